"""Render the toy world's pictures for ``docs/toy_world.md`` into ``docs/images/toy_world/``.

python examples/toy_world/make_figures.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from diffusers_infusion.toy.concepts import CONCEPTS
from diffusers_infusion.toy.looks import MARKS, PATTERN_KINDS, Look
from diffusers_infusion.toy.world import BACKGROUNDS, CLASSES, COLORS, Scene, ToyObject, render, sample_scene

GAP, SCALE = 2, 2


def grid(images: list[Image.Image], cols: int, *, row_labels: list[str] | None = None) -> Image.Image:
    """Images in a grid with 2 px gaps, upscaled twice, with optional labels left of each row."""
    label_w = 60 if row_labels else 0
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (label_w + cols * (64 + GAP), rows * (64 + GAP)), "white")
    d = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        out.paste(im, (label_w + (i % cols) * (64 + GAP), (i // cols) * (64 + GAP)))
    for r, text in enumerate(row_labels or []):
        d.text((4, r * (64 + GAP) + 26), text, fill=(0, 0, 0))
    return out.resize((out.width * SCALE, out.height * SCALE), Image.NEAREST)


def _look(pattern: str, k: int) -> Look:
    """Orange and blue in ``pattern`` (orange alone when plain), with the ``k``-th mark in white."""
    return Look(pattern, "orange", "orange" if pattern == "plain" else "blue", MARKS[k % len(MARKS)], "white")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("docs/images/toy_world"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)

    grid([render(sample_scene(i, look_prob=0.5)) for i in range(32)], 8).save(args.output / "samples.png")
    looks = [  # toy world 2: every pattern (columns) on every class (rows), each with another mark
        render(Scene("grass", (ToyObject(cls, "orange", "center", "big", look=_look(pattern, i + j)),), seed=i))
        for i, cls in enumerate(CLASSES)
        for j, pattern in enumerate(PATTERN_KINDS)
    ]
    grid(looks, len(PATTERN_KINDS), row_labels=list(CLASSES)).save(args.output / "looks.png")
    colors = list(COLORS)
    classes = [
        render(Scene(bg, (ToyObject(cls, colors[(i + 2 * j) % len(colors)], "center", "big"),), seed=j))
        for j, bg in enumerate(BACKGROUNDS)
        for i, cls in enumerate(CLASSES)
    ]
    grid(classes, len(CLASSES), row_labels=list(BACKGROUNDS)).save(args.output / "classes_backgrounds.png")
    layout = [
        render(Scene("grass", (ToyObject("teddy", "red", pos, size),), seed=3))
        for size in ("small", "big")
        for pos in ("left", "center", "right")
    ]
    layout.append(
        render(
            Scene(
                "beach",
                (ToyObject("cat", "blue", "left", "small"), ToyObject("car", "yellow", "right", "small")),
                seed=4,
            )
        )
    )
    grid(layout, 7).save(args.output / "positions_sizes.png")
    concept_rows = []
    for concept in CONCEPTS.values():
        concept_rows += concept.photos()
        concept_rows.append(Image.new("RGB", (64, 64), "white"))
        concept_rows.append(render(Scene("night", (concept.object("center"),), seed=9)))
    grid(concept_rows, 7, row_labels=list(CONCEPTS)).save(args.output / "concepts.png")
    print(f"wrote figures to {args.output}")


if __name__ == "__main__":
    main()
