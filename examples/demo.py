"""The README's main job: train an Infusion concept on the toy world, and show it in scenes its photos never showed.

    python examples/demo.py --output out/demo.png

1. Trains "my_cat" twice (a cat split diagonally into green and orange with a yellow star, photographed 5 times at
   night, in the center) with ``examples/train_infusion.py`` on the embedded toy Stable Diffusion
   (``examples/toy_world/model``).
2. Renders prompts that put the cat on other backgrounds, at other positions and next to other objects, plus one
   prompt without the class word, each with the same seed for the base model and the concept (one call each).
3. Writes the grid (rows: prompts; columns: base model, then each concept) and prints the toy reader's scores:
   concept similarity (how much the cat looks like the photos) and text alignment (does the image show what the
   prompt names: background, objects, position; ``diffusers_infusion.metrics.toy_text_alignment``).

Two concepts are trained, one per column: the paper's method (1,000 steps), which keeps the base model's scenes
but learns little of the look on the toy model, and the same method with the opt-in fidelity knob (beyond the
paper, docs/fidelity.md: rank 4, only for t < 700, norm bound 1.0, Δ at 0.3x the rate; 400 steps), which draws
the cat's two colors (not its star). ``--variants exact`` or ``--variants fidelity`` trains and shows one of them.
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


FIDELITY_FLAGS = ["--fidelity_rank", "4", "--fidelity_max_timestep", "700", "--fidelity_norm_bound", "1.0",
                  "--fidelity_residual_lr_scale", "0.3"]  # fmt: skip
#: The demo's concepts: variant -> (column title, folder next to the grid, training steps, with the fidelity knob).
VARIANTS = {
    "exact": ("Infusion (the paper's method), {steps} steps", "my_cat", 1000, False),
    "fidelity": ("Infusion + fidelity knob, {steps} steps", "my_cat_fidelity", 400, True),
}


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


def save_grid(prompts: list[str], columns: dict[str, list], path: Path) -> None:
    """A labelled PNG grid: one row per prompt, one column per ``{title: images}`` entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(prompts), len(columns), figsize=(0.6 + 2 * len(columns), 1.75 * len(prompts)),
                             squeeze=False)  # fmt: skip
    for c, (title, images) in enumerate(columns.items()):
        axes[0][c].set_title("\n".join(textwrap.wrap(title, 22)), fontsize=8)
        for r, image in enumerate(images):
            axes[r][c].imshow(image, interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
    for r, prompt in enumerate(prompts):
        axes[r][0].set_ylabel("\n".join(textwrap.wrap(prompt, 16)), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def log_scores(name: str, images: list, *, with_cat: list[int]) -> None:
    """Print the reader's concept similarity (over the prompts naming the cat) and text alignment of one column."""
    readings = read_images(images)
    similarity = concept_similarity([images[i] for i in with_cat], "my_cat", readings=[readings[i] for i in with_cat])
    alignment = toy_text_alignment(images, PROMPTS, readings=readings)
    logger.info("%-42s concept similarity %.2f   text alignment %.2f", name, sum(similarity) / len(similarity),
                alignment)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("out/demo.png"))
    parser.add_argument("--concept", type=Path, default=None, help="A trained concept folder (skips training).")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="Which concepts to show."
    )
    parser.add_argument("--train_steps", type=int, default=None, help="Training steps (1000 exact, 400 knob).")
    parser.add_argument("--steps", type=int, default=25, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()

    # 1. The concepts: trained here unless given.
    if args.concept is not None:
        concepts = {"with the concept": args.concept}
    else:
        concepts = {}
        for variant in args.variants:
            title, folder, steps, fidelity = VARIANTS[variant]
            steps = args.train_steps or steps
            train_concept(args.output.parent / folder, steps=steps, seed=args.seed, fidelity=fidelity)
            concepts[title.format(steps=steps)] = args.output.parent / folder
    trained = time.perf_counter()

    # 2. Base model and concept images, same seeds, one call per concept.
    pipe = load_toy_pipeline(TOY_MODEL, pipeline_cls=InfusionPipeline)
    columns, untouched = {}, []
    for title, folder in concepts.items():
        pipe.load_infusion_concept(folder, "my_cat")
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(PROMPTS))]
        out = pipe(PROMPTS, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   generator=generators, return_base_images=True)  # fmt: skip
        pipe.unload_infusion_concept("my_cat")
        columns.setdefault("base model", out.base_images)
        columns[title] = out.images
        untouched.append(bool(np.array_equal(np.asarray(out.images[-1]), np.asarray(out.base_images[-1]))))

    # 3. The grid and the reader's scores.
    save_grid(PROMPTS, columns, args.output)
    with_cat = [i for i, p in enumerate(PROMPTS) if "cat" in p.split()]
    for title, images in columns.items():
        log_scores(title, images, with_cat=with_cat)
    logger.info("Prompt without the class word untouched: %s", all(untouched))
    logger.info("Wrote %s (training %.0f s, sampling %.0f s).", args.output, trained - start,
                time.perf_counter() - trained)  # fmt: skip


if __name__ == "__main__":
    main()
