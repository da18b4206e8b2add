"""Inference cost of Infusion as ratios against StableDiffusionPipeline on the same components, in one run.

    python benchmarks/inference.py --model sd15 --batch 1 4 --steps 2     # SD 1.5's UNet shape, random weights
    python benchmarks/inference.py --model toy --batch 1 4 --steps 10     # the shipped toy model

Each method runs in a fresh process (so its peak memory is its own): ``plain`` (StableDiffusionPipeline),
``exact`` (one concept, the paper's method: 2.00x is the floor), ``sequential`` (the same, F then C in two
UNet calls per step: less memory), ``fast`` (one stream, own queries), ``variants``
(4 concept variants sharing one F stream; per image), ``naive`` (the map-storing reference, batch 1 only).
Times are medians of ``--repeats`` calls (``--output-type latent``: the denoising loop; ``pil``: with decoding).
Memory is the process's peak RSS during the timed calls, in total (weights included: what a user's machine must
hold) and as growth over the RSS before them (the activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _models import load_components, run_worker

METHODS = ("plain", "exact", "sequential", "fast", "variants", "naive")
N_VARIANTS = 4


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    from diffusers import StableDiffusionPipeline

    from diffusers_infusion import InfusionConcept, InfusionPipeline
    from diffusers_infusion.reference import naive_infusion_latents
    from diffusers_infusion.tokens import find_class_word_positions

    torch.set_num_threads(args.threads)
    components, side = load_components(args.model)
    side = args.resolution or side
    cls = StableDiffusionPipeline if args.method == "plain" else InfusionPipeline
    pipe = cls(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a cat on the beach"
    if args.method != "plain":
        for i in range(N_VARIANTS):
            concept = InfusionConcept.zeros(pipe.unet, "cat")
            gen = torch.Generator().manual_seed(i)
            concept.residuals = {k: torch.randn(v.shape, generator=gen) for k, v in concept.residuals.items()}
            pipe.load_infusion_concept(concept, f"c{i}")
    kwargs = dict(num_inference_steps=args.steps, output_type=args.output_type, height=side, width=side)
    batch = [prompt] * args.batch
    positions = find_class_word_positions(pipe.tokenizer, prompt, "cat")

    def call():
        if args.method == "plain":
            return pipe(batch, **kwargs)
        if args.method == "exact":
            return pipe(batch, infusion_concepts={"c0": 1.0}, **kwargs)
        if args.method == "sequential":
            return pipe(batch, infusion_concepts={"c0": 1.0}, infusion_streams="sequential", **kwargs)
        if args.method == "fast":
            return pipe(batch, infusion_concepts={"c0": 1.0}, infusion_mode="fast", **kwargs)
        if args.method == "variants":
            return pipe(batch, infusion_variants=[{f"c{i}": 1.0} for i in range(N_VARIANTS)], **kwargs)
        noise = torch.randn(
            1, pipe.unet.config.in_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor
        )
        residuals = pipe.infusion_concepts["c0"].residuals
        # latents only: compare it with --output-type latent
        return naive_infusion_latents(pipe, prompt, [(residuals, 1.0, positions)], latents=noise,
                                      num_inference_steps=args.steps, guidance_scale=7.5)  # fmt: skip

    with torch.no_grad():
        call()  # warm-up
        reset_peak()
        start_rss = rss_mb("VmRSS")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    per_image = N_VARIANTS if args.method == "variants" else 1
    peak = rss_mb("VmHWM")
    print(json.dumps({"seconds": statistics.median(times) / per_image, "peak_mb": peak - start_rss, "total_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=["sd15", "toy", "tiny"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--resolution", type=int, default=None, help="Image side (default: the model's, 512 for sd15)."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--output-type", default="latent", choices=["latent", "pil"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.batch = args.batch[0]
        return worker(args)
    print(f"model={args.model} resolution={args.resolution} steps={args.steps} repeats={args.repeats} "
          f"threads={args.threads} output_type={args.output_type}")  # fmt: skip
    print("| batch | method | s per call (per variant) | ratio to plain | peak RSS growth (MB) | ratio to plain "
          "| peak RSS total (MB) | ratio to plain |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch:
        results = {}
        for method in args.methods:
            if method == "naive" and batch != 1:
                continue
            argv = ["--worker", "--method", method, "--model", args.model, "--batch", str(batch), "--steps",
                    str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
            argv += ["--resolution", str(args.resolution)] if args.resolution else []
            argv += ["--output-type", args.output_type]
            results[method] = run_worker(Path(__file__), argv)
            r, p = results[method], results.get("plain", results[method])
            print(f"| {batch} | {method} | {r['seconds']:.3f} | {r['seconds'] / p['seconds']:.2f}x | "
                  f"{r['peak_mb']:.0f} | {r['peak_mb'] / max(p['peak_mb'], 1e-9):.2f}x | "
                  f"{r['total_mb']:.0f} | {r['total_mb'] / p['total_mb']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
