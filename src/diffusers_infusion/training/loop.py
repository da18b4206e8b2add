"""The training loop of ``examples/train_infusion.py``, callable: frozen inputs computed once, then step by step.

``examples/train_infusion.py`` (checkpoints, resume, trackers) and ``examples/app.py`` (a live page) both drive this
loop; neither holds a copy. Randomness is indexed by micro step (:func:`step_generator`), so a run resumed at step
``k`` continues to the same Δ, bit for bit, and the result does not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..tokens import find_class_word_positions
from .data import InstanceData
from .step import infusion_training_loss

if TYPE_CHECKING:
    from accelerate import Accelerator


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The generator of one micro step: the same on every process and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + micro_step)


@dataclass
class TrainingInputs:
    """What stays frozen during training: caption encodings, class-word positions, the photos' latent moments."""

    captions: list[list[str]]  # per photo, the captions to draw from
    caption_index: dict[str, int]  # caption -> row of ``encodings``
    encodings: torch.Tensor  # (captions, tokens, dim)
    positions: list[list[int]]  # per caption row, the class word's token positions
    latent_mean: torch.Tensor  # (photos, channels, h, w)
    latent_std: torch.Tensor
    latent_masks: torch.Tensor | None  # (photos, 1, h, w) or None
    scaling: float

    @classmethod
    @torch.no_grad()
    def precompute(
        cls, data: InstanceData, *, tokenizer, text_encoder, vae, class_word: str, device, dtype: torch.dtype
    ) -> TrainingInputs:
        """Encode every distinct caption once and the photos' VAE posteriors once."""
        captions = sorted({c for options in data.captions for c in options})
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        encodings = text_encoder(ids.to(device))[0]
        moments = vae.encode(data.pixels.to(device, dtype)).latent_dist
        masks = None
        if data.masks is not None:
            masks = torch.nn.functional.interpolate(data.masks, size=moments.mean.shape[-2:], mode="area")
        return cls(
            captions=data.captions,
            caption_index={c: i for i, c in enumerate(captions)},
            encodings=encodings,
            positions=[find_class_word_positions(tokenizer, c, class_word) for c in captions],
            latent_mean=moments.mean,
            latent_std=moments.std,
            latent_masks=masks,
            scaling=vae.config.scaling_factor,
        )


def training_steps(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    unet: torch.nn.Module,
    noise_scheduler: SchedulerMixin,
    inputs: TrainingInputs,
    *,
    max_train_steps: int,
    train_batch_size: int,
    seed: int,
    first_step: int = 0,
    gradient_accumulation_steps: int = 1,
    replace_queries: bool = True,
    weight_dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, float]]:
    """Train Δ from ``first_step`` to ``max_train_steps``, yielding ``(step, loss)`` after each optimizer step.

    Micro step ``m`` draws photos, captions, timesteps and noise for the global batch (``train_batch_size`` per
    process) from ``step_generator(seed, m)``; process ``p`` trains on its slice. A tqdm bar shows the progress.

    Args:
        accelerator: An ``accelerate.Accelerator`` (``model``, ``optimizer``, ``lr_scheduler`` prepared with it).
        model: ``InfusionResiduals`` (possibly wrapped); calling it gives ``{layer: Δ}`` (and the fidelity knob's
            ``U``, ``V`` when it has one: they are learned jointly with Δ).
        optimizer: The optimizer of ``model``'s parameters.
        lr_scheduler: A learning-rate scheduler, stepped with the optimizer.
        unet: The frozen base UNet.
        noise_scheduler: The training noise scheduler (DDPM).
        inputs: :meth:`TrainingInputs.precompute`'s result.
        max_train_steps: The last optimizer step.
        train_batch_size: Samples per process and micro step.
        seed: Seed of the run (with the micro step, it fixes every draw).
        first_step: Optimizer steps already done (when resuming).
        gradient_accumulation_steps: Micro steps per optimizer step.
        replace_queries: False trains the own-query ablation instead of the paper's method.
        weight_dtype: dtype of the frozen weights (the noise and latents are cast to it).
    """
    from tqdm.auto import tqdm

    per_process, world = train_batch_size, accelerator.num_processes
    mine = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
    n_photos, latent_shape = len(inputs.captions), inputs.latent_mean.shape[1:]
    num_timesteps = noise_scheduler.config.num_train_timesteps
    dev = accelerator.device
    fidelity = getattr(accelerator.unwrap_model(model), "fidelity_config", None)  # the knob's options, or None
    progress = tqdm(range(max_train_steps), initial=first_step, desc="Training", unit="step",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    try:
        for step in range(first_step, max_train_steps):
            for micro in range(gradient_accumulation_steps):
                g = step_generator(seed, step * gradient_accumulation_steps + micro)
                photo = torch.randint(n_photos, (per_process * world,), generator=g)[mine]
                choice = torch.rand(per_process * world, generator=g)[mine]
                t = torch.randint(num_timesteps, (per_process * world,), generator=g)[mine]
                eps = torch.randn((per_process * world, *latent_shape), generator=g)[mine]
                draw = torch.randn((per_process * world, *latent_shape), generator=g)[mine]
                caps = [inputs.captions[i][int(c * len(inputs.captions[i]))]
                        for i, c in zip(photo.tolist(), choice.tolist())]  # fmt: skip
                rows = torch.tensor([inputs.caption_index[c] for c in caps])
                index, draw = photo.to(dev), draw.to(dev, weight_dtype)
                z0 = (inputs.latent_mean[index] + inputs.latent_std[index] * draw) * inputs.scaling
                with accelerator.accumulate(model), accelerator.autocast():
                    loss = infusion_training_loss(
                        unet, noise_scheduler, model(), z0, inputs.encodings[rows.to(dev)],
                        [inputs.positions[r] for r in rows], noise=eps.to(dev, weight_dtype), timesteps=t.to(dev),
                        mask=None if inputs.latent_masks is None else inputs.latent_masks[photo].to(dev),
                        replace_queries=replace_queries, fidelity=fidelity,
                    )  # fmt: skip
                    accelerator.backward(loss)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                loss_value = accelerator.reduce(loss.detach(), "mean").item()
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}")
            yield step + 1, loss_value
    finally:
        progress.close()
