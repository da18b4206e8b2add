"""The diffusers contract: a call without a concept is the parent's, with whatever components are None; prompt_embeds
with a concept need positions (the helper finds them); callbacks see and edit the returned images' rows.

The XL pipeline is held to the same contract (issue 17, item 5); docs/diffusers-compat.md has diffusers' own tests.
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback

from diffusers_infusion import InfusionCallError, InfusionPipeline, InfusionXLPipeline, infusion_token_indices
from diffusers_infusion.reference import naive_infusion_latents
from diffusers_infusion.tiny import tiny_sdxl_components

STEPS = 3
PAIRS = {False: (StableDiffusionPipeline, InfusionPipeline), True: (StableDiffusionXLPipeline, InfusionXLPipeline)}
TEXT_PARTS = {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"}


@pytest.fixture
def xl_components():
    return tiny_sdxl_components(seed=0)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(pipe, prompt):
    """diffusers' ``encode_prompt`` outputs as call arguments (4 for SDXL, 2 for SD)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return dict(zip(names, pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1)))
    return dict(zip(("prompt_embeds", "negative_prompt_embeds"), pipe.encode_prompt(prompt, "cpu", 1, True)))


# ------------------------------------------------------------------------------- 1. no concept: exactly the parent
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize("case", ["no concept loaded", "concept deactivated for the call", "strength 0"])
def test_encode_prompt_in_isolation_is_the_parents_call(components, xl_components, make_concept, gen, xl, case):
    """diffusers' "encode_prompt works in isolation": text parts None, prompt_embeds from a pipeline that has them."""
    parts = xl_components if xl else components
    parent, child = PAIRS[xl]
    embeds = _encode(_quiet(parent(**parts)), "a photo of a cat")
    bare = {k: None if k in TEXT_PARTS else v for k, v in parts.items()}
    pipe = _quiet(child(**bare))
    call = {}
    if case != "no concept loaded":
        pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))  # with no tokenizer, the class word is unchecked
        call = {"infusion_concepts": {}} if case == "concept deactivated for the call" else {}
        if case == "strength 0":
            pipe.set_infusion_concepts("default_0", 0.0)
    kwargs = dict(num_inference_steps=2, output_type="np", **embeds)
    expected = _quiet(parent(**bare))(generator=gen(), **kwargs).images
    assert pipe.tokenizer is None and pipe.text_encoder is None
    assert (pipe(generator=gen(), **kwargs, **call).images == expected).all()


# --------------------------------------------------------------- 4. prompt_embeds with a concept: positions needed
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_prompt_embeds_with_a_concept_need_positions_and_the_helper_gives_them(components, xl_components,
                                                                               make_concept, gen, xl):  # fmt: skip
    parts = xl_components if xl else components
    pipe = _quiet((InfusionXLPipeline if xl else InfusionPipeline)(**parts))
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"), "cat")
    prompt = "a photo of a cat next to a cat"
    embeds = _encode(pipe, prompt)
    kwargs = dict(num_inference_steps=2, output_type="latent")
    with pytest.raises(InfusionCallError, match=r"'cat' is active but .* no prompt .*infusion_token_indices"):
        pipe(**embeds, **kwargs)
    indices = infusion_token_indices(pipe, prompt)
    assert indices == {"cat": [5, 9]}  # 0 is the start token
    assert infusion_token_indices(pipe, [prompt, "a dog"]) == [{"cat": [5, 9]}, {}]
    from_embeds = pipe(**embeds, infusion_token_indices=indices, generator=gen(), **kwargs).images
    from_prompt = pipe(prompt, generator=gen(), return_base_images=True, **kwargs)
    assert torch.allclose(from_embeds, from_prompt.images, atol=1e-6)
    assert not torch.allclose(from_prompt.images, from_prompt.base_images, atol=1e-3)  # the concept does act
    bare = _quiet((InfusionXLPipeline if xl else InfusionPipeline)(**{k: None if k in TEXT_PARTS else v
                                                                      for k, v in parts.items()}))  # fmt: skip
    bare.load_infusion_concept(pipe.infusion_concepts["cat"], "cat")
    no_text = bare(**embeds, infusion_token_indices=indices, generator=gen(), **kwargs).images
    assert torch.allclose(no_text, from_prompt.images, atol=1e-6)  # no tokenizer or text encoder needed


def test_positions_helper_checks_its_input(pipe, make_concept):
    pipe.load_infusion_concept(make_concept(pipe.unet, "teddy bear"), "teddy")
    assert infusion_token_indices(pipe, "a teddy bear on a teddy bear", names=["teddy"]) == {"teddy": [3, 7]}
    with pytest.raises(Exception, match="names has concept names \\['dog'\\] that are not loaded"):
        infusion_token_indices(pipe, "a dog", names=["dog"])
    pipe.tokenizer = None
    with pytest.raises(InfusionCallError, match="pipe.tokenizer is None"):
        infusion_token_indices(pipe, "a teddy bear")


# -------------------------------------------------------------------- 2. callbacks see and edit the returned rows
def _pattern(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_callback_sees_output_rows_and_its_edit_acts_like_the_naive_expectation(pipe, make_concept):
    """A callback that edits latents (not additively) at every step, on a batch with and without the class word."""
    pipe.to(dtype=torch.float64)
    concept = make_concept(pipe.unet, "cat")
    pipe.load_infusion_concept(concept, "cat")
    prompts = ["a cat on the beach", "a red car"]
    noise = _pattern((2, 4, 8, 8), 3)
    seen = []

    def edit(step, latents):  # shrink toward a fixed pattern: the change depends on the latents
        return 0.8 * latents + 0.3 * _pattern(latents.shape[1:], 10 + step)

    def callback(p, step, t, kwargs):
        seen.append({k: v.shape for k, v in kwargs.items()})
        kwargs["latents"] = torch.stack([edit(step, row) for row in kwargs["latents"]])
        return kwargs

    out = pipe(prompts, num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=6.0,
               return_base_images=True, callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])  # fmt: skip
    assert len(seen) == STEPS
    assert seen[0]["latents"] == (2, 4, 8, 8)  # one row per returned image (the internal batch has 3)
    assert seen[0]["prompt_embeds"][0] == 4  # [uncond | cond] of the returned images
    for i, prompt in enumerate(prompts):
        concepts = [(concept.residuals, 1.0, [2])] if i == 0 else []  # "a red car": no class word, no concept
        naive_f, naive_c = naive_infusion_latents(pipe, prompt, concepts, latents=noise[i : i + 1],
                                                  num_inference_steps=STEPS, guidance_scale=6.0,
                                                  callback=lambda s, z: edit(s, z[0])[None])  # fmt: skip
        assert (out.images[i] - naive_c[0]).abs().max() < 1e-9, prompt
        assert (out.base_images[i] - naive_f[0]).abs().max() < 1e-9, prompt
    assert (out.images[1] == out.base_images[1]).all()
    plain = pipe(prompts, num_inference_steps=STEPS, latents=noise, output_type="latent", guidance_scale=6.0)
    assert (plain.images - out.images).abs().max() > 1e-2  # the edit does change the images


@pytest.mark.parametrize("mode", ["exact", "fast", "sequential"])
def test_callback_returns_take_effect_and_interrupt_works(pipe, make_concept, gen, mode):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    call = dict(num_inference_steps=STEPS, output_type="latent", num_images_per_prompt=2,
                infusion_mode="fast" if mode == "fast" else "exact",
                infusion_streams="sequential" if mode == "sequential" else "batched")  # fmt: skip
    recorded = []

    def record(p, step, t, kwargs):
        recorded.append(kwargs["latents"].clone())
        return kwargs

    full = pipe(["a cat", "a dog"], generator=gen(), callback_on_step_end=record, **call).images
    assert recorded[-1].shape == full.shape == (4, 4, 8, 8)
    assert (recorded[-1] == full).all()  # the callback saw the returned images' latents

    def interrupt(p, step, t, kwargs):
        p._interrupt = step == 1
        return kwargs

    stopped = pipe(["a cat", "a dog"], generator=gen(), callback_on_step_end=interrupt, **call).images
    assert (stopped == recorded[1]).all()

    def zero_last(p, step, t, kwargs):
        if step == STEPS - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    assert (pipe(["a cat", "a dog"], generator=gen(), callback_on_step_end=zero_last, **call).images == 0).all()


def test_callback_editing_in_place_and_returning_bad_rows(pipe, make_concept, gen):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    kwargs = dict(num_inference_steps=2, output_type="latent", generator=gen())

    def in_place(p, step, t, callback_kwargs):
        callback_kwargs["latents"].mul_(0.0)
        return callback_kwargs

    assert (pipe("a cat", callback_on_step_end=in_place, **kwargs).images == 0).all()
    kwargs["generator"] = gen()
    with pytest.raises(InfusionCallError, match="returned 'latents' with 3 rows; it was shown 1"):
        pipe("a cat", callback_on_step_end=lambda p, s, t, k: {"latents": k["latents"].repeat(3, 1, 1, 1)}, **kwargs)


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_diffusers_cfg_cutoff_callback_with_a_concept(components, xl_components, make_concept, gen, xl):
    """diffusers' own callback drops the unconditional half (rows ``[-1:]``); F behaves as the parent's run does."""
    parts = xl_components if xl else components
    parent, child = PAIRS[xl]
    pipe, plain = _quiet(child(**parts)), _quiet(parent(**parts))
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    cutoff = (SDXLCFGCutoffCallback if xl else SDCFGCutoffCallback)(cutoff_step_ratio=None, cutoff_step_index=1)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", guidance_scale=6.0)
    out = pipe("a cat", generator=gen(), return_base_images=True, callback_on_step_end=cutoff, **kwargs)
    expected_base = plain("a cat", generator=gen(), callback_on_step_end=cutoff, **kwargs).images
    without_cutoff = pipe("a cat", generator=gen(), **kwargs).images
    assert torch.allclose(out.base_images, expected_base, atol=1e-5)  # F: the parent's run with the cutoff
    assert not torch.allclose(out.images, out.base_images, atol=1e-3)  # C: still the concept
    assert not torch.allclose(out.images, without_cutoff, atol=1e-3)  # and the cutoff did act


def test_xl_callback_sees_output_rows(xl_components, make_concept, gen):
    pipe = _quiet(InfusionXLPipeline(**xl_components))
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    seen = []

    def callback(p, step, t, kwargs):
        seen.append({k: tuple(v.shape) for k, v in kwargs.items()})
        kwargs["latents"] = kwargs["latents"] * 0.5
        return kwargs

    inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    out = pipe(["a cat", "a dog"], num_inference_steps=2, output_type="latent", generator=gen(),
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)  # fmt: skip
    assert seen[0]["latents"][0] == 2 and seen[0]["prompt_embeds"][0] == 4
    assert seen[0]["add_text_embeds"][0] == 4 and seen[0]["add_time_ids"][0] == 4
    recorded = []
    pipe(["a cat", "a dog"], num_inference_steps=2, output_type="latent", generator=gen(),
         callback_on_step_end=lambda p, s, t, k: recorded.append(k["latents"] * 0.5) or {"latents": recorded[-1]},
         )  # fmt: skip
    assert (recorded[-1] == out.images).all()
