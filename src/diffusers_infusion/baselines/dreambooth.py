"""DreamBooth (Ruiz et al. 2023): fine-tune the whole UNet on prompts "a [identifier] [class word]".

By default prior preservation is left out so that every method trains on the same data.
``prior_preservation=True`` adds the paper's class-specific prior preservation loss (eq. 2) as diffusers'
``train_dreambooth.py --with_prior_preservation`` computes it: ``num_class_images`` images of ``class_prompt`` drawn
by the base model before training, each step a batch of them beside the photos, their loss weighted by
``prior_loss_weight``. Storage: the UNet as a diffusers
model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), in fp16 by default (3.4 GB → 1.7 GB on
SD 1.5; the paper's table counts a full fp32 checkpoint).

Learning rates: 5e-6 on Stable Diffusion (``default_learning_rate``, the paper's setting); 1e-4 on the toy model
(``toy_learning_rate``), re-checked on toy world 2: concept similarity 0.20 at 400 and 1,000 steps (mean of the four
concepts) against 0.14 / 0.18 at 2e-5, the first world's rate, and 0.22 / 0.23 at 3e-4 (text alignment 0.89 / 0.70
there, 0.97-1.0 at 1e-4); see docs/baselines.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import PersonalizationMethod, copy_module, encode_photos, insert_identifier

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class DreamBoothMethod(PersonalizationMethod):
    """Full UNet fine-tune on a copy of the base UNet.

    Args:
        identifier: The rare word put before the class word ("sks"; the toy benchmark uses "my").
        save_precision: "fp16" (default, half the storage; loads back rounded) or "fp32" (exact round trip).
        prior_preservation: Add the class-specific prior preservation loss (diffusers' ``--with_prior_preservation``).
        class_prompt: The prompt of the class images; "a photo of a [class word]" when None.
        num_class_images: How many class images the base model draws (once, at the first training step).
        prior_loss_weight: The weight of the class images' loss (diffusers' ``--prior_loss_weight``).
        prior_seed: Class image i is drawn from seed ``prior_seed + i``; the batches' picks and noise from it too.
        train_text_encoder: Fine-tune (a copy of) the text encoder too, at the same rate (diffusers'
            ``--train_text_encoder``); saved beside the UNet in ``text_encoder/``.
    """

    name: ClassVar[str] = "dreambooth"
    default_learning_rate: ClassVar[float] = 5e-6
    toy_learning_rate: ClassVar[float] = 1e-4

    def __init__(self, pipe, *, class_word: str, learning_rate: float | None = None, identifier: str = "sks",
                 save_precision: str = "fp16", prior_preservation: bool = False, class_prompt: str | None = None,
                 num_class_images: int = 100, prior_loss_weight: float = 1.0, prior_seed: int = 0,
                 train_text_encoder: bool = False):  # fmt: skip
        super().__init__(pipe, class_word=class_word, learning_rate=learning_rate)
        if not identifier.strip():
            raise ValueError(f"identifier={identifier!r} is empty. Pass a rare word, e.g. identifier='sks'.")
        if save_precision not in SAVE_DTYPES:
            raise ValueError(f"save_precision={save_precision!r} is not one of {sorted(SAVE_DTYPES)}.")
        if not isinstance(num_class_images, int) or isinstance(num_class_images, bool) or num_class_images < 1:
            raise ValueError(f"num_class_images={num_class_images!r}: pass a positive integer (diffusers uses 100).")
        if not prior_loss_weight >= 0:
            raise ValueError(f"prior_loss_weight={prior_loss_weight!r} must be >= 0 (diffusers uses 1.0).")
        if class_prompt is not None and not class_prompt.strip():
            raise ValueError(f"class_prompt={class_prompt!r} is empty. Pass e.g. 'a photo of a {self.class_word}'.")
        self.identifier, self.save_precision = identifier.strip(), save_precision
        self.prior_preservation = bool(prior_preservation)
        self.class_prompt = class_prompt.strip() if class_prompt else f"a photo of a {self.class_word}"
        self.num_class_images, self.prior_loss_weight = num_class_images, float(prior_loss_weight)
        self.prior_seed = int(prior_seed)
        self.class_latents: torch.Tensor | None = None  # (num_class_images, C, h, w), drawn at the first step
        self._prior_generator = torch.Generator().manual_seed(self.prior_seed)
        self.train_text_encoder = bool(train_text_encoder)
        trained = {"unet": copy_module(pipe.unet, trainable=lambda name: True)}
        if self.train_text_encoder:
            trained["text_encoder"] = copy_module(pipe.text_encoder, trainable=lambda name: True)
        self.pipe = self.build_pipeline(**trained)

    def options(self) -> dict[str, Any]:
        options = {"identifier": self.identifier, "save_precision": self.save_precision}
        if self.train_text_encoder:
            options["train_text_encoder"] = True
        if self.prior_preservation:
            options.update(prior_preservation=True, class_prompt=self.class_prompt, prior_seed=self.prior_seed,
                           num_class_images=self.num_class_images,
                           prior_loss_weight=self.prior_loss_weight)  # fmt: skip
        return options

    def concept_prompt(self, prompt: str) -> str:
        """ "a cat on snow" -> "a sks cat on snow"."""
        return insert_identifier(prompt, self.class_word, f"{self.identifier} {self.class_word}")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        text = list(self.pipe.text_encoder.parameters()) if self.train_text_encoder else []
        return list(self.pipe.unet.parameters()) + text

    @torch.no_grad()
    def draw_class_images(self, *, height: int, width: int, batch_size: int = 16) -> torch.Tensor:
        """The base model's images of ``class_prompt``, encoded as the photos are: latents (N, C, h, w)."""
        from tqdm.auto import tqdm

        logger.info("Drawing %d class images of %r for prior preservation.", self.num_class_images, self.class_prompt)
        chunks = []
        for start in tqdm(range(0, self.num_class_images, batch_size), desc="Class images", unit="batch"):
            n = min(batch_size, self.num_class_images - start)
            generators = [torch.Generator().manual_seed(self.prior_seed + start + i) for i in range(n)]
            images = self.base_pipe([self.class_prompt] * n, height=height, width=width, generator=generators,
                                    num_inference_steps=25, output_type="pt").images  # (n, 3, H, W) in [0, 1]
            chunks.append(encode_photos(self.pipe, images * 2 - 1))  # fmt: skip
        return torch.cat(chunks)

    def training_loss(
        self, latents: torch.Tensor, captions: list[str], *, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The denoising loss; with prior preservation plus ``prior_loss_weight`` x the class images' (eq. 2)."""
        if not self.prior_preservation:
            return super().training_loss(latents, captions, noise=noise, timesteps=timesteps)
        if self.class_latents is None:
            scale = getattr(self.base_pipe, "vae_scale_factor", 8)
            self.class_latents = self.draw_class_images(height=latents.shape[-2] * scale,
                                                        width=latents.shape[-1] * scale)  # fmt: skip
        g, batch = self._prior_generator, len(latents)
        picks = torch.randint(len(self.class_latents), (batch,), generator=g)
        prior_noise = torch.randn(latents.shape, generator=g).to(noise)
        prior_steps = torch.randint(self.noise_scheduler.config.num_train_timesteps, (batch,), generator=g)
        instance = super().training_loss(latents, captions, noise=noise, timesteps=timesteps)
        prior = self.denoising_loss(self.class_latents[picks].to(latents), [self.class_prompt] * batch,
                                    noise=prior_noise, timesteps=prior_steps.to(timesteps))  # fmt: skip
        return instance + self.prior_loss_weight * prior

    def _save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        dtype = SAVE_DTYPES[self.save_precision]
        self.pipe.unet.save_config(directory)
        save_file(_state(self.pipe.unet, dtype), str(directory / UNET_FILE), metadata={"format": "pt"})
        if self.train_text_encoder:
            (directory / "text_encoder").mkdir(exist_ok=True)
            self.pipe.text_encoder.config.save_pretrained(directory / "text_encoder")
            save_file(_state(self.pipe.text_encoder, dtype), str(directory / TEXT_ENCODER_FILE),
                      metadata={"format": "pt"})  # fmt: skip

    def _load_weights(self, directory: Path) -> None:
        _load_into(self.pipe.unet, directory / UNET_FILE)
        if self.train_text_encoder:
            _load_into(self.pipe.text_encoder, directory / TEXT_ENCODER_FILE)


UNET_FILE = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILE = "text_encoder/model.safetensors"


def _state(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}


def _load_into(module: torch.nn.Module, path: Path) -> None:
    """Copy a saved state into ``module`` (same names and shapes, else a clear error)."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"'{path}' is missing: the folder was not written by DreamBoothMethod.save().")
    state = load_file(str(path))
    missing = [name for name in module.state_dict() if name not in state]
    if missing:
        raise ValueError(f"'{path}' lacks {len(missing)} tensors (e.g. {missing[0]!r}): saved from another model.")
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            tensor.copy_(state[name])
