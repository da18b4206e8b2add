"""DreamBooth: the whole (copied) UNet trains; identifier prompts; fp16 storage."""

from __future__ import annotations

import pytest
import torch
from state_helpers import changed, module_state

from diffusers_infusion.baselines import DreamBoothMethod, train_method


def test_only_the_unet_changes(base_pipe, data):
    method = DreamBoothMethod(base_pipe, class_word="cat", learning_rate=1e-3)
    before = module_state(method.pipe)
    train_method(method, data, steps=2, progress=False)
    moved = changed(before, module_state(method.pipe))
    assert moved and all(name.startswith("unet.") for name in moved)
    assert len(method.trainable_parameters()) == len(list(base_pipe.unet.parameters()))


def test_concept_prompt_puts_the_identifier_before_the_class_word(base_pipe):
    method = DreamBoothMethod(base_pipe, class_word="cat", identifier="my")
    assert method.concept_prompt("a cat next to a Cat") == "a my cat next to a my cat"
    assert method.concept_prompt("a catalog on a dog") == "a catalog on a dog"
    assert DreamBoothMethod(base_pipe, class_word="cat").concept_prompt("a cat") == "a sks cat"


def test_fp16_storage_rounds_the_weights(base_pipe, data, tmp_path):
    method = DreamBoothMethod(base_pipe, class_word="cat", learning_rate=1e-3)
    train_method(method, data, steps=2, progress=False)
    folder = method.save(tmp_path / "db")
    n_values = sum(t.numel() for t in method.pipe.unet.state_dict().values())
    weights = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 2 * n_values <= weights < 2 * n_values + 100_000  # fp16 plus the header
    loaded = DreamBoothMethod.load(base_pipe, folder)
    for (name, got), want in zip(loaded.pipe.unet.state_dict().items(), method.pipe.unet.state_dict().values()):
        assert torch.equal(got, want.half().float()), name


def _naive_prior_loss(method, latents, captions, class_latents, noise, timesteps, prior_noise, prior_steps):
    """eq. 2 of DreamBooth written out: two separate UNet calls, one per half, then the weighted sum."""
    mse = torch.nn.functional.mse_loss

    def half(z0, eps, t, prompts):
        noisy = method.noise_scheduler.add_noise(z0, eps, t)
        pred = method.pipe.unet(noisy, t, method.encode_prompts(prompts), return_dict=False)[0]
        return mse(pred, method.target(z0, eps, t))

    instance = half(latents, noise, timesteps, [method.concept_prompt(c) for c in captions])
    prior = half(class_latents, prior_noise, prior_steps, [method.class_prompt] * len(latents))
    return instance + method.prior_loss_weight * prior


def test_prior_preservation_adds_the_weighted_class_loss(base_pipe):
    """The loss is the photos' loss + prior_loss_weight x the class images' loss (eq. 2), as a naive reference
    computes it; the class images are drawn once, by the base model, from seeds prior_seed + i."""
    method = DreamBoothMethod(base_pipe, class_word="cat", prior_preservation=True, num_class_images=3,
                              prior_loss_weight=0.5, prior_seed=7)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    timesteps, captions = torch.tensor([10, 900]), ["a photo of a cat", "a cat on the grass"]
    with torch.no_grad():
        got = method.training_loss(latents, captions, noise=noise, timesteps=timesteps)
    assert method.class_latents.shape == (3, 4, 8, 8)
    replay = torch.Generator().manual_seed(7)  # the method's own draws: picks, noise, timesteps
    picks = torch.randint(3, (2,), generator=replay)
    prior_noise = torch.randn(latents.shape, generator=replay)
    prior_steps = torch.randint(method.noise_scheduler.config.num_train_timesteps, (2,), generator=replay)
    with torch.no_grad():
        want = _naive_prior_loss(method, latents, captions, method.class_latents[picks], noise, timesteps,
                                 prior_noise, prior_steps)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    first = method.class_latents
    with torch.no_grad():
        method.training_loss(latents, captions, noise=noise, timesteps=timesteps)
    assert method.class_latents is first  # drawn once
    again = DreamBoothMethod(base_pipe, class_word="cat", prior_preservation=True, num_class_images=3, prior_seed=7)
    torch.testing.assert_close(again.draw_class_images(height=16, width=16), first)  # seeded
    base_images = base_pipe(["a photo of a cat"], height=16, width=16, num_inference_steps=25, output_type="pt",
                            generator=[torch.Generator().manual_seed(8)]).images  # fmt: skip
    assert not torch.equal(first[0], first[1])
    from diffusers_infusion.baselines.base import encode_photos

    torch.testing.assert_close(encode_photos(base_pipe, base_images * 2 - 1)[0], first[1])  # image 1: seed 7 + 1


def test_prior_weight_zero_is_plain_dreambooth(base_pipe):
    plain = DreamBoothMethod(base_pipe, class_word="cat")
    prior = DreamBoothMethod(base_pipe, class_word="cat", prior_preservation=True, num_class_images=2,
                             prior_loss_weight=0.0)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    latents, noise = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    kwargs = dict(noise=noise, timesteps=torch.tensor([3, 500]))
    with torch.no_grad():
        want = plain.training_loss(latents, ["a cat", "a photo of a cat"], **kwargs)
        got = prior.training_loss(latents, ["a cat", "a photo of a cat"], **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_prior_options_survive_save_and_load(base_pipe, data, tmp_path):
    method = DreamBoothMethod(base_pipe, class_word="cat", learning_rate=1e-3, prior_preservation=True,
                              num_class_images=2, class_prompt="a cat", prior_loss_weight=0.3,
                              prior_seed=5)  # fmt: skip
    train_method(method, data, steps=2, progress=False)
    loaded = DreamBoothMethod.load(base_pipe, method.save(tmp_path / "db"))
    assert loaded.options() == method.options()
    assert loaded.options()["class_prompt"] == "a cat" and loaded.class_latents is None  # no images drawn to load
    assert "prior_preservation" not in DreamBoothMethod(base_pipe, class_word="cat").options()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_class_images": 0}, "num_class_images=0"),
        ({"prior_loss_weight": -1.0}, "prior_loss_weight=-1.0"),
        ({"class_prompt": "  "}, "class_prompt='  ' is empty"),
    ],
)
def test_bad_prior_options_are_refused(base_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DreamBoothMethod(base_pipe, class_word="cat", prior_preservation=True, **kwargs)


def test_train_text_encoder_trains_and_saves_both(base_pipe, data, tmp_path):
    """diffusers' --train_text_encoder: the copied text encoder trains too (the base's stays), and both come back
    from the saved folder exactly (fp32)."""
    base_state = module_state(base_pipe)
    method = DreamBoothMethod(base_pipe, class_word="cat", learning_rate=1e-3, train_text_encoder=True,
                              save_precision="fp32")  # fmt: skip
    before = module_state(method.pipe)
    train_method(method, data, steps=2, progress=False)
    moved = changed(before, module_state(method.pipe))
    assert {name.split(".")[0] for name in moved} == {"unet", "text_encoder"}
    assert not changed(base_state, module_state(base_pipe))
    folder = method.save(tmp_path / "db")
    assert (folder / "text_encoder" / "model.safetensors").exists()
    loaded = DreamBoothMethod.load(base_pipe, folder)
    assert loaded.options()["train_text_encoder"] is True
    assert not changed(module_state(method.pipe), module_state(loaded.pipe))
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors' is missing"):
        DreamBoothMethod.load(base_pipe, folder)
