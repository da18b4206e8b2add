"""Toy world 2: looks that text can describe (patterns in two colors, a mark), their captions, the held-out looks.

A :class:`Look` paints an object in a pattern of two of the world's colors and optionally puts a mark on it:

- patterns: ``band`` (a broad band of color b across the body of color a), ``sides`` (left half a, right half b),
  ``halves`` (top a, bottom b), ``diagonal`` (upper left a, lower right b), ``plain`` (one color, a mark only);
- marks: ``star``, ``heart``, ``badge`` (a round disc) and ``square``, in a third color, on the object's chest.

Captions name a look in varied ways, so that, as in Stable Diffusion, the text space spans looks: "a cat with a
blue band", "an orange and blue cat", "a dog with a red left side and a yellow right side", "a teddy with a purple
top and a yellow bottom and a red heart"; some name only part of it, some omit it.

Held-out looks: :func:`is_look_held_out` holds one in five (class, pattern, color pair) combinations out of the base
model's training data (a pattern-following benchmark asks for them), and every look planned for a personal concept
(:data:`CONCEPT_LOOKS`; class, pattern and color pair in either order, whatever the mark) is held out too: the base
model knows every piece of a concept's look but never saw that instance.

Status: the shipped toy model and concepts are still those of the first world (one-color objects); a model trained
on looks (``train_toy_model.py --world 2``) does not follow pattern text yet, see ``docs/toy_world.md``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .world import CLASSES, COLORS

PATTERN_KINDS: tuple[str, ...] = ("plain", "band", "sides", "halves", "diagonal")
MARKS: tuple[str, ...] = ("star", "heart", "badge", "square")  # their words are in world.LOOK_VOCABULARY

# Where a class's mark sits, in the unit frame of world._shape_parts (on the body, clear of the details).
_MARK_ANCHOR: dict[str, tuple[float, float]] = {
    "cat": (0.0, 0.42),
    "dog": (-0.2, 0.05),
    "teddy": (0.0, 0.42),
    "car": (-0.05, 0.12),
    "cup": (-0.05, 0.22),
}
_MARK_RADIUS = 0.3  # in units of the object's half-height


@dataclass(frozen=True)
class Look:
    """A look: a pattern in two colors (``a``, ``b``; ``plain`` uses ``a`` only) and an optional mark.

    Attributes:
        pattern: One of :data:`PATTERN_KINDS`.
        a: First color (body / left / top / upper left).
        b: Second color (band / right / bottom / lower right); equals ``a`` for ``plain``.
        mark: One of :data:`MARKS`, or None.
        mark_color: The mark's color (None without a mark).
    """

    pattern: str
    a: str
    b: str
    mark: str | None = None
    mark_color: str | None = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERN_KINDS:
            raise ValueError(f"pattern {self.pattern!r} is not one of {PATTERN_KINDS}")
        for c in (self.a, self.b, *([self.mark_color] if self.mark else [])):
            if c not in COLORS:
                raise ValueError(f"color {c!r} is not one of the world's colors {tuple(COLORS)}")
        if (self.pattern == "plain") != (self.a == self.b):
            raise ValueError(f"a {self.pattern} look needs {'one color' if self.pattern == 'plain' else 'two'}")
        if self.mark is not None and self.mark not in MARKS:
            raise ValueError(f"mark {self.mark!r} is not one of {MARKS}")

    @property
    def pair(self) -> tuple[str, str]:
        return self.a, self.b


def paint_look(img: Image.Image, look: Look, cls: str, cx: float, cy: float, s: float) -> None:
    """Paint ``look`` over the whole fill image ``img`` (supersampled pixels; object center cx, cy, half-height s)."""
    d = ImageDraw.Draw(img)
    w, h = img.size
    a, b = COLORS[look.a], COLORS[look.b]
    d.rectangle((0, 0, w, h), fill=a)
    if look.pattern == "band":
        d.rectangle((0, cy - 0.1 * s, w, cy + 0.45 * s), fill=b)
    elif look.pattern == "sides":
        d.rectangle((cx, 0, w, h), fill=b)
    elif look.pattern == "halves":
        d.rectangle((0, cy, w, h), fill=b)
    elif look.pattern == "diagonal":
        d.polygon([(cx - 3 * s, cy + 3 * s), (cx + 3 * s, cy - 3 * s), (cx + 3 * s, cy + 3 * s)], fill=b)
    if look.mark is not None:
        ax, ay = _MARK_ANCHOR[cls]
        _mark(d, look.mark, cx + ax * s, cy + ay * s, _MARK_RADIUS * s, COLORS[look.mark_color])


def _mark(d: ImageDraw.ImageDraw, mark: str, x: float, y: float, r: float, fill) -> None:
    if mark == "star":
        pts = []
        for k in range(10):
            rad = 1.25 * r if k % 2 == 0 else 0.55 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(ang), y + rad * math.sin(ang)))
        d.polygon(pts, fill=fill)
    elif mark == "heart":  # two circles and a triangle
        q = 0.5 * r
        d.ellipse((x - 2 * q, y - 1.4 * q, x, y + 0.6 * q), fill=fill)
        d.ellipse((x, y - 1.4 * q, x + 2 * q, y + 0.6 * q), fill=fill)
        d.polygon([(x - 1.95 * q, y - 0.2 * q), (x + 1.95 * q, y - 0.2 * q), (x, y + 2.1 * q)], fill=fill)
    elif mark == "badge":
        d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif mark == "square":
        q = 0.85 * r
        d.rectangle((x - q, y - q, x + q, y + q), fill=fill)


# ---------------------------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def look_phrase(
    cls: str, look: Look, *, rng: random.Random | None = None, size: str | None = None, short: bool = False
) -> str:
    """The words for an object with ``look`` (without article and "my"), e.g. ``"orange cat with a blue band"``.

    With ``rng`` one of several wordings is drawn (parts of the look may be left out); without it the full,
    canonical wording is used. ``short`` (for scenes of two objects) keeps to the shorter wordings, without the mark.
    """
    a, b = look.a, look.b
    pre = f"{size} " if size else ""
    forms = {
        "plain": [f"{a} {cls}", cls],
        "band": [f"{a} {cls} with {_article(b)} {b} band", f"{a} and {b} {cls}", f"{cls} with {_article(b)} {b} band"],
        "sides": [
            f"{cls} with {_article(a)} {a} left side and {_article(b)} {b} right side",
            f"{a} and {b} {cls}",
            f"{b} {cls} with {_article(a)} {a} left side",
        ],
        "halves": [
            f"{cls} with {_article(a)} {a} top and {_article(b)} {b} bottom",
            f"{a} and {b} {cls}",
            f"{b} {cls} with {_article(a)} {a} top",
        ],
        "diagonal": [f"{cls} split diagonally into {a} and {b}", f"{a} and {b} {cls}", f"{cls} split diagonally"],
    }[look.pattern]
    forms = forms[1:] if short else forms
    # The full wording half of the time, a shorter one otherwise (the model learns the look's pieces from both).
    text = pre + (forms[0] if rng is None or rng.random() < 0.5 else rng.choice(forms[1:] or forms))
    if look.mark is not None and not short and (rng is None or rng.random() < 0.8):
        color = look.mark_color if rng is None or rng.random() < 0.8 else None
        mark = f"{color} {look.mark}" if color else look.mark
        text += f" {'and' if ' with ' in text else 'with'} {_article(mark)} {mark}"
    return text


# ---------------------------------------------------------------------------------------------------------------
# Drawing looks for the base model's training data, and the held-out ones

#: The looks of toy world 2's personal concepts (name -> class word, look), held out of the base model's data. Each
#: keeps a VAE ceiling >= 0.72 with the world-2 VAE (its reconstructions of the photos, strict concept similarity).
CONCEPT_LOOKS: dict[str, tuple[str, Look]] = {
    "my_cat": ("cat", Look("diagonal", "green", "orange", "star", "yellow")),
    "my_dog": ("dog", Look("sides", "red", "yellow", "badge", "blue")),
    "my_teddy": ("teddy", Look("halves", "purple", "yellow", "heart", "red")),
    "my_cup": ("cup", Look("diagonal", "blue", "orange", "square", "yellow")),
}


def is_look_held_out(cls: str, pattern: str, a: str, b: str) -> bool:
    """Whether (class, pattern, ordered color pair) is held out of the base model's training data (1 in 5).

    Plain looks are never held out here (plain objects follow the world's own (class, color, background) rule);
    the personal concepts' combinations are held out as well (see :func:`concept_combinations`).
    """
    if pattern == "plain":
        return False
    if (cls, pattern, frozenset((a, b))) in concept_combinations():
        return True
    ki, pi = CLASSES.index(cls), PATTERN_KINDS.index(pattern)
    ai, bi = list(COLORS).index(a), list(COLORS).index(b)
    return (3 * ki + 2 * pi + 5 * ai + 7 * bi) % 5 == 0


def concept_combinations() -> set[tuple[str, str, frozenset]]:
    """(class, pattern, unordered color pair) of every concept look: never in the base model's training data."""
    return {(cls, look.pattern, frozenset(look.pair)) for cls, look in CONCEPT_LOOKS.values()}


def held_out_looks() -> list[tuple[str, str, str, str]]:
    """Every held-out (class, pattern, a, b) (two-color patterns only)."""
    return [
        (k, p, a, b)
        for k in CLASSES
        for p in PATTERN_KINDS[1:]
        for a in COLORS
        for b in COLORS
        if a != b and is_look_held_out(k, p, a, b)
    ]


def random_look(rng: random.Random, cls: str, base: str, *, mark_prob: float = 0.4, held_out: bool = False) -> Look:
    """A random look for an object of class ``cls`` whose first color is ``base``.

    Args:
        rng: Source of randomness.
        cls: The object's class.
        base: Color ``a`` (the object's color in the world's plain scheme).
        mark_prob: Probability of a mark.
        held_out: Draw only held-out combinations (True) or only trainable ones (False).
    """
    for _ in range(1000):
        pattern = rng.choice(PATTERN_KINDS)
        b = base if pattern == "plain" else rng.choice([c for c in COLORS if c != base])
        if pattern != "plain" and is_look_held_out(cls, pattern, base, b) != held_out:
            continue
        mark = rng.choice(MARKS) if rng.random() < mark_prob or pattern == "plain" else None
        mark_color = rng.choice([c for c in COLORS if c not in (base, b)]) if mark else None
        return Look(pattern, base, b, mark, mark_color)
    raise RuntimeError(f"no {'held-out' if held_out else 'trainable'} look for a {base} {cls}")
