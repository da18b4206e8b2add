"""Overfitting of personalization methods on the toy world: the paper's Figs. 9-11 and Table 1, measured.

    python benchmarks/overfitting.py                  # 4 concepts x 7 methods x (100, 200, 400, 1000, 2000) steps
    python benchmarks/overfitting.py --quick          # my_cat, 100 and 200 steps, fewer samples (minutes)
    python benchmarks/overfitting.py --report-only    # tables, plots and grids from the results already written

Concepts can run in parallel processes, one ``--output-dir`` each, then be reported together:
``--report-only --output-dir A --merge B C D``.

Every method trains on the same concept photos (``examples/toy_world/concepts/<name>``: one background, one
position), from the same toy model, with the same batch (4), seeds and step budget, through one loop
(:func:`diffusers_infusion.baselines.train_method`), and is measured after each step count in ``--steps``:

- **Wasserstein** (concept-specific overfitting, Fig. 9): Fréchet distance between Gaussians fitted to the VAE latents
  of the base model's and the method's images under super-class prompts ("a photo of a cat", the method's concept
  prompt for the customized model), same seeds.
- **Fisher** (concept-agnostic overfitting, Fig. 10): latent Fisher divergence (eq. 4) on rendered toy scenes whose
  captions do not name the class word.
- **Text alignment**: the attribute reader's share of images showing what the prompt names, on prompts that put the
  concept in backgrounds, positions and company its photos never showed.
- **Concept similarity**: how much the object looks like the concept's photos (toy analogue of CLIP-I / DINO).
- **Storage**: bytes of what the method saves for the concept.

``--scene-captions`` trains every method on captions that also name the photos' position and background, in the
toy world's own words ("a photo of a cat in the center at night"), as one captions a LoRA or Textual Inversion
dataset to keep the scene out of the concept; the default is the paper's setting, "a photo of a cat" alone.

Two reference rows need no training: ``base`` (the base model against itself with other seeds: the metrics' floor)
and ``base_described`` (the base model with the concept's look written out in the prompt, "a cat split diagonally
into green and orange with a yellow star": what the text space alone can draw).

Sampling: DDIM, ``--inference-steps`` 25, ``--guidance`` 7.5 (the paper's); the fidelity comparison of
docs/benchmarks.md samples at 3, the toy model's own (it draws looks told in words most faithfully there).

The prompts below were fixed before any result was seen and are not tuned afterwards. Results are appended to
``<output-dir>/results.jsonl`` after every measurement (a rerun skips what is there; a dir made with other
captions or sampling refuses new rows), then summarized by ``overfitting_report.py`` into
``<output-dir>/overfitting.md`` (mean ± std over concepts), ``overfitting.png`` (curves), ``tradeoff.png`` and one
image grid per concept (``grid_<concept>.png``: rows = methods, columns = steps, same prompt and seed: Fig. 11).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("overfitting_report", Path(__file__).with_name("overfitting_report.py"))
_report = importlib.util.module_from_spec(_spec)  # the tables, plots and grids (loadable by path, as this file is)
_spec.loader.exec_module(_report)
STEPS = (100, 200, 400, 1000, 2000)
SCENE_SEED = 10_000  # the new-scene images' first seed (text alignment, concept similarity, grids)
#: The paper's seven methods, in the tables' order; the default run.
DEFAULT_METHODS = [
    "dreambooth", "dreambooth_lora", "textual_inversion", "custom_diffusion", "perfusion", "infusion_own_queries",
    "infusion",
]  # fmt: skip
T700 = {"rank": 4, "max_timestep": 700, "norm_bound": 1.0}  # the fidelity knob gated to t < 700
#: Rows that are a method with options: label -> (method name, constructor options).
VARIANTS = {
    "dreambooth_prior": ("dreambooth", {"prior_preservation": True}),  # diffusers' --with_prior_preservation
    "dreambooth_te": ("dreambooth", {"train_text_encoder": True}),  # diffusers' --train_text_encoder
    "textual_inversion_8v": ("textual_inversion", {"num_vectors": 8}),  # diffusers' --num_vectors 8
    "infusion_fidelity_r4": ("infusion", {"fidelity": {"rank": 4}}),  # docs/fidelity.md: every layer, always on
    "infusion_fidelity_r4_b05": ("infusion", {"fidelity": {"rank": 4, "norm_bound": 0.5}}),
    "infusion_fidelity_r4_late": ("infusion", {"fidelity": {"rank": 4, "max_timestep": 500, "norm_bound": 1.0}}),
    "infusion_fidelity_r4_t700": ("infusion", {"fidelity": T700}),
    # the same, Δ at a fraction of the rate (its drift at high noise is what moves the layout by 2,000 steps);
    # 0.3 is docs/fidelity.md's recommended setting
    "infusion_fidelity_r4_t700_d03": ("infusion", {"fidelity": T700, "residual_lr_scale": 0.3}),
    "infusion_fidelity_r4_t700_d01": ("infusion", {"fidelity": T700, "residual_lr_scale": 0.1}),
}
#: Every method the benchmark trains, each variant right after its method.
TRAINED = [row for m in DEFAULT_METHODS for row in (m, *(v for v, (base, _) in VARIANTS.items() if base == m))]
METHOD_ORDER = ("base", "base_described", *TRAINED)  # the base rows are references, computed for every concept
logger = logging.getLogger("overfitting")


def superclass_prompts(class_word: str) -> list[str]:
    """Prompts naming only the class word (Wasserstein metric, Fig. 9)."""
    return [f"a photo of a {class_word}", f"a {class_word}", f"a picture of a {class_word}"]


def scene_prompts(concept) -> list[str]:
    """Prompts that put the concept where its photos never were: other backgrounds, positions, company."""
    from diffusers_infusion.toy.world import BACKGROUND_PHRASES, CLASSES, POSITION_PHRASES

    w = concept.class_word
    others = [b for b in BACKGROUND_PHRASES if b != concept.background]
    sides = [p for p in ("left", "right") if p != concept.position]
    company = [c for c in CLASSES if c != w]
    prompts = [f"a photo of a {w} {BACKGROUND_PHRASES[b]}" for b in others]  # 4
    prompts += [f"a {w} {POSITION_PHRASES[s]} {BACKGROUND_PHRASES[others[i]]}" for i, s in enumerate(sides)]  # 1-2
    prompts += [f"a {w} and a {company[0]} {BACKGROUND_PHRASES[others[-1]]}"]
    prompts += [f"a {company[1]} and a {w} {BACKGROUND_PHRASES[others[-2]]}"]
    return prompts


def scene_captioned(data, concept):
    """``data`` with every caption followed by the photos' position and background phrases (``--scene-captions``)."""
    from dataclasses import replace

    from diffusers_infusion.toy.world import BACKGROUND_PHRASES, POSITION_PHRASES

    scene = f"{POSITION_PHRASES[concept.position]} {BACKGROUND_PHRASES[concept.background]}"
    return replace(data, captions=[[f"{c} {scene}" for c in captions] for captions in data.captions])


def fisher_set(class_word: str, n: int) -> tuple[list, list[str]]:
    """``n`` rendered toy scenes (fixed seeds) whose captions do not name ``class_word``, with their captions."""
    import random

    from diffusers_infusion.toy.world import caption, render, sample_scene

    images, captions, seed = [], [], 5_000_000
    while len(images) < n:
        scene = sample_scene(seed, look_prob=0.5)  # the base model's training distribution (toy world 2)
        seed += 1
        if any(o.cls == class_word for o in scene.objects):
            continue
        images.append(render(scene))
        captions.append(caption(scene, rng=random.Random(seed)))
    return images, captions


@torch.no_grad()
def base_images(base, prompts: list[str], *, seed: int, **kwargs) -> list:
    """The base pipeline's images of ``prompts``, image i from ``manual_seed(seed + i)`` (as ``generate`` seeds)."""
    images = []
    for i in range(0, len(prompts), 16):
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(prompts[i : i + 16]))]
        images += base(prompts[i : i + 16], generator=gens, **kwargs).images
    return images


class Evaluator:
    """Everything measured at one checkpoint; base-model references computed once per concept."""

    def __init__(self, base, concept, args):
        from diffusers_infusion.metrics import encode_images

        self.base, self.concept, self.args = base, concept, args
        self.super_prompts = [p for p in superclass_prompts(concept.class_word) for _ in range(args.super_images)]
        self.scene_prompts = [p for p in scene_prompts(concept) for _ in range(args.scene_images)]
        self.fisher_images, self.fisher_captions = fisher_set(concept.class_word, args.fisher_images)
        self.kwargs = dict(num_inference_steps=args.inference_steps, guidance_scale=args.guidance)
        self.base_latents = self.features(encode_images(base.vae, self._base_images(self.super_prompts, seed=0)))
        self.base_scene = self._base_images(self.scene_prompts, seed=SCENE_SEED)

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) average-pooled ``--pool`` times (layout-level features; fewer dims for small N)."""
        return torch.nn.functional.avg_pool2d(latents, self.args.pool) if self.args.pool > 1 else latents

    def reference_row(self) -> dict:
        """The base model against itself with other seeds: the metrics' floor at this sample size."""
        from diffusers_infusion.metrics import (
            encode_images,
            toy_concept_similarity,
            toy_text_alignment,
            wasserstein_metric,
        )

        reseeded = self._base_images(self.super_prompts, seed=50_000)
        return {
            "wasserstein": wasserstein_metric(
                self.base_latents, self.features(encode_images(self.base.vae, reseeded))
            ),
            "fisher": 0.0,
            "text_alignment": toy_text_alignment(self.base_scene, self.scene_prompts),
            "concept_similarity": float(np.mean(toy_concept_similarity(self.base_scene, self.concept))),
            "storage_bytes": 0,
        }

    def described_row(self) -> dict:
        """The base model told the concept's look in words (no training): what the text space alone can draw.

        The class word of each prompt becomes the look's full wording ("a cat split diagonally into green and
        orange with a yellow star"), same seeds as the methods' images.
        """
        from diffusers_infusion.baselines.base import insert_identifier
        from diffusers_infusion.metrics import (
            encode_images,
            toy_concept_similarity,
            toy_text_alignment,
            wasserstein_metric,
        )
        from diffusers_infusion.toy.looks import look_phrase

        def described(prompts: list[str]) -> list[str]:
            phrase = look_phrase(self.concept.class_word, self.concept.look)
            return [insert_identifier(p, self.concept.class_word, phrase) for p in prompts]

        super_images = self._base_images(described(self.super_prompts), seed=0)
        scene_images = self._base_images(described(self.scene_prompts), seed=SCENE_SEED)
        return {
            "wasserstein": wasserstein_metric(
                self.base_latents, self.features(encode_images(self.base.vae, super_images))
            ),
            "fisher": 0.0,
            "text_alignment": toy_text_alignment(scene_images, self.scene_prompts),
            "concept_similarity": float(np.mean(toy_concept_similarity(scene_images, self.concept))),
            "storage_bytes": 0,
        }

    def _base_images(self, prompts: list[str], *, seed: int) -> list:
        return base_images(self.base, prompts, seed=seed, **self.kwargs)

    def __call__(self, method, step: int) -> tuple[dict, list]:
        from diffusers_infusion.metrics import (
            encode_images,
            latent_fisher_divergence,
            toy_concept_similarity,
            toy_text_alignment,
            wasserstein_metric,
        )

        t0 = time.time()
        super_images = method.generate(self.super_prompts, seed=0, **self.kwargs)
        scene_images = method.generate(self.scene_prompts, seed=SCENE_SEED, **self.kwargs)
        row = {
            "wasserstein": wasserstein_metric(
                self.base_latents, self.features(encode_images(self.base.vae, super_images))
            ),
            "fisher": latent_fisher_divergence(
                self.base,
                method.noise_prediction,
                self.fisher_images,
                self.fisher_captions,
                num_samples_per_image=self.args.fisher_draws,
                progress=False,
            ),  # fmt: skip
            "text_alignment": toy_text_alignment(scene_images, self.scene_prompts),
            "concept_similarity": float(np.mean(toy_concept_similarity(scene_images, self.concept))),
            "storage_bytes": method.storage_bytes(),
            "eval_s": round(time.time() - t0, 1),
        }
        return row, scene_images[:: self.args.scene_images][:2]


def train_and_measure(method, data, evaluator: Evaluator, *, results: Path, concept: str, args, label=None) -> None:
    """Train ``method`` to the last step count, measuring after each one; rows appended to ``results``.

    Rows are written under ``label`` (default: the method's name).
    """
    from diffusers_infusion.baselines import train_method

    label = label or method.name

    clock = {"train_s": 0.0, "last": time.time()}

    def measure(step: int, method) -> None:
        clock["train_s"] += time.time() - clock["last"]
        row, cells = evaluator(method, step)
        row = {"concept": concept, "method": label, "step": step, "train_s": round(clock["train_s"], 1), **row}
        for i, image in enumerate(cells):
            image.save(results.parent / "cells" / f"{concept}_{label}_{step}_{i}.png")
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        logger.info("%s", row)
        clock["last"] = time.time()

    train_method(method, data, steps=max(args.steps), batch_size=4, seed=args.seed, snapshot_at=args.steps,
                 callback=measure)  # fmt: skip


def run(args: argparse.Namespace) -> None:
    from diffusers_infusion.toy import CONCEPTS, load_toy_pipeline
    from diffusers_infusion.toy.concepts import CONCEPTS_DIR
    from diffusers_infusion.training.data import load_instance_data

    out = args.output_dir
    (out / "cells").mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    sampling = {"guidance": args.guidance, "inference_steps": args.inference_steps}
    _check_setting(out, {"scene_captions": args.scene_captions, **sampling})
    done = {(r["concept"], r["method"]) for r in _report.read_rows(results) if r["step"] == max(args.steps)}
    unknown = [c for c in args.concepts if c not in CONCEPTS]
    if unknown:
        raise SystemExit(f"--concepts {' '.join(unknown)}: no such toy concept. Choose from {', '.join(CONCEPTS)}.")
    for name in args.concepts:
        concept = CONCEPTS[name]
        todo = [m for m in args.methods if (name, m) not in done]
        if not todo and (name, "base_described") in done:
            continue
        base = load_toy_pipeline()
        evaluator = Evaluator(base, concept, args)
        _save_base_cells(evaluator, out / "cells", name, args.scene_images)  # the grid's first column, up front
        data = load_instance_data(CONCEPTS_DIR / name, concept.class_word, resolution=64)
        if args.scene_captions:
            data = scene_captioned(data, concept)
        for label, row in (("base", evaluator.reference_row), ("base_described", evaluator.described_row)):
            if (name, label) not in done:
                _drop(results, name, label)
                reference = row()
                with results.open("a") as f:
                    for step in args.steps:
                        f.write(json.dumps({"concept": name, "method": label, "step": step, **reference}) + "\n")
        for method_name in todo:
            _drop(results, name, method_name)  # a run cut short starts over: no mixed rows
            method = build_method(method_name, base, concept, seed=args.seed, learning_rate=args.learning_rate,
                                  lr_scale=args.lr_scale)  # fmt: skip
            train_and_measure(method, data, evaluator, results=results, concept=name, args=args, label=method_name)


def build_method(label: str, base, concept, *, seed: int, learning_rate: float | None = None, lr_scale: float = 1.0):
    """The method of row ``label`` (a name in ``METHODS`` or ``VARIANTS``) for ``concept``, before training.

    Its initial weights are drawn after ``torch.manual_seed(seed)`` (e.g. LoRA's); its rate is ``learning_rate``
    (default: the method's ``toy_learning_rate``) times ``lr_scale``; DreamBooth's prompts say "my <class>".
    """
    from diffusers_infusion.baselines import METHODS

    cls_name, options = VARIANTS.get(label, (label, {}))
    cls = METHODS[cls_name]
    options = {"identifier": "my", **options} if cls_name in ("dreambooth", "dreambooth_lora") else options
    torch.manual_seed(seed)
    lr = lr_scale * (cls.toy_learning_rate if learning_rate is None else learning_rate)
    return cls(base, class_word=concept.class_word, learning_rate=lr, **options)


SETTING_DEFAULTS = {"scene_captions": False, "guidance": 7.5, "inference_steps": 25}


def _check_setting(out: Path, setting: dict) -> None:
    """Refuse to add rows trained or sampled otherwise to ``out`` (a rerun skips the rows already there)."""
    marker = out / "setting.json"
    before = None
    if marker.exists() or (out / "results.jsonl").exists():  # a key a marker lacks (or no marker): the defaults then
        before = {**SETTING_DEFAULTS, **(json.loads(marker.read_text()) if marker.exists() else {})}
    if before is not None and before != setting:
        raise SystemExit(
            f"--output-dir {out} holds results made with {before}, this run asks for {setting}: the rows would mix."
            " Pass another --output-dir."
        )
    marker.write_text(json.dumps(setting) + "\n")


def _save_base_cells(evaluator: Evaluator, cells: Path, name: str, per_prompt: int) -> None:
    """The base model's images of the grid's two prompts, and the prompts, for the report's grid."""
    shown = evaluator.scene_prompts[::per_prompt][:2]
    for i in range(len(shown)):
        evaluator.base_scene[i * per_prompt].save(cells / f"{name}_base_0_{i}.png")
    (cells / f"{name}_prompts.json").write_text(json.dumps(shown))


def _drop(path: Path, concept: str, method: str) -> None:
    keep = [r for r in _report.read_rows(path) if (r["concept"], r["method"]) != (concept, method)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def report(args: argparse.Namespace) -> None:
    """Tables, curves and grids from the rows written (``overfitting_report.py``), in this benchmark's row order."""
    _report.report(args, method_order=METHOD_ORDER)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=["my_cat", "my_dog", "my_teddy", "my_cup"])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=TRAINED)
    parser.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    parser.add_argument("--super-images", type=int, default=16, help="images per super-class prompt")
    parser.add_argument("--scene-images", type=int, default=3, help="images per new-scene prompt")
    parser.add_argument("--fisher-images", type=int, default=48)
    parser.add_argument("--fisher-draws", type=int, default=2, help="(t, noise) draws per Fisher image")
    parser.add_argument("--pool", type=int, default=4, help="average-pool latents before the Wasserstein metric")
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="one learning rate for every method in --methods (default: each method's toy_learning_rate)",
    )
    parser.add_argument(
        "--lr-scale", type=float, default=1.0, help="multiply each method's learning rate (a learning-rate sweep)"
    )
    parser.add_argument(
        "--scene-captions", action="store_true", help="train on captions naming the photos' position and background"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "out" / "overfitting")
    parser.add_argument("--quick", action="store_true", help="my_cat, 100 and 200 steps, fewer samples")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], help="more output dirs to report with this one")
    args = parser.parse_args(argv)
    if args.quick:  # flags given explicitly win
        args.concepts = args.concepts[:1]
        args.steps = [100, 200] if args.steps == list(STEPS) else args.steps
        args.super_images, args.scene_images, args.fisher_images, args.fisher_draws = 4, 1, 8, 1
        args.inference_steps = 10
    args.steps = sorted(set(args.steps))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.report_only:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
