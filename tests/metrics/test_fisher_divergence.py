"""Latent Fisher divergence (eq. 4): zero where the model is unchanged, positive where it is, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig

from diffusers_infusion import InfusionPipeline
from diffusers_infusion.baselines import InfusionMethod, LoRAMethod, copy_module
from diffusers_infusion.metrics import fisher_divergence_samples, latent_fisher_divergence, to_epsilon, to_pil
from diffusers_infusion.training.data import InstanceData

WITHOUT = ["a photo of a dog on the grass", "a red car at night", "a book next to a cup", "the moon"]
WITH = ["a photo of a cat on the grass", "a red cat at night", "a book next to a cat", "my cat"]
FAST = dict(num_samples_per_image=2, progress=False)


@pytest.fixture
def images() -> torch.Tensor:
    """Four seeded 16x16 'real images' in [-1, 1]."""
    return torch.rand((4, 3, 16, 16), generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_infusion_is_exactly_zero_without_the_class_word(pipe, make_concept, images):
    """METHOD.md property 4: no class word, no change, to the last bit; the class word changes the prediction."""
    concept = make_concept(pipe.unet, "cat")
    assert latent_fisher_divergence(pipe, concept, images, WITHOUT, **FAST) == 0.0
    assert latent_fisher_divergence(pipe, concept, images, WITH, **FAST) > 0.0
    method = InfusionMethod(pipe, class_word="cat")  # the same through the baselines' dual-stream callable
    method.residuals.load_concept(concept)
    assert latent_fisher_divergence(pipe, method.noise_prediction, images, WITHOUT, **FAST) == 0.0


def test_mixed_captions_only_rows_with_the_class_word_differ(pipe, make_concept, images):
    concept = make_concept(pipe.unet, "cat")
    captions = [WITH[0], WITHOUT[1], WITH[2], WITHOUT[3]]
    terms = fisher_divergence_samples(pipe, concept, images, captions, **FAST).view(4, 2)  # (image, draw)
    assert (terms[[1, 3]] == 0).all()
    assert (terms[[0, 2]] > 0).all()


def test_every_way_of_naming_an_infusion_concept_gives_the_same_number(pipe, make_concept, images):
    concept = make_concept(pipe.unet, "cat")
    reference = latent_fisher_divergence(pipe, concept, images, WITH, **FAST)
    pipe.load_infusion_concept(concept, adapter_name="mine")
    assert latent_fisher_divergence(pipe, "mine", images, WITH, **FAST) == pytest.approx(reference, rel=1e-3)
    assert latent_fisher_divergence(pipe, ["mine"], images, WITH, **FAST) == pytest.approx(reference, rel=1e-3)
    assert latent_fisher_divergence(pipe, pipe, images, WITH, **FAST) == pytest.approx(reference, rel=1e-3)
    assert latent_fisher_divergence(pipe, {"mine": 0.0}, images, WITH, **FAST) == 0.0
    half = latent_fisher_divergence(pipe, {"mine": 0.5}, images, WITH, **FAST)
    assert 0 < half < reference
    method = InfusionMethod(pipe, class_word="cat")  # the baselines' callable
    method.residuals.load_concept(concept)
    value = latent_fisher_divergence(pipe, method.noise_prediction, images, WITH, **FAST)
    assert value == pytest.approx(reference, rel=1e-3)


def test_two_concepts_each_count_only_with_their_class_word(pipe, make_concept, images):
    cat, dog = make_concept(pipe.unet, "cat", seed=1), make_concept(pipe.unet, "dog", seed=2)
    captions = ["a cat", "a dog", "a car", "a cat and a dog"]
    terms = fisher_divergence_samples(pipe, [cat, dog], images, captions, **FAST).view(4, 2)
    assert (terms[2] == 0).all() and (terms[[0, 1, 3]] > 0).all()
    only_cat = fisher_divergence_samples(pipe, cat, images, captions, **FAST).view(4, 2)
    assert torch.equal(terms[0], only_cat[0]) and (only_cat[1] == 0).all()


def test_base_pipeline_against_itself_is_zero(sd_pipe, images):
    assert latent_fisher_divergence(sd_pipe, sd_pipe, images, WITH, **FAST) == 0.0
    twin = InfusionPipeline.from_pipe(sd_pipe)  # same modules, no concept: the plain model
    assert latent_fisher_divergence(sd_pipe, twin, images, WITH, **FAST) == 0.0


def test_lora_fine_tune_is_positive_on_any_caption(sd_pipe, images):
    unet = copy_module(sd_pipe.unet)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "to_v"]))
    tuned = StableDiffusionPipeline(**{**sd_pipe.components, "unet": unet})
    assert latent_fisher_divergence(sd_pipe, tuned, images, WITHOUT, **FAST) > 0.0


def test_baseline_method_callable_zero_before_training_positive_after(sd_pipe, images):
    method = LoRAMethod(sd_pipe, class_word="cat", learning_rate=1e-2)  # B = 0: the base model exactly
    assert latent_fisher_divergence(sd_pipe, method.noise_prediction, images, WITHOUT, **FAST) == 0.0
    data = InstanceData(pixels=images, captions=[["a photo of a cat"]] * 4, masks=None, files=["a"] * 4)
    from diffusers_infusion.baselines import train_method

    train_method(method, data, steps=2, progress=False)
    assert latent_fisher_divergence(sd_pipe, method.noise_prediction, images, WITHOUT, **FAST) > 0.0


def test_same_seed_same_value_any_batch_size_and_input_format(pipe, make_concept, images):
    concept = make_concept(pipe.unet, "cat")
    first = latent_fisher_divergence(pipe, concept, images, WITH, seed=5, **FAST)
    assert latent_fisher_divergence(pipe, concept, images, WITH, seed=5, **FAST) == first
    assert latent_fisher_divergence(pipe, concept, images, WITH, seed=6, **FAST) != first
    # Other batch shapes round differently in float32; D_F is a small difference of near-equal outputs.
    other_batches = latent_fisher_divergence(pipe, concept, images, WITH, seed=5, batch_size=3, **FAST)
    assert other_batches == pytest.approx(first, rel=1e-3)
    pil = to_pil(images)  # 8-bit images: compare with their exact tensor form
    as_tensor = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pil])
    from_pil = latent_fisher_divergence(pipe, concept, pil, WITH, **FAST)
    from_tensor = latent_fisher_divergence(pipe, concept, as_tensor.float() / 127.5 - 1, WITH, **FAST)
    assert from_pil == pytest.approx(from_tensor, rel=1e-3)


def test_to_epsilon_inverts_v_and_sample_predictions():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn((5, 4, 8, 8), generator=g), torch.randn((5, 4, 8, 8), generator=g)
    t = torch.tensor([0, 10, 250, 700, 999])
    zt = scheduler.add_noise(z0, eps, t)
    kw = dict(alphas_cumprod=scheduler.alphas_cumprod)
    v = scheduler.get_velocity(z0, eps, t)
    torch.testing.assert_close(to_epsilon(v, zt, t, prediction_type="v_prediction", **kw), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(to_epsilon(z0[1:], zt[1:], t[1:], prediction_type="sample", **kw), eps[1:],
                               atol=1e-3, rtol=0)  # fmt: skip
    assert to_epsilon(eps, zt, t, prediction_type="epsilon", **kw) is not None
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        to_epsilon(eps, zt, t, prediction_type="flow", **kw)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_constant_offset_matches_a_hand_computation(components, images, prediction_type):
    """custom = base + c: ½c² per element for ε; ½c²·ᾱ_t for v (ε̂ = √ᾱ·v̂ + √(1−ᾱ)·z_t, the z_t terms cancel)."""
    components["scheduler"] = DDIMScheduler.from_config(
        components["scheduler"].config, prediction_type=prediction_type
    )
    base = StableDiffusionPipeline(**components, requires_safety_checker=False)
    seen: list[torch.Tensor] = []

    def shifted(latents, timesteps, captions):
        seen.append(timesteps)
        encodings = base.encode_prompt(captions, "cpu", 1, False)[0]
        return base.unet(latents, timesteps, encodings, return_dict=False)[0] + 0.3

    value = latent_fisher_divergence(base, shifted, images, WITHOUT, **FAST)
    alphas = DDPMScheduler.from_config(base.scheduler.config).alphas_cumprod.double()
    weight = alphas[torch.cat(seen)] if prediction_type == "v_prediction" else torch.ones(len(torch.cat(seen)))
    assert value == pytest.approx(float((0.5 * 0.3**2 * weight).mean()), rel=1e-4)


def test_bad_arguments_say_what_to_do(pipe, sd_pipe, make_concept, images):
    concept = make_concept(pipe.unet, "cat")
    with pytest.raises(ValueError, match="captions has 2 entries for 4 images"):
        latent_fisher_divergence(pipe, concept, images, WITH[:2], progress=False)
    with pytest.raises(ValueError, match="num_samples_per_image=0"):
        latent_fisher_divergence(pipe, concept, images, WITH, num_samples_per_image=0, progress=False)
    with pytest.raises(TypeError, match="Load them in an InfusionPipeline"):
        latent_fisher_divergence(sd_pipe, "mine", images, WITH, progress=False)
    with pytest.raises(TypeError, match="custom is of type int"):
        latent_fisher_divergence(pipe, 3, images, WITH, progress=False)
    with pytest.raises(ValueError, match="read as \\[-1, 1\\]"):
        latent_fisher_divergence(pipe, concept, images * 255, WITH, progress=False)
    with pytest.raises(ValueError, match="custom returned shape"):
        latent_fisher_divergence(pipe, lambda z, t, c: z[:, :1], images, WITH, progress=False)
