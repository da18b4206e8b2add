"""The instance photos of a concept: images, captions (``metadata.jsonl`` or templates), optional object masks.

Everything is read once and validated up front (an empty folder, an unreadable image, a class word absent from
every caption are errors naming the flag and the value). The set is small (a few photos), so it lives in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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


def _resize_and_crop(image: PIL.Image.Image, resolution: int, center_crop: bool) -> PIL.Image.Image:
    """Resize the short side to ``resolution``, then crop a square (centered, or top-left aligned)."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, PIL.Image.Resampling.BICUBIC)
    left = (image.width - resolution) // 2 if center_crop else 0
    top = (image.height - resolution) // 2 if center_crop else 0
    return image.crop((left, top, left + resolution, top + resolution))


def _read_image(path: Path, flag: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise TrainingDataError(
            f"{flag}: cannot read image '{path}' ({error}). Remove it or replace it with a valid image file."
        ) from error


def _read_metadata(folder: Path) -> dict[str, str]:
    path = folder / "metadata.jsonl"
    if not path.exists():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[row["file_name"]] = row.get("text") or row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise TrainingDataError(
                f"--instance_data_dir: line {number} of '{path}' is not a JSON object with 'file_name' and 'text' "
                f"({error}). Fix that line (datasets' imagefolder convention)."
            ) from error
    return captions


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
    pixels, captions, masks = [], [], []
    for path in files:
        image = _resize_and_crop(_read_image(path, "--instance_data_dir").convert("RGB"), resolution, center_crop)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
        if path.name in metadata:
            captions.append([metadata[path.name]])
        elif instance_prompt:
            captions.append([instance_prompt.format(class_word=class_word)])
        else:
            captions.append([t.format(class_word=class_word) for t in templates])
        if mask_dir is not None:
            mask_path = Path(mask_dir) / path.name
            if not mask_path.exists():
                raise TrainingDataError(f"--mask_dir: no mask '{mask_path}' for image '{path.name}'. Add one.")
            mask = _resize_and_crop(_read_image(mask_path, "--mask_dir").convert("L"), resolution, center_crop)
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
    )
