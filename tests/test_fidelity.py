"""The fidelity knob at inference (docs/fidelity.md): its options, and the promises it keeps, numerically.

Knob off = the paper's method bit for bit; prompts without the class word untouched; fused hook (F2) = the extended
naive reference (F1, per-pixel values with F's stored maps and queries) in float64 at 1e-9, for one concept with every
option, several concepts per prompt and per-prompt concepts, fast mode, sequential streams, LoRA and SDXL.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from diffusers_infusion import InfusionCallError, InfusionConcept, InfusionXLPipeline, UnknownConceptError
from diffusers_infusion import attention as attention_module
from diffusers_infusion.attention import layer_sizes
from diffusers_infusion.errors import FidelityConfigError
from diffusers_infusion.fidelity import FidelityConfig, FidelityLayer, fidelity_term
from diffusers_infusion.reference import naive_infusion_latents
from diffusers_infusion.stream import dual_stream_noise_pred
from diffusers_infusion.tiny import tiny_sdxl_components
from diffusers_infusion.tokens import find_class_word_positions

STEPS = 4
KWARGS = dict(num_inference_steps=STEPS, output_type="latent", guidance_scale=6.0)


def _noise(n=1, seed=1, dtype=torch.float64):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _without_knob(concept) -> InfusionConcept:
    return InfusionConcept(concept.class_word, concept.residuals, base_model=concept.base_model)


# ------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "options, argument",
    [
        ({"rank": -1}, "rank=-1"), ({"rank": 2.0}, "rank=2.0"), ({"rank": True}, "rank=True"),
        ({"max_timestep": 0}, "max_timestep=0"), ({"max_timestep": math.inf}, "max_timestep=inf"),
        ({"norm_bound": -0.5}, "norm_bound=-0.5"), ({"norm_bound": "big"}, "norm_bound='big'"),
        ({"strength": math.nan}, "strength=nan"), ({"strength": 1e9}, "strength=1000000000.0"),
        ({"layers": []}, "layers=[]"), ({"layers": ["up", 3]}, "layers=['up', 3]"), ({"layers": ""}, "layers=''"),
    ],
)  # fmt: skip
def test_bad_options_are_refused_naming_the_argument_and_value(options, argument):
    with pytest.raises(FidelityConfigError, match=f"^{argument.replace('[', '.').replace(']', '.')}"):
        FidelityConfig(**options)


def test_options_are_keyword_only_off_by_default_and_round_trip_through_metadata():
    with pytest.raises(TypeError):
        FidelityConfig(4)  # noqa
    assert not FidelityConfig().enabled and FidelityConfig(rank=1).enabled
    for config in (FidelityConfig(rank=4), FidelityConfig(rank=2, max_timestep=400, layers=("up_blocks.1", "mid"),
                                                          norm_bound=0.5, strength=0.7), FidelityConfig(rank=1,
                                                          layers="finest")):  # fmt: skip
        assert FidelityConfig.from_metadata(config.to_metadata()) == config
    assert FidelityConfig(rank=1, layers="up_blocks.1").layers == ("up_blocks.1",)


def test_layer_subsets(pipe):
    sizes = layer_sizes(pipe.unet)  # tiny: value sizes 16 (finest) and 32
    assert FidelityConfig(rank=1).select_layers(sizes) == list(sizes)
    finest = FidelityConfig(rank=1, layers="finest").select_layers(sizes)
    assert finest and all(sizes[name][0] == 16 for name in finest) and len(finest) == 3
    assert FidelityConfig(rank=1, layers=("up_blocks.1",)).select_layers(sizes) == [
        name for name in sizes if name.startswith("up_blocks.1")
    ]
    with pytest.raises(FidelityConfigError, match=r"\['up_blocks.7'\] match no cross-attention layer"):
        FidelityConfig(rank=1, layers=("up_blocks.1", "up_blocks.7")).select_layers(sizes)


def test_norm_bound_holds_per_pixel_and_binds():
    """F2 with one head: ``term(p) = m_obj(p) · b(w(p))`` and ``‖b(w)‖ ≤ ρ‖v_obj‖``, with equality where w is large."""
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 9, 6, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, generator=g).double()
    value_obj = torch.randn(2, 6, generator=g, dtype=torch.float64)
    up, down = torch.randn(2, 6, 3, generator=g).double(), torch.randn(2, 6, 3, generator=g).double()

    def term(bound: float) -> torch.Tensor:
        scalars = dict(dtype=torch.float64)
        layer = FidelityLayer(up, down, torch.ones(2, **scalars), torch.full((2,), math.inf, **scalars),
                              torch.full((2,), bound, **scalars))  # fmt: skip
        return fidelity_term(query, key, value_obj, layer, positions=torch.tensor([1, 3]), timesteps=None, heads=1,
                             scale=6**-0.5)  # fmt: skip

    m_obj = torch.softmax(query @ key.transpose(1, 2) * 6**-0.5, -1)[torch.arange(2), :, [1, 3]]  # (2, pixels)
    free, bounded = term(0.0), term(0.2)  # 0.0 = no bound
    w = query @ down @ up.transpose(1, 2)
    assert torch.allclose(free, m_obj[..., None] * w, atol=1e-12)
    limit = 0.2 * value_obj.norm(dim=-1)[:, None]
    norms = (bounded / m_obj[..., None]).norm(dim=-1)
    assert (norms <= limit + 1e-12).all() and torch.allclose(norms, torch.minimum(w.norm(dim=-1), limit))
    assert (w.norm(dim=-1) > limit).any()  # the bound does bind somewhere


# ------------------------------------------------------------------------------------------------- knob off
def test_knob_off_computes_nothing_and_equals_the_method_without_the_knob_hooks(pipe, make_concept, monkeypatch):
    """A concept without the knob: the same images, bit for bit, as with only the method's to_q/to_v hooks."""
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat", seed=1), "cat")
    calls = []
    monkeypatch.setattr("diffusers_infusion.attention.fidelity_term", lambda *a, **k: calls.append(1))
    out = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **KWARGS).images
    projections = attention_module._projections
    monkeypatch.setattr(attention_module, "_projections",
                        lambda attn: [p for p in projections(attn) if p[0] in ("to_q", "to_v", "to_kv")])  # fmt: skip
    monkeypatch.setattr(attention_module, "_timestep_hook", lambda state: lambda module, args: None)
    method_only = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **KWARGS).images
    assert calls == [] and torch.equal(out, method_only)


@pytest.mark.parametrize("case", ["fresh knob (U = 0)", "infusion_fidelity=0", "gate closed at every step"])
def test_a_knob_that_adds_nothing_gives_the_exact_methods_images(pipe, make_knob_concept, case):
    concept = make_knob_concept(pipe.unet, "cat", seed=1, max_timestep=0.5 if "gate" in case else None)
    if case.startswith("fresh"):
        concept.fidelity.up = {k: torch.zeros_like(v) for k, v in concept.fidelity.up.items()}
    pipe.load_infusion_concept(concept, "knob")
    pipe.load_infusion_concept(_without_knob(concept), "plain")
    kwargs = dict(generator=torch.Generator().manual_seed(0), **KWARGS)
    extra = {"infusion_fidelity": 0.0} if "=0" in case else {}
    knob = pipe("a photo of a cat", infusion_concepts={"knob": 1.0}, **extra, **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(knob, pipe("a photo of a cat", infusion_concepts={"plain": 1.0}, **kwargs).images)


def test_prompts_without_the_class_word_are_untouched(pipe, sd_pipe, make_knob_concept, gen):
    pipe.load_infusion_concept(make_knob_concept(pipe.unet, "cat", scale=3.0))
    for prompt in ("a photo of a dog", "a red car on the beach"):
        expected = sd_pipe(prompt, generator=gen(), num_inference_steps=STEPS, output_type="np").images
        out = pipe(prompt, generator=gen(), num_inference_steps=STEPS, output_type="np", return_base_images=True)
        assert (out.images == expected).all() and (out.base_images == expected).all()


def test_concept_agnostic_overfitting_stays_zero_with_the_knob(pipe, make_knob_concept):
    """Fisher divergence (eq. 4) through the training forward with a knob: exactly 0 without the class word."""
    concept = make_knob_concept(pipe.unet, "cat", scale=3.0)
    tensors = {"cat": {**concept.residuals, **concept.fidelity.tensors()}}
    captions = ["a photo of a dog", "a red car on the beach", "a cup", "a cat"]
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 300, 600, 900])
    zt = pipe.scheduler.add_noise(z0, noise, t)
    text, _ = pipe.encode_prompt(captions, "cpu", 1, False)
    positions = [find_class_word_positions(pipe.tokenizer, c, "cat") for c in captions]
    placements = [[("cat", 1.0, p)] if p else [] for p in positions]
    with torch.no_grad():
        eps_base = pipe.unet(zt, t, text).sample
        custom = dual_stream_noise_pred(
            pipe.unet, zt, t, text, placements, tensors, fidelity={"cat": concept.fidelity.config}
        )
        plain = dual_stream_noise_pred(pipe.unet, zt, t, text, placements, {"cat": concept.residuals})
    divergence = 0.5 * ((eps_base - custom) ** 2).flatten(1).sum(1)
    assert (divergence[:3] == 0).all() and (custom[3] - plain[3]).abs().max() > 1e-4  # the knob acts on "a cat"


# ------------------------------------------------------------------------------------------------- exactness
OPTIONS = {
    "rank 2, all layers": {},
    "gate, finest, bound, own strength": dict(max_timestep=600, layers="finest", norm_bound=0.3, strength=0.7),
    "rank 3, prefix, bound": dict(rank=3, layers=("up_blocks.1", "mid_block"), norm_bound=2.0),
}


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_fused_equals_naive_one_concept_with_every_option(pipe, make_knob_concept, options, scheduler):
    pipe.to(dtype=torch.float64)
    if scheduler == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    concept = make_knob_concept(pipe.unet, "cat", **OPTIONS[options])
    pipe.load_infusion_concept(concept, "cat")
    prompt = "a cat on the beach next to a cat"  # two occurrences: each gets its own map-gated knob
    positions = find_class_word_positions(pipe.tokenizer, prompt, "cat")
    out = pipe(prompt, latents=_noise(), infusion_concepts={"cat": 0.5}, return_base_images=True, **KWARGS)
    phi = concept.fidelity.config.strength
    naive = dict(latents=_noise(), num_inference_steps=STEPS, guidance_scale=6.0)
    naive_f, naive_c = naive_infusion_latents(
        pipe, prompt, [(concept.residuals, 0.5, positions, (concept.fidelity, phi))], **naive
    )
    _, without = naive_infusion_latents(pipe, prompt, [(concept.residuals, 0.5, positions)], **naive)
    assert (out.base_images - naive_f).abs().max() < 1e-9
    assert (out.images - naive_c).abs().max() < 1e-9
    assert (naive_c - without).abs().max() > 1e-4  # the knob does change the image


def test_several_concepts_and_per_prompt_concepts_equal_naive(pipe, make_knob_concept, make_concept):
    """Each concept's knob is gated by its own token's map; concepts differ per prompt; φ per concept per call."""
    pipe.to(dtype=torch.float64)
    cat = make_knob_concept(pipe.unet, "cat", seed=1)
    dog = make_knob_concept(pipe.unet, "dog", seed=2, rank=3, max_timestep=600, norm_bound=1.0)
    teddy = make_concept(pipe.unet, "teddy bear", seed=3)  # no knob, in the same call
    for name, concept in (("cat", cat), ("dog", dog), ("teddy", teddy)):
        pipe.load_infusion_concept(concept, name)
    prompts = ["a cat and a dog", "a dog with a teddy bear", "a red car", "a cat"]
    sets = [{"cat": 1.0, "dog": 0.5}, {"dog": 1.0, "teddy": 1.0}, {"cat": 1.0}, {"cat": 0.7}]
    phi = {"cat": 0.5}  # dog keeps its default, 1.0
    out = pipe(prompts, latents=_noise(4, seed=3), infusion_concepts=sets, infusion_fidelity=phi, **KWARGS)
    concepts = {"cat": cat, "dog": dog, "teddy": teddy}
    for i, (prompt, chosen) in enumerate(zip(prompts, sets)):
        per_concept = []
        for name, strength in chosen.items():
            c = concepts[name]
            positions = find_class_word_positions(pipe.tokenizer, prompt, c.class_word)
            knob = (c.fidelity, phi.get(name, c.fidelity.config.strength)) if c.fidelity else None
            per_concept.append((c.residuals, strength, positions, knob))
        _, naive_c = naive_infusion_latents(pipe, prompt, per_concept, latents=_noise(4, seed=3)[i : i + 1],
                                            num_inference_steps=STEPS, guidance_scale=6.0)  # fmt: skip
        assert (out.images[i] - naive_c[0]).abs().max() < 1e-9, prompt


def test_fast_mode_equals_naive_with_own_queries(pipe, make_knob_concept):
    pipe.to(dtype=torch.float64)
    concept = make_knob_concept(pipe.unet, "cat", norm_bound=1.0)
    pipe.load_infusion_concept(concept, "cat")
    prompt = "a photo of a cat"
    positions = find_class_word_positions(pipe.tokenizer, prompt, "cat")
    out = pipe(prompt, latents=_noise(), infusion_mode="fast", **KWARGS).images
    _, naive_c = naive_infusion_latents(pipe, prompt, [(concept.residuals, 1.0, positions, (concept.fidelity, 1.0))],
                                        latents=_noise(), num_inference_steps=STEPS, guidance_scale=6.0,
                                        own_queries=True)  # fmt: skip
    assert (out - naive_c).abs().max() < 1e-9


def test_sequential_streams_equal_batched_with_the_knob(pipe, make_knob_concept):
    pipe.to(dtype=torch.float64)
    pipe.load_infusion_concept(make_knob_concept(pipe.unet, "cat", seed=1, max_timestep=600), "cat")
    prompts = ["a cat", "a red car", "a photo of a cat"]
    kwargs = dict(latents=_noise(3), return_base_images=True, **KWARGS)
    batched, sequential = pipe(prompts, **kwargs), pipe(prompts, infusion_streams="sequential", **kwargs)
    assert (sequential.images - batched.images).abs().max() < 1e-9
    assert (sequential.base_images - batched.base_images).abs().max() < 1e-9


def test_stacked_with_a_lora_on_every_projection_equals_naive(pipe, make_knob_concept, lora_dir):
    """peft wraps to_q/to_k/to_v/to_out.0; the knob's hooks sit on the wrappers, so the LoRA counts as in naive."""
    pipe.load_lora_weights(lora_dir)
    pipe.to(dtype=torch.float64)
    concept = make_knob_concept(pipe.unet, "cat")
    pipe.load_infusion_concept(concept, "cat")
    prompt = "a photo of a cat"
    positions = find_class_word_positions(pipe.tokenizer, prompt, "cat")
    out = pipe(prompt, latents=_noise(), **KWARGS).images
    _, naive_c = naive_infusion_latents(pipe, prompt, [(concept.residuals, 1.0, positions, (concept.fidelity, 1.0))],
                                        latents=_noise(), num_inference_steps=STEPS, guidance_scale=6.0)  # fmt: skip
    assert (out - naive_c).abs().max() < 1e-9


def test_sdxl_fused_equals_naive_with_the_knob(make_knob_concept):
    xl = InfusionXLPipeline(**tiny_sdxl_components(seed=0))
    xl.set_progress_bar_config(disable=True)
    xl.to(dtype=torch.float64)
    concept = make_knob_concept(xl.unet, "cat", max_timestep=700, norm_bound=1.0)
    assert len(concept.fidelity.up) == len(layer_sizes(xl.unet))
    xl.load_infusion_concept(concept, "cat")
    prompt = "a photo of a cat"
    positions = find_class_word_positions(xl.tokenizer, prompt, "cat")
    out = xl(prompt, latents=_noise(), num_inference_steps=3, output_type="latent", guidance_scale=5.0).images
    knob = (concept.fidelity, 1.0)
    _, naive_c = naive_infusion_latents(xl, prompt, [(concept.residuals, 1.0, positions, knob)], latents=_noise(),
                                        num_inference_steps=3, guidance_scale=5.0)  # fmt: skip
    _, without = naive_infusion_latents(xl, prompt, [(concept.residuals, 1.0, positions)], latents=_noise(),
                                        num_inference_steps=3, guidance_scale=5.0)  # fmt: skip
    assert (out - naive_c).abs().max() < 1e-9 and (naive_c - without).abs().max() > 1e-5


# ------------------------------------------------------------------------------------------------- the call
def test_infusion_fidelity_argument_is_validated(pipe, make_knob_concept):
    pipe.load_infusion_concept(make_knob_concept(pipe.unet, "cat"), "cat")
    call = dict(num_inference_steps=1, output_type="latent")
    with pytest.raises(UnknownConceptError, match=r"infusion_fidelity names \['dog'\]"):
        pipe("a cat", infusion_fidelity={"dog": 1.0}, **call)
    with pytest.raises(InfusionCallError, match=r"infusion_fidelity='high' must be a number"):
        pipe("a cat", infusion_fidelity="high", **call)
    with pytest.raises(InfusionCallError, match=r"infusion_fidelity\['cat'\]=nan"):
        pipe("a cat", infusion_fidelity={"cat": math.nan}, **call)
    with pytest.raises(InfusionCallError, match="Did you mean 'infusion_fidelity'"):
        pipe("a cat", infusion_fidelty=1.0, **call)


def test_a_processor_that_skips_to_out_is_an_error_not_a_silent_exact_method(pipe, make_knob_concept):
    class NoOutProjection:  # computes attention itself and never calls attn.to_out[0]
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            return torch.softmax(q @ k.transpose(1, 2), -1) @ v

    pipe.load_infusion_concept(make_knob_concept(pipe.unet, "cat"), "cat")
    pipe.unet.set_attn_processor({n: NoOutProjection() if "attn2" in n else p
                                  for n, p in pipe.unet.attn_processors.items()})  # fmt: skip
    with pytest.raises(RuntimeError, match="hook on attn2.to_out.0. never ran"):
        pipe("a cat", num_inference_steps=1, output_type="latent")


def test_ddim_scheduler_kept(pipe):
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the gate tests above assume timesteps 751, 501, 251, 1
    pipe.scheduler.set_timesteps(STEPS)
    assert pipe.scheduler.timesteps.tolist() == [751, 501, 251, 1]


def test_variants_share_one_f_stream_and_equal_separate_calls(pipe, make_knob_concept):
    pipe.to(dtype=torch.float64)
    concept = make_knob_concept(pipe.unet, "cat", max_timestep=600)
    pipe.load_infusion_concept(concept, "knob")
    pipe.load_infusion_concept(_without_knob(concept), "plain")
    variants = [{"knob": 1.0}, {"plain": 1.0}, {"knob": 0.5}]
    together = pipe("a photo of a cat", latents=_noise(), infusion_variants=variants, **KWARGS).images
    for i, variant in enumerate(variants):
        alone = pipe("a photo of a cat", latents=_noise(), infusion_concepts=variant, **KWARGS).images
        assert (together[i] - alone[0]).abs().max() < 1e-9, variant
    assert (together[0] - together[1]).abs().max() > 1e-4
