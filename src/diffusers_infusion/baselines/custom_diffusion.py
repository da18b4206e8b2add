"""Custom Diffusion (Kumari et al. 2023): fine-tune the cross-attention key and value projections + a new token.

Every ``attn2.to_k`` / ``attn2.to_v`` weight of a copied UNet (the frozen rest shares the base's storage) and a new
token's embedding (``"<concept>"``, initialised from the class word, placed before it: "a <concept> cat") are
trained. Left out so that all methods train on the same data: prior preservation with regularization images; also
the official code's detaching of the start token's key/value. Storage (fp32 safetensors, diffusers' key names):
``pytorch_custom_diffusion_weights.safetensors`` (``<layer>.processor.to_{k,v}_custom_diffusion.weight``; 77 MB
on SD 1.5) and the token in Textual Inversion format (``learned_embeds.safetensors``).

Learning rates: 1e-5 on Stable Diffusion (``default_learning_rate``; the official script scales it by the batch
size, 4e-5 at batch 4); 3.3e-4 on the toy model (``toy_learning_rate``), re-checked on the v-prediction toy model:
at 1e-3 (chosen on the earlier epsilon-prediction toy model) "a photo of a cat on the beach" turns into snow within
400 steps on my_cat; at 3.3e-4 the beach stays, the cat still changes and the training loss falls from 0.155
(steps 1-50) to 0.110 (steps 351-400); see docs/baselines.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import ConceptToken, PersonalizationMethod, copy_module, insert_identifier

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
TOKEN_WEIGHT_NAME = "learned_embeds.safetensors"
KEY_VALUE = (".attn2.to_k.weight", ".attn2.to_v.weight")


def _is_key_value(name: str) -> bool:
    return name.endswith(KEY_VALUE)


def _file_key(name: str) -> str:
    """``...attn2.to_k.weight`` -> ``...attn2.processor.to_k_custom_diffusion.weight`` (diffusers' naming)."""
    layer, proj, _ = name.rsplit(".", 2)
    return f"{layer}.processor.{proj}_custom_diffusion.weight"


class CustomDiffusionMethod(PersonalizationMethod):
    """Custom Diffusion: cross-attention K/V weights and a new token, "a cat" -> "a <concept> cat".

    Args:
        token: The new token (must not be in the tokenizer yet).
    """

    name: ClassVar[str] = "custom_diffusion"
    default_learning_rate: ClassVar[float] = 1e-5
    toy_learning_rate: ClassVar[float] = 3.3e-4

    def __init__(self, pipe, *, class_word: str, learning_rate: float | None = None, token: str = "<concept>"):
        super().__init__(pipe, class_word=class_word, learning_rate=learning_rate)
        self.token = ConceptToken(pipe.tokenizer, pipe.text_encoder, token=token, init_word=self.class_word)
        unet = copy_module(pipe.unet, trainable=_is_key_value)
        self.pipe = self.build_pipeline(
            unet=unet, tokenizer=self.token.tokenizer, text_encoder=self.token.text_encoder
        )

    def options(self) -> dict[str, Any]:
        return {"token": self.token.token}

    def concept_prompt(self, prompt: str) -> str:
        """ "a cat on snow" -> "a <concept> cat on snow"."""
        return insert_identifier(prompt, self.class_word, f"{self.token.token} {self.class_word}")

    def key_value_weights(self) -> dict[str, torch.nn.Parameter]:
        """The trained projections by UNet parameter name."""
        return {n: p for n, p in self.pipe.unet.named_parameters() if _is_key_value(n)}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.key_value_weights().values(), self.token.embedding]

    def _save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        weights = {_file_key(n): p.detach().to("cpu", torch.float32) for n, p in self.key_value_weights().items()}
        save_file(weights, str(directory / WEIGHT_NAME), metadata={"format": "pt"})
        vector = self.token.embedding.detach().to("cpu", torch.float32)[None]  # (1, dim)
        save_file({self.token.token: vector}, str(directory / TOKEN_WEIGHT_NAME), metadata={"format": "pt"})

    def _load_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(directory / WEIGHT_NAME))
        with torch.no_grad():
            for name, param in self.key_value_weights().items():
                param.copy_(weights[_file_key(name)])
        self.token.load(load_file(str(directory / TOKEN_WEIGHT_NAME))[self.token.token])
