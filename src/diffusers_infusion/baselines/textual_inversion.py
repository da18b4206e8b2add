"""Textual Inversion (Gal et al. 2023): one new word embedding, everything else frozen.

A new token (``"<concept>"``) is added to a copy of the tokenizer and the text encoder, initialised from the class
word's embedding, and replaces the class word in prompts. Only that one vector is trained. Storage: diffusers'
format (``learned_embeds.safetensors`` holding ``{"<concept>": (1, dim)}`` in fp32, loadable with
``pipe.load_textual_inversion``): 3 KB on SD 1.5.

``num_vectors=N`` is the multi-vector variant of diffusers' training script (``--num_vectors``): N new tokens
(``<concept> <concept>_1 ...``, diffusers' ``maybe_convert_prompt`` expands ``<concept>`` to them) replace the
class word, the file holds ``{"<concept>": (N, dim)}``, which
``load_textual_inversion`` expands the same way.

Learning rates: 5e-3 on Stable Diffusion (``default_learning_rate``, diffusers' script with its default scaling
off); 5e-2 on the toy model (``toy_learning_rate``): the photos' evaluation loss only falls from 0.066 to 0.062
(the same from 5e-3 to 5e-1, where images break down); see docs/baselines.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import ConceptToken, PersonalizationMethod, insert_identifier

WEIGHT_NAME = "learned_embeds.safetensors"


class TextualInversionMethod(PersonalizationMethod):
    """Textual Inversion: "a cat on snow" -> "a <concept> on snow", one trainable embedding.

    Args:
        token: The new token (must not be in the tokenizer yet).
        num_vectors: How many embedding vectors (tokens) replace the class word (diffusers' ``--num_vectors``).
    """

    name: ClassVar[str] = "textual_inversion"
    default_learning_rate: ClassVar[float] = 5e-3
    toy_learning_rate: ClassVar[float] = 5e-2

    def __init__(
        self,
        pipe,
        *,
        class_word: str,
        learning_rate: float | None = None,
        token: str = "<concept>",
        num_vectors: int = 1,
    ):
        super().__init__(pipe, class_word=class_word, learning_rate=learning_rate)
        self.token = ConceptToken(
            pipe.tokenizer, pipe.text_encoder, token=token, init_word=self.class_word, num_vectors=num_vectors
        )
        self.pipe = self.build_pipeline(tokenizer=self.token.tokenizer, text_encoder=self.token.text_encoder)

    def options(self) -> dict[str, Any]:
        return {"token": self.token.token, "num_vectors": len(self.token.tokens)}

    def concept_prompt(self, prompt: str) -> str:
        """ "a cat on snow" -> "a <concept> on snow" (with several vectors the pipeline expands the token)."""
        return insert_identifier(prompt, self.class_word, self.token.token)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.token.embedding]

    def _save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        vector = self.token.vectors.detach().to("cpu", torch.float32)  # (num_vectors, dim)
        save_file({self.token.token: vector}, str(directory / WEIGHT_NAME), metadata={"format": "pt"})

    def _load_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.token.load(load_file(str(directory / WEIGHT_NAME))[self.token.token])
