"""``infusion_streams="sequential"``: F alone, then C with F's recorded queries; the same numbers as one batch."""

import contextlib
from unittest import mock

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffusers_infusion import InfusionCallError, InfusionPipeline, InfusionXLPipeline
from diffusers_infusion.tiny import tiny_sd_components, tiny_sdxl_components

STEPS = 3


@pytest.fixture
def two_concepts(pipe, make_concept):
    pipe.to(dtype=torch.float64)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # multistep: history per row
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat", seed=1), "cat")
    pipe.load_infusion_concept(make_concept(pipe.unet, "dog", seed=2), "dog")
    return pipe


def batch_sizes(module: torch.nn.Module, record: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(lambda m, args: record.append(args[0].shape[0]))


@pytest.mark.parametrize("guidance", [6.0, 1.0], ids=["guidance", "no-guidance"])
def test_sequential_equals_batched(two_concepts, guidance):
    pipe = two_concepts
    prompts = ["a cat and a dog", "a red car", "a photo of a cat"]  # the car prompt has no C row
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = dict(num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=guidance,
                  num_images_per_prompt=2, return_base_images=True)  # fmt: skip
    batched = pipe(prompts, **kwargs)
    sizes = []
    handle = batch_sizes(pipe.unet.conv_in, sizes)
    sequential = pipe(prompts, infusion_streams="sequential", **kwargs)
    handle.remove()
    halves = 2 if guidance > 1 else 1
    assert sizes == [halves * 6, halves * 4] * STEPS  # per step: the 6 F rows, then the 4 C rows
    assert (sequential.images - batched.images).abs().max() < 1e-9
    assert (sequential.base_images - batched.base_images).abs().max() < 1e-9
    assert (batched.images - batched.base_images).abs().max() > 1e-3
    assert "forward" not in pipe.unet.__dict__  # the UNet's own forward is back


def test_sequential_keeps_only_the_conditional_queries(two_concepts):
    """Under guidance the C call reads only the conditional F rows' queries, so only those are held."""
    from diffusers_infusion import attention

    pipe, held = two_concepts, []
    original = attention.capture_queries

    @contextlib.contextmanager
    def spy(unet, **kwargs):
        with original(unet, **kwargs) as queries:
            yield queries
        held.append(dict(queries))

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with mock.patch.object(attention, "capture_queries", spy):
        pipe(["a cat", "a dog"], num_inference_steps=1, latents=noise, output_type="latent",
             infusion_streams="sequential")  # fmt: skip
    rows = {q.shape[0] for q in held[0].values()}
    assert rows == {2}  # the 2 F rows of the conditional half; the unconditional half's 2 are not kept
    for q in held[0].values():  # copies, not views that would keep both halves' storage alive
        assert q.untyped_storage().nbytes() == q.numel() * q.element_size()


def test_sequential_with_variants_equals_batched(two_concepts):
    pipe = two_concepts
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kwargs = dict(num_inference_steps=STEPS, latents=noise, output_type="latent",
                  infusion_variants=[{"cat": 1.0}, {"cat": 0.5, "dog": 1.0}])  # fmt: skip
    batched = pipe("a cat and a dog", **kwargs).images
    sequential = pipe("a cat and a dog", infusion_streams="sequential", **kwargs).images
    assert (sequential - batched).abs().max() < 1e-9


def test_sequential_sdxl_equals_batched(make_concept):
    pipe = InfusionXLPipeline(**tiny_sdxl_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype=torch.float64)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kwargs = dict(num_inference_steps=STEPS, latents=noise, output_type="latent", return_base_images=True,
                  original_size=(24, 24), target_size=(16, 16))  # fmt: skip
    batched = pipe(["a cat on snow", "a dog"], **kwargs)
    sequential = pipe(["a cat on snow", "a dog"], infusion_streams="sequential", **kwargs)
    assert (sequential.images - batched.images).abs().max() < 1e-9
    assert (sequential.base_images - batched.base_images).abs().max() < 1e-9
    assert (batched.images - batched.base_images).abs().max() > 1e-3


def test_sequential_under_model_offload_keeps_accelerates_forward(make_concept, gen):
    pipe = InfusionPipeline(**tiny_sd_components(seed=0), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    expected = pipe("a cat", generator=gen(), num_inference_steps=2, output_type="latent").images
    pipe.enable_model_cpu_offload(device="cpu")
    offload_forward = pipe.unet.__dict__["forward"]  # accelerate's wrapper
    out = pipe("a cat", generator=gen(), num_inference_steps=2, output_type="latent", infusion_streams="sequential")
    assert torch.allclose(out.images, expected, atol=1e-5)
    assert pipe.unet.__dict__["forward"] is offload_forward


def test_forward_is_restored_when_the_call_fails(two_concepts):
    pipe = two_concepts

    def stop(pipe, step, t, callback_kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe("a cat", num_inference_steps=STEPS, infusion_streams="sequential", callback_on_step_end=stop)
    assert "forward" not in pipe.unet.__dict__
    assert pipe("a cat", num_inference_steps=1, output_type="latent").images.isfinite().all()


def test_stream_errors(two_concepts):
    pipe = two_concepts
    with pytest.raises(InfusionCallError, match="infusion_streams='parallel' must be 'batched'"):
        pipe("a cat", num_inference_steps=1, infusion_streams="parallel")
    with pytest.raises(InfusionCallError, match="'fast' mode has one"):
        pipe("a cat", num_inference_steps=1, infusion_streams="sequential", infusion_mode="fast")
    pipe.unet = torch.compile(pipe.unet, backend="eager")  # refused before anything is traced
    with pytest.raises(InfusionCallError, match="compiled UNet does not allow"):
        pipe("a cat", num_inference_steps=1, infusion_streams="sequential")
