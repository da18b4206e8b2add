"""The instance photos of a concept: images, captions (``metadata.jsonl`` or templates), optional object masks.

Everything is read once and validated up front (an empty folder, an unreadable image, a malformed metadata line or
caption template, a caption without the class word are errors naming the flag, the file or line, and the value).
16-bit grayscale photos are scaled to 8 bits, not clipped. The set is small (a few photos), so it lives in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_TEMPLATES = (
    "a photo of a {class_word}",
    "a rendering of a {class_word}",
    "a cropped photo of the {class_word}",
    "the photo of a {class_word}",
    "a close-up photo of a {class_word}",
    "a good photo of the {class_word}",
)


class TrainingDataError(ValueError):
    """Bad training data: the message names the flag, the value and the fix."""


@dataclass
class InstanceData:
    """Instance photos as tensors: ``pixels`` in [-1, 1], one caption list per photo, optional masks in [0, 1]."""

    pixels: torch.Tensor  # (photos, 3, resolution, resolution)
    captions: list[list[str]]  # per photo, the captions to draw from
    masks: torch.Tensor | None  # (photos, 1, resolution, resolution)
    files: list[str]
    sources: list[str] = field(default_factory=list)  # per photo, where its captions come from (for messages)


def _resize_and_crop(image: PIL.Image.Image, resolution: int, center_crop: bool) -> PIL.Image.Image:
    """Resize the short side to ``resolution``, then crop a square (centered, or top-left aligned)."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, PIL.Image.Resampling.BICUBIC)
    left = (image.width - resolution) // 2 if center_crop else 0
    top = (image.height - resolution) // 2 if center_crop else 0
    return image.crop((left, top, left + resolution, top + resolution))


def _read_image(path: Path, flag: str, mode: str) -> PIL.Image.Image:
    """The image in ``mode`` ("RGB" or "L"); 16-bit grayscale is scaled to 8 bits (``convert`` would clip it)."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            image = image.copy()
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise TrainingDataError(
            f"{flag}: cannot read image '{path}' ({error}). Remove it or replace it with a valid image file."
        ) from error
    if image.mode.startswith("I;16"):  # 16-bit grayscale (PNG, TIFF): 0..65535
        image = PIL.Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8), "L")
    elif image.mode in ("I", "F"):  # 32-bit integer or float pixels: no known range to scale from
        raise TrainingDataError(
            f"{flag}: image '{path}' has 32-bit {'integer' if image.mode == 'I' else 'float'} pixels (mode "
            f"{image.mode}), whose range is unknown. Save it as an 8-bit (or 16-bit grayscale) image."
        )
    return image.convert(mode)


def _read_metadata(folder: Path) -> dict[str, tuple[str, int]]:
    """``file_name -> (caption, line number)`` from ``metadata.jsonl`` (datasets' imagefolder convention)."""
    path = folder / "metadata.jsonl"
    if not path.exists():
        return {}
    captions = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"--instance_data_dir: line {number} of '{path}'"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TrainingDataError(f"{where} is not UTF-8 text ({error}). Save the file as UTF-8.") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainingDataError(f"{where} is not valid JSON ({error}). Fix that line.") from None
        caption = (row.get("text") or row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise TrainingDataError(
                f"{where} is {line.strip()[:80]!r}, not a JSON object with 'file_name' and 'text'. Fix that line "
                '(e.g. {"file_name": "0.png", "text": "a photo of a cat"}).'
            )
        if not isinstance(caption, str) or not caption.strip():
            raise TrainingDataError(
                f"{where} has caption {caption!r} for '{row['file_name']}': 'text' must be a non-empty string. "
                "Fix that line."
            )
        captions[row["file_name"]] = (caption, number)
    return captions


def _fill(template: str, class_word: str, flag: str) -> str:
    """A caption template filled with the class word, or an error naming the template."""
    try:
        return template.format(class_word=class_word)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as error:
        raise TrainingDataError(
            f"{flag}: template {template!r} cannot be filled ({type(error).__name__}: {error}). The only field is "
            "{class_word}; write other braces doubled ({{ and }})."
        ) from None


def check_caption_tokens(data: InstanceData, tokenizer, class_word: str) -> None:
    """Every caption must hold the class word as tokens within the tokenizer's limit (else it trains nothing)."""
    from ..tokens import find_class_word_positions

    for photo, options in enumerate(data.captions):
        for caption in options:
            if not find_class_word_positions(tokenizer, caption, class_word):
                source = data.sources[photo] if data.sources else "the captions"
                raise TrainingDataError(
                    f"--class_word '{class_word}': caption {caption!r} of photo '{data.files[photo]}' ({source}) has "
                    f"no '{class_word}' token within the first {tokenizer.model_max_length} tokens (a longer word "
                    f"like 'category' holds no 'cat' token). Write the class word as its own word, near the start."
                )


def load_instance_data(
    instance_data_dir: str | Path,
    class_word: str,
    *,
    resolution: int,
    center_crop: bool = True,
    instance_prompt: str | None = None,
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
    mask_dir: str | Path | None = None,
) -> InstanceData:
    """Read and validate a concept's photos.

    Captions come, in this order, from ``metadata.jsonl`` next to the images, from ``instance_prompt`` (one caption
    for all), or from ``templates`` filled with the class word. Every caption must contain the class word.

    Args:
        instance_data_dir: Folder of photos.
        class_word: The concept's class word.
        resolution: Side of the square training images.
        center_crop: Crop the center (else the top-left) after resizing the short side.
        instance_prompt: One caption for every photo (may contain ``{class_word}``).
        templates: Caption templates used when neither metadata nor ``instance_prompt`` give captions.
        mask_dir: Optional folder of grayscale masks with the photos' file names (white = the object).
    """
    folder = Path(instance_data_dir)
    if not folder.is_dir():
        raise TrainingDataError(f"--instance_data_dir '{folder}' is not a folder. Pass the folder of your photos.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainingDataError(
            f"--instance_data_dir '{folder}' has no images ({', '.join(IMAGE_SUFFIXES)}). Put the concept's photos "
            "there."
        )
    metadata = _read_metadata(folder)
    if instance_prompt:
        prompt_caption = _fill(instance_prompt, class_word, "--instance_prompt")
    template_captions = [_fill(t, class_word, "--caption_templates") for t in templates]
    pixels, captions, masks, sources = [], [], [], []
    for path in files:
        image = _resize_and_crop(_read_image(path, "--instance_data_dir", "RGB"), resolution, center_crop)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
        if path.name in metadata:
            captions.append([metadata[path.name][0]])
            sources.append(f"line {metadata[path.name][1]} of '{folder / 'metadata.jsonl'}'")
        elif instance_prompt:
            captions.append([prompt_caption])
            sources.append("--instance_prompt")
        else:
            captions.append(template_captions)
            sources.append("--caption_templates")
        if mask_dir is not None:
            mask_path = Path(mask_dir) / path.name
            if not mask_path.exists():
                raise TrainingDataError(f"--mask_dir: no mask '{mask_path}' for image '{path.name}'. Add one.")
            mask = _resize_and_crop(_read_image(mask_path, "--mask_dir", "L"), resolution, center_crop)
            masks.append(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None])
    if not any(class_word.lower() in c.lower() for options in captions for c in options):
        raise TrainingDataError(
            f"--class_word '{class_word}' appears in no caption (e.g. {captions[0][0]!r}). Use the word your "
            "captions use for the object, or fix the captions (metadata.jsonl / --instance_prompt)."
        )
    logger.info("Read %d photos from %s.", len(files), folder)
    return InstanceData(
        pixels=torch.stack(pixels),
        captions=captions,
        masks=torch.stack(masks) if masks else None,
        files=[p.name for p in files],
        sources=sources,
    )
