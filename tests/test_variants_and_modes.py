"""One F stream for several concept variants, and the single-stream 'fast' mode (own queries)."""

import pytest
import torch

from diffusers_infusion import InfusionCallError
from diffusers_infusion.reference import naive_infusion_latents
from diffusers_infusion.tokens import find_class_word_positions

STEPS = 3


@pytest.fixture
def two_concepts(pipe, make_concept):
    pipe.to(dtype=torch.float64)
    cat, dog = make_concept(pipe.unet, "cat", seed=1), make_concept(pipe.unet, "dog", seed=2)
    pipe.load_infusion_concept(cat, "cat")
    pipe.load_infusion_concept(dog, "dog")
    return pipe, cat, dog


def test_variants_equal_separate_calls(two_concepts):
    pipe, _, _ = two_concepts
    prompts = ["a cat and a dog", "a red car"]
    variants = [{"cat": 1.0}, {"cat": 0.5}, {"dog": 1.0}, {"cat": 1.0, "dog": 0.7}]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = dict(num_inference_steps=STEPS, latents=noise, output_type="latent")
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    out = pipe(prompts, infusion_variants=variants, return_base_images=True, **kwargs)
    handle.remove()
    assert batches[0] == 2 * (2 + 4)  # F once for both prompts; one C row per variant for the first prompt only
    assert out.images.shape[0] == 2 * len(variants)
    for v, variant in enumerate(variants):
        separate = pipe(prompts, infusion_concepts=variant, return_base_images=True, **kwargs)
        assert (out.images[2 * v : 2 * v + 2] - separate.images).abs().max() < 1e-9, variant
        assert (out.base_images - separate.base_images).abs().max() < 1e-9


def test_variants_without_any_concept_are_the_plain_images(two_concepts, sd_pipe):
    pipe, _, _ = two_concepts
    out = pipe("a red car", infusion_variants=[{"cat": 1.0}, {"dog": 1.0}], num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
    plain = sd_pipe("a red car", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images  # fmt: skip
    assert torch.equal(out.images, torch.cat([plain, plain]))


def test_fast_mode_is_one_stream_with_own_queries(two_concepts):
    pipe, cat, _ = two_concepts
    prompt = "a photo of a cat"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    fast = pipe(prompt, num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=6.0,
                infusion_concepts={"cat": 1.0}, infusion_mode="fast").images  # fmt: skip
    handle.remove()
    assert batches == [2] * STEPS  # the cost of a plain call
    positions = find_class_word_positions(pipe.tokenizer, prompt, "cat")
    _, own = naive_infusion_latents(pipe, prompt, [(cat.residuals, 1.0, positions)], latents=noise,
                                    num_inference_steps=STEPS, guidance_scale=6.0, own_queries=True)  # fmt: skip
    _, exact = naive_infusion_latents(pipe, prompt, [(cat.residuals, 1.0, positions)], latents=noise,
                                      num_inference_steps=STEPS, guidance_scale=6.0)  # fmt: skip
    assert (fast - own).abs().max() < 1e-9
    assert (fast - exact).abs().max() > 1e-3  # and it is not the paper's method


def test_mode_errors(two_concepts):
    pipe, _, _ = two_concepts
    with pytest.raises(InfusionCallError, match="infusion_mode='slow' must be"):
        pipe("a cat", num_inference_steps=1, infusion_mode="slow")
    with pytest.raises(InfusionCallError, match="return_base_images=True needs infusion_mode='exact'"):
        pipe("a cat", num_inference_steps=1, infusion_mode="fast", return_base_images=True)
    with pytest.raises(InfusionCallError, match="not both"):
        pipe("a cat", num_inference_steps=1, infusion_mode="exact", infusion_variants=[{}], infusion_concepts={})
    with pytest.raises(InfusionCallError, match="non-empty list of dicts"):
        pipe("a cat", num_inference_steps=1, infusion_variants=[])
