"""InfusionXLPipeline on a tiny SDXL-shaped pipeline: exactness, both tokenizers, size conditioning, SD 1.5 refusal."""

import logging

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

from diffusers_infusion import ConceptMismatchError, InfusionCallError, InfusionConcept, InfusionXLPipeline
from diffusers_infusion.configs import SDXL_UNET, build_unet
from diffusers_infusion.reference import naive_infusion_latents
from diffusers_infusion.tiny import tiny_sd_components, tiny_sdxl_components
from diffusers_infusion.tokens import find_class_word_positions

STEPS = 3


@pytest.fixture
def xl_components():
    return tiny_sdxl_components(seed=0)


@pytest.fixture
def xl(xl_components):
    pipe = InfusionXLPipeline(**xl_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_unet_on_meta():
    return build_unet(SDXL_UNET)


def test_sdxl_concept_has_70_layers_and_83200_values():
    concept = InfusionConcept.zeros(sdxl_unet_on_meta(), "cat")
    assert len(concept.residuals) == 70 and concept.num_values == 83_200


def test_sd15_concept_is_refused_on_sdxl(xl):
    sd15 = InfusionConcept.zeros(tiny_sd_components()["unet"], "cat", base_model="tiny-sd-1.5")
    with pytest.raises(ConceptMismatchError, match="does not fit this UNet.*made for base model 'tiny-sd-1.5'"):
        xl.load_infusion_concept(sd15)


def test_plain_output_without_concept(xl, xl_components):
    sdxl = StableDiffusionXLPipeline(**xl_components)
    sdxl.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=STEPS, output_type="np", original_size=(24, 24), target_size=(16, 16))
    expected = sdxl("a photo of a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    xl.load_infusion_concept(InfusionConcept.zeros(xl.unet, "cat"))
    out = xl("a photo of a dog", generator=torch.Generator().manual_seed(0), return_base_images=True, **kwargs)
    assert (out.images == expected).all() and (out.base_images == expected).all()


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_fused_equals_naive(xl, make_concept, scheduler):
    xl.to(dtype=torch.float64)
    if scheduler == "dpm++":
        xl.scheduler = DPMSolverMultistepScheduler.from_config(xl.scheduler.config)
    concept = make_concept(xl.unet, "cat")
    xl.load_infusion_concept(concept, "cat")
    prompt = "a cat on the beach"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = xl(prompt, num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=5.0,
             return_base_images=True)  # fmt: skip
    positions = find_class_word_positions(xl.tokenizer, prompt, "cat")
    naive_f, naive_c = naive_infusion_latents(xl, prompt, [(concept.residuals, 1.0, positions)], latents=noise,
                                              num_inference_steps=STEPS, guidance_scale=5.0)  # fmt: skip
    assert (out.base_images - naive_f).abs().max() < 1e-9
    assert (out.images - naive_c).abs().max() < 1e-9
    assert (out.images - out.base_images).abs().max() > 1e-2


def test_zero_residuals_and_size_conditioning_kept(xl):
    xl.load_infusion_concept(InfusionConcept.zeros(xl.unet, "cat"))
    seen = []
    handle = xl.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]),
                                               with_kwargs=True)  # fmt: skip
    out = xl("a cat", num_inference_steps=2, output_type="latent", return_base_images=True,
             original_size=(40, 32), target_size=(16, 16))  # fmt: skip
    handle.remove()
    assert torch.allclose(out.images, out.base_images, atol=1e-6)
    time_ids = seen[0]["time_ids"]  # (uncond F, uncond C, cond F, cond C) rows
    assert time_ids.shape[0] == 4 and (time_ids[:, :2] == torch.tensor([40.0, 32.0])).all()
    assert seen[0]["text_embeds"].shape[0] == 4  # pooled embeddings, row by row


def test_class_word_must_match_in_both_prompts(xl, make_concept, caplog):
    xl.load_infusion_concept(make_concept(xl.unet, "cat"))
    with pytest.raises(InfusionCallError, match="positions \\[2\\] of prompt 0 for tokenizer but at \\[5\\]"):
        xl("a cat", prompt_2="a photo of a cat", num_inference_steps=1)
    xl("a cat", prompt_2="a cat on snow", num_inference_steps=1, output_type="latent")  # same positions: fine
    # a prompt_2 without the word (a style prompt, as in diffusers' multi-prompt test): prompt's positions, a warning
    kwargs = dict(num_inference_steps=2, output_type="latent", return_base_images=True)
    with caplog.at_level(logging.WARNING):
        out = xl("a cat", prompt_2="an oil painting", generator=torch.Generator().manual_seed(0), **kwargs)
    assert any("prompt_2 0 has no 'cat'" in r.getMessage() for r in caplog.records)
    assert not torch.allclose(out.images, out.base_images, atol=1e-4)  # the concept acts at "cat" of prompt


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offload_leaves_the_output_unchanged(xl_components, make_concept, cpu_sequential_offload, offload):
    kwargs = dict(num_inference_steps=2, output_type="latent", original_size=(24, 24), target_size=(16, 16))
    outputs = []
    for enable in (False, True):
        pipe = InfusionXLPipeline(**tiny_sdxl_components(seed=0))
        pipe.set_progress_bar_config(disable=True)
        pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
        if enable:
            getattr(pipe, f"enable_{offload}_cpu_offload")(device="cpu")
            assert hasattr(pipe.unet, "_hf_hook") and hasattr(pipe.text_encoder_2, "_hf_hook")
        out = pipe("a cat", generator=torch.Generator().manual_seed(0), return_base_images=True, **kwargs)
        outputs.append(out)
    plain, offloaded = outputs
    assert torch.allclose(offloaded.images, plain.images, atol=1e-6)
    assert torch.allclose(offloaded.base_images, plain.base_images, atol=1e-6)
    assert not torch.allclose(plain.images, plain.base_images, atol=1e-3)
