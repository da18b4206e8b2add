"""CLIP-T, CLIP-I and DINO-I: cosine similarities of embeddings from models the caller supplies.

Nothing is downloaded here: pass ``transformers`` models and processors, e.g.

    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel
    clip = CLIPModel.from_pretrained("openai/clip-vit-base-patch32")
    clip_processor = CLIPProcessor.from_pretrained("openai/clip-vit-base-patch32")
    dino = ViTModel.from_pretrained("facebook/dino-vits16", add_pooling_layer=False)
    dino_processor = ViTImageProcessor.from_pretrained("facebook/dino-vits16")

    clip_t(images, prompts, model=clip, processor=clip_processor)        # ~0.25-0.30 for SD 1.5 images
    clip_i(images, photos, model=clip, processor=clip_processor)
    dino_i(images, photos, model=dino, processor=dino_processor)

All three are plain cosines in [-1, 1], as in the paper's Table 1 (CLIP-T ≈ 0.25), not the ×100 "CLIPScore"
nor its ×2.5 variant. CLIP-T averages over (image, its prompt) pairs; CLIP-I and DINO-I average over every
(generated image, reference image) pair (DreamBooth's protocol). DINO-I uses the CLS token of the last hidden
state (``ViTModel`` or ``Dinov2Model``), not the pooler. Without torchvision, transformers 5 falls back to its PIL
image processors (``CLIPImageProcessorPil``) by itself; resizing may then differ from torchvision's in the last
digits.

The ``*_embeddings`` functions return unit vectors, so a benchmark can embed the reference photos once and use
:func:`mean_cosine` for every method and checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .images import ImageBatch, to_pil


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


def _pil(images: ImageBatch, argument: str = "images") -> list:
    """PIL images of a non-empty batch."""
    pil = to_pil(images, argument=argument)
    if not pil:
        raise ValueError(f"{argument} is empty. Pass at least one image.")
    return pil


def _pixel_values(pil: list, processor, device, dtype) -> torch.Tensor:
    return _image_processor(processor)(images=pil, return_tensors="pt").pixel_values.to(device, dtype)


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is projected (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _batches(n: int, batch_size: int):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    return (slice(i, i + batch_size) for i in range(0, n, batch_size))


@torch.no_grad()
def clip_image_embeddings(
    images: ImageBatch, *, model: torch.nn.Module, processor: Any, batch_size: int = 32
) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (N, projection_dim), float32 on the CPU."""
    pil = _pil(images)
    param = next(model.parameters())
    out = [
        _features(model.get_image_features(pixel_values=_pixel_values(pil[s], processor, param.device, param.dtype)))
        for s in _batches(len(pil), batch_size)
    ]
    return torch.nn.functional.normalize(torch.cat(out).float().cpu(), dim=-1)


@torch.no_grad()
def clip_text_embeddings(
    prompts: Sequence[str], *, model: torch.nn.Module, processor: Any, batch_size: int = 32
) -> torch.Tensor:
    """Unit-norm CLIP text embeddings (N, projection_dim), float32 on the CPU (prompts truncated to 77 tokens)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"processor={type(processor).__name__} has no tokenizer. Pass a CLIPProcessor (tokenizer and image "
            "processor), e.g. CLIPProcessor.from_pretrained('openai/clip-vit-base-patch32')."
        )
    device = next(model.parameters()).device
    out = []
    for s in _batches(len(prompts), batch_size):
        tokens = tokenizer(list(prompts[s]), padding=True, truncation=True, return_tensors="pt").to(device)
        out.append(
            _features(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
        )
    return torch.nn.functional.normalize(torch.cat(out).float().cpu(), dim=-1)


@torch.no_grad()
def dino_image_embeddings(
    images: ImageBatch, *, model: torch.nn.Module, processor: Any, batch_size: int = 32
) -> torch.Tensor:
    """Unit-norm CLS-token embeddings (N, hidden) of a ViT (DINO ``ViTModel`` or ``Dinov2Model``), CPU float32."""
    pil = _pil(images)
    param = next(model.parameters())
    out = []
    for s in _batches(len(pil), batch_size):
        hidden = model(pixel_values=_pixel_values(pil[s], processor, param.device, param.dtype)).last_hidden_state
        out.append(hidden[:, 0])  # (B, hidden): the CLS token
    return torch.nn.functional.normalize(torch.cat(out).float().cpu(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor, *, pairwise: bool = True) -> float:
    """Mean cosine of unit vectors: over all (a_i, b_j) pairs, or of matching rows (``pairwise=False``)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"Embeddings of different sizes: {tuple(a.shape)} and {tuple(b.shape)}.")
    if not pairwise:
        if len(a) != len(b):
            raise ValueError(f"{len(a)} embeddings against {len(b)}: matching rows need equal counts.")
        return float((a.double() * b.double()).sum(-1).mean())
    return float((a.double() @ b.double().T).mean())


def clip_t(
    images: ImageBatch, prompts: str | Sequence[str], *, model: torch.nn.Module, processor: Any, batch_size: int = 32
) -> float:
    """CLIP-T: mean cosine of each image's CLIP embedding with its prompt's (plain cosine, no ×100 or ×2.5).

    Args:
        images: Generated images (PIL, array (N, H, W, 3) in [0, 1] or tensor (N, 3, H, W) in [-1, 1]).
        prompts: The prompt of each image (one per image, or a single one for all), as the user wrote it (for
            methods with a special token, the prompt with the class word, e.g. "a cat on the beach").
        model: A ``CLIPModel``.
        processor: A ``CLIPProcessor`` (tokenizer and image processor).
        batch_size: Images (or prompts) per forward pass.
    """
    images = _pil(images)
    n = len(images)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"prompts has {len(prompts)} entries for {n} images. Pass one prompt per image.")
    image_emb = clip_image_embeddings(images, model=model, processor=processor, batch_size=batch_size)
    text_emb = clip_text_embeddings(prompts, model=model, processor=processor, batch_size=batch_size)
    return mean_cosine(image_emb, text_emb, pairwise=False)


def clip_i(
    images: ImageBatch, reference_images: ImageBatch, *, model: torch.nn.Module, processor: Any, batch_size: int = 32
) -> float:
    """CLIP-I: mean cosine of CLIP image embeddings over all (generated, reference) pairs.

    Args:
        images: Generated images.
        reference_images: The concept's training photos.
        model: A ``CLIPModel``.
        processor: A ``CLIPProcessor`` or a CLIP image processor.
        batch_size: Images per forward pass.
    """
    kwargs = dict(model=model, processor=processor, batch_size=batch_size)
    images, reference_images = _pil(images), _pil(reference_images, "reference_images")
    return mean_cosine(clip_image_embeddings(images, **kwargs), clip_image_embeddings(reference_images, **kwargs))


def dino_i(
    images: ImageBatch, reference_images: ImageBatch, *, model: torch.nn.Module, processor: Any, batch_size: int = 32
) -> float:
    """DINO-I: mean cosine of ViT CLS embeddings (e.g. ``facebook/dino-vits16``) over all (generated, reference) pairs.

    Args:
        images: Generated images.
        reference_images: The concept's training photos.
        model: A ``ViTModel`` (DINO) or ``Dinov2Model``.
        processor: Its image processor (``ViTImageProcessor`` / ``BitImageProcessor``).
        batch_size: Images per forward pass.
    """
    kwargs = dict(model=model, processor=processor, batch_size=batch_size)
    images, reference_images = _pil(images), _pil(reference_images, "reference_images")
    return mean_cosine(dino_image_embeddings(images, **kwargs), dino_image_embeddings(reference_images, **kwargs))
