"""Toy-world scores behind the metrics API: text alignment (the reader's CLIP-T) and concept similarity (CLIP-I).

The toy world (:mod:`diffusers_infusion.toy`) has an attribute reader that reads background, and class, color
and position of each object off a 64x64 image. :func:`toy_text_alignment` asks it whether an image shows what its
prompt names; :func:`toy_concept_similarity` (re-exported from :mod:`diffusers_infusion.toy.concepts`) scores how
much each image's object looks like a personal concept.

    toy_text_alignment(images, ["a photo of my cat on the beach", ...])      # fraction of images that match
    np.mean(toy_concept_similarity(images, "my_cat"))                         # per-image scores, average them
    toy_reconstruction_similarity(pipe.vae, "my_cat")                         # the ceiling the VAE allows
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..toy.concepts import concept_similarity as toy_concept_similarity
from ..toy.looks import MARKS
from ..toy.reader import Reading
from ..toy.world import BACKGROUND_PHRASES, BACKGROUNDS, CLASSES, COLORS, LOOK_VOCABULARY, POSITIONS
from .images import ImageBatch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from ..toy.concepts import ToyConcept

__all__ = [
    "NamedObject",
    "parse_toy_prompt",
    "toy_concept_similarity",
    "toy_prompt_matches",
    "toy_reconstruction_similarity",
    "toy_text_alignment",
]


@dataclass(frozen=True)
class NamedObject:
    """An object a prompt names: its class, its color (None if not named) and position (None if not named)."""

    cls: str
    color: str | None = None
    position: str | None = None
    personal: bool = False  # "my cat": a personal concept, whose look is not one of the world's colors


_MARK_WORDS = frozenset(MARKS)
_PATTERN_WORDS = frozenset(LOOK_VOCABULARY) - _MARK_WORDS  # band, side, top, bottom, split, ...


def _background_words() -> dict[str, str]:
    """Word that names each background in a prompt ("brick" for "by a brick wall")."""
    words = {b: b for b in BACKGROUNDS}
    for background, phrase in BACKGROUND_PHRASES.items():
        words.setdefault(phrase.split()[-1], background)
    return words


def parse_toy_prompt(prompt: str) -> tuple[list[NamedObject], str | None]:
    """The objects and the background a toy-world prompt names.

    A color word binds to the next class word ("a red cat and a blue dog"; of two, "an orange and blue cat", the
    first, which the reader reads as the object's color), "my" marks a personal concept, and a position word
    ("left", "center", "right") binds to the last object named before it ("a cat on the left"). Words of a look
    after a class word ("a cat with a blue band", "a dog with a red left side") describe that object: its color is
    then not checked (its two colors are the pattern's), and the colors in the look bind to nothing else.
    """
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    objects: list[NamedObject] = []
    background = None
    colors: list[str] = []
    personal = False
    for i, word in enumerate(words):
        if word in COLORS:
            colors.append(word)
        elif word == "my":
            personal = True
        elif word in CLASSES:
            objects.append(NamedObject(word, None if personal or not colors else colors[0], None, personal))
            colors, personal = [], False
        elif word in _MARK_WORDS or word in _PATTERN_WORDS:
            if word in _PATTERN_WORDS and objects:
                objects[-1] = replace(objects[-1], color=None)
            colors = []
        elif word in POSITIONS and objects and (i + 1 == len(words) or words[i + 1] != "side"):
            objects[-1] = replace(objects[-1], position=word)
        elif word in _background_words() and background is None:
            background = _background_words()[word]
    return objects, background


def toy_prompt_matches(prompt: str, reading: Reading) -> bool:
    """Whether the reader's ``reading`` of an image shows everything ``prompt`` names.

    The background if named; for each named object, a distinct object the reader finds with that class, and the
    named color and position where the prompt names them (a personal concept's color is not checked).
    """
    named, background = parse_toy_prompt(prompt)
    if background is not None and reading.background != background:
        return False
    unused = list(reading.objects)
    for want in named:
        found = next(
            (o for o in unused if o.cls == want.cls and want.color in (None, o.color)
             and want.position in (None, o.position)),
            None,
        )  # fmt: skip
        if found is None:
            return False
        unused.remove(found)
    return True


def toy_text_alignment(
    images: ImageBatch, prompts: str | Sequence[str], *, readings: Sequence[Reading] | None = None
) -> float:
    """Fraction of images in which the toy reader sees what the image's prompt names (:func:`toy_prompt_matches`).

    Args:
        images: PIL images, or an array (N, 64, 64, 3) in [0, 1] (a pipeline's ``output_type="np"``).
        prompts: One prompt per image (or one for all), as the user wrote it (with the class word: "my cat").
        readings: The reader's readings of ``images`` if already computed (``toy.reader.read_images``).
    """
    from ..toy.reader import read_images

    n = len(images)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n or n == 0:
        raise ValueError(f"prompts has {len(prompts)} entries for {n} images. Pass one prompt per image.")
    readings = readings if readings is not None else read_images(images)
    return sum(toy_prompt_matches(p, r) for p, r in zip(prompts, readings)) / n


def toy_reconstruction_similarity(vae: AutoencoderKL, concept: ToyConcept | str) -> float:
    """Concept similarity of the VAE's own reconstructions of the concept's photos: the most any method can score.

    Every method learns from the photos' latents and every image is decoded by the same VAE, so what the VAE
    cannot reproduce no method can draw. Reconstructions use the posterior mean, decoded in float32.

    Args:
        vae: The pipeline's ``AutoencoderKL``.
        concept: A toy concept (``ToyConcept``) or its name (``"my_cat"``).
    """
    import numpy as np
    import torch

    from ..toy.concepts import CONCEPTS
    from .images import to_pil, to_pixels

    concept = CONCEPTS[concept] if isinstance(concept, str) else concept
    param = next(vae.parameters())
    x = to_pixels(concept.photos(), argument="concept photos").to(param.device, param.dtype)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    images = to_pil(((y.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
    return float(np.mean(toy_concept_similarity(images, concept)))
