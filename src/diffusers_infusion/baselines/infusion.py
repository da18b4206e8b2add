"""Infusion (this project) behind the baseline interface: exact (``"infusion"``) and own-query (ablation) variants.

Training reuses :class:`~..training.step.InfusionResiduals` and :func:`~..training.step.infusion_training_loss`
(the C stream attends with the F stream's queries, METHOD.md); generation uses :class:`~..InfusionPipeline`
(``infusion_mode="exact"``, or ``"fast"`` for the own-query variant). Prompts are unchanged: the class word
carries the concept. Storage: the concept file (``infusion_concept.safetensors``, fp32 residuals: 12,480 values,
50 KB on SD 1.5).

Learning rates: 1e-2 on Stable Diffusion (``default_learning_rate``, the paper's); 1e-2 on the toy model too
(``toy_learning_rate``): the photos' evaluation loss falls from 0.066 to 0.060 by 400 steps and 0.057 by 1,000
(1e-1 goes lower but breaks the images); see docs/baselines.md.

``fidelity=`` trains the concept with the fidelity knob (docs/fidelity.md, :class:`~..fidelity.FidelityConfig` or
its fields as a dict), so the overfitting benchmark can measure knob settings next to the baselines.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import PIL.Image
import torch

from ..concept import CONCEPT_WEIGHT_NAME, InfusionConcept
from ..fidelity import FidelityConfig
from ..pipeline import InfusionPipeline
from ..stream import dual_stream_noise_pred
from ..tokens import class_word_token_ids, find_class_word_positions
from ..training.step import InfusionResiduals, infusion_training_loss
from .base import PersonalizationMethod

ADAPTER = "concept"


class InfusionMethod(PersonalizationMethod):
    """Infusion as in the paper: residuals on the class word's values, attention maps of the frozen base model.

    Args:
        fidelity: The fidelity knob's options (a ``FidelityConfig`` or a dict of its fields); None: the paper's method.
        residual_lr_scale: Δ's learning rate as a fraction of ``learning_rate`` (the knob's U, V keep the full rate);
            1.0: one rate for everything, as in the paper.
    """

    name: ClassVar[str] = "infusion"
    default_learning_rate: ClassVar[float] = 1e-2
    toy_learning_rate: ClassVar[float] = 1e-2
    replace_queries: ClassVar[bool] = True
    pipeline_class: ClassVar[type] = InfusionPipeline

    def __init__(
        self,
        pipe,
        *,
        class_word: str,
        learning_rate: float | None = None,
        fidelity: FidelityConfig | dict[str, Any] | None = None,
        residual_lr_scale: float = 1.0,
    ):
        super().__init__(pipe, class_word=class_word, learning_rate=learning_rate)
        if not (isinstance(residual_lr_scale, (int, float)) and 0 < residual_lr_scale <= 1):
            raise ValueError(f"residual_lr_scale={residual_lr_scale!r} must be in (0, 1]; 1.0 is the paper's setting.")
        self.residual_lr_scale = float(residual_lr_scale)
        class_word_token_ids(pipe.tokenizer, self.class_word)  # raises ClassWordError for unknown words
        if isinstance(fidelity, dict):
            fidelity = FidelityConfig(**fidelity)
        self.residuals = InfusionResiduals.for_unet(self.pipe.unet, fidelity=fidelity).to(pipe.unet.device)
        self.fidelity = self.residuals.fidelity_config  # None unless the knob is on (rank > 0)

    def options(self) -> dict[str, Any]:
        options = {} if self.fidelity is None else {"fidelity": asdict(self.fidelity)}
        return options | ({} if self.residual_lr_scale == 1.0 else {"residual_lr_scale": self.residual_lr_scale})

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.residuals.parameters())

    def optimizer(self) -> list[dict[str, Any]]:
        """Δ at ``residual_lr_scale × learning_rate``, the knob's U and V (if any) at ``learning_rate``."""
        return self.residuals.param_groups(self.learning_rate, residual_lr_scale=self.residual_lr_scale)

    def _positions(self, captions: list[str]) -> list[list[int]]:
        return [find_class_word_positions(self.pipe.tokenizer, c, self.class_word) for c in captions]

    def training_loss(
        self, latents: torch.Tensor, captions: list[str], *, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 8 with the C stream on the F stream's queries (``infusion_training_loss``)."""
        with torch.no_grad():
            encodings = self.encode_prompts(captions)  # (B, tokens, dim)
        return infusion_training_loss(
            self.pipe.unet, self.noise_scheduler, self.residuals(), latents, encodings, self._positions(captions),
            noise=noise, timesteps=timesteps, replace_queries=self.replace_queries, fidelity=self.fidelity,
        )  # fmt: skip

    def concept(self) -> InfusionConcept:
        """The current residuals as an ``InfusionConcept``."""
        return self.residuals.to_concept(self.class_word)

    def _call_pipe(self, prompts: list[str], **kwargs) -> list[PIL.Image.Image]:
        self.pipe.unload_infusion_concept()
        self.pipe.load_infusion_concept(self.concept(), adapter_name=ADAPTER)
        mode = "exact" if self.replace_queries else "fast"
        return self.pipe(prompts, output_type="pil", infusion_mode=mode, **kwargs).images

    @torch.no_grad()
    def noise_prediction(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, captions: list[str]):
        """The C stream's output; on captions without the class word, exactly the base UNet's (property 4)."""
        placements = [[(ADAPTER, 1.0, tuple(p))] if p else [] for p in self._positions(captions)]
        return dual_stream_noise_pred(
            self.pipe.unet, noisy_latents, timesteps, self.encode_prompts(captions), placements,
            {ADAPTER: self.residuals()}, replace_queries=self.replace_queries,
            fidelity=None if self.fidelity is None else {ADAPTER: self.fidelity},
        )  # fmt: skip

    def _save_weights(self, directory: Path) -> None:
        self.concept()._save_pretrained(directory)

    def _load_weights(self, directory: Path) -> None:
        self.residuals.load_concept(InfusionConcept.from_file(directory / CONCEPT_WEIGHT_NAME))


class InfusionOwnQueryMethod(InfusionMethod):
    """The authors' public-code variant (ablation): the C stream attends with its own queries (one stream)."""

    name: ClassVar[str] = "infusion_own_queries"
    replace_queries: ClassVar[bool] = False
