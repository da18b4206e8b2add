"""Why Infusion's fidelity depends on the guidance scale: each concept trained once, sampled at several scales.

Classifier-free guidance denoises with ``ε_u + g (ε_c − ε_u)``. Infusion changes only the conditional prediction:
a prompt without the class word, the empty one included, is drawn exactly as the base model draws it (METHOD.md,
property 4). So the concept adds ``g Δε_c`` to every step, and a lower ``g`` shrinks that push in proportion. A
method that fine-tunes the UNet (DreamBooth) moves ``ε_u`` too and adds ``Δε_u + g (Δε_c − Δε_u)``: where
``Δε_u ≈ Δε_c`` its push does not depend on ``g`` at all. This script measures both halves of that reading:

- **Fidelity by guidance**: every method of ``--methods`` trains once per concept to ``--steps`` (the overfitting
  benchmark's loop, photos, captions and seeds: its rows are the same weights), then draws the benchmark's
  new-scene prompts (same seeds) at each ``--guidance``: concept similarity and text alignment. The ``base`` and
  ``base_described`` reference rows are drawn at each scale too.
- **The push**: on the base model's new-scene images noised to ``t`` in ``PUSH_TIMESTEPS``,
  ``Δε_c = ε'_c − ε_c`` (the method's concept prompt against the base model's prompt) and ``Δε_u = ε'_u − ε_u``
  (the empty prompt); rows ``uncond_share = ‖Δε_u‖ / ‖Δε_c‖`` and ``cond_strength = ‖Δε_c‖ / ‖ε_c − ε_u‖`` (the
  push against guidance's own direction).

::

    OMP_NUM_THREADS=1 python benchmarks/guidance_sweep.py --scene-captions --output-dir out/guidance_sweep
    python benchmarks/guidance_sweep.py --report-only --output-dir out/guidance_sweep --merge out/other_half

Rows are appended to ``<output-dir>/results.jsonl`` as they are measured (a rerun skips a (concept, method) done);
the report writes ``guidance_sweep.md`` (mean over concepts) and ``guidance_sweep.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("overfitting", Path(__file__).with_name("overfitting.py"))
overfitting = importlib.util.module_from_spec(_spec)  # the benchmark whose loop, prompts, seeds and variants are used
_spec.loader.exec_module(overfitting)

GUIDANCE = (1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0)
PUSH_TIMESTEPS = (200, 500, 800)
DEFAULT_METHODS = ["infusion", "infusion_fidelity_r4_t700_d03", "textual_inversion", "dreambooth"]
logger = logging.getLogger("guidance_sweep")


@torch.no_grad()
def push(method, base, prompts: list[str], images: list) -> dict:
    """``uncond_share`` and ``cond_strength`` of ``method``'s change to the noise prediction (module docstring).

    Args:
        method: a trained ``PersonalizationMethod``.
        base: the untouched base pipeline.
        prompts: prompts naming the class word; the method's ``concept_prompt`` invokes the concept in them.
        images: the base model's images of ``prompts`` (what gets noised).
    """
    from diffusers_infusion.metrics import encode_images

    latents = encode_images(base.vae, images)  # (N, C, h, w)
    generator = torch.Generator().manual_seed(123)
    empty = [""] * len(prompts)
    base_c, base_u = base.encode_prompt(prompts, "cpu", 1, True, negative_prompt=empty)  # each (N, tokens, dim)
    cond_change, uncond_change, guidance_dir = [], [], []
    for t in PUSH_TIMESTEPS:
        steps = torch.full((len(prompts),), t, dtype=torch.long)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = method.noise_scheduler.add_noise(latents, noise, steps)
        eps_c = base.unet(noisy, steps, base_c, return_dict=False)[0]
        eps_u = base.unet(noisy, steps, base_u, return_dict=False)[0]
        new_c = method.noise_prediction(noisy, steps, [method.concept_prompt(p) for p in prompts])
        new_u = method.noise_prediction(noisy, steps, empty)
        cond_change.append((new_c - eps_c).flatten(1).norm(dim=1))
        uncond_change.append((new_u - eps_u).flatten(1).norm(dim=1))
        guidance_dir.append((eps_c - eps_u).flatten(1).norm(dim=1))
    cond, uncond, direction = (torch.cat(v).mean().item() for v in (cond_change, uncond_change, guidance_dir))
    return {"uncond_share": uncond / cond if cond > 0 else 0.0, "cond_strength": cond / direction}


def run(args: argparse.Namespace) -> None:
    from diffusers_infusion.baselines import train_method
    from diffusers_infusion.baselines.base import insert_identifier
    from diffusers_infusion.metrics import toy_concept_similarity, toy_text_alignment
    from diffusers_infusion.toy import CONCEPTS, load_toy_pipeline
    from diffusers_infusion.toy.concepts import CONCEPTS_DIR
    from diffusers_infusion.toy.looks import look_phrase
    from diffusers_infusion.training.data import load_instance_data

    unknown = [c for c in args.concepts if c not in CONCEPTS]
    if unknown:
        raise SystemExit(f"--concepts {' '.join(unknown)}: no such toy concept. Choose from {', '.join(CONCEPTS)}.")
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    overfitting._check_setting(out, {"scene_captions": args.scene_captions, "guidance": list(args.guidance),
                                     "inference_steps": args.inference_steps, "steps": args.steps})  # fmt: skip
    done = {(r["concept"], r["method"]) for r in overfitting._report.read_rows(results)}
    seed = overfitting.SCENE_SEED  # the benchmark's new-scene seeds, for the base model and every method

    def write(rows: list[dict]) -> None:
        with results.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def sampling(g: float) -> dict:
        return {"num_inference_steps": args.inference_steps, "guidance_scale": g}

    def measure(images, prompts) -> dict:
        return {"concept_similarity": float(np.mean(toy_concept_similarity(images, concept))),
                "text_alignment": toy_text_alignment(images, prompts)}  # fmt: skip

    for name in args.concepts:
        concept = CONCEPTS[name]
        todo = [m for m in args.methods if (name, m) not in done]
        if not todo and (name, "base") in done:
            continue
        base = load_toy_pipeline()
        prompts = [p for p in overfitting.scene_prompts(concept) for _ in range(args.scene_images)]
        base_scene = {}  # guidance -> the base model's images of prompts; the push noises those at 3
        if (name, "base") not in done:
            phrase = look_phrase(concept.class_word, concept.look)
            described = [insert_identifier(p, concept.class_word, phrase) for p in prompts]
            rows = []
            for g in args.guidance:
                base_scene[g] = overfitting.base_images(base, prompts, seed=seed, **sampling(g))
                told = overfitting.base_images(base, described, seed=seed, **sampling(g))
                for label, images in (("base", base_scene[g]), ("base_described", told)):
                    rows.append({"concept": name, "method": label, "guidance": g, **measure(images, prompts)})
            write(rows)
        if todo and 3.0 not in base_scene:
            base_scene[3.0] = overfitting.base_images(base, prompts, seed=seed, **sampling(3.0))
        data = load_instance_data(CONCEPTS_DIR / name, concept.class_word, resolution=64)
        if args.scene_captions:
            data = overfitting.scene_captioned(data, concept)
        for label in todo:
            method = overfitting.build_method(label, base, concept, seed=args.seed)  # as the benchmark builds it
            train_method(method, data, steps=args.steps, batch_size=4, seed=args.seed)
            rows = [{"concept": name, "method": label, "guidance": g, "step": args.steps,
                     **measure(method.generate(prompts, seed=seed, **sampling(g)), prompts)}
                    for g in args.guidance]  # fmt: skip
            rows.append({"concept": name, "method": label, "step": args.steps,
                         **push(method, base, prompts, base_scene[3.0])})  # fmt: skip
            write(rows)  # a (concept, method) is written whole or not at all
            logger.info("%s %s: %s", name, label, rows)


def report(args: argparse.Namespace) -> str:
    """``guidance_sweep.md`` and ``guidance_sweep.png`` from the rows of ``--output-dir`` and ``--merge``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for d in (args.output_dir, *args.merge) for r in overfitting._report.read_rows(d / "results.jsonl")]
    if not rows:
        raise SystemExit(f"{args.output_dir / 'results.jsonl'} has no results yet. Run without --report-only first.")
    sweep = [r for r in rows if "guidance" in r]
    methods = list(dict.fromkeys(r["method"] for r in sweep))
    scales = sorted({r["guidance"] for r in sweep})
    concepts = sorted({r["concept"] for r in sweep})

    def mean(method, key, g=None) -> float:
        vals = [r[key] for r in rows if r["method"] == method and key in r and (g is None or r.get("guidance") == g)]
        return float(np.mean(vals)) if vals else float("nan")

    lines = [f"Concepts: {', '.join(concepts)}; mean over concepts.", ""]
    for key in ("concept_similarity", "text_alignment"):
        head = "| method | " + " | ".join(f"{g:g}" for g in scales) + " |"
        lines += [f"### {key.replace('_', ' ')} by guidance scale", "", head, "|---|" + "--:|" * len(scales)]
        lines += [f"| {m} | " + " | ".join(f"{mean(m, key, g):.3f}" for g in scales) + " |" for m in methods]
        lines.append("")
    pushed = [m for m in methods if not np.isnan(mean(m, "cond_strength"))]
    lines += ["### The push (module docstring)", "", "| method | uncond share ‖Δε_u‖/‖Δε_c‖ | cond strength "
              "‖Δε_c‖/‖ε_c − ε_u‖ |", "|---|--:|--:|"]  # fmt: skip
    lines += [f"| {m} | {mean(m, 'uncond_share'):.3f} | {mean(m, 'cond_strength'):.3f} |" for m in pushed]
    text = "\n".join(lines) + "\n"
    args.output_dir.mkdir(parents=True, exist_ok=True)  # a report over --merge dirs may go to a new one
    (args.output_dir / "guidance_sweep.md").write_text(text)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("concept_similarity", "text_alignment")):
        for m in methods:
            style = (
                dict(color="black", lw=2.5) if m == "infusion" else dict(lw=1.2, ls="--" if "fidelity" in m else "-")
            )
            ax.plot(scales, [mean(m, key, g) for g in scales], marker="o", ms=3, label=m, **style)
        ax.set_xlabel("guidance scale")
        ax.set_title(f"{key.replace('_', ' ')}, mean over concepts")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(args.output_dir / "guidance_sweep.png", dpi=110)
    plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=["my_cat", "my_dog", "my_teddy", "my_cup"])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=overfitting.TRAINED)
    parser.add_argument("--steps", type=int, default=1000, help="training steps (one count)")
    parser.add_argument("--guidance", nargs="+", type=float, default=list(GUIDANCE))
    parser.add_argument("--scene-images", type=int, default=3, help="images per new-scene prompt")
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scene-captions", action="store_true", help="train on captions naming the photos' scene")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "out" / "guidance_sweep")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], help="more output dirs to report with this one")
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--scene-images", args.scene_images)):
        if value < 1:
            parser.error(f"{flag} {value}: must be a positive integer.")
    low = [g for g in args.guidance if g < 1]
    if low:
        parser.error(f"--guidance {' '.join(f'{g:g}' for g in low)}: scales below 1 pull the image away from the "
                     "prompt; pass scales of 1 or more.")  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.report_only:
        run(args)
    print(report(args))


if __name__ == "__main__":
    main()
