"""The README's main job: an Infusion concept in new scenes, next to the base model, as a picture grid.

Until the toy world's trained model lands, this runs on tiny Stable Diffusion components built in code (random
weights, so the pictures are noise-like) with a stand-in concept of random residuals: it shows the whole data path
(load concept, dual-stream sampling, base vs. concept with the same seeds) end to end on a CPU in seconds.

    python examples/demo.py --output out/demo.png
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from diffusers_infusion import InfusionConcept, InfusionPipeline
from diffusers_infusion.tiny import tiny_sd_components

logger = logging.getLogger("demo")

PROMPTS = [
    "a photo of a cat",
    "a cat on the beach",
    "a cat reading a book on the moon",
    "a cat next to a dog on snow",
    "a dog on grass",  # no class word: the base image, untouched
]


def stand_in_concept(pipe: InfusionPipeline, seed: int) -> InfusionConcept:
    """A concept with random residuals (an untrained stand-in) bound to the class word 'cat'."""
    concept = InfusionConcept.zeros(pipe.unet, "cat", base_model="tiny-sd (in code)")
    gen = torch.Generator().manual_seed(seed)
    concept.residuals = {k: 2.0 * torch.randn(v.shape, generator=gen) for k, v in concept.residuals.items()}
    return concept


def save_grid(rows: list[tuple[str, object, object]], path: Path) -> None:
    """Rows of (prompt, base image, concept image) as a labelled PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(4.5, 1.9 * len(rows)), squeeze=False)
    for r, (prompt, base, concept) in enumerate(rows):
        for c, (image, title) in enumerate(((base, "base model"), (concept, "with concept"))):
            axes[r][c].imshow(image, interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(title, fontsize=9)
        axes[r][0].set_ylabel(prompt, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("out/demo.png"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()

    # 1. The base model and a concept.
    pipe = InfusionPipeline(**tiny_sd_components(seed=args.seed), requires_safety_checker=False)
    name = pipe.load_infusion_concept(stand_in_concept(pipe, args.seed), "my-cat")
    logger.info("Loaded concept %r (class word 'cat', %d values).", name, pipe.infusion_concepts[name].num_values)

    # 2. Every prompt with the same seed: the concept's image and the base model's image from one call.
    out = pipe(PROMPTS, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
               return_base_images=True)  # fmt: skip

    # 3. The grid.
    save_grid(list(zip(PROMPTS, out.base_images, out.images)), args.output)
    logger.info("Wrote %s (%d prompts x [base, concept]) in %.1f s.", args.output, len(PROMPTS),
                time.perf_counter() - start)  # fmt: skip


if __name__ == "__main__":
    main()
