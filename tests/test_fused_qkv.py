"""Fused QKV projections (``fuse_qkv_projections()``): the value residual on ``to_kv``'s value half, exactly.

The naive reference (``diffusers_infusion.reference``) computes with the unfused ``to_q``/``to_k``/``to_v`` of the
same layers, so "fused = naive" checks the fused path against an independent computation.
"""

import pytest
import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0

from diffusers_infusion import InfusionXLPipeline
from diffusers_infusion.attention import cross_attention_layers
from diffusers_infusion.reference import naive_infusion_latents
from diffusers_infusion.tiny import tiny_sdxl_components
from diffusers_infusion.tokens import find_class_word_positions

STEPS = 3


def _count_calls(unet):
    """Count calls of every cross-attention layer's ``to_v`` and ``to_kv`` during the ``with`` block."""
    calls, handles = {"to_v": 0, "to_kv": 0}, []
    for attn in cross_attention_layers(unet).values():
        for kind in calls:
            if hasattr(attn, kind):
                handles.append(getattr(attn, kind).register_forward_hook(
                    lambda *a, kind=kind: calls.__setitem__(kind, calls[kind] + 1)))  # fmt: skip
    return calls, handles


def _check_against_naive(pipe, concept, prompt, *, fused: bool, guidance_scale: float):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls, handles = _count_calls(pipe.unet)
    out = pipe(prompt, num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=guidance_scale,
               return_base_images=True)  # fmt: skip
    for handle in handles:
        handle.remove()
    # the value went through the module under test: to_kv when fused, to_v when not
    assert (calls["to_kv"] > 0, calls["to_v"] > 0) == (fused, not fused), calls
    positions = find_class_word_positions(pipe.tokenizer, prompt, concept.class_word)
    naive_f, naive_c = naive_infusion_latents(pipe, prompt, [(concept.residuals, 1.0, positions)], latents=noise,
                                              num_inference_steps=STEPS, guidance_scale=guidance_scale)  # fmt: skip
    assert (out.base_images - naive_f).abs().max() < 1e-9
    assert (out.images - naive_c).abs().max() < 1e-9
    assert (out.images - out.base_images).abs().max() > 1e-2  # the concept does act
    return out


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_fused_projections_equal_naive_and_survive_unfuse_and_fuse(pipe, make_concept, xl):
    if xl:
        pipe = InfusionXLPipeline(**tiny_sdxl_components(seed=0))
        pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype=torch.float64)
    concept = make_concept(pipe.unet, "cat")
    pipe.load_infusion_concept(concept, "cat")
    prompt, scale = "a cat on the beach next to a cat", 5.0
    unfused = _check_against_naive(pipe, concept, prompt, fused=False, guidance_scale=scale)

    pipe.fuse_qkv_projections()  # concepts loaded: fuse, unfuse and fuse again
    assert all(isinstance(a.processor, FusedAttnProcessor2_0) for a in cross_attention_layers(pipe.unet).values())
    fused = _check_against_naive(pipe, concept, prompt, fused=True, guidance_scale=scale)
    assert (fused.images - unfused.images).abs().max() < 1e-9
    pipe.unfuse_qkv_projections()
    _check_against_naive(pipe, concept, prompt, fused=False, guidance_scale=scale)
    pipe.fuse_qkv_projections()
    _check_against_naive(pipe, concept, prompt, fused=True, guidance_scale=scale)


@pytest.mark.parametrize("option", ["fast", "sequential", "two concepts"])
def test_fused_projections_in_every_mode(pipe, make_concept, gen, option):
    """Each mode gives the same images fused as unfused (the unfused modes have their own exactness tests)."""
    pipe.to(dtype=torch.float64)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat", seed=1), "cat")
    pipe.load_infusion_concept(make_concept(pipe.unet, "dog", seed=2), "dog")
    call = dict(num_inference_steps=STEPS, output_type="latent", return_base_images=option != "fast",
                infusion_concepts={"cat": 1.0, "dog": 0.5} if option == "two concepts" else {"cat": 1.0},
                infusion_mode="fast" if option == "fast" else "exact",
                infusion_streams="sequential" if option == "sequential" else "batched")  # fmt: skip
    prompts = ["a cat and a dog", "a red car"]
    unfused = pipe(prompts, generator=gen(), **call)
    pipe.fuse_qkv_projections()
    fused = pipe(prompts, generator=gen(), **call)
    assert (fused.images - unfused.images).abs().max() < 1e-9
    assert (fused.images[0] - pipe(prompts, generator=gen(), num_inference_steps=STEPS, output_type="latent",
                                   infusion_concepts={}).images[0]).abs().max() > 1e-2  # fmt: skip
