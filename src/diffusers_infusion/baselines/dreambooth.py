"""DreamBooth (Ruiz et al. 2023): fine-tune the whole UNet on prompts "a [identifier] [class word]".

Prior preservation is left out so that every method trains on the same data. Storage: the UNet as a diffusers
model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), in fp16 by default (3.4 GB → 1.7 GB on
SD 1.5; the paper's table counts a full fp32 checkpoint).

Learning rates: 5e-6 on Stable Diffusion (``default_learning_rate``, the paper's setting); 1e-4 on the toy model
(``toy_learning_rate``), re-checked on toy world 2: concept similarity 0.20 at 400 and 1,000 steps (mean of the four
concepts) against 0.14 / 0.18 at 2e-5, the first world's rate, and 0.22 / 0.23 at 3e-4 (text alignment 0.89 / 0.70
there, 0.97-1.0 at 1e-4); see docs/baselines.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import PersonalizationMethod, copy_module, insert_identifier

SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class DreamBoothMethod(PersonalizationMethod):
    """Full UNet fine-tune on a copy of the base UNet.

    Args:
        identifier: The rare word put before the class word ("sks"; the toy benchmark uses "my").
        save_precision: "fp16" (default, half the storage; loads back rounded) or "fp32" (exact round trip).
    """

    name: ClassVar[str] = "dreambooth"
    default_learning_rate: ClassVar[float] = 5e-6
    toy_learning_rate: ClassVar[float] = 1e-4

    def __init__(self, pipe, *, class_word: str, learning_rate: float | None = None, identifier: str = "sks",
                 save_precision: str = "fp16"):  # fmt: skip
        super().__init__(pipe, class_word=class_word, learning_rate=learning_rate)
        if not identifier.strip():
            raise ValueError(f"identifier={identifier!r} is empty. Pass a rare word, e.g. identifier='sks'.")
        if save_precision not in SAVE_DTYPES:
            raise ValueError(f"save_precision={save_precision!r} is not one of {sorted(SAVE_DTYPES)}.")
        self.identifier, self.save_precision = identifier.strip(), save_precision
        self.pipe = self.build_pipeline(unet=copy_module(pipe.unet, trainable=lambda name: True))

    def options(self) -> dict[str, Any]:
        return {"identifier": self.identifier, "save_precision": self.save_precision}

    def concept_prompt(self, prompt: str) -> str:
        """ "a cat on snow" -> "a sks cat on snow"."""
        return insert_identifier(prompt, self.class_word, f"{self.identifier} {self.class_word}")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.pipe.unet.parameters())

    def _save_weights(self, directory: Path) -> None:
        unet = self.pipe.unet
        unet.save_config(directory)
        from safetensors.torch import save_file

        dtype = SAVE_DTYPES[self.save_precision]
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}
        save_file(state, str(directory / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    def _load_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
        with torch.no_grad():
            for name, tensor in self.pipe.unet.state_dict().items():
                tensor.copy_(state[name])
