"""Half-precision inference: bfloat16 and float16 pipelines with float32 or float16 concept files (CPU kernels).

Both half dtypes run on this torch's CPU kernels (SDPA, group norm, conv, linear), so both are tested.
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import diffusers_infusion.generation as generation
from diffusers_infusion import InfusionConcept, InfusionPipeline, InfusionXLPipeline
from diffusers_infusion.tiny import tiny_sd_components, tiny_sdxl_components

KWARGS = dict(num_inference_steps=2, output_type="latent")
PROMPT = "a cat on the grass"
# Relative L2 error bounds against float32 for the C stream and for the concept's effect C - F (observed on the
# tiny model: bf16 0.026-0.029 and 0.09; fp16 0.0031 and 0.013; F itself: bf16 0.028, fp16 0.0036).
C_BOUND = {torch.bfloat16: 0.06, torch.float16: 0.01}
EFFECT_BOUND = {torch.bfloat16: 0.2, torch.float16: 0.05}


def build(cls, dtype, xl=False):
    """A tiny pipeline of ``cls`` cast the way users cast one: ``pipe.to(dtype)``."""
    components = (tiny_sdxl_components if xl else tiny_sd_components)(seed=0)
    pipe = cls(**components) if xl else cls(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def spy_on_plans(monkeypatch) -> list:
    """The ``InfusionPlan`` of each call, as the hooks receive it."""
    plans, build_plan = [], generation.build_plan

    def spy(*args, **kwargs):
        plans.append(build_plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(generation, "build_plan", spy)
    return plans


@pytest.fixture(scope="module")
def concept_and_fp32():
    """A strong random concept (its effect well above half-precision noise) and the float32 F and C latents."""
    pipe = build(InfusionPipeline, torch.float32)
    concept = InfusionConcept.zeros(pipe.unet, "cat", base_model="tiny-sd")
    g = torch.Generator().manual_seed(0)
    concept.residuals = {k: 20 * torch.randn(v.shape, generator=g) for k, v in sorted(concept.residuals.items())}
    pipe.load_infusion_concept(concept, "cat")
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), return_base_images=True, **KWARGS)
    return concept, out.images, out.base_images


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16], ids=["fp32-file", "fp16-file"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_pipeline(concept_and_fp32, dtype, file_dtype, gen, tmp_path, monkeypatch):
    concept, c32, f32 = concept_and_fp32
    concept.to(dtype=file_dtype).save_pretrained(tmp_path)
    pipe, plain = build(InfusionPipeline, dtype), build(StableDiffusionPipeline, dtype)
    pipe.load_infusion_concept(tmp_path, "cat")
    assert pipe.infusion_concepts["cat"].dtype == file_dtype  # kept as stored; cast per call
    plans = spy_on_plans(monkeypatch)

    out = pipe(PROMPT, generator=gen(), return_base_images=True, **KWARGS)
    assert out.images.dtype == out.base_images.dtype == dtype
    assert {r.dtype for r in plans[0].value_residuals.values()} == {dtype}  # residuals in the pipeline's dtype
    torch.testing.assert_close(out.base_images, plain(PROMPT, generator=gen(), **KWARGS).images)  # F is plain
    c_err, f_err = rel(out.images, c32), rel(out.base_images, f32)
    assert c_err < C_BOUND[dtype] and c_err < 1.5 * f_err  # no error beyond the base model's own half precision
    assert rel(out.images - out.base_images, c32 - f32) < EFFECT_BOUND[dtype]  # the concept's effect survives

    images = pipe(PROMPT, generator=gen(), num_inference_steps=2, output_type="np").images  # decoding too
    assert images.dtype == "float32" and images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_sdxl(dtype, gen):
    """SDXL in half precision (float16 decodes through diffusers' VAE upcast); F equals the plain SDXL pipeline."""
    pipe, plain = build(InfusionXLPipeline, dtype, xl=True), build(StableDiffusionXLPipeline, dtype, xl=True)
    concept = InfusionConcept.zeros(pipe.unet, "cat")
    g = torch.Generator().manual_seed(0)
    concept.residuals = {k: 20 * torch.randn(v.shape, generator=g) for k, v in sorted(concept.residuals.items())}
    pipe.load_infusion_concept(concept, "cat")
    out = pipe(PROMPT, generator=gen(), return_base_images=True, **KWARGS)
    torch.testing.assert_close(out.base_images, plain(PROMPT, generator=gen(), **KWARGS).images)
    assert out.images.dtype == dtype and rel(out.images, out.base_images) > 0.05
    images = pipe(PROMPT, generator=gen(), num_inference_steps=2, output_type="np").images
    assert images.dtype == "float32" and images.shape == (1, 16, 16, 3)
