"""A ``torch.compile``'d UNet: exact outputs, and no recompilation when concepts, strengths or positions change.

Dynamo does not guard on module hooks (``skip_nnmodule_hook_guards`` is True by default), so Infusion keeps its hooks
installed, idle, on a compiled UNet; these tests run the orders that went wrong with call-scoped hooks (a plain call
traced first). The ``eager`` backend traces with dynamo and runs the captured graph with the same kernels, so outputs
must equal the uncompiled pipeline's exactly.
"""

import pytest
import torch
import torch._dynamo
from diffusers import StableDiffusionPipeline
from diffusers.models.attention import BasicTransformerBlock
from torch._dynamo.utils import counters

from diffusers_infusion import InfusionPipeline
from diffusers_infusion.attention import cross_attention_layers
from diffusers_infusion.tiny import tiny_sd_components

KWARGS = dict(num_inference_steps=2, output_type="latent")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def build(cls=InfusionPipeline, components=None):
    """A tiny pipeline with cross-attention at one resolution (half the ops to trace of the conftest one)."""
    components = components or tiny_sd_components(seed=0, block_out_channels=(16,))
    pipe = cls(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_concepts(pipe, make_concept):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat", seed=0), "A")
    pipe.load_infusion_concept(make_concept(pipe.unet, "dog", seed=1), "B")
    return pipe


def test_compiled_unet_is_exact_and_recompiles_only_for_new_batch_layouts(make_concept, gen):
    pipe, eager = with_concepts(build(), make_concept), with_concepts(build(), make_concept)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    plain = StableDiffusionPipeline.from_pipe(pipe)  # shares the compiled UNet
    plain.set_progress_bar_config(disable=True)

    def same(prompt, **kwargs):
        out = pipe(prompt, generator=gen(), **kwargs, **KWARGS).images
        assert torch.equal(out, eager(prompt, generator=gen(), **kwargs, **KWARGS).images), (prompt, kwargs)

    same("a moon")  # a plain call first: its trace must already contain the (idle) hooks
    same("a cat", infusion_concepts={"A": 1.0})  # the [F | C] layout: a second graph
    assert graphs() == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        same("a cat", infusion_concepts={"A": 0.5})
        same("a photo of a cat", infusion_concepts={"A": 0.5})  # other token position
        same("a dog", infusion_concepts={"B": 1.0})  # other concept
        same("a moon")
        out = plain("a cat", generator=gen(), **KWARGS).images  # idle hooks: the plain pipeline stays plain
        assert torch.equal(out, eager("a cat", generator=gen(), infusion_concepts={}, **KWARGS).images)
    assert graphs() == 2
    assert all(a.to_q._forward_hooks for a in cross_attention_layers(pipe.unet).values())  # kept while compiled


def test_regional_compilation_compiles_one_graph_per_block_shape(make_concept, gen):
    """``compile_repeated_blocks``: the hooks hold no per-layer constants, so blocks of one shape share a graph."""
    pipe, eager = with_concepts(build(), make_concept), with_concepts(build(), make_concept)
    pipe.unet.compile_repeated_blocks(backend="eager")
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]

    out = pipe("a cat", generator=gen(), **KWARGS).images
    assert torch.equal(out, eager("a cat", generator=gen(), **KWARGS).images)
    assert graphs() == 1 < len(blocks) == 4  # 4 blocks of one shape (one resolution; down, mid, 2 up)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt, concepts in [("a cat", {"A": 0.3}), ("a photo of a dog", {"B": 1.0})]:
            out = pipe(prompt, generator=gen(), infusion_concepts=concepts, **KWARGS).images
            assert torch.equal(out, eager(prompt, generator=gen(), infusion_concepts=concepts, **KWARGS).images)


def test_a_unet_traced_before_infusion_saw_it_is_an_error_not_base_images(make_concept, gen):
    """Blocks traced outside Infusion with the batch size of an Infusion call: the cached graphs have no hooks."""
    components = tiny_sd_components(seed=0, block_out_channels=(16,))
    components["unet"].compile_repeated_blocks(backend="eager")
    build(StableDiffusionPipeline, components)(["a moon", "a cat"], **KWARGS)  # 4 rows per block, no hooks
    pipe, eager = with_concepts(build(components=components), make_concept), with_concepts(build(), make_concept)
    with pytest.raises(RuntimeError, match=r"never ran during this call.*torch\.compiler\.reset\(\)"):
        pipe("a cat", **KWARGS)  # 4 rows per block: dynamo reuses the hook-less graphs
    torch.compiler.reset()  # the documented fix
    out = pipe("a cat", generator=gen(), **KWARGS).images
    assert torch.equal(out, eager("a cat", generator=gen(), **KWARGS).images)
