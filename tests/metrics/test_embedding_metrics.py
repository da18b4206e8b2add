"""CLIP-T, CLIP-I and DINO-I on tiny randomly initialised models built in code (no download, no torchvision)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTModel
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from diffusers_infusion.metrics import (
    clip_i,
    clip_image_embeddings,
    clip_t,
    clip_text_embeddings,
    dino_i,
    dino_image_embeddings,
    to_pixels,
)
from diffusers_infusion.tiny import build_clip_tokenizer

PROMPTS = ["a photo of a cat", "a red car at night", "a dog on the beach", "a cup"]
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=8)


@pytest.fixture(scope="module")
def clip() -> tuple[CLIPModel, CLIPProcessor]:
    tokenizer = build_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=32, **VIT), projection_dim=16))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)  # fmt: skip


@pytest.fixture(scope="module")
def dino() -> tuple[ViTModel, ViTImageProcessorPil]:
    torch.manual_seed(1)
    model = ViTModel(ViTConfig(image_size=32, **VIT), add_pooling_layer=False)
    return model.eval(), ViTImageProcessorPil(size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def images() -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]


def test_embeddings_are_unit_vectors_of_the_right_size(clip, dino, images):
    model, processor = clip
    assert clip_image_embeddings(images, model=model, processor=processor).shape == (4, 16)
    text = clip_text_embeddings(PROMPTS, model=model, processor=processor)
    assert text.shape == (4, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    assert dino_image_embeddings(images, model=dino[0], processor=dino[1]).shape == (4, 32)


def test_identical_images_score_one(clip, dino, images):
    same = [images[0]] * 3
    assert clip_i(same, [images[0]], model=clip[0], processor=clip[1]) == pytest.approx(1.0, abs=1e-6)
    assert dino_i(same, [images[0]], model=dino[0], processor=dino[1]) == pytest.approx(1.0, abs=1e-6)
    assert clip_i(images, images, model=clip[0], processor=clip[1]) < 1.0  # all pairs, not only matching ones


def test_symmetric_bounded_and_order_invariant(clip, dino, images):
    a, b = images[:3], images[1:]
    for metric, (model, processor) in ((clip_i, clip), (dino_i, dino)):
        value = metric(a, b, model=model, processor=processor)
        assert -1.0 <= value <= 1.0
        assert metric(b, a, model=model, processor=processor) == pytest.approx(value, abs=1e-6)
        assert metric(a[::-1], b, model=model, processor=processor, batch_size=2) == pytest.approx(value, abs=1e-6)
    value = clip_t(images, PROMPTS, model=clip[0], processor=clip[1])
    assert -1.0 <= value <= 1.0
    reordered = clip_t(images[::-1], PROMPTS[::-1], model=clip[0], processor=clip[1], batch_size=3)
    assert reordered == pytest.approx(value, abs=1e-6)


def test_clip_t_is_the_plain_cosine_of_clip(clip, images):
    """The paper's CLIP-T (~0.25 in Table 1): CLIP's logits divided by its logit scale, no ×100 or ×2.5."""
    model, processor = clip
    inputs = processor(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # (images, texts) = scale · cosine
        expected = float((logits.diagonal() / model.logit_scale.exp()).mean())
    assert clip_t(images, PROMPTS, model=model, processor=processor) == pytest.approx(expected, abs=1e-5)
    assert clip_t(images, PROMPTS, model=model, processor=processor) != clip_t(
        images, PROMPTS[::-1], model=model, processor=processor
    )


def test_image_formats_agree(clip, images):
    model, processor = clip
    pil = clip_image_embeddings(images, model=model, processor=processor)
    array = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])  # (N, H, W, 3) in [0, 1]
    torch.testing.assert_close(clip_image_embeddings(array, model=model, processor=processor), pil)
    tensor = to_pixels(images)  # (N, 3, H, W) in [-1, 1]
    torch.testing.assert_close(clip_image_embeddings(tensor, model=model, processor=processor), pil)


def test_dinov2_uses_the_cls_token(images):
    torch.manual_seed(2)
    model = Dinov2Model(Dinov2Config(image_size=32, **VIT)).eval()
    processor = BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    emb = dino_image_embeddings(images, model=model, processor=processor)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(emb, torch.nn.functional.normalize(cls, dim=-1))
    assert dino_i(images[:1], images[:1], model=model, processor=processor) == pytest.approx(1.0, abs=1e-6)


def test_bad_arguments(clip, dino, images):
    with pytest.raises(ValueError, match="prompts has 2 entries for 4 images"):
        clip_t(images, PROMPTS[:2], model=clip[0], processor=clip[1])
    with pytest.raises(ValueError, match="has no tokenizer"):
        clip_t(images, PROMPTS, model=clip[0], processor=clip[1].image_processor)
    with pytest.raises(TypeError, match="PIL images"):
        clip_i(images[0], images, model=clip[0], processor=clip[1])
    with pytest.raises(ValueError, match="images is empty"):
        dino_i([], images, model=dino[0], processor=dino[1])
    with pytest.raises(ValueError, match="reference_images is empty"):
        clip_i(images, [], model=clip[0], processor=clip[1])
