"""The README's main job: train an Infusion concept on the toy world, and show it in scenes its photos never showed.

    python examples/demo.py --output out/demo.png

1. Trains "my_cat" (a cat split diagonally into green and orange with a yellow star, photographed 5 times at night,
   in the center) with ``examples/train_infusion.py`` on the embedded toy Stable Diffusion
   (``examples/toy_world/model``).
2. Renders prompts that put the cat on other backgrounds, at other positions and next to other objects, plus one
   prompt without the class word, each with the same seed for the base model and the concept (one call each).
3. Writes the grid (rows: prompts; columns: base model, with the concept) and prints the toy reader's scores:
   concept similarity (how much the cat looks like the photos) and text alignment (does the image show what the
   prompt names: background, objects, position; ``diffusers_infusion.metrics.toy_text_alignment``).

``--fidelity`` trains the concept with the opt-in fidelity knob instead (beyond the paper, docs/fidelity.md: rank 4,
only for t < 500, norm bound 1.0, 400 steps unless ``--train_steps`` says otherwise), which draws the concept's
two colors where the exact method paints it green.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_infusion import InfusionPipeline
from diffusers_infusion.metrics import toy_text_alignment
from diffusers_infusion.toy import concept_similarity, load_toy_pipeline, read_images

logger = logging.getLogger("demo")
HERE = Path(__file__).resolve().parent
TOY_MODEL = HERE / "toy_world" / "model"  # next to this script, so an installed (non-editable) package works too
PROMPTS = [
    "a photo of a cat on the beach",
    "a cat on grass",
    "a cat on snow",
    "a cat on the left on brick",
    "a cat and a dog on the beach",
    "a cup and a cat on snow",
    "a red car on grass",  # no class word: the base image, untouched
]


FIDELITY_FLAGS = ["--fidelity_rank", "4", "--fidelity_max_timestep", "500", "--fidelity_norm_bound", "1.0"]


def train_concept(output_dir: Path, *, steps: int, seed: int, fidelity: bool = False) -> None:
    """Train the concept with the project's training script (the same code path as ``accelerate launch``).

    ``fidelity``: with the gated fidelity knob (``FIDELITY_FLAGS``, the setting measured in docs/fidelity.md).
    """
    spec = importlib.util.spec_from_file_location("train_infusion", HERE / "train_infusion.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([
        "--pretrained_model_name_or_path", str(TOY_MODEL),
        "--instance_data_dir", str(HERE / "toy_world" / "concepts" / "my_cat"), "--class_word", "cat",
        "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "4",
        "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--checkpointing_steps", str(steps),
        "--seed", str(seed), "--report_to", "none", *(FIDELITY_FLAGS if fidelity else []),
    ])  # fmt: skip


def save_grid(rows: list[tuple[str, object, object]], path: Path) -> None:
    """Rows of (prompt, base image, concept image) as a labelled PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(4.6, 1.75 * len(rows)), squeeze=False)
    for r, (prompt, base, concept) in enumerate(rows):
        for c, image in enumerate((base, concept)):
            axes[r][c].imshow(image, interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel("\n".join(textwrap.wrap(prompt, 16)), fontsize=7, rotation=0, ha="right", va="center")
    axes[0][0].set_title("base model", fontsize=9)
    axes[0][1].set_title("with my_cat", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("out/demo.png"))
    parser.add_argument("--concept", type=Path, default=None, help="A trained concept folder (skips training).")
    parser.add_argument("--train_steps", type=int, default=None, help="Training steps (1000; 400 with --fidelity).")
    parser.add_argument("--fidelity", action="store_true", help="Train with the fidelity knob (docs/fidelity.md).")
    parser.add_argument("--steps", type=int, default=25, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()

    # 1. The concept: trained here unless given.
    concept_dir = args.concept or args.output.parent / "my_cat"
    if args.concept is None:
        steps = args.train_steps or (400 if args.fidelity else 1000)
        train_concept(concept_dir, steps=steps, seed=args.seed, fidelity=args.fidelity)
    trained = time.perf_counter()

    # 2. Base model and concept images, same seeds, in one call.
    pipe = load_toy_pipeline(TOY_MODEL, pipeline_cls=InfusionPipeline)
    pipe.load_infusion_concept(concept_dir, "my_cat")
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(PROMPTS))]
    out = pipe(PROMPTS, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=generators,
               return_base_images=True)  # fmt: skip

    # 3. The grid and the reader's scores.
    save_grid(list(zip(PROMPTS, out.base_images, out.images)), args.output)
    with_cat = [i for i, p in enumerate(PROMPTS) if "cat" in p.split()]
    for name, images in (("base model", out.base_images), ("with my_cat", out.images)):
        readings = read_images(images)
        similarity = concept_similarity(
            [images[i] for i in with_cat], "my_cat", readings=[readings[i] for i in with_cat]
        )
        alignment = toy_text_alignment(images, PROMPTS, readings=readings)
        logger.info("%-12s concept similarity %.2f   text alignment %.2f", name, sum(similarity) / len(similarity),
                    alignment)  # fmt: skip
    untouched = bool(np.array_equal(np.asarray(out.images[-1]), np.asarray(out.base_images[-1])))
    logger.info("Prompt without the class word untouched: %s", untouched)
    logger.info("Wrote %s (training %.0f s, sampling %.0f s).", args.output, trained - start,
                time.perf_counter() - trained)  # fmt: skip


if __name__ == "__main__":
    main()
