"""Train the toy Stable Diffusion of the toy world from scratch, on CPU, from a fixed seed.

Stages (each resumable from atomically written checkpoints in ``--work-dir``):

1. render the training set: ``--num-images`` scenes of the toy world, none of them showing a held-out
   (class, color, background) combination (see ``diffusers_infusion.toy.world.is_held_out``);
2. train the ``AutoencoderKL`` (64x64x3 <-> 8x16x16) on those images;
3. encode every image once and cache the latents (scaled to unit variance);
4. train the ``UNet2DConditionModel`` and the ``CLIPTextModel`` jointly on the cached latents, with randomly
   drawn captions (attributes sometimes omitted) and 10% empty captions for classifier-free guidance;
   an exponential moving average of both is what gets saved.

The result is a ``StableDiffusionPipeline`` folder (safety checker None, DDIM scheduler with zero terminal SNR and
v-prediction). The shipped model (toy world 2: objects in looks, ``--world 2``, the default) was made by this one
command, seed 0:

    python examples/toy_world/train_toy_model.py

Rendering 30,000 scenes, the VAE (1,500 steps) and the latents take 14 min; the UNet's 8,000 steps run at about
2.3 steps/s on two threads alone (58 min; 1.75 steps/s on one thread, 76 min, the shipped run, which shared the
machine). Two choices of the UNet stage make the looks learnable in that budget (``--object-weight 4``: the
denoising loss weighs latent cells on an object 1 + 4 times; ``--look-oversample 3``: scenes with a look are drawn
three times as often); at 3,000 steps they took the pattern accuracy on held-out looks from 1.7% to 14.2%.
``--world 1`` trains the first world's model (one-color objects, 7,000 steps).

Run the command again with the same arguments to resume after an interruption.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusers_infusion.toy.model import build_toy_components  # noqa: E402
from diffusers_infusion.toy.world import (  # noqa: E402
    LOOK_VOCABULARY,
    UNNAMED_LOOK_PREFIX,
    caption,
    is_held_out,
    object_pixels,
    render,
    sample_scene,
)

logger = logging.getLogger("train_toy_model")


def save_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def excluded(obj, background: str) -> bool:
    return is_held_out(obj.cls, obj.color, background)


#: Toy world 2's recipe (``--world 2``); the first world's is the parser's defaults.
WORLD2_DEFAULTS = dict(
    look_prob=0.5,
    text_layers=1,
    num_images=30000,
    vae_steps=1500,
    steps=8000,
    object_weight=4.0,
    look_oversample=3.0,
    work_dir=Path("out/toy_world2_train"),
)
N_LOOKS = 512  # plain off-palette looks ``rgb-<k>`` (UNNAMED_LOOK_PREFIX) for --random-colors


def register_random_looks(seed: int) -> None:
    """Register ``N_LOOKS`` plain object colors drawn uniformly from RGB, never near a personal concept's colors.

    An object with such a look is captioned without a color ("a cat on grass"), so the model learns that an
    unnamed color can be any color, and the VAE learns to reproduce colors outside the world's eight.
    """
    from diffusers_infusion.toy.concepts import CONCEPTS
    from diffusers_infusion.toy.world import PATTERNS

    avoid = np.array([c for concept in CONCEPTS.values() for c in concept.colors], dtype=float)  # (K, 3)
    rng = np.random.default_rng(seed + 7919)
    k = 0
    while k < N_LOOKS:
        color = rng.integers(0, 256, 3)
        if np.linalg.norm(avoid - color, axis=1).min() < 48:
            continue
        fill = tuple(int(v) for v in color)
        PATTERNS[f"{UNNAMED_LOOK_PREFIX}{k}"] = lambda img, cx, cy, s, fill=fill: img.paste(fill, (0, 0, *img.size))
        k += 1


def with_random_looks(scene, share: float, seed: int):
    """With probability ``share`` (seeded per scene), every object of ``scene`` takes a random off-palette look."""
    rng = random.Random(f"{seed}-look")
    if rng.random() >= share:
        return scene
    objects = tuple(replace(o, pattern=f"{UNNAMED_LOOK_PREFIX}{rng.randrange(N_LOOKS)}") for o in scene.objects)
    return replace(scene, objects=objects)


def render_dataset(n: int, seed: int, path: Path, *, random_colors: float = 0.0, look_prob: float = 0.0) -> dict:
    """Render ``n`` training scenes (held-out combinations and looks excluded) and cache them at ``path``."""
    if path.exists():
        return torch.load(path, weights_only=False)
    scenes, images = [], []
    for i in tqdm(range(n), desc="render", mininterval=5):
        scene = sample_scene(seed * 1_000_003 + i, exclude=excluded, look_prob=look_prob)
        if random_colors > 0:
            scene = with_random_looks(scene, random_colors, seed * 1_000_003 + i)
        scenes.append(scene)
        images.append(np.asarray(render(scene), dtype=np.uint8))
    data = {"scenes": scenes, "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()}
    save_atomic(data, path)  # images: (N, 3, 64, 64) uint8
    return data


def object_masks(scenes: list, path: Path) -> torch.Tensor:
    """Where each training image shows an object (it differs from its background alone): (N, 1, 64, 64) bool."""
    if path.exists():
        return torch.load(path)
    masks = [object_pixels(scene) for scene in tqdm(scenes, desc="masks", mininterval=5)]
    out = torch.from_numpy(np.stack(masks))[:, None]
    save_atomic(out, path)
    return out


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(accelerator: Accelerator, vae, images: torch.Tensor, masks: torch.Tensor, args, ckpt: Path):
    """Stage 2: reconstruction (L1 + MSE, object pixels weighted ``--vae-object-weight``) with a small KL term."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        logger.info("resuming VAE at step %d", start)
    vae.train()
    vae, opt = accelerator.prepare(vae, opt)
    bar = tqdm(range(start, args.vae_steps), desc="vae", initial=start, total=args.vae_steps, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
        gen = torch.Generator().manual_seed(args.seed * 7919 + step)
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=gen)
        x = images[idx].float().div(127.5).sub(1.0).to(accelerator.device)  # (B, 3, 64, 64) in [-1, 1]
        weight = 1.0 + args.vae_object_weight * masks[idx].float().to(x.device)  # (B, 1, 64, 64)
        posterior = accelerator.unwrap_model(vae).encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(x.device)
        recon = accelerator.unwrap_model(vae).decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        err = (recon - x).abs()
        loss = (weight * (err + err.square())).mean() / weight.mean() + args.vae_kl * kl
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.vae_steps:
            model = accelerator.unwrap_model(vae)
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    vae = accelerator.unwrap_model(vae)
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, path: Path, batch: int = 256) -> torch.Tensor:
    """Stage 3: posterior means of every image, (N, 8, 16, 16), unscaled."""
    if path.exists():
        return torch.load(path)
    out = []
    for i in tqdm(range(0, len(images), batch), desc="encode", mininterval=5):
        x = images[i : i + batch].float().div(127.5).sub(1.0)
        out.append(vae.encode(x).latent_dist.mean)
    latents = torch.cat(out)
    save_atomic(latents, path)
    return latents


class MapRecorder:
    """Cross-attention processor of toy training: the softmax maps are computed explicitly and kept for the loss."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape  # (B, N, C): attn2 of a BasicTransformerBlock, no mask, no residual
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*h, N, d)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*h, T, d)
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (B*h, N, T)
        self.store.append(probs.view(b, attn.heads, n, -1).mean(1))  # (B, N, T), head mean
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))


def localization_loss(maps: list[torch.Tensor], masks: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """-log of the share of each object word's cross-attention that falls on its object, mean over layers and words.

    Args:
        maps: Per cross-attention layer, (B, N, T) head-averaged softmax maps, N = s*s.
        masks: (B, 1, 64, 64) object masks.
        words: (B, T) 1.0 on the tokens that name the object (class and color word), else 0.
    """
    losses = []
    for m in maps:
        side = int(math.isqrt(m.shape[1]))
        inside = F.adaptive_avg_pool2d(masks.float(), side).flatten(1)  # (B, N) share of object pixels per cell
        share = torch.einsum("bnt,bn->bt", m, inside) / m.sum(1).clamp_min(1e-8)  # (B, T)
        losses.append(-(words * share.clamp_min(1e-6).log()).sum() / words.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def object_words(scenes: list, texts: list[str], ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, T) mask of the tokens naming the one object of single-object scenes (two-object scenes: none).

    The object's words are its class, its colors and the words of its look (pattern and mark words).
    """
    words = torch.zeros(ids.shape)
    for b, (scene, text) in enumerate(zip(scenes, texts)):
        if len(scene.objects) != 1 or not text:
            continue
        obj = scene.objects[0]
        named = {obj.cls, obj.color}
        if obj.look is not None:
            named |= {obj.look.a, obj.look.b, *LOOK_VOCABULARY} | ({obj.look.mark_color} if obj.look.mark else set())
        for word in named:
            words[b] += (ids[b] == tokenizer.convert_tokens_to_ids(word + "</w>")).float()
    return words.clamp(max=1.0)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)


def train_unet(
    accelerator: Accelerator, comps: dict, latents: torch.Tensor, scenes: list, masks: torch.Tensor, args, ckpt: Path
):
    """Stage 4: denoising loss on cached latents, UNet and text encoder together; returns the EMA copies.

    With ``--localize`` > 0, a second term pulls each object word's cross-attention onto its object (the object
    masks of single-object scenes), so that, as in Stable Diffusion, a word's attention map shows where its
    thing is: the property prompt-to-prompt editing and Infusion's value residuals rely on.
    """
    unet, text_encoder = comps["unet"], comps["text_encoder"]
    maps: list[torch.Tensor] = []
    if args.localize > 0:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(
            {name: MapRecorder(maps) if ".attn2." in name else AttnProcessor2_0() for name in unet.attn_processors}
        )
    tokenizer, scheduler = comps["tokenizer"], comps["scheduler"]
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        logger.info("resuming UNet at step %d", start)
    unet.train()
    text_encoder.train()
    unet, text_encoder, opt = accelerator.prepare(unet, text_encoder, opt)
    alphas = scheduler.alphas_cumprod.to(accelerator.device)  # (1000,)
    # Where the objects are, at the latent's resolution: (N, 1, 16, 16), the share of object pixels per latent cell.
    latent_masks = F.adaptive_avg_pool2d(masks.float(), latents.shape[-1]) if args.object_weight > 0 else None
    # Drawing weights of the training images: scenes with a look come ``--look-oversample`` times as often.
    draw = torch.tensor([args.look_oversample if any(o.look for o in s.objects) else 1.0 for s in scenes])
    bar = tqdm(range(start, args.steps), desc="unet", initial=start, total=args.steps, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        gen = torch.Generator().manual_seed(args.seed * 104729 + step)
        rng = random.Random(f"{args.seed}-captions-{step}")
        if args.look_oversample == 1.0:
            idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        else:
            idx = torch.multinomial(draw, args.batch, replacement=True, generator=gen)
        texts = ["" if rng.random() < 0.1 else caption(scenes[i], rng=rng) for i in idx.tolist()]
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(accelerator.device)  # (B, T)
        z0 = latents[idx].to(accelerator.device)  # (B, 8, 16, 16)
        noise = torch.randn(z0.shape, generator=gen).to(z0.device)
        if args.noise_offset:  # per-sample, per-channel constant: the noise's mean must not decide the picture
            noise = noise + args.noise_offset * torch.randn(z0.shape[:2], generator=gen).to(z0.device)[..., None, None]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen).to(z0.device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids)[0]  # (B, T, 64)
        maps.clear()
        pred = unet(zt, t, hidden).sample  # (B, 8, 16, 16)
        if scheduler.config.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * z0
        else:
            target = noise
        if args.object_weight > 0:  # object cells weigh 1 + w: the looks live there, the textures elsewhere
            weight = 1.0 + args.object_weight * latent_masks[idx].to(z0.device)  # (B, 1, 16, 16)
            loss = denoise = (weight * (pred - target).square()).mean() / weight.mean()
        else:
            loss = denoise = F.mse_loss(pred, target)
        if args.localize > 0:
            words = object_words([scenes[i] for i in idx.tolist()], texts, ids.cpu(), tokenizer).to(z0.device)
            loss = loss + args.localize * localization_loss(maps, masks[idx].to(z0.device), words)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, accelerator.unwrap_model(unet), decay)
        ema_update(ema_text, accelerator.unwrap_model(text_encoder), decay)
        bar.set_postfix(loss=f"{denoise.item():.4f}", loc=f"{(loss - denoise).item() / max(args.localize, 1e-8):.3f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            state = {
                "unet": accelerator.unwrap_model(unet).state_dict(),
                "text": accelerator.unwrap_model(text_encoder).state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "opt": opt.state_dict(),
                "step": step + 1,
            }
            save_atomic(state, ckpt)
    return ema_unet.eval(), ema_text.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("examples/toy_world/model"))
    parser.add_argument("--work-dir", type=Path, default=Path("out/toy_world_train"), help="checkpoints and caches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-object-weight", type=float, default=4.0)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=7000, help="UNet training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--noise-offset", type=float, default=0.0, help="std of a per-channel constant added to noise")
    parser.add_argument("--localize", type=float, default=0.01, help="weight of the attention localization term")
    parser.add_argument("--text-layers", type=int, default=0, help="transformer layers of the text encoder")
    parser.add_argument("--look-prob", type=float, default=0.0, help="share of objects wearing a look (toy world 2)")
    parser.add_argument(
        "--object-weight", type=float, default=0.0, help="extra weight of the denoising loss on object latent cells"
    )
    parser.add_argument(
        "--look-oversample", type=float, default=1.0, help="how much more often scenes with a look are drawn"
    )
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--random-colors", type=float, default=0.0,
        help="share of training scenes whose objects get a random off-palette color (captioned without a color)",
    )  # fmt: skip
    parser.add_argument(
        "--world", type=int, choices=(1, 2), default=2,
        help="1: the first world's recipe (one-color objects; the parser's other defaults); 2 (default, the shipped "
        "model): toy world 2's recipe (looks on half the objects, a one-layer text encoder, UNet 48/64/128 with 4 "
        "heads, 30,000 images, VAE 1,500 steps, UNet 8,000 steps with object cells weighted 1 + 4 and scenes with a "
        "look drawn 3x as often); explicit options still win",
    )  # fmt: skip
    if parser.parse_known_args(argv)[0].world == 2:
        parser.set_defaults(**WORLD2_DEFAULTS)
    args = parser.parse_args(argv)
    if args.look_prob > 0 and args.world != 2:
        parser.error(f"--look-prob {args.look_prob} needs --world 2 (its tokenizer knows the words of looks)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    accelerator = Accelerator()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    comps = build_toy_components(args.seed, text_layers=args.text_layers, looks=args.world == 2)
    if args.random_colors > 0:
        register_random_looks(args.seed)  # before rendering or re-rendering (masks) any scene that uses them
    looks = {"random_colors": args.random_colors, "look_prob": args.look_prob}
    data = render_dataset(args.num_images, args.seed, args.work_dir / "data.pt", **looks)
    masks = object_masks(data["scenes"], args.work_dir / "masks.pt")
    vae = train_vae(accelerator, comps["vae"], data["images"], masks, args, args.work_dir / "vae.ckpt")
    vae.save_pretrained(args.work_dir / "vae")  # usable at once, e.g. by train_reader.py while the UNet trains
    latents = encode_latents(vae, data["images"], args.work_dir / "latents.pt")
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    logger.info("VAE done after %.1f min; latent scaling factor %.4f", (time.time() - t0) / 60, scale)
    unet, text_encoder = train_unet(
        accelerator, comps, latents * scale, data["scenes"], masks, args, args.work_dir / "unet.ckpt"
    )
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())

    from diffusers import StableDiffusionPipeline

    comps.update(unet=unet, text_encoder=text_encoder, vae=vae)
    pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
    pipe.save_pretrained(args.output)
    minutes = (time.time() - t0) / 60
    size = sum(f.stat().st_size for f in args.output.rglob("*") if f.is_file()) / 1e6
    print(f"saved {args.output} ({size:.1f} MB) after {minutes:.1f} min (this run only)")


if __name__ == "__main__":
    main()
