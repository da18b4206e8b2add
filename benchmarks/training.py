"""Training-step cost of Infusion against a DreamBooth-LoRA step (peft, rank 4) on the same UNet, in one run.

    python benchmarks/training.py --model sd15 --resolution 256 --batch 1     # SD 1.5's UNet shape, random weights
    python benchmarks/training.py --model toy --batch 4                       # the shipped toy model

Methods, each in a fresh process: ``lora`` (rank-4 LoRA on to_q/to_k/to_v/to_out.0, diffusers' DreamBooth-LoRA
targets), ``infusion`` (the default step: F without gradient, recording its queries, then C with gradient: 1.33x
is the floor), ``infusion-batched`` (F and C in one call with gradient), ``infusion-own`` (the own-query ablation:
one stream). A step is forward + backward + AdamW; the time is the median over ``--repeats`` steps after one
warm-up step. ``--gradient_checkpointing`` turns it on for every method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _models import load_components, run_worker

METHODS = ("lora", "infusion", "infusion-batched", "infusion-own")


def worker(args: argparse.Namespace) -> None:
    from diffusers import DDPMScheduler

    from diffusers_infusion.training import InfusionResiduals, infusion_training_loss

    torch.set_num_threads(args.threads)
    components, side = load_components(args.model)
    side = args.resolution or side
    unet = components["unet"]
    unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    ids = tokenizer(["a photo of a cat"] * args.batch, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        text = text_encoder(ids)[0]
    latent = side // (2 ** (len(components["vae"].config.block_out_channels) - 1))
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(args.batch, 4, latent, latent, generator=g)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(1000, (args.batch,), generator=g)
    if args.method == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
        params = [p for p in unet.parameters() if p.requires_grad]

        def loss_fn():
            pred = unet(scheduler.add_noise(z0, noise, t), t, text).sample
            return torch.nn.functional.mse_loss(pred, noise)
    else:
        model = InfusionResiduals.for_unet(unet)
        params = list(model.parameters())

        def loss_fn():
            return infusion_training_loss(
                unet, scheduler, model(), z0, text, [[5]] * args.batch, noise=noise, timesteps=t,
                replace_queries=args.method != "infusion-own", batched=args.method == "infusion-batched",
            )  # fmt: skip

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for step in range(args.repeats + 1):
        start = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "trainable": sum(p.numel() for p in params)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=["sd15", "toy", "tiny"])
    parser.add_argument("--resolution", type=int, default=None, help="Image side (default: the model's).")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"model={args.model} resolution={args.resolution} batch={args.batch} repeats={args.repeats} "
          f"threads={args.threads} gradient_checkpointing={args.gradient_checkpointing}")  # fmt: skip
    print("| method | trainable values | s / step | steps / s | ratio to LoRA |")
    print("| --- | --- | --- | --- | --- |")
    lora = None
    for method in args.methods:
        argv = ["--worker", "--method", method, "--model", args.model, "--batch", str(args.batch), "--repeats",
                str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
        argv += ["--resolution", str(args.resolution)] if args.resolution else []
        argv += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
        r = run_worker(Path(__file__), argv)
        lora = lora or (r if method == "lora" else None)
        ratio = f"{r['seconds'] / lora['seconds']:.2f}x" if lora else "n/a"
        print(f"| {method} | {r['trainable']:,} | {r['seconds']:.3f} | {1 / r['seconds']:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
