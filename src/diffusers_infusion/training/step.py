"""The Infusion training step (METHOD.md, "Training step"): F's queries, C's residuals, plain denoising loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..attention import cross_attention_layers, value_size
from ..concept import InfusionConcept
from ..stream import dual_stream_noise_pred


class InfusionResiduals(torch.nn.Module):
    """The trainable Δ_i, one vector per cross-attention layer, starting at zero (eq. 7).

    ``forward()`` returns ``{layer path: Δ}``; calling it through a DDP wrapper keeps gradients synchronized.
    """

    def __init__(self, sizes: dict[str, int]):
        super().__init__()
        self.layer_names = list(sizes)
        self.deltas = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(n)) for n in sizes.values()])

    @classmethod
    def for_unet(cls, unet: torch.nn.Module) -> InfusionResiduals:
        """Zero residuals for every cross-attention layer of ``unet``."""
        return cls({name: value_size(attn) for name, attn in cross_attention_layers(unet).items()})

    def forward(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.layer_names, self.deltas))

    def load_concept(self, concept: InfusionConcept) -> None:
        """Copy a concept's residuals into the parameters (e.g. to continue training it)."""
        with torch.no_grad():
            for name, delta in zip(self.layer_names, self.deltas):
                delta.copy_(concept.residuals[name].to(delta))

    def to_concept(self, class_word: str, *, base_model: str | None = None) -> InfusionConcept:
        """The current residuals as an ``InfusionConcept`` (detached float32 copies on the CPU)."""
        residuals = {name: d.detach().float().cpu().clone() for name, d in zip(self.layer_names, self.deltas)}
        return InfusionConcept(class_word, residuals, base_model=base_model)


def infusion_training_loss(
    unet: torch.nn.Module,
    noise_scheduler: SchedulerMixin,
    residuals: dict[str, torch.Tensor],
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    positions: Sequence[Sequence[int]],
    *,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    mask: torch.Tensor | None = None,
    replace_queries: bool = True,
    batched: bool = False,
) -> torch.Tensor:
    """Eq. 8: ``E‖ε − ε_θ'(z_t, t, y)‖²`` with the C stream attending with the F stream's queries.

    Args:
        unet: The frozen base UNet.
        noise_scheduler: The training noise scheduler (``add_noise``; ``get_velocity`` for v-prediction).
        residuals: Layer path -> Δ (requires grad).
        latents: Clean latents ``z_0`` (batch, channels, h, w), already scaled.
        encoder_hidden_states: Caption encodings (batch, tokens, dim).
        positions: Per sample, the class word's token positions in its caption.
        noise: ``ε`` (same shape as ``latents``).
        timesteps: (batch,) training timesteps.
        mask: Optional object mask at latent size (batch, 1, h, w): the loss counts only the object.
        replace_queries: False trains the own-query ablation instead of the paper's method.
        batched: Run F and C in one call (True) or F first without gradient (False, the default: cheaper).
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # z_t
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    placements = [[("concept", 1.0, tuple(p))] if p else [] for p in positions]
    pred = dual_stream_noise_pred(
        unet, noisy, timesteps, encoder_hidden_states, placements, {"concept": residuals},
        replace_queries=replace_queries, batched=batched,
    )  # fmt: skip
    error = (pred.float() - target.float()) ** 2  # (batch, channels, h, w)
    if mask is None:
        return error.mean()
    weight = mask.float().expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1e-8)
