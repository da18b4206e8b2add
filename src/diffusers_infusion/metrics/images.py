"""Images in, pixels or latents out: the input conventions of every metric, and the latents the metrics compare.

Every metric takes images in one of three forms:

- a list of PIL images (all the same size where pixels are needed),
- a numpy array (N, H, W, 3) in [0, 1] (what a diffusers pipeline returns with ``output_type="np"``), or uint8,
- a torch tensor (N, 3, H, W) in [-1, 1] (the VAE's range, as in training batches).

Latents are ``E(x)·scale``: the VAE posterior's mean times ``vae.config.scaling_factor`` (minus ``shift_factor``
where the VAE has one), the same latents the models are trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

ImageBatch = Sequence[PIL.Image.Image] | np.ndarray | torch.Tensor


def _check_batch(images, *, argument: str) -> None:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim != 4:
            raise ValueError(
                f"{argument} has shape {tuple(images.shape)}. Pass a batch: a tensor (N, 3, H, W) in [-1, 1], "
                "an array (N, H, W, 3) in [0, 1], or a list of PIL images."
            )
        return
    if isinstance(images, PIL.Image.Image) or not isinstance(images, Sequence):
        raise TypeError(
            f"{argument} is a {type(images).__name__}. Pass a list of PIL images, an array (N, H, W, 3) in [0, 1] "
            "or a tensor (N, 3, H, W) in [-1, 1]."
        )
    bad = [i for i, im in enumerate(images) if not isinstance(im, PIL.Image.Image)]
    if bad:
        raise TypeError(f"{argument}[{bad[0]}] is a {type(images[bad[0]]).__name__}, not a PIL image.")


def to_pixels(images: ImageBatch, *, argument: str = "images") -> torch.Tensor:
    """Images as a float32 tensor (N, 3, H, W) in [-1, 1] (the VAE's input)."""
    _check_batch(images, argument=argument)
    if isinstance(images, torch.Tensor):
        if images.shape[1] != 3:
            raise ValueError(f"{argument} has shape {tuple(images.shape)}; a tensor must be (N, 3, H, W) in [-1, 1].")
        x = images.detach().float()
        if x.numel() and (x.min() < -1.001 or x.max() > 1.001):
            raise ValueError(
                f"{argument} has values in [{x.min():.3g}, {x.max():.3g}]; tensors are read as [-1, 1]. "
                "Rescale (x * 2 - 1 for [0, 1] images) or pass PIL images."
            )
        if x.numel() and x.min() >= 0:
            logger.warning("%s has no negative values; tensors are read as [-1, 1], not [0, 1].", argument)
        return x
    if isinstance(images, np.ndarray):
        if images.shape[-1] != 3:
            raise ValueError(f"{argument} has shape {images.shape}; an array must be (N, H, W, 3) in [0, 1].")
        arr = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    else:
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise ValueError(f"{argument} holds images of several sizes {sorted(sizes)}. Resize them to one size.")
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2 - 1  # (N, 3, H, W)


def to_pil(images: ImageBatch, *, argument: str = "images") -> list[PIL.Image.Image]:
    """Images as a list of RGB PIL images (what the CLIP and DINO image processors read)."""
    _check_batch(images, argument=argument)
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        return [im.convert("RGB") for im in images]
    arr = ((to_pixels(images, argument=argument) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    return [PIL.Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in arr]


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: ImageBatch, *, batch_size: int = 16) -> torch.Tensor:
    """Scaled VAE latents ``E(x)·scale`` (posterior mean) of images: (N, C, h, w) on the VAE's device and dtype."""
    pixels = to_pixels(images)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    chunks = [
        vae.encode(pixels[i : i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean
        for i in range(0, len(pixels), batch_size)
    ]
    return (torch.cat(chunks) - shift) * vae.config.scaling_factor


@torch.no_grad()
def generated_latents(
    source: Any | Callable[..., list[PIL.Image.Image]],
    prompts: Sequence[str],
    *,
    vae: torch.nn.Module | None = None,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 16,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> torch.Tensor:
    """Latents of the images a model generates for ``prompts`` (for :func:`~.wasserstein.wasserstein_metric`).

    Image ``i`` starts from ``torch.Generator().manual_seed(seed + i)``, as in
    ``PersonalizationMethod.generate``, so that two models are compared on the same initial noise. The images are
    generated as PIL images (what a user gets) and encoded with :func:`encode_images`.

    Args:
        source: A diffusers pipeline (called with ``generator``, ``num_inference_steps``, ``guidance_scale`` and
            ``pipe_kwargs``), or a callable ``source(prompts, *, seed, num_inference_steps, guidance_scale,
            batch_size) -> list of PIL images`` such as ``PersonalizationMethod.generate``.
        prompts: One prompt per image (repeat a prompt for several images).
        vae: The VAE that encodes the images; the pipeline's own when None (required for a callable).
        seed: Seed of the first image.
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
        batch_size: Images per pipeline call.
        progress: Show a progress bar.
        pipe_kwargs: More arguments for the pipeline call (e.g. ``infusion_concepts``).

    Returns:
        (N, C, h, w) latents.
    """
    prompts = list(prompts)
    vae = vae if vae is not None else getattr(source, "vae", None)
    if vae is None:
        raise ValueError(f"source={source!r} has no .vae. Pass vae= (e.g. the base pipeline's vae).")
    if hasattr(source, "unet"):  # a pipeline
        images: list[PIL.Image.Image] = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            images += source(chunk, generator=generators, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, output_type="pil", **pipe_kwargs).images  # fmt: skip
    elif callable(source):
        if pipe_kwargs:
            raise ValueError(f"pipe_kwargs {sorted(pipe_kwargs)} only apply to a pipeline source, not a callable.")
        images = source(prompts, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        batch_size=batch_size)  # fmt: skip
    else:
        raise TypeError(f"source is a {type(source).__name__}. Pass a diffusers pipeline or a generate callable.")
    return encode_images(vae, images, batch_size=batch_size)
