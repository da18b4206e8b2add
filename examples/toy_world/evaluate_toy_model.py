"""Measure how well the toy Stable Diffusion follows text on attribute combinations held out of its training.

Generates one image per prompt ("a photo of a green cat on the left on the beach", each (class, color,
background) combination never seen in training) and reads class, color, background and position back with the
attribute reader. With ``--looks`` the prompts name held-out looks ("a photo of an orange cat with a blue band in
the center on grass") and the pattern with both colors is read too.

    python examples/toy_world/evaluate_toy_model.py --num-samples 200 --grid out/toy_eval.png
    python examples/toy_world/evaluate_toy_model.py --looks --num-samples 232 --grid out/toy_eval_looks.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_infusion.toy.evaluate import evaluate_text_following  # noqa: E402
from diffusers_infusion.toy.model import TOY_MODEL_DIR, load_toy_pipeline  # noqa: E402

BAR = {"class": 0.95, "color": 0.90, "background": 0.95, "position": 0.90}  # toy world 2's bar
LOOK_BAR = {"pattern": 0.80}


def save_grid(images: np.ndarray, path: Path, *, cols: int = 10, scale: int = 2) -> None:
    """Images (N, 64, 64, 3) in [0, 1] as one PNG, ``cols`` per row, 2 px gaps, upscaled ``scale`` times."""
    n = len(images)
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * 66, rows * 66), "white")
    for i, im in enumerate(images):
        grid.paste(Image.fromarray((im * 255).round().astype(np.uint8)), ((i % cols) * 66, (i // cols) * 66))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TOY_MODEL_DIR)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", type=Path, default=None, help="save the first 40 samples as a PNG grid")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--looks", action="store_true", help="held-out looks (pattern + color pair) instead of colors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    pipe = load_toy_pipeline(args.model)
    results = {}
    for g in args.guidance:
        t0 = time.time()
        scores, images, specs = evaluate_text_following(
            pipe,
            num_samples=args.num_samples,
            seed=args.seed,
            num_inference_steps=args.steps,
            guidance_scale=g,
            return_images=True,
            looks=args.looks,
        )
        results[g] = scores
        bar = {**{k: v for k, v in BAR.items() if not args.looks or k != "color"}, **(LOOK_BAR if args.looks else {})}
        passed = all(scores[k] >= v for k, v in bar.items())
        line = "  ".join(f"{k} {v:.1%}" for k, v in scores.items())
        print(f"guidance {g}: {line}  ({time.time() - t0:.0f} s, bar {'met' if passed else 'NOT met'})")
        if args.grid is not None and g == args.guidance[0]:
            save_grid(images[:40], args.grid)
            (args.grid.with_suffix(".txt")).write_text("\n".join(s.prompt for s in specs[:40]) + "\n")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
