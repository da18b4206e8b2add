"""The fidelity knob on a ``torch.compile``'d UNet: exact, and no recompilation when knob concepts are swapped.

Mirrors ``test_compile.py``: the knob's hooks (``to_k``, ``to_out[0]``, ``time_proj``) are installed, idle, with the
others, and read their per-call data from tensors, so swapping concepts with knobs of the same layout (rank, layers),
their strengths, timestep gates, norm bounds or token positions recompiles nothing.
"""

import torch
import torch._dynamo
from test_compile import KWARGS, fresh_dynamo, graphs  # noqa: F401  (fresh_dynamo: autouse, a fresh dynamo per test)

from diffusers_infusion import InfusionPipeline
from diffusers_infusion.tiny import tiny_sd_components


def build(make_knob_concept, make_concept):
    pipe = InfusionPipeline(**tiny_sd_components(seed=0, block_out_channels=(16,)), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_infusion_concept(make_knob_concept(pipe.unet, "cat", seed=0), "A")
    pipe.load_infusion_concept(make_knob_concept(pipe.unet, "dog", seed=1, max_timestep=600, norm_bound=0.5), "B")
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat", seed=2), "plain")
    return pipe


CALLS = [
    ("a cat", {"A": 0.5}, None),
    ("a photo of a cat", {"A": 1.0}, None),  # other token position
    ("a dog", {"B": 1.0}, None),  # other knob: gate and bound
    ("a cat", {"A": 1.0}, 0.3),  # the knob's own strength
    ("a cat", {"plain": 1.0}, None),  # a concept without the knob
    ("a moon", None, None),
]


def test_compiled_unet_is_exact_and_swapping_knob_concepts_recompiles_nothing(make_knob_concept, make_concept, gen):
    pipe, eager = build(make_knob_concept, make_concept), build(make_knob_concept, make_concept)
    pipe.unet = torch.compile(pipe.unet, backend="eager")

    def same(prompt, concepts, phi):
        kwargs = dict(infusion_concepts=concepts, infusion_fidelity=phi, **KWARGS)
        out = pipe(prompt, generator=gen(), **kwargs).images
        assert torch.equal(out, eager(prompt, generator=gen(), **kwargs).images), (prompt, concepts, phi)

    same("a moon", None, None)  # plain first
    same("a cat", {"A": 1.0}, None)  # [F | C] with a knob
    same("a cat", {"plain": 1.0}, None)  # [F | C] without: the knob's hooks stay idle
    warm = graphs()
    assert warm <= 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        for call in CALLS:
            same(*call)
    assert graphs() == warm


def test_regional_compilation_with_the_knob(make_knob_concept, make_concept, gen):
    pipe, eager = build(make_knob_concept, make_concept), build(make_knob_concept, make_concept)
    pipe.unet.compile_repeated_blocks(backend="eager")
    out = pipe("a cat", generator=gen(), infusion_concepts={"A": 1.0}, **KWARGS).images
    assert torch.equal(out, eager("a cat", generator=gen(), infusion_concepts={"A": 1.0}, **KWARGS).images)
    assert graphs() == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt, concepts, phi in CALLS[:4]:
            kwargs = dict(infusion_concepts=concepts, infusion_fidelity=phi, **KWARGS)
            out = pipe(prompt, generator=gen(), **kwargs).images
            assert torch.equal(out, eager(prompt, generator=gen(), **kwargs).images), (prompt, concepts)
