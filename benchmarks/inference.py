"""Inference cost of Infusion as ratios against StableDiffusionPipeline on the same components, in one run.

    python benchmarks/inference.py --model sd15 --batch 1 4 --steps 2     # SD 1.5's UNet shape, random weights
    python benchmarks/inference.py --model toy --batch 1 4 --steps 10     # the shipped toy model

Each method runs in a fresh process (so its peak memory is its own): ``plain`` (StableDiffusionPipeline),
``exact`` (one concept, the paper's method: 2.00x is the floor), ``sequential`` (the same, F then C in two
UNet calls per step: less memory), ``fast`` (one stream, own queries), ``variants``
(4 concept variants sharing one F stream; per image), ``naive`` (the map-storing reference, batch 1 only).
Times are medians of ``--repeats`` calls (``--output-type latent``: the denoising loop; ``pil``: with decoding).
Memory is the process's peak RSS during the timed calls, in total (weights included: what a user's machine must
hold) and as growth over the RSS before them (the activations); on CUDA, the peak of ``torch.cuda`` allocated
memory instead.

On a GPU (the performance issue's fp16 / ``torch.compile`` figures):

    python benchmarks/inference.py --model sd15 --device cuda --dtype float16 --batch 1 4 --steps 10 --compile

``--compile`` compiles the UNet (``torch.compile``, inductor unless a backend is named) in both pipelines; the
warm-up call compiles, and after the timed calls the worker swaps the concept (another one, another strength) and
reports in the ``recompiled`` column whether dynamo compiled anything new. ``sequential`` and ``naive`` are skipped
under ``--compile`` (sequential streams refuse a compiled UNet; the reference is not meant to be compiled).
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
NOT_COMPILED = ("sequential", "naive")  # skipped under --compile
N_VARIANTS = 4
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Memory:
    """Peak memory of the timed calls: process RSS on CPU, ``torch.cuda`` allocated memory on CUDA (MB)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start_mb = 0.0

    def sync(self) -> None:
        """Wait for queued CUDA work, so that a timer reads finished calls."""
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            reset_peak()
            self.start_mb = rss_mb("VmRSS")

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else rss_mb("VmHWM")


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def worker(args: argparse.Namespace) -> None:
    from diffusers import StableDiffusionPipeline

    from diffusers_infusion import InfusionConcept, InfusionPipeline
    from diffusers_infusion.reference import naive_infusion_latents
    from diffusers_infusion.tokens import find_class_word_positions

    torch.set_num_threads(args.threads)
    components, side = load_components(args.model)
    side = args.resolution or side
    cls = StableDiffusionPipeline if args.method == "plain" else InfusionPipeline
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pipe = cls(**components, requires_safety_checker=False).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet, backend=args.compile)
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

    use = {"concept": "c0", "strength": 1.0}  # what the calls apply; swapped after the timed calls

    def call():
        concepts = {use["concept"]: use["strength"]}
        if args.method == "plain":
            return pipe(batch, **kwargs)
        if args.method == "exact":
            return pipe(batch, infusion_concepts=concepts, **kwargs)
        if args.method == "sequential":
            return pipe(batch, infusion_concepts=concepts, infusion_streams="sequential", **kwargs)
        if args.method == "fast":
            return pipe(batch, infusion_concepts=concepts, infusion_mode="fast", **kwargs)
        if args.method == "variants":
            return pipe(batch, infusion_variants=[{f"c{i}": use["strength"]} for i in range(N_VARIANTS)], **kwargs)
        noise = torch.randn(
            1, pipe.unet.config.in_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor,
            device=device, dtype=dtype,
        )  # fmt: skip
        residuals = pipe.infusion_concepts["c0"].residuals
        # latents only: compare it with --output-type latent
        return naive_infusion_latents(pipe, prompt, [(residuals, 1.0, positions)], latents=noise,
                                      num_inference_steps=args.steps, guidance_scale=7.5)  # fmt: skip

    memory = Memory(device)
    with torch.no_grad():
        call()  # warm-up (and compilation)
        memory.start()
        times = []
        for _ in range(args.repeats):
            memory.sync()
            start = time.perf_counter()
            call()
            memory.sync()
            times.append(time.perf_counter() - start)
        peak = memory.peak()
        recompiled = None
        if args.compile and args.method != "plain":  # another concept, another strength: tensors only
            graphs = compiled_graphs()
            use.update(concept="c1", strength=0.5)
            call()
            recompiled = compiled_graphs() != graphs
    per_image = N_VARIANTS if args.method == "variants" else 1
    print(json.dumps({"seconds": statistics.median(times) / per_image, "peak_mb": peak - memory.start_mb,
                      "total_mb": peak, "recompiled": recompiled}))  # fmt: skip


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
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument(
        "--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
        help="torch.compile the UNet (inductor unless a backend is named, e.g. aot_eager)",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.batch = args.batch[0]
        return worker(args)
    check_device(args)
    methods = [m for m in args.methods if not (args.compile and m in NOT_COMPILED)]
    print(f"model={args.model} resolution={args.resolution} steps={args.steps} repeats={args.repeats} "
          f"threads={args.threads} output_type={args.output_type} device={args.device} dtype={args.dtype} "
          f"compile={args.compile} skipped={sorted(set(args.methods) - set(methods))}")  # fmt: skip
    memory = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS"
    extra = " recompiled on concept swap |" if args.compile else ""
    print(f"| batch | method | s per call (per variant) | ratio to plain | {memory} growth (MB) | ratio to plain "
          f"| {memory} total (MB) | ratio to plain |{extra}")  # fmt: skip
    print("| --- " * (9 if args.compile else 8) + "|")
    for batch in args.batch:
        results = {}
        for method in methods:
            if method == "naive" and batch != 1:
                continue
            argv = ["--worker", "--method", method, "--model", args.model, "--batch", str(batch), "--steps",
                    str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads),
                    "--output-type", args.output_type, "--device", args.device, "--dtype", args.dtype]  # fmt: skip
            argv += ["--resolution", str(args.resolution)] if args.resolution else []
            argv += ["--compile", args.compile] if args.compile else []
            results[method] = run_worker(Path(__file__), argv)
            r, p = results[method], results.get("plain", results[method])
            swap = f" {r['recompiled'] if r['recompiled'] is not None else '-'} |" if args.compile else ""
            print(f"| {batch} | {method} | {r['seconds']:.3f} | {r['seconds'] / p['seconds']:.2f}x | "
                  f"{r['peak_mb']:.0f} | {r['peak_mb'] / max(p['peak_mb'], 1e-9):.2f}x | "
                  f"{r['total_mb']:.0f} | {r['total_mb'] / p['total_mb']:.2f}x |{swap}", flush=True)  # fmt: skip


def check_device(args: argparse.Namespace) -> None:
    """Refuse a device or dtype this machine cannot run, before any worker starts."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here. Run on a GPU machine, or drop --device.")
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        raise SystemExit(f"--dtype float16 on --device {args.device}: CPU kernels are fp32/bf16. "
                         "Use --device cuda, or --dtype bfloat16 / float32.")  # fmt: skip


if __name__ == "__main__":
    main()
