"""Every method behind the shared interface: the loop, the base pipeline left alone, targets, storage, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from state_helpers import changed, module_state

from diffusers_infusion.baselines import METHODS, PersonalizationMethod, train_method
from diffusers_infusion.baselines.dreambooth import DreamBoothMethod

OWN = ["dreambooth", "dreambooth_lora", "textual_inversion", "custom_diffusion", "infusion", "infusion_own_queries"]
LR = 1e-2  # visible changes in a few steps on the tiny model


def make(name: str, pipe, **options) -> PersonalizationMethod:
    if name == "dreambooth":
        options.setdefault("save_precision", "fp32")  # exact round trip (fp16 is tested in test_dreambooth.py)
    return METHODS[name](pipe, class_word="cat", learning_rate=LR, **options)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def test_registry_names_every_method():
    assert set(OWN) <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.default_learning_rate > 0 and cls.toy_learning_rate > 0


@pytest.mark.parametrize("name", OWN)
def test_trains_finite_and_leaves_base_pipe_untouched(name, base_pipe, data):
    before = module_state(base_pipe)
    flags = {n: p.requires_grad for n, p in base_pipe.unet.named_parameters()}
    method = make(name, base_pipe)
    start = [p.detach().clone() for p in method.trainable_parameters()]
    losses = train_method(method, data, steps=3, progress=False)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any(not torch.equal(a, p) for a, p in zip(start, method.trainable_parameters()))
    assert changed(before, module_state(base_pipe)) == set()
    assert {n: p.requires_grad for n, p in base_pipe.unet.named_parameters()} == flags
    assert all(p.grad is None for p in base_pipe.unet.parameters())


@pytest.mark.parametrize("name", OWN)
def test_v_prediction_loss_regresses_the_velocity(name, vpred_pipe, data):
    method = make(name, vpred_pipe)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn((2, 4, 8, 8), generator=g)
    noise, t = torch.randn((2, 4, 8, 8), generator=g), torch.tensor([10, 900])
    captions = data.captions[0][:2]
    loss = method.training_loss(latents, captions, noise=noise, timesteps=t)
    with torch.no_grad():  # untrained: every method still predicts with its own UNet on its own prompt
        noisy = method.noise_scheduler.add_noise(latents, noise, t)
        enc = method.encode_prompts([method.concept_prompt(c) for c in captions])
        pred = method.pipe.unet(noisy, t, enc).sample
    velocity = method.noise_scheduler.get_velocity(latents, noise, t)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, velocity), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, torch.nn.functional.mse_loss(pred, noise), rtol=1e-3)
    assert all(np.isfinite(train_method(method, data, steps=2, progress=False)))


@pytest.mark.parametrize("name", OWN)
def test_save_load_round_trip_and_storage(name, base_pipe, data, tmp_path):
    method = make(name, base_pipe)
    train_method(method, data, steps=3, progress=False)
    folder = method.save(tmp_path / name)
    assert method.storage_bytes() == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert not [f for f in folder.rglob("*") if f.suffix in (".bin", ".ckpt", ".pt", ".pkl")]
    loaded = METHODS[name].load(base_pipe, folder)
    prompts = ["a cat on snow", "a photo of a cat at night"]
    kwargs = dict(seed=3, num_inference_steps=3)
    assert np.array_equal(pixels(method.generate(prompts, **kwargs)), pixels(loaded.generate(prompts, **kwargs)))
    x, t = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    assert torch.equal(method.noise_prediction(x, t, ["a cat"]), loaded.noise_prediction(x, t, ["a cat"]))


def test_load_refuses_another_methods_folder(base_pipe, tmp_path):
    folder = make("textual_inversion", base_pipe).save(tmp_path / "ti")
    with pytest.raises(ValueError, match="textual_inversion"):
        METHODS["custom_diffusion"].load(base_pipe, folder)
    with pytest.raises(FileNotFoundError, match="save"):
        METHODS["custom_diffusion"].load(base_pipe, tmp_path)


@pytest.mark.parametrize("name", OWN)
def test_training_is_reproducible_from_the_seed(name, base_pipe, data):
    runs = []
    for seed in (0, 0, 1):
        method = make(name, base_pipe)
        losses = train_method(method, data, steps=2, seed=seed, progress=False)
        runs.append((losses, [p.detach().clone() for p in method.trainable_parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][0] != runs[2][0]


def test_snapshot_callback_runs_after_the_given_steps(base_pipe, data):
    method = make("textual_inversion", base_pipe)
    seen = []
    callback = lambda step, m: seen.append((step, m, m.trainable_parameters()[0].detach().clone()))  # noqa: E731
    train_method(method, data, steps=5, snapshot_at=(2, 5), callback=callback, progress=False)
    assert [(s, m) for s, m, _ in seen] == [(2, method), (5, method)]
    assert not torch.equal(seen[0][2], seen[1][2])  # the state at step 2, not the end state
    replay = make("textual_inversion", base_pipe)
    train_method(replay, data, steps=2, progress=False)
    assert torch.equal(replay.trainable_parameters()[0], seen[0][2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(steps=-1), "steps=-1"), (dict(steps=3, batch_size=0), "batch_size=0"),
     (dict(steps=3, snapshot_at=(0, 4)), "snapshot_at")],
)  # fmt: skip
def test_train_method_rejects_bad_arguments(kwargs, match, base_pipe, data):
    with pytest.raises(ValueError, match=match):
        train_method(make("textual_inversion", base_pipe), data, progress=False, **kwargs)


def test_constructor_rejects_bad_arguments(base_pipe):
    with pytest.raises(ValueError, match="class_word"):
        DreamBoothMethod(base_pipe, class_word=" ")
    with pytest.raises(ValueError, match="learning_rate=-1"):
        DreamBoothMethod(base_pipe, class_word="cat", learning_rate=-1)
    assert DreamBoothMethod(base_pipe, class_word="cat").learning_rate == DreamBoothMethod.default_learning_rate


def test_generate_seeds_image_i_with_seed_plus_i(base_pipe):
    method = make("dreambooth_lora", base_pipe)
    kwargs = dict(num_inference_steps=3)
    both = pixels(method.generate(["a cat", "a cat on snow"], seed=5, batch_size=1, **kwargs))
    assert np.array_equal(both, pixels(method.generate(["a cat", "a cat on snow"], seed=5, **kwargs)))
    assert np.array_equal(both[1:], pixels(method.generate(["a cat on snow"], seed=6, **kwargs)))
    assert not np.array_equal(both[0], pixels(method.generate(["a cat"], seed=6, **kwargs))[0])
