"""LoRA files through diffusers' ``load_lora_weights`` (peft backend) next to Infusion concepts, in either order."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_infusion import InfusionPipeline
from diffusers_infusion.tiny import tiny_sd_components

KWARGS = dict(num_inference_steps=2, output_type="latent")
PROMPT = "a cat on the grass"


def fresh(cls, lora_dir=None):
    """A pipeline of ``cls`` on fresh tiny components (nothing shared), with the LoRA file loaded if given."""
    pipe = cls(**tiny_sd_components(seed=0), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, adapter_name="style")
    return pipe


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_file_and_concept_in_either_order(lora_dir, make_concept, gen, lora_first):
    pipe = fresh(InfusionPipeline)
    concept = make_concept(pipe.unet, "cat")
    if lora_first:
        pipe.load_lora_weights(lora_dir, adapter_name="style")
    pipe.load_infusion_concept(concept, "cat")
    if not lora_first:
        pipe.load_lora_weights(lora_dir, adapter_name="style")
    plain_lora = fresh(StableDiffusionPipeline, lora_dir)
    out = pipe(PROMPT, generator=gen(), return_base_images=True, **KWARGS)
    with_lora = plain_lora(PROMPT, generator=gen(), **KWARGS).images
    without_lora = fresh(StableDiffusionPipeline)(PROMPT, generator=gen(), **KWARGS).images
    assert torch.allclose(out.base_images, with_lora, atol=1e-5)  # F is the plain pipeline with the LoRA
    assert not torch.allclose(with_lora, without_lora, atol=1e-3)  # the LoRA does act
    assert not torch.allclose(out.images, out.base_images, atol=1e-3)  # and the concept acts on top of it

    pipe.unload_lora_weights()
    only_concept = fresh(InfusionPipeline)
    only_concept.load_infusion_concept(concept, "cat")
    out = pipe(PROMPT, generator=gen(), return_base_images=True, **KWARGS)
    assert torch.equal(out.images, only_concept(PROMPT, generator=gen(), **KWARGS).images)
    assert torch.allclose(out.base_images, without_lora, atol=1e-5)  # F batched with C: float rounding only


@pytest.mark.parametrize("lora_first", [True, False])
def test_unloading_the_concept_leaves_the_lora_file(lora_dir, make_concept, gen, lora_first):
    pipe = fresh(InfusionPipeline, lora_dir if lora_first else None)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"), "cat")
    if not lora_first:
        pipe.load_lora_weights(lora_dir, adapter_name="style")
    pipe(PROMPT, generator=gen(), **KWARGS)  # a call with the concept, then unload it
    pipe.unload_infusion_concept()
    out = pipe(PROMPT, generator=gen(), **KWARGS).images
    assert torch.equal(out, fresh(StableDiffusionPipeline, lora_dir)(PROMPT, generator=gen(), **KWARGS).images)


def test_lora_scale_and_set_adapters_reach_the_f_stream(lora_dir, make_concept, gen):
    """``cross_attention_kwargs={"scale": s}`` and ``set_adapters`` weights act in F exactly as in the plain call."""
    pipe, plain = fresh(InfusionPipeline, lora_dir), fresh(StableDiffusionPipeline, lora_dir)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"), "cat")

    def both(**kwargs):
        out = pipe(PROMPT, generator=gen(), return_base_images=True, **kwargs, **KWARGS)
        return out, plain(PROMPT, generator=gen(), **kwargs, **KWARGS).images

    full, full_plain = both()
    half, half_plain = both(cross_attention_kwargs={"scale": 0.5})
    assert torch.allclose(half.base_images, half_plain, atol=1e-5)
    assert not torch.allclose(half_plain, full_plain, atol=1e-3)  # the scale does reach the UNet's LoRA layers
    assert not torch.allclose(half.images, half.base_images, atol=1e-3)
    off, _ = both(cross_attention_kwargs={"scale": 0.0})
    no_lora = fresh(StableDiffusionPipeline)(PROMPT, generator=gen(), **KWARGS).images
    assert torch.allclose(off.base_images, no_lora, atol=1e-5)

    pipe.set_adapters(["style"], adapter_weights=[0.5])  # the UNet is the pipeline's own: plain gets it too
    plain.set_adapters(["style"], adapter_weights=[0.5])
    weighted, weighted_plain = both()
    assert torch.allclose(weighted.base_images, weighted_plain, atol=1e-5)
    assert torch.allclose(weighted_plain, half_plain, atol=1e-5)  # adapter weight 0.5 == call scale 0.5
    assert torch.allclose(weighted.images, half.images, atol=1e-5)  # and so the C stream too
