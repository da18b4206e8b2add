"""Infusion stacked with an IP-Adapter (tiny image encoder built in code) and a LoRA file, in any load order."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from diffusers_infusion import InfusionPipeline
from diffusers_infusion.attention import cross_attention_layers

KWARGS = dict(num_inference_steps=2, output_type="latent")


def ip_adapter_state_dict(unet, image_dim: int) -> dict:
    """Random IP-Adapter weights in the original checkpoint layout ({image_proj, ip_adapter})."""
    g = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * dim, image_dim, generator=g) * 0.1,
        "proj.bias": torch.zeros(4 * dim),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    ip_adapter, key_id = {}, 1
    layers = cross_attention_layers(unet)
    for name in unet.attn_processors:
        layer = name.removesuffix(".processor")
        if layer in layers:
            hidden = layers[layer].to_k.out_features
            ip_adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, dim, generator=g) * 0.3
            ip_adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, dim, generator=g) * 0.3
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.fixture
def ip_components(components):
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=37, image_size=32, patch_size=8)  # fmt: skip
    components["image_encoder"] = CLIPVisionModelWithProjection(config).eval()
    components["feature_extractor"] = CLIPImageProcessor(crop_size=32, size=32)
    return components


@pytest.fixture
def image():
    return PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))


def pipes(components):
    pipe = InfusionPipeline(**components, requires_safety_checker=False)
    plain = StableDiffusionPipeline(**components, requires_safety_checker=False)  # shares every component
    for p in (pipe, plain):
        p.set_progress_bar_config(disable=True)
    return pipe, plain


@pytest.mark.parametrize("infusion_first", [True, False])
def test_ip_adapter_and_concept_in_either_order(ip_components, make_concept, gen, image, infusion_first):
    pipe, plain = pipes(ip_components)
    concept = make_concept(pipe.unet, "cat")
    if infusion_first:
        pipe.load_infusion_concept(concept, "cat")
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, 32), subfolder="", weight_name="", image_encoder_folder=None)
    if not infusion_first:
        pipe.load_infusion_concept(concept, "cat")
    out = pipe("a cat", ip_adapter_image=image, generator=gen(), return_base_images=True, **KWARGS)
    with_ip = plain("a cat", ip_adapter_image=image, generator=gen(), **KWARGS).images
    assert torch.allclose(out.base_images, with_ip, atol=1e-5)  # F is the plain pipeline with the IP-Adapter
    other = plain("a cat", ip_adapter_image=image.transpose(PIL.Image.ROTATE_90), generator=gen(), **KWARGS).images
    assert not torch.allclose(with_ip, other, atol=1e-4)  # the IP-Adapter does act
    assert not torch.allclose(out.images, out.base_images, atol=1e-3)  # and the concept acts on top of it

    pipe.unload_ip_adapter()  # re-creates other processors with no arguments: Infusion keeps nothing there
    assert pipe.get_list_infusion_concepts() == ["cat"]
    out = pipe("a cat", generator=gen(), return_base_images=True, **KWARGS)
    assert torch.allclose(out.base_images, plain("a cat", generator=gen(), **KWARGS).images, atol=1e-5)
    assert not torch.allclose(out.images, out.base_images, atol=1e-3)


def test_unloading_the_concept_leaves_the_ip_adapter(ip_components, make_concept, gen, image):
    pipe, plain = pipes(ip_components)
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, 32), subfolder="", weight_name="", image_encoder_folder=None)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    pipe.unload_infusion_concept()
    out = pipe("a cat", ip_adapter_image=image, generator=gen(), **KWARGS).images
    assert torch.equal(out, plain("a cat", ip_adapter_image=image, generator=gen(), **KWARGS).images)


@pytest.mark.parametrize("order", [("lora", "ip", "concept"), ("concept", "ip", "lora"), ("ip", "concept", "lora")])
def test_lora_ip_adapter_and_concept_together(ip_components, lora_dir, make_concept, gen, image, order):
    pipe, plain = pipes(ip_components)
    concept = make_concept(pipe.unet, "cat")
    load = {
        "lora": lambda: pipe.load_lora_weights(lora_dir, adapter_name="style"),
        "ip": lambda: pipe.load_ip_adapter(
            ip_adapter_state_dict(pipe.unet, 32), subfolder="", weight_name="", image_encoder_folder=None
        ),  # fmt: skip
        "concept": lambda: pipe.load_infusion_concept(concept, "cat"),
    }
    for name in order:
        load[name]()

    def f_is_plain_and_concept_acts(**extra) -> torch.Tensor:
        out = pipe("a cat", generator=gen(), return_base_images=True, **extra, **KWARGS)
        expected = plain("a cat", generator=gen(), **extra, **KWARGS).images  # same UNet, same LoRA/IP-Adapter
        assert torch.allclose(out.base_images, expected, atol=1e-5)
        assert not torch.allclose(out.images, out.base_images, atol=1e-3)
        return expected

    with_both = f_is_plain_and_concept_acts(ip_adapter_image=image)
    pipe.unload_lora_weights()
    with_ip = f_is_plain_and_concept_acts(ip_adapter_image=image)
    assert not torch.allclose(with_both, with_ip, atol=1e-4)  # the LoRA acted, and unloading it took it away
    pipe.unload_ip_adapter()
    assert pipe.get_list_infusion_concepts() == ["cat"]
    f_is_plain_and_concept_acts()
