"""How well a toy-world pipeline follows text: the reader's accuracy on images generated from held-out prompts.

Prompts name class, color, background and position of one object, and each (class, color, background)
combination is one that the toy model never saw in training
(:func:`~diffusers_infusion.toy.world.held_out_combinations`).

    from diffusers_infusion.toy.evaluate import evaluate_text_following
    scores = evaluate_text_following(pipe, num_samples=200)  # {"class": 0.97, "color": 0.9, ...}
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .world import BACKGROUND_PHRASES, POSITION_PHRASES, POSITIONS, held_out_combinations

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and the attributes it asks for."""

    prompt: str
    cls: str
    color: str
    background: str
    position: str


def held_out_prompts(num_samples: int = 200, *, seed: int = 0) -> list[PromptSpec]:
    """Prompts over the held-out combinations (cycled through in order), each with a random position."""
    rng = random.Random(f"held-out-{seed}")
    combos = held_out_combinations()
    specs = []
    for i in range(num_samples):
        cls, color, background = combos[i % len(combos)]
        position = rng.choice(list(POSITIONS))
        article = "an" if color[0] in "aeiou" else "a"
        prompt = f"a photo of {article} {color} {cls} {POSITION_PHRASES[position]} {BACKGROUND_PHRASES[background]}"
        specs.append(PromptSpec(prompt, cls, color, background, position))
    return specs


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    *,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 50,
    progress: bool = True,
) -> np.ndarray:
    """Images for ``prompts``, sample ``i`` seeded with ``seed + i``: (N, 64, 64, 3) in [0, 1]."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = prompts[i : i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        result = pipe(
            chunk,
            generator=gens,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="np",
        )
        out.append(result.images)  # (B, 64, 64, 3)
    return np.concatenate(out)


def score_images(images, specs: list[PromptSpec]) -> dict[str, float]:
    """The reader's accuracy of the main object's class, color, position and of the background."""
    from .reader import read_images

    readings = read_images(images)
    hits = {"class": 0, "color": 0, "background": 0, "position": 0, "all": 0}
    for spec, r in zip(specs, readings):
        ok = {
            "class": r.main.cls == spec.cls,
            "color": r.main.color == spec.color,
            "background": r.background == spec.background,
            "position": r.main.position == spec.position,
        }
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
    return {k: v / len(specs) for k, v in hits.items()}


def evaluate_text_following(
    pipe,
    *,
    num_samples: int = 200,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 50,
    return_images: bool = False,
):
    """Generate from held-out prompts and read the images back.

    Returns:
        A dict of accuracies (``class``, ``color``, ``background``, ``position``, and ``all`` four right), and with
        ``return_images`` also the images (N, 64, 64, 3) and the prompt specs.
    """
    specs = held_out_prompts(num_samples, seed=seed)
    images = generate(
        pipe,
        [s.prompt for s in specs],
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    )
    scores = score_images(images, specs)
    return (scores, images, specs) if return_images else scores
