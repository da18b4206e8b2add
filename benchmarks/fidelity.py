"""Cost of the fidelity knob as ratios against the exact method (no knob) in the same run; its storage.

    python benchmarks/fidelity.py --model toy --batch 1 --steps 10     # the shipped toy model, CPU
    python benchmarks/fidelity.py --model tiny                         # the tests' tiny components (seconds)
    python benchmarks/fidelity.py --storage-only                       # SD 1.5 and SDXL storage from layer shapes

Settings, each in a fresh process: ``exact`` (one concept, the paper's method), ``knob-r4`` (the same concept with
a rank-4 knob on every cross-attention layer), ``knob-r4-finest`` (rank 4 on the finest layers only, timestep gate
t < 400, norm bound 0.5: the knob computes at every step, the gate only zeroes it), ``knob-r16`` (rank 16, every
layer). Inference: seconds per denoising step (one exact-mode call over ``--steps`` steps, ``output_type="latent"``,
median of ``--repeats`` calls after a warm-up call). Training: one step of ``infusion_training_loss`` (F without
gradient, C with it) + backward + AdamW, median of ``--repeats`` steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _models import load_components, run_worker

SETTINGS = {
    "exact": None,
    "knob-r4": dict(rank=4),
    "knob-r4-finest": dict(rank=4, layers="finest", max_timestep=400, norm_bound=0.5),
    "knob-r16": dict(rank=16),
}


def worker(args: argparse.Namespace) -> None:
    from diffusers import DDPMScheduler

    from diffusers_infusion import InfusionConcept, InfusionPipeline
    from diffusers_infusion.attention import layer_sizes
    from diffusers_infusion.fidelity import ConceptFidelity, FidelityConfig
    from diffusers_infusion.training import InfusionResiduals, infusion_training_loss

    torch.set_num_threads(args.threads)
    components, side = load_components(args.model)
    side = args.resolution or side
    options = SETTINGS[args.setting]
    config = None if options is None else FidelityConfig(**options)
    gen = torch.Generator().manual_seed(0)
    pipe = InfusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    concept = InfusionConcept.zeros(pipe.unet, "cat")
    concept.residuals = {k: torch.randn(v.shape, generator=gen) for k, v in concept.residuals.items()}
    if config is not None:
        knob = ConceptFidelity.init(layer_sizes(pipe.unet), config, generator=gen)
        knob.up = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in knob.up.items()}
        concept.fidelity = knob
    pipe.load_infusion_concept(concept, "c")
    batch = ["a photo of a cat on the beach"] * args.batch
    kwargs = dict(num_inference_steps=args.steps, output_type="latent", height=side, width=side)
    times = []
    with torch.no_grad():
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            pipe(batch, generator=torch.Generator().manual_seed(0), **kwargs)
            if i:
                times.append((time.perf_counter() - start) / args.steps)
    inference = statistics.median(times)

    unet = pipe.unet.requires_grad_(False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        text, _ = pipe.encode_prompt(["a photo of a cat"] * args.batch, "cpu", 1, False)
    latent = side // pipe.vae_scale_factor
    z0 = torch.randn(args.batch, unet.config.in_channels, latent, latent, generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(1000, (args.batch,), generator=gen)
    model = InfusionResiduals.for_unet(unet, fidelity=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    times = []
    for step in range(args.repeats + 1):
        start = time.perf_counter()
        infusion_training_loss(unet, scheduler, model(), z0, text, [[5]] * args.batch, noise=noise, timesteps=t,
                               fidelity=config).backward()  # fmt: skip
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters())
    print(json.dumps({"inference": inference, "training": statistics.median(times), "values": trainable}))


def storage_table() -> None:
    """Numbers stored per concept for SD 1.5 and SDXL: Δ, and the knob's r × (value_dim + query_dim) per layer."""
    from diffusers_infusion.attention import layer_sizes
    from diffusers_infusion.configs import SD15_UNET, SDXL_UNET, build_unet
    from diffusers_infusion.fidelity import FidelityConfig

    print("| model | layers | Δ values | knob layers | knob values per rank | r = 4 (fp16 bytes) | r = 16 (bytes) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, config in (("SD 1.5", SD15_UNET), ("SDXL", SDXL_UNET)):
        sizes = layer_sizes(build_unet(config))  # on meta: shapes only
        deltas = sum(v for v, _ in sizes.values())
        for layers in (None, "finest"):
            chosen = FidelityConfig(rank=1, layers=layers).select_layers(sizes)
            per_rank = sum(sum(sizes[name]) for name in chosen)
            label = f"{len(chosen)} ({'all' if layers is None else layers})"
            print(f"| {model} | {len(sizes)} | {deltas:,} | {label} | {per_rank:,} | {4 * per_rank:,} "
                  f"({8 * per_rank:,}) | {16 * per_rank:,} ({32 * per_rank:,}) |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", choices=["sd15", "toy", "tiny"])
    parser.add_argument("--resolution", type=int, default=None, help="Image side (default: the model's).")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--storage-only", action="store_true", help="Only print the SD 1.5 / SDXL storage table.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    storage_table()
    if args.storage_only:
        return
    print(f"\nmodel={args.model} resolution={args.resolution} batch={args.batch} steps={args.steps} "
          f"repeats={args.repeats} threads={args.threads}")  # fmt: skip
    print("| setting | trained values | s / denoising step | ratio to exact | s / training step | ratio to exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = None
    for setting in args.settings:
        argv = ["--worker", "--setting", setting, "--model", args.model, "--batch", str(args.batch), "--steps",
                str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
        argv += ["--resolution", str(args.resolution)] if args.resolution else []
        r = run_worker(Path(__file__), argv)
        base = base or (r if setting == "exact" else None)
        ratio = {k: f"{r[k] / base[k]:.3f}x" if base else "n/a" for k in ("inference", "training")}
        print(f"| {setting} | {r['values']:,} | {r['inference']:.4f} | {ratio['inference']} | "
              f"{r['training']:.4f} | {ratio['training']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
