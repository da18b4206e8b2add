"""METHOD.md's exactness properties, numerically.

1. plain output when no concept applies; 2. C = F at zero residuals; 3. fused = naive; 4. zero concept-agnostic
overfitting.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

from diffusers_infusion.reference import naive_infusion_latents
from diffusers_infusion.stream import dual_stream_noise_pred
from diffusers_infusion.tokens import find_class_word_positions

STEPS = 4
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}


# --------------------------------------------------------------------------------------------- property 1
@pytest.mark.parametrize("case", ["no concept loaded", "class word absent", "all strengths zero"])
def test_plain_pipeline_output_when_no_concept_applies(pipe, sd_pipe, make_concept, gen, case):
    if case != "no concept loaded":
        pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    if case == "all strengths zero":
        pipe.set_infusion_concepts(["default_0"], [0.0])
    prompt = "a photo of a dog" if case == "class word absent" else "a photo of a cat"
    kwargs = dict(num_inference_steps=STEPS, output_type="np")
    expected = sd_pipe(prompt, generator=gen(), **kwargs).images
    out = pipe(prompt, generator=gen(), return_base_images=True, **kwargs)
    assert (out.images == expected).all()  # bit for bit: the C stream is not computed
    assert (out.base_images == expected).all()


def test_no_c_stream_is_computed_without_class_word(pipe, make_concept, gen):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    pipe(["a dog", "a cat"], num_inference_steps=2, generator=gen(), output_type="latent")
    pipe("a dog", num_inference_steps=2, generator=gen(), output_type="latent")
    handle.remove()
    assert batches == [6, 6, 2, 2]  # [F F C] x CFG for the cat prompt only; then the plain batch


# --------------------------------------------------------------------------------------------- property 2
def test_zero_residuals_give_the_base_image(pipe, gen):
    from diffusers_infusion import InfusionConcept

    pipe.load_infusion_concept(InfusionConcept.zeros(pipe.unet, "cat"))
    out = pipe("a photo of a cat", num_inference_steps=STEPS, generator=gen(), output_type="latent",
               return_base_images=True)  # fmt: skip
    assert torch.allclose(out.images, out.base_images, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- property 3
def _positions(pipe, prompt, word):
    return find_class_word_positions(pipe.tokenizer, prompt, word)


def _assert_matches_naive(pipe, prompt, per_concept, names_strengths, atol, seed=1):
    dtype = pipe.unet.dtype
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = pipe(prompt, num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=6.0,
               infusion_concepts=names_strengths, return_base_images=True)  # fmt: skip
    naive_f, naive_c = naive_infusion_latents(
        pipe, prompt, per_concept, latents=noise, num_inference_steps=STEPS, guidance_scale=6.0
    )
    assert (out.base_images - naive_f).abs().max() < atol
    assert (out.images - naive_c).abs().max() < atol
    return out


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_fused_equals_naive_one_concept(pipe, make_concept, scheduler, strength):
    pipe.to(dtype=torch.float64)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    concept = make_concept(pipe.unet, "cat")
    pipe.load_infusion_concept(concept, "cat")
    prompt = "a cat on the beach next to a cat"  # two occurrences: both get the residual
    positions = _positions(pipe, prompt, "cat")
    assert len(positions) == 2
    out = _assert_matches_naive(pipe, prompt, [(concept.residuals, strength, positions)], {"cat": strength}, 1e-9)
    assert (out.images - out.base_images).abs().max() > 1e-2  # the concept does change the image


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_fused_equals_naive_two_concepts_and_a_phrase(pipe, make_concept, scheduler):
    pipe.to(dtype=torch.float64)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    cat, teddy = make_concept(pipe.unet, "cat", seed=1), make_concept(pipe.unet, "teddy bear", seed=2)
    pipe.load_infusion_concept(cat, "cat")
    pipe.load_infusion_concept(teddy, "teddy")
    prompt = "a cat with a teddy bear"
    per_concept = [
        (cat.residuals, 1.0, _positions(pipe, prompt, "cat")),
        (teddy.residuals, 0.5, _positions(pipe, prompt, "teddy bear")),
    ]
    assert per_concept[1][2] == [6]  # last sub-token of the phrase ("bear"); 0 is the start token
    _assert_matches_naive(pipe, prompt, per_concept, {"cat": 1.0, "teddy": 0.5}, 1e-9)


def test_fused_equals_naive_in_float32(pipe, make_concept):
    concept = make_concept(pipe.unet, "cat")
    pipe.load_infusion_concept(concept, "cat")
    prompt = "a photo of a cat"
    per_concept = [(concept.residuals, 1.0, _positions(pipe, prompt, "cat"))]
    _assert_matches_naive(pipe, prompt, per_concept, {"cat": 1.0}, 1e-4)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_per_prompt_concepts_in_one_batch_equal_naive(pipe, make_concept, scheduler):
    pipe.to(dtype=torch.float64)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    cat, dog = make_concept(pipe.unet, "cat", seed=1), make_concept(pipe.unet, "dog", seed=2)
    pipe.load_infusion_concept(cat, "cat")
    pipe.load_infusion_concept(dog, "dog")
    prompts = ["a cat and a dog", "a dog on snow", "a red car", "a cat"]
    concept_sets = [{"cat": 1.0, "dog": 1.0}, {"dog": 0.5}, {"cat": 1.0}, {"cat": 0.0}]
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = pipe(prompts, num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=6.0,
               infusion_concepts=concept_sets, return_base_images=True)  # fmt: skip
    residuals = {"cat": cat.residuals, "dog": dog.residuals}
    for i, (prompt, concepts) in enumerate(zip(prompts, concept_sets)):
        per_concept = [(residuals[n], s, _positions(pipe, prompt, n)) for n, s in concepts.items()]
        naive_f, naive_c = naive_infusion_latents(
            pipe, prompt, per_concept, latents=noise[i : i + 1], num_inference_steps=STEPS, guidance_scale=6.0
        )
        assert (out.base_images[i] - naive_f[0]).abs().max() < 1e-9, prompt
        assert (out.images[i] - naive_c[0]).abs().max() < 1e-9, prompt
    assert (out.images[2] == out.base_images[2]).all() and (out.images[3] == out.base_images[3]).all()


def test_explicit_token_indices_equal_naive_at_those_positions(pipe, make_concept):
    pipe.to(dtype=torch.float64)
    concept = make_concept(pipe.unet, "cat")
    pipe.load_infusion_concept(concept, "cat")
    prompt = "a photo of my teddy"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = pipe(prompt, num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=6.0,
               infusion_token_indices={"cat": [5]})  # fmt: skip
    _, naive_c = naive_infusion_latents(
        pipe, prompt, [(concept.residuals, 1.0, [5])], latents=noise, num_inference_steps=STEPS, guidance_scale=6.0
    )
    assert (out.images - naive_c).abs().max() < 1e-9


def test_multistep_history_is_not_mixed_between_streams(pipe, make_concept):
    """With DPM-Solver++ the F images of an Infusion call equal a plain call's (to float rounding)."""
    pipe.to(dtype=torch.float64)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat", scale=3.0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = pipe("a cat", num_inference_steps=6, latents=noise, output_type="latent", return_base_images=True)
    plain = pipe("a cat", num_inference_steps=6, latents=noise, output_type="latent", infusion_concepts={}).images
    assert (out.base_images - plain).abs().max() < 1e-9


# --------------------------------------------------------------------------------------------- property 4
def test_concept_agnostic_overfitting_is_zero(pipe, make_concept):
    """Latent Fisher divergence ½E‖ε_θ − ε_θ'‖² (eq. 4) on captions without the class word is exactly 0."""
    concept = make_concept(pipe.unet, "cat", scale=3.0)
    residuals = {"cat": concept.residuals}
    captions = ["a photo of a dog", "a red car on the beach", "a cup", "a cat"]
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 300, 600, 900])
    zt = pipe.scheduler.add_noise(z0, noise, t)
    text, _ = pipe.encode_prompt(captions, "cpu", 1, False)
    placements = [[("cat", 1.0, _positions(pipe, c, "cat"))] if _positions(pipe, c, "cat") else [] for c in captions]
    with torch.no_grad():
        eps_base = pipe.unet(zt, t, text).sample
        eps_custom = dual_stream_noise_pred(pipe.unet, zt, t, text, placements, residuals)
    divergence = 0.5 * ((eps_base - eps_custom) ** 2).flatten(1).sum(1)
    assert (divergence[:3] == 0).all()  # exactly: no caption without the class word is changed
    assert divergence[3] > 1e-3  # the concept's own caption is (so the measurement can fail)


# --------------------------------------------------------------------------------------------- fused path
def test_fused_path_never_materializes_an_attention_map(pipe, make_concept, gen, monkeypatch):
    """The C stream's cross-attention is one SDPA call per layer: no softmax map is ever built in Python."""
    import diffusers.models.attention_processor as attention_processor

    calls = {"softmax": 0, "scores": 0, "sdpa": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "softmax", counting("softmax", torch.softmax))
    monkeypatch.setattr(torch.nn.functional, "softmax", counting("softmax", torch.nn.functional.softmax))
    scores = attention_processor.Attention.get_attention_scores
    monkeypatch.setattr(attention_processor.Attention, "get_attention_scores", counting("scores", scores))
    sdpa = counting("sdpa", torch.nn.functional.scaled_dot_product_attention)
    monkeypatch.setattr(attention_processor.F, "scaled_dot_product_attention", sdpa)

    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    pipe("a cat", num_inference_steps=2, output_type="latent", generator=gen())
    assert calls["sdpa"] > 0 and calls["softmax"] == 0 and calls["scores"] == 0

    prompt = "a cat"
    positions = find_class_word_positions(pipe.tokenizer, prompt, "cat")
    residuals = pipe.infusion_concepts[pipe.get_list_infusion_concepts()[0]].residuals
    naive_infusion_latents(pipe, prompt, [(residuals, 1.0, positions)], latents=torch.randn(1, 4, 8, 8),
                           num_inference_steps=2, guidance_scale=7.5)  # fmt: skip
    assert calls["softmax"] > 0  # the counters do see maps: the map-storing reference builds them
