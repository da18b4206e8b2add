"""Pipelines to benchmark on: Stable Diffusion 1.5's UNet shape with random weights, or the toy model."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "examples" / "toy_world" / "model"


def sd15_components(seed: int = 0) -> dict:
    """SD 1.5's UNet config (860M parameters, random weights), a small VAE and a 1-layer 768-wide text encoder.

    Only the UNet matters for the ratios (benchmarks time the denoising loop, ``output_type="latent"``).
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_infusion.configs import SD15_UNET, build_unet
    from diffusers_infusion.tiny import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = build_unet(SD15_UNET, device="cpu").eval()
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=1024,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )  # fmt: skip
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
    ).eval()  # fmt: skip
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, image_encoder=None)  # fmt: skip


def load_components(model: str, seed: int = 0) -> tuple[dict, int]:
    """Components and the image side for ``model``: 'sd15' (random weights), 'toy' (shipped), or 'tiny'."""
    if model == "sd15":
        return sd15_components(seed), 512
    if model == "toy":
        from diffusers import StableDiffusionPipeline

        if not TOY_MODEL.exists():
            raise SystemExit(f"--model toy: no toy model at {TOY_MODEL}. Train it first (examples/toy_world/).")
        pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL, torch_dtype=torch.float32)
        return dict(pipe.components), pipe.unet.config.sample_size * pipe.vae_scale_factor
    from diffusers_infusion.tiny import tiny_sd_components

    return tiny_sd_components(seed), 16


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: Path, argv: list[str]) -> dict:
    """Run ``script --worker ...`` in a fresh process (so peak memory is its own) and parse its JSON line."""
    out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
