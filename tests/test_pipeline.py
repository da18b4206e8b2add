"""InfusionPipeline's public call: construction, outputs, batching, shared components, other adapters, bad input."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor

from diffusers_infusion import InfusionCallError, InfusionPipeline, InfusionPipelineOutput
from diffusers_infusion.attention import cross_attention_layers

STEPS = 2


def test_outputs_and_tuple_form(pipe, make_concept, gen):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    out = pipe("a cat", num_inference_steps=STEPS, generator=gen(), return_base_images=True)
    assert isinstance(out, InfusionPipelineOutput)
    assert len(out.images) == len(out.base_images) == 1 and out.images[0].size == (16, 16)
    images, nsfw, base = pipe("a cat", num_inference_steps=STEPS, generator=gen(), output_type="np",
                              return_base_images=True, return_dict=False)  # fmt: skip
    assert images.shape == base.shape == (1, 16, 16, 3) and nsfw is None
    assert len(pipe("a cat", num_inference_steps=STEPS, return_dict=False)) == 2
    assert pipe("a cat", num_inference_steps=STEPS).base_images is None


def test_from_pretrained_and_from_pipe(sd_pipe, make_concept, gen, tmp_path):
    sd_pipe.save_pretrained(tmp_path)
    loaded = InfusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, InfusionPipeline)
    piped = InfusionPipeline.from_pipe(sd_pipe)
    assert piped.unet is sd_pipe.unet
    plain = sd_pipe("a cat", num_inference_steps=STEPS, generator=gen(), output_type="np").images
    piped.set_progress_bar_config(disable=True)
    piped.load_infusion_concept(make_concept(piped.unet, "cat"))
    infused = piped("a cat", num_inference_steps=STEPS, generator=gen(), output_type="np").images
    assert not (infused == plain).all()
    # The plain pipeline shares the UNet and keeps returning its plain images while the concept is loaded.
    assert (sd_pipe("a cat", num_inference_steps=STEPS, generator=gen(), output_type="np").images == plain).all()


def test_hooks_are_removed_even_when_the_call_fails(pipe, make_concept, gen):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))

    def fail(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe("a cat", num_inference_steps=STEPS, callback_on_step_end=fail)
    for attn in cross_attention_layers(pipe.unet).values():
        assert not attn.to_q._forward_hooks and not attn.to_v._forward_hooks


def test_callback_sees_one_row_per_returned_image(pipe, make_concept, gen):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    shapes = []

    def record(pipeline, step, timestep, tensors):
        shapes.append(tuple(tensors["latents"].shape))
        return tensors

    pipe(["a cat", "a dog"], num_inference_steps=STEPS, callback_on_step_end=record, output_type="latent")
    assert shapes == [(2, 4, 8, 8)] * STEPS  # not the internal [F F | C] batch (test_diffusers_contract.py)


def test_images_per_prompt_and_generator_lists(pipe, sd_pipe, make_concept, gen):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    prompts = ["a cat", "a dog"]
    kwargs = dict(num_inference_steps=STEPS, num_images_per_prompt=2, output_type="latent", eta=1.0)
    out = pipe(prompts, generator=[gen(i) for i in range(4)], return_base_images=True, **kwargs)
    plain = sd_pipe(prompts, generator=[gen(i) for i in range(4)], **kwargs).images
    assert out.images.shape == (4, 4, 8, 8)
    # With one generator per image, the C rows draw the same step noise as their F rows, so F stays the base model.
    assert torch.allclose(out.base_images, plain, atol=1e-5)
    assert torch.equal(out.images[2:], out.base_images[2:])  # the dog prompt has no C row
    assert not torch.allclose(out.images[:2], out.base_images[:2], atol=1e-3)


def test_prompt_embeds_need_token_indices(pipe, make_concept, gen):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"), "cat")
    embeds, negative = pipe.encode_prompt("a photo of a cat", "cpu", 1, True)
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS,
                  output_type="latent")  # fmt: skip
    with pytest.raises(InfusionCallError, match="infusion_token_indices=.*positions"):
        pipe(**kwargs)
    by_embeds = pipe(generator=gen(), infusion_token_indices={"cat": [5]}, **kwargs).images
    by_prompt = pipe("a photo of a cat", generator=gen(), num_inference_steps=STEPS, output_type="latent").images
    assert torch.allclose(by_embeds, by_prompt, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"infusion_concepts": [{"cat": 1.0}]}, "infusion_concepts has 1 entries for 2 prompts"),
        ({"infusion_concepts": "cat"}, "must be a dict, a list of dicts"),
        ({"infusion_concepts": {"cat": "high"}}, r"infusion_concepts\['cat'\]='high' must be a number"),
        ({"infusion_token_indices": {"cat": [77]}}, r"positions \[77\] outside \[1, 76\]"),
        ({"infusion_token_indices": {"cat": [0]}}, r"positions \[0\] outside"),
        ({"infusion_token_indices": {"cat": ["x"]}}, "not a list of integers"),
        ({"infusion_concepts": {}, "infusion_token_indices": {"cat": [3]}}, "not active for prompt 0"),
        ({"infusion_token_indices": {"dog": [3]}}, r"\['dog'\] that are not loaded"),
    ],
)
def test_bad_call_arguments(pipe, make_concept, kwargs, match):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"), "cat")
    with pytest.raises(InfusionCallError if "loaded" not in match else ValueError, match=match):
        pipe(["a cat", "a dog"], num_inference_steps=1, **kwargs)


def test_generator_list_of_wrong_length(pipe, make_concept, gen):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    with pytest.raises(InfusionCallError, match="list of 3 generators for 2 images"):
        pipe(["a cat", "a dog"], num_inference_steps=1, generator=[gen(), gen(), gen()])


def test_other_attention_processors_keep_working(pipe, sd_pipe, make_concept, gen):
    """A user's processors stay installed, and the F stream is what the plain pipeline with them gives."""
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    kwargs = dict(num_inference_steps=STEPS, output_type="latent")
    out = pipe("a cat", generator=gen(), return_base_images=True, **kwargs)
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
    assert torch.allclose(out.base_images, sd_pipe("a cat", generator=gen(), **kwargs).images, atol=1e-5)
    assert not torch.allclose(out.images, out.base_images, atol=1e-3)


def test_peft_lora_keeps_working(pipe, sd_pipe, make_concept, gen):
    from peft import LoraConfig

    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False), "style"
    )
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    kwargs = dict(num_inference_steps=STEPS, output_type="latent")
    out = pipe("a cat", generator=gen(), return_base_images=True, **kwargs)
    with_lora = sd_pipe("a cat", generator=gen(), **kwargs).images  # shares the UNet, so the LoRA too
    pipe.unet.disable_adapters()
    without_lora = sd_pipe("a cat", generator=gen(), **kwargs).images
    assert torch.allclose(out.base_images, with_lora, atol=1e-5)
    assert not torch.allclose(with_lora, without_lora, atol=1e-3)  # the LoRA does act
    assert not torch.allclose(out.images, out.base_images, atol=1e-3)


def test_plain_pipeline_class_is_untouched(components):
    assert not hasattr(StableDiffusionPipeline, "load_infusion_concept")
