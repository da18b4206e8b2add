"""The toy world: 64x64 RGB scenes rendered from attributes, and their captions.

A scene is a textured background (``grass``, ``beach``, ``snow``, ``night``, ``brick``) with one or two objects.
Each object has a class (``cat``, ``dog``, ``teddy``, ``car``, ``cup``: five bold, distinct silhouettes), a color
(eight saturated colors), a position (``left``/``center``/``right``) and a size (``small``/``big``). Everything is
deterministic from a seed: :func:`sample_scene` draws the attributes, :func:`render` draws the picture (its
textures and small jitters come from the scene's own seed), :func:`caption` writes a templated sentence.

Objects are drawn at twice the resolution and box-filtered down, with a dark outline, so their edges are clean
and the world stays easy for a small diffusion model to learn and for :mod:`~diffusers_infusion.toy.reader`
to read back.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:
    from .looks import Look

SIZE = 64  # image side in pixels
_SS = 2  # supersampling factor for drawing

CLASSES: tuple[str, ...] = ("cat", "dog", "teddy", "car", "cup")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "green": (40, 200, 50),
    "blue": (40, 80, 235),
    "yellow": (250, 225, 30),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "orange": (250, 135, 20),
    "purple": (150, 50, 200),
}
BACKGROUNDS: tuple[str, ...] = ("grass", "beach", "snow", "night", "brick")
POSITIONS: dict[str, int] = {"left": 16, "center": 32, "right": 48}  # object center x in pixels
SIZES: dict[str, float] = {"small": 9.0, "big": 13.5}  # object half-height in pixels
OBJECT_Y = 37  # object center y in pixels

BACKGROUND_PHRASES: dict[str, str] = {
    "grass": "on grass",
    "beach": "on the beach",
    "snow": "on snow",
    "night": "at night",
    "brick": "by a brick wall",
}
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "center": "in the center", "right": "on the right"}

#: Every word of the world's captions (give it to ``build_clip_tokenizer``).
VOCABULARY: tuple[str, ...] = (
    "a", "an", "the", "photo", "picture", "of", "on", "in", "at", "by", "and", "with", "next", "to", "my", "wall",
    *CLASSES, *COLORS, *BACKGROUNDS, *POSITIONS, *SIZES,
)  # fmt: skip
#: The words of looks' captions (toy world 2, see :mod:`~diffusers_infusion.toy.looks`): patterns and marks.
LOOK_VOCABULARY: tuple[str, ...] = (
    "band", "side", "top", "bottom", "split", "diagonally", "into", "star", "heart", "badge", "square",
)  # fmt: skip


@dataclass(frozen=True)
class ToyObject:
    """One object of a scene.

    Attributes:
        cls: Class word (one of :data:`CLASSES`).
        color: Color name (one of :data:`COLORS`), ignored when ``pattern`` is given.
        position: ``left``, ``center`` or ``right``.
        size: ``small`` or ``big``.
        pattern: Optional name of a registered painter (:data:`PATTERNS`: a personal concept's name, which also
            makes the caption say "my cat", or an unnamed ``rgb-`` look).
        look: Optional :class:`~diffusers_infusion.toy.looks.Look` (a pattern in two colors and a mark) the object
            is painted with; ``color`` is then its first color.
    """

    cls: str
    color: str
    position: str
    size: str = "big"
    pattern: str | None = None
    look: Look | None = None


@dataclass(frozen=True)
class Scene:
    """A background, its objects (one or two, at different positions) and the seed of textures and jitter."""

    background: str
    objects: tuple[ToyObject, ...]
    seed: int = 0
    meta: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------------------------
# Backgrounds


def _background(name: str, rng: random.Random) -> Image.Image:
    """A textured 64x64 background; the texture's random layout comes from ``rng``."""
    img = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(img)
    if name == "grass":
        d.rectangle((0, 0, SIZE, SIZE), fill=(85, 150, 60))
        for _ in range(140):
            x, y = rng.uniform(0, SIZE), rng.uniform(0, SIZE + 6)
            shade = rng.choice([(55, 115, 40), (120, 185, 80)])
            d.line((x, y, x + rng.uniform(-2, 2), y - rng.uniform(3, 6)), fill=shade, width=1)
    elif name == "beach":
        horizon = 18 + rng.randint(-2, 2)
        d.rectangle((0, 0, SIZE, horizon), fill=(70, 150, 205))
        d.rectangle((0, horizon, SIZE, SIZE), fill=(232, 205, 145))
        phase = rng.uniform(0, 6.3)
        pts = [(x, horizon - 1.5 + 1.5 * np.sin(x / 4 + phase)) for x in range(0, SIZE + 1, 2)]
        d.line(pts, fill=(245, 250, 255), width=2)
        for _ in range(70):
            x, y = rng.uniform(0, SIZE), rng.uniform(horizon + 3, SIZE)
            d.point((x, y), fill=(195, 165, 105))
    elif name == "snow":
        d.rectangle((0, 0, SIZE, SIZE), fill=(236, 241, 250))
        hill = 22 + rng.randint(-3, 3)
        d.ellipse((-20, hill, 44, hill + 40), fill=(214, 224, 240))
        d.ellipse((24, hill + 6, 90, hill + 46), fill=(214, 224, 240))
        for _ in range(45):
            x, y = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
            d.ellipse((x - 0.8, y - 0.8, x + 0.8, y + 0.8), fill=(175, 195, 225))
    elif name == "night":
        d.rectangle((0, 0, SIZE, SIZE), fill=(18, 22, 62))
        d.rectangle((0, 50, SIZE, SIZE), fill=(30, 30, 45))
        for _ in range(28):
            x, y = rng.uniform(0, SIZE), rng.uniform(0, 48)
            d.point((x, y), fill=(245, 245, 200))
    elif name == "brick":
        d.rectangle((0, 0, SIZE, SIZE), fill=(205, 195, 180))  # mortar
        off = rng.randint(0, 15)
        for row in range(9):
            y0 = row * 8 - rng.randint(0, 0)
            shift = off + (8 if row % 2 else 0)
            for col in range(-1, 5):
                x0 = col * 16 + shift
                tone = rng.randint(-12, 12)
                d.rectangle((x0 + 1, y0 + 1, x0 + 14, y0 + 6), fill=(158 + tone, 62 + tone // 2, 45))
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")
    return img


# ---------------------------------------------------------------------------------------------------------------
# Silhouettes: drawn in a unit frame ([-1, 1] around the object center, 1 = half-height)


def _shape_parts(cls: str) -> list[tuple[str, tuple[float, ...]]]:
    """The silhouette of a class as drawing primitives in the unit frame: (kind, coordinates)."""
    if cls == "cat":  # sitting, front view, pointed ears, tail to the side
        return [
            ("ellipse", (-0.55, -0.05, 0.55, 1.0)),
            ("ellipse", (-0.45, -0.78, 0.45, 0.05)),
            ("polygon", (-0.45, -0.45, -0.38, -1.0, -0.08, -0.72)),
            ("polygon", (0.45, -0.45, 0.38, -1.0, 0.08, -0.72)),
            ("polygon", (0.4, 0.75, 0.95, 0.15, 1.0, 0.3, 0.5, 0.95)),
        ]
    if cls == "dog":  # standing, side view, facing right
        return [
            ("ellipse", (-0.8, -0.3, 0.5, 0.4)),
            ("ellipse", (0.25, -0.85, 0.85, -0.2)),
            ("rectangle", (0.7, -0.55, 1.05, -0.3)),
            ("rectangle", (-0.7, 0.1, -0.5, 0.95)),
            ("rectangle", (-0.35, 0.1, -0.15, 0.95)),
            ("rectangle", (0.05, 0.1, 0.25, 0.95)),
            ("rectangle", (0.3, 0.1, 0.45, 0.95)),
            ("polygon", (-0.7, -0.1, -1.0, -0.7, -0.88, -0.75, -0.55, -0.2)),
        ]
    if cls == "teddy":  # round head, round ears, round body and paws
        return [
            ("ellipse", (-0.5, -0.05, 0.5, 0.9)),
            ("ellipse", (-0.42, -0.75, 0.42, 0.05)),
            ("ellipse", (-0.52, -0.98, -0.16, -0.62)),
            ("ellipse", (0.16, -0.98, 0.52, -0.62)),
            ("ellipse", (-0.72, 0.1, -0.36, 0.46)),
            ("ellipse", (0.36, 0.1, 0.72, 0.46)),
            ("ellipse", (-0.52, 0.66, -0.12, 1.0)),
            ("ellipse", (0.12, 0.66, 0.52, 1.0)),
        ]
    if cls == "car":  # side view, cabin and two wheels
        return [
            ("rectangle", (-1.1, -0.15, 1.1, 0.5)),
            ("polygon", (-0.6, -0.15, -0.35, -0.7, 0.4, -0.7, 0.7, -0.15)),
        ]
    if cls == "cup":  # mug with a handle on a saucer
        return [
            ("polygon", (-0.6, -0.75, 0.5, -0.75, 0.4, 0.6, -0.5, 0.6)),
            ("ring", (0.25, -0.5, 0.95, 0.3)),
            ("ellipse", (-0.95, 0.5, 0.85, 0.85)),
        ]
    raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")


def _details(cls: str) -> list[tuple[str, tuple[float, ...], str]]:
    """Inner details drawn over the fill: (kind, unit coordinates, 'dark' or 'light')."""
    if cls in ("cat", "teddy"):
        return [("ellipse", (-0.24, -0.45, -0.1, -0.3), "dark"), ("ellipse", (0.1, -0.45, 0.24, -0.3), "dark")]
    if cls == "dog":
        return [("ellipse", (0.5, -0.65, 0.62, -0.52), "dark"), ("ellipse", (0.2, -0.8, 0.45, -0.2), "dark")]
    if cls == "car":
        return [
            ("polygon", (-0.45, -0.2, -0.28, -0.58, 0.33, -0.58, 0.55, -0.2), "light"),
            ("ellipse", (-0.85, 0.2, -0.3, 0.75), "wheel"),
            ("ellipse", (0.3, 0.2, 0.85, 0.75), "wheel"),
        ]
    return [("rectangle", (-0.45, -0.2, 0.35, -0.05), "dark")] if cls == "cup" else []


def _to_px(coords: tuple[float, ...], cx: float, cy: float, s: float) -> list[float]:
    """Unit-frame coordinates to supersampled pixel coordinates."""
    out = []
    for i, v in enumerate(coords):
        out.append(((cx if i % 2 == 0 else cy) + v * s) * _SS)
    return out


def _draw(d: ImageDraw.ImageDraw, kind: str, xy: list[float], fill, s: float) -> None:
    if kind == "ellipse":
        d.ellipse(xy, fill=fill)
    elif kind == "rectangle":
        d.rectangle(xy, fill=fill)
    elif kind == "polygon":
        d.polygon(xy, fill=fill)
    elif kind == "ring":
        d.ellipse(xy, outline=fill, width=max(2, round(0.22 * s * _SS)))


def object_mask(obj: ToyObject, cx: float, cy: float) -> Image.Image:
    """The silhouette of ``obj`` centered at (cx, cy) as a supersampled ``L`` mask (255 inside)."""
    s = SIZES[obj.size]
    mask = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    d = ImageDraw.Draw(mask)
    for kind, coords in _shape_parts(obj.cls):
        _draw(d, kind, _to_px(coords, cx, cy, s), 255, s)
    for kind, coords, tone in _details(obj.cls):
        if tone == "wheel":
            _draw(d, kind, _to_px(coords, cx, cy, s), 255, s)
    return mask


#: Painters of personal concepts' looks: name -> function(fill image, mask, cx, cy, s) painting in place.
#: Filled by :mod:`~diffusers_infusion.toy.concepts`; the world itself only knows plain colors.
PATTERNS: dict[str, Callable[[Image.Image, float, float, float], None]] = {}
#: Patterns named with this prefix are unnamed looks (a color outside the eight, captioned "a cat", not "my cat").
UNNAMED_LOOK_PREFIX = "rgb-"


def _paint_object(canvas: Image.Image, obj: ToyObject, cx: float, cy: float) -> None:
    """Draw ``obj`` onto the supersampled ``canvas`` in place: outline, fill (color or pattern), details."""
    s = SIZES[obj.size]
    mask = object_mask(obj, cx, cy)
    outline = mask.filter(ImageFilter.MaxFilter(5))
    canvas.paste((22, 22, 26), (0, 0), outline)
    if obj.look is not None:
        from .looks import paint_look

        fill = Image.new("RGB", canvas.size)
        paint_look(fill, obj.look, obj.cls, cx * _SS, cy * _SS, s * _SS)
    elif obj.pattern is not None:
        fill = Image.new("RGB", canvas.size)
        PATTERNS[obj.pattern](fill, cx * _SS, cy * _SS, s * _SS)
    else:
        fill = Image.new("RGB", canvas.size, COLORS[obj.color])
    canvas.paste(fill, (0, 0), mask)
    d = ImageDraw.Draw(canvas)
    base = np.array(COLORS.get(obj.color, (128, 128, 128)))
    dark = tuple(int(v) for v in (base * 0.35 if obj.color != "black" else (120, 120, 120)))
    light = tuple(int(v) for v in (base * 0.4 + 150))
    for kind, coords, tone in _details(obj.cls):
        xy = _to_px(coords, cx, cy, s)
        if tone == "wheel":
            _draw(d, kind, xy, (35, 35, 40), s)
            hub = _to_px((coords[0] + 0.17, coords[1] + 0.17, coords[2] - 0.17, coords[3] - 0.17), cx, cy, s)
            _draw(d, kind, hub, (170, 170, 175), s)
        else:
            _draw(d, kind, xy, dark if tone == "dark" else light, s)


def object_center(obj: ToyObject, seed: int, index: int) -> tuple[float, float]:
    """The jittered center (x, y) in pixels of the ``index``-th object of a scene with ``seed``."""
    rng = random.Random(f"{seed}-obj-{index}")
    return POSITIONS[obj.position] + rng.uniform(-2.0, 2.0), OBJECT_Y + rng.uniform(-2.0, 2.0)


def render(scene: Scene) -> Image.Image:
    """Render a scene as a 64x64 RGB ``PIL.Image`` (deterministic: same scene, same pixels)."""
    rng = random.Random(f"{scene.seed}-bg-{scene.background}")
    canvas = _background(scene.background, rng).resize((SIZE * _SS, SIZE * _SS), Image.NEAREST)
    for i, obj in enumerate(scene.objects):
        cx, cy = object_center(obj, scene.seed, i)
        _paint_object(canvas, obj, cx, cy)
    return canvas.resize((SIZE, SIZE), Image.BOX)


def object_pixels(scene: Scene) -> np.ndarray:
    """(64, 64) bool: where ``scene`` renders differently from its background alone (its objects and outlines)."""
    full = np.asarray(render(scene), dtype=np.int16)
    empty = np.asarray(render(replace(scene, objects=())), dtype=np.int16)
    return np.abs(full - empty).max(-1) > 8


def to_array(images: list[Image.Image] | Image.Image) -> np.ndarray:
    """PIL image(s) to a float32 array in [0, 1], shape (N, 64, 64, 3)."""
    if isinstance(images, Image.Image):
        images = [images]
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


# ---------------------------------------------------------------------------------------------------------------
# Sampling scenes and writing captions


def sample_scene(
    seed: int,
    *,
    two_objects_prob: float = 0.25,
    exclude: Callable[[ToyObject, str], bool] | None = None,
    look_prob: float = 0.0,
) -> Scene:
    """Draw a random scene (deterministic from ``seed``).

    Args:
        seed: Seed of the draw (and of the scene's textures and jitter).
        two_objects_prob: Probability of two objects (then one on the left, one on the right, both small).
        exclude: Optional predicate ``exclude(obj, background)``; objects for which it is true are redrawn
            (used to hold attribute combinations out of the training data).
        look_prob: Probability that an object gets a random :class:`~diffusers_infusion.toy.looks.Look` (toy
            world 2), never a held-out one; 0 draws the world's first scenes exactly as before.
    """
    rng = random.Random(f"scene-{seed}")
    background = rng.choice(BACKGROUNDS)
    n = 2 if rng.random() < two_objects_prob else 1
    positions = ["left", "right"] if n == 2 else [rng.choice(list(POSITIONS))]
    objects = []
    for pos in positions:
        for _ in range(1000):
            size = "small" if n == 2 else rng.choice(list(SIZES))
            obj = ToyObject(rng.choice(CLASSES), rng.choice(list(COLORS)), pos, size)
            if exclude is None or not exclude(obj, background):
                break
        if look_prob > 0 and rng.random() < look_prob:
            from .looks import random_look

            obj = replace(obj, look=random_look(rng, obj.cls, obj.color))
        objects.append(obj)
    return Scene(background, tuple(objects), seed)


def _object_phrase(
    obj: ToyObject, *, color: bool, size: bool, rng: random.Random | None = None, short: bool = False
) -> str:
    personal = obj.pattern is not None and not obj.pattern.startswith(UNNAMED_LOOK_PREFIX)
    if obj.look is not None and color and not personal:
        from .looks import look_phrase

        text = look_phrase(obj.cls, obj.look, rng=rng, size=obj.size if size else None, short=short)
        return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"
    words = ([obj.size] if size else []) + ([obj.color] if color and not obj.pattern else []) + [obj.cls]
    article = "my" if personal else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([article, *words])


def caption(
    scene: Scene,
    *,
    rng: random.Random | None = None,
    color: bool = True,
    background: bool = True,
    position: bool = True,
    size: bool = False,
    prefix: bool = True,
) -> str:
    """A templated caption of a scene.

    With ``rng`` the caption is drawn at random (attributes omitted with some probability, so a model learns
    that an unnamed attribute varies); without it the flags say which attributes to name.

    Examples: ``"a photo of a red cat on the beach"``, ``"a cat and a dog on snow"``, ``"a teddy on the left"``.
    """
    if rng is not None:
        color, background = rng.random() < 0.85, rng.random() < 0.85
        position, size = rng.random() < 0.7, rng.random() < 0.3
        prefix = rng.random() < 0.6
    objs = scene.objects
    if len(objs) == 1:
        text = _object_phrase(objs[0], color=color, size=size, rng=rng)
        if position:
            text += " " + POSITION_PHRASES[objs[0].position]
    else:  # the first object named is the one on the left
        left, right = sorted(objs, key=lambda o: POSITIONS[o.position])
        phrases = [_object_phrase(o, color=color, size=False, rng=rng, short=True) for o in (left, right)]
        text = " and ".join(phrases)
    if background:
        text += " " + BACKGROUND_PHRASES[scene.background]
    return ("a photo of " + text) if prefix else text


def with_objects(scene: Scene, *objects: ToyObject) -> Scene:
    """A copy of ``scene`` with other objects."""
    return replace(scene, objects=tuple(objects))


def is_held_out(cls: str, color: str, background: str) -> bool:
    """Whether the combination (class, color, background) is held out of the toy model's training data.

    For every (class, background) pair exactly one of the eight colors is held out (25 of the 200 combinations);
    every class, color and background is still seen in training, only these combinations are not.
    """
    ci, bi = CLASSES.index(cls), BACKGROUNDS.index(background)
    return list(COLORS).index(color) == (3 * ci + 5 * bi + 1) % len(COLORS)


def held_out_combinations() -> list[tuple[str, str, str]]:
    """All held-out (class, color, background) combinations."""
    return [(k, c, b) for k in CLASSES for c in COLORS for b in BACKGROUNDS if is_held_out(k, c, b)]
