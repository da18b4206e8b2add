"""How well a toy-world pipeline follows text: the reader's accuracy on images generated from held-out prompts.

Prompts name class, color, background and position of one object, and each (class, color, background)
combination is one that the toy model never saw in training
(:func:`~diffusers_infusion.toy.world.held_out_combinations`). With ``looks=True`` they name a look instead of a
color ("a photo of a dog with a red left side and a yellow right side on the left on snow"), each (class, pattern,
color pair) a held-out one (:func:`~diffusers_infusion.toy.looks.held_out_looks`), and ``pattern`` scores the
pattern with both colors in their places.

    from diffusers_infusion.toy.evaluate import evaluate_text_following
    scores = evaluate_text_following(pipe, num_samples=200)  # {"class": 0.97, "color": 0.9, ...}
    scores = evaluate_text_following(pipe, num_samples=232, looks=True)  # {..., "pattern": 0.85, ...}
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .looks import Look, held_out_looks, look_phrase
from .world import BACKGROUND_PHRASES, BACKGROUNDS, POSITION_PHRASES, POSITIONS, held_out_combinations

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and the attributes it asks for."""

    prompt: str
    cls: str
    color: str
    background: str
    position: str
    look: Look | None = None


def held_out_look_prompts(num_samples: int = 232, *, seed: int = 0) -> list[PromptSpec]:
    """Prompts over the held-out (class, pattern, color pair) looks (cycled through), random background and position.

    The look is named in full, without a mark: "a photo of an orange cat with a blue band in the center on grass".
    """
    rng = random.Random(f"held-out-looks-{seed}")
    combos = held_out_looks()
    specs = []
    for i in range(num_samples):
        cls, pattern, a, b = combos[i % len(combos)]
        look = Look(pattern, a, b)
        position, background = rng.choice(list(POSITIONS)), rng.choice(BACKGROUNDS)
        text = look_phrase(cls, look)
        article = "an" if text[0] in "aeiou" else "a"
        prompt = f"a photo of {article} {text} {POSITION_PHRASES[position]} {BACKGROUND_PHRASES[background]}"
        specs.append(PromptSpec(prompt, cls, a, background, position, look))
    return specs


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
    """The reader's accuracy of the main object's class, color, position and of the background.

    Specs with a look also score ``pattern`` (pattern and both colors in their places, :func:`~.reader.look_matches`)
    and ``pattern_kind`` (the pattern alone); ``all`` then asks for the pattern instead of the color.
    """
    from .reader import look_matches, read_images

    readings = read_images(images)
    hits: dict[str, int] = {}
    n_looks = sum(s.look is not None for s in specs)
    for spec, r in zip(specs, readings):
        ok = {
            "class": r.main.cls == spec.cls,
            "color": r.main.color == spec.color,
            "background": r.background == spec.background,
            "position": r.main.position == spec.position,
        }
        if spec.look is not None:
            hits["pattern_kind"] = hits.get("pattern_kind", 0) + (r.main.pattern == spec.look.pattern)
            ok["pattern"] = look_matches(r.main, spec.look)
        for k, v in ok.items():
            hits[k] = hits.get(k, 0) + v
        hits["all"] = hits.get("all", 0) + all(v for k, v in ok.items() if k != "color" or spec.look is None)
    return {k: v / (n_looks if k.startswith("pattern") else len(specs)) for k, v in hits.items()}


def evaluate_text_following(
    pipe,
    *,
    num_samples: int = 200,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 50,
    return_images: bool = False,
    looks: bool = False,
):
    """Generate from held-out prompts and read the images back.

    Args:
        looks: Prompts name held-out looks (:func:`held_out_look_prompts`) instead of held-out colors.

    Returns:
        A dict of accuracies (``class``, ``color``, ``background``, ``position``, and ``all`` four right), and with
        ``return_images`` also the images (N, 64, 64, 3) and the prompt specs.
    """
    specs = (held_out_look_prompts if looks else held_out_prompts)(num_samples, seed=seed)
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
