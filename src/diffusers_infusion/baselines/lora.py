"""DreamBooth-LoRA (Hu et al. 2022; diffusers' ``train_dreambooth_lora``): rank-r adapters on the UNet's attention.

peft's ``LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"])`` is added to a copy
of the base UNet (sharing the frozen weights); saved and loaded with diffusers' own LoRA format
(``StableDiffusionPipeline.save_lora_weights`` / ``load_lora_weights``: ``pytorch_lora_weights.safetensors``,
fp32; 3.2 MB on SD 1.5 at rank 4).

Learning rates: 1e-4 on Stable Diffusion (``default_learning_rate``, diffusers' default); 3.3e-4 on the toy model
(``toy_learning_rate``), re-checked on the v-prediction toy model: at 1e-3 (chosen on the earlier epsilon-prediction
toy model) "a photo of a cat on the beach" turns into snow within 400 steps on my_cat; at 3.3e-4 the beach stays,
the cat still changes and the training loss falls from 0.160 (steps 1-50) to 0.112 (steps 351-400); see
docs/baselines.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import PersonalizationMethod, insert_identifier

TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


class LoRAMethod(PersonalizationMethod):
    """DreamBooth with LoRA adapters (identifier + class word prompts).

    Args:
        identifier: The rare word put before the class word ("sks"; the toy benchmark uses "my").
        rank: LoRA rank r (alpha = r, so the adapter's scale is 1).
        init_seed: Seed of the Gaussian initialisation of the A matrices (B starts at zero), for reproducible runs.
    """

    name: ClassVar[str] = "dreambooth_lora"
    default_learning_rate: ClassVar[float] = 1e-4
    toy_learning_rate: ClassVar[float] = 3.3e-4

    def __init__(self, pipe, *, class_word: str, learning_rate: float | None = None, identifier: str = "sks",
                 rank: int = 4, init_seed: int = 0):  # fmt: skip
        from peft import LoraConfig

        super().__init__(pipe, class_word=class_word, learning_rate=learning_rate)
        if not identifier.strip():
            raise ValueError(f"identifier={identifier!r} is empty. Pass a rare word, e.g. identifier='sks'.")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} must be a positive integer (4 is diffusers' default).")
        self.identifier, self.rank, self.init_seed = identifier.strip(), rank, init_seed
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            self.pipe.unet.add_adapter(config)

    def options(self) -> dict[str, Any]:
        return {"identifier": self.identifier, "rank": self.rank, "init_seed": self.init_seed}

    def concept_prompt(self, prompt: str) -> str:
        """ "a cat on snow" -> "a sks cat on snow"."""
        return insert_identifier(prompt, self.class_word, f"{self.identifier} {self.class_word}")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.pipe.unet.named_parameters() if "lora_" in name]

    def _save_weights(self, directory: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)

    def _load_weights(self, directory: Path) -> None:
        """Replace the fresh adapter by the saved one, read with diffusers' ``load_lora_weights``."""
        self.pipe.unet.delete_adapters(list(self.pipe.unet.peft_config))
        self.pipe.load_lora_weights(directory)
