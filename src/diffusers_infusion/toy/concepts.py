"""Personal concepts of the toy world, and the concept-similarity score (the toy analogue of CLIP-I / DINO).

A personal concept is an *instance* of a class word that the base model never saw: a :class:`~.looks.Look` (the
class silhouette painted in a pattern of two of the world's colors, in large regions, with a mark in a third; e.g.
``my_cat``: a cat split diagonally into green and orange, with a yellow star). The base model was trained on every
piece of it (cats, the diagonal split, green and orange, stars) but never on that class with that pattern in those
two colors, in either order (:func:`~.looks.is_look_held_out`). The regions are large because the toy VAE (8x16x16
latents) keeps those and loses thin stripes. Each has a handful of training photos, all in
**one** background and position (so a method that overfits learns the background too), shipped as PNGs in
``examples/toy_world/concepts/<name>/`` with a ``metadata.jsonl`` (datasets imagefolder convention).

:func:`concept_similarity` measures how much the object region of an image matches a concept: the shares of
the concept's main colors among the object's pixels, compared with those in the concept's photos (1.0 for the
concept's own look, 0 for a plain instance of the class).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .looks import CONCEPT_LOOKS, Look, paint_look
from .world import COLORS, PATTERNS, POSITIONS, SIZE, Scene, ToyObject, render, to_array

CONCEPTS_DIR = Path(__file__).resolve().parents[3] / "examples" / "toy_world" / "concepts"


@dataclass(frozen=True)
class ToyConcept:
    """A personal concept: its class word, its look (a :class:`~.looks.Look`) and where its photos were shot."""

    name: str
    class_word: str
    look: Look
    background: str
    position: str
    size: str = "big"
    num_photos: int = 5

    @property
    def colors(self) -> tuple[tuple[int, int, int], ...]:
        """RGB of the look's colors: (a, b, mark)."""
        return tuple(COLORS[c] for c in (self.look.a, self.look.b, self.look.mark_color))

    def object(self, position: str | None = None, size: str | None = None) -> ToyObject:
        """The concept as a scene object (at its photos' position and size unless given)."""
        return ToyObject(
            self.class_word,
            self.look.a,
            position or self.position,
            size or self.size,
            pattern=self.name,
            look=self.look,
        )

    def photo_scenes(self) -> list[Scene]:
        """The scenes of the concept's training photos: one background, one position, different seeds."""
        return [Scene(self.background, (self.object(),), seed=1000 + i) for i in range(self.num_photos)]

    def photos(self) -> list[Image.Image]:
        """The training photos, rendered."""
        return [render(s) for s in self.photo_scenes()]


_SHOOTS = {
    "my_cat": ("night", "center"),
    "my_dog": ("snow", "right"),
    "my_teddy": ("brick", "left"),
    "my_cup": ("beach", "center"),
}
CONCEPTS: dict[str, ToyConcept] = {
    name: ToyConcept(name, cls, look, *_SHOOTS[name]) for name, (cls, look) in CONCEPT_LOOKS.items()
}
for _c in CONCEPTS.values():  # painters by name too, for scenes that name a concept's look only by ``pattern``
    PATTERNS[_c.name] = lambda img, cx, cy, s, c=_c: paint_look(img, c.look, c.class_word, cx, cy, s)


def write_concept_photos(root: str | Path = CONCEPTS_DIR, names: Sequence[str] | None = None) -> list[Path]:
    """Render each concept's photos to ``root/<name>/<i>.png`` with a ``metadata.jsonl`` ("a photo of a cat")."""
    folders = []
    for name in names or list(CONCEPTS):
        concept = CONCEPTS[name]
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, image in enumerate(concept.photos()):
            image.save(folder / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a {concept.class_word}"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        folders.append(folder)
    return folders


def load_concept_photos(name: str, root: str | Path = CONCEPTS_DIR) -> list[tuple[Image.Image, str]]:
    """The shipped photos of a concept with their captions, as (image, text) pairs."""
    folder = Path(root) / name
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [(Image.open(folder / r["file_name"]).convert("RGB"), r["text"]) for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# Concept similarity

_MATCH_RADIUS = 70.0  # RGB distance (0-255 scale) within which a pixel counts as one of the concept's colors
_MAIN_COLOR_SHARE = 0.15  # a concept color covering at least this share of the photos' object is a main color


def _crop_columns(position: str) -> slice:
    x = POSITIONS[position]
    return slice(max(0, x - 16), min(SIZE, x + 16))


@lru_cache(maxsize=16)
def _background_palette(background: str) -> np.ndarray:
    """The frequent colors of a background's texture, (K, 3) in 0-255."""
    pixels = np.concatenate([to_array(render(Scene(background, (), seed=s)))[0].reshape(-1, 3) for s in range(6)])
    q = (pixels * 255 / 16).astype(int)
    keys, inverse, counts = np.unique(q, axis=0, return_inverse=True, return_counts=True)
    keep = counts > 0.01 * len(pixels)
    return np.stack([pixels[inverse.ravel() == k].mean(0) * 255 for k in np.nonzero(keep)[0]])


def color_shares(image, concept: ToyConcept, *, position: str, background: str) -> np.ndarray:
    """Shares of the concept's colors among the object pixels of the crop at ``position``: (3,) summing to <= 1.

    Object pixels are those of the crop that are neither close to the background's texture colors nor to the
    dark outline; each counts for the concept color it is nearest to, among the world's object colors and their
    detail shades, if within the match radius.
    """
    arr = to_array(image)[0] if not isinstance(image, np.ndarray) else image
    crop = arr[10:62, _crop_columns(position)].reshape(-1, 3) * 255  # (P, 3)
    bg = np.concatenate([_background_palette(background), [[22.0, 22.0, 26.0]]])  # (K + 1, 3)
    fg = np.linalg.norm(crop[:, None] - bg[None], axis=-1).min(1) > 45  # (P,)
    pix = crop[fg]
    if len(pix) < 8:
        return np.zeros(len(concept.colors))
    palette = _world_palette()  # (W, 3)
    ids = [int(np.linalg.norm(palette - np.array(c, dtype=float), axis=1).argmin()) for c in concept.colors]
    dist = np.linalg.norm(pix[:, None] - palette[None], axis=-1)  # (P, W)
    nearest = np.where(dist.min(1) < _MATCH_RADIUS, dist.argmin(1), -1)  # (P,)
    return np.array([(nearest == i).sum() for i in ids]) / len(pix)


@lru_cache(maxsize=1)
def _world_palette() -> np.ndarray:
    """The world's object colors with their dark and light detail shades, (3 * 8, 3) in 0-255."""
    base = np.array(list(COLORS.values()), dtype=float)
    return np.concatenate([base, base * 0.35, base * 0.4 + 150])


@lru_cache(maxsize=16)
def _reference_shares(name: str) -> tuple[float, ...]:
    concept = CONCEPTS[name]
    shares = [
        color_shares(im, concept, position=concept.position, background=concept.background) for im in concept.photos()
    ]
    return tuple(np.mean(shares, 0))


def concept_similarity(images, concept: ToyConcept | str, *, readings=None) -> list[float]:
    """How much the object of each image looks like the concept: 1.0 for its own look, 0 for a plain instance.

    The object is the one the reader finds for the concept's class word (else its most confident object). Each
    of the concept's colors that covers at least 15% of the object in the concept's photos (its main colors;
    a small mark is a detail) must be there in the photos' proportion: the score is the smallest of
    ``min(1, share / photo share)`` over those colors, so a plain object in one of them scores 0.

    Args:
        images: PIL images or an array (N, 64, 64, 3) in [0, 1].
        concept: A :class:`ToyConcept` or its name.
        readings: The reader's readings of ``images`` if already computed.
    """
    from .reader import read_images

    concept = CONCEPTS[concept] if isinstance(concept, str) else concept
    images = list(images)
    readings = readings or read_images(images)
    ref = np.array(_reference_shares(concept.name))
    main = ref >= _MAIN_COLOR_SHARE
    scores = []
    for image, reading in zip(images, readings):
        same = [o for o in reading.objects if o.cls == concept.class_word]
        position = (same[0] if same else reading.main).position
        shares = color_shares(image, concept, position=position, background=reading.background)
        scores.append(float(np.minimum(1.0, shares[main] / ref[main]).min()))
    return scores
