"""The Infusion training step (METHOD.md, "Training step"): F's queries, C's residuals, plain denoising loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..attention import layer_sizes
from ..concept import InfusionConcept
from ..errors import ConceptMismatchError
from ..fidelity import DOWN_SUFFIX, UP_SUFFIX, ConceptFidelity, FidelityConfig
from ..stream import dual_stream_noise_pred


class InfusionResiduals(torch.nn.Module):
    """The trainable Δ_i, one vector per cross-attention layer, starting at zero (eq. 7); optionally the fidelity knob.

    ``forward()`` returns ``{layer path: Δ}``, plus the knob's ``U``, ``V`` under their file names
    (``<layer>.fidelity_up``/``_down``) when it has one; calling it through a DDP wrapper keeps gradients
    synchronized.

    Args:
        sizes: Layer path -> value size (the length of Δ).
        fidelity: The fidelity knob's options (``fidelity.py``); ``None`` or rank 0: the paper's method only.
        query_sizes: Layer path -> query size (``attn2.to_q.out_features``); needed with a knob.
        seed: Seed of the knob's ``V`` initialization (``U`` starts at zero, so a fresh knob is the exact method).
    """

    def __init__(self, sizes: dict[str, int], *, fidelity: FidelityConfig | None = None,
                 query_sizes: dict[str, int] | None = None, seed: int = 0):  # fmt: skip
        super().__init__()
        self.layer_names = list(sizes)
        self.deltas = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(n)) for n in sizes.values()])
        self.fidelity_config = fidelity if fidelity is not None and fidelity.enabled else None
        self.fidelity_layers: list[str] = []
        self.fidelity_up, self.fidelity_down = torch.nn.ParameterList(), torch.nn.ParameterList()
        if self.fidelity_config is not None:
            if query_sizes is None:
                raise ConceptMismatchError("InfusionResiduals with a fidelity knob needs query_sizes; use for_unet().")
            both = {name: (sizes[name], query_sizes[name]) for name in sizes}
            knob = ConceptFidelity.init(both, self.fidelity_config, generator=torch.Generator().manual_seed(seed))
            self.fidelity_layers = list(knob.up)
            self.fidelity_up.extend(torch.nn.Parameter(knob.up[name]) for name in self.fidelity_layers)
            self.fidelity_down.extend(torch.nn.Parameter(knob.down[name]) for name in self.fidelity_layers)

    @classmethod
    def for_unet(
        cls, unet: torch.nn.Module, *, fidelity: FidelityConfig | None = None, seed: int = 0
    ) -> InfusionResiduals:
        """Zero residuals for every cross-attention layer of ``unet`` (and a fresh fidelity knob if asked)."""
        sizes = layer_sizes(unet)
        return cls({name: value for name, (value, _) in sizes.items()}, fidelity=fidelity,
                   query_sizes={name: query for name, (_, query) in sizes.items()}, seed=seed)  # fmt: skip

    def forward(self) -> dict[str, torch.Tensor]:
        tensors = dict(zip(self.layer_names, self.deltas))
        for name, up, down in zip(self.fidelity_layers, self.fidelity_up, self.fidelity_down):
            tensors[name + UP_SUFFIX], tensors[name + DOWN_SUFFIX] = up, down
        return tensors

    def param_groups(self, learning_rate: float, *, residual_lr_scale: float = 1.0) -> list[dict]:
        """Optimizer groups: Δ at ``residual_lr_scale × learning_rate``, the knob's ``U``, ``V`` at ``learning_rate``.

        One group of every parameter at ``learning_rate`` when ``residual_lr_scale`` is 1 (the paper's setting).
        """
        if residual_lr_scale == 1.0:
            return [{"params": list(self.parameters()), "lr": learning_rate}]
        knob = [*self.fidelity_up, *self.fidelity_down]
        groups = [{"params": list(self.deltas), "lr": learning_rate * residual_lr_scale}]
        return groups + ([{"params": knob, "lr": learning_rate}] if knob else [])

    def load_concept(self, concept: InfusionConcept) -> None:
        """Copy a concept's residuals (and its knob, which must match this module's) into the parameters."""
        knob = concept.fidelity
        if self.fidelity_layers and (knob is None or set(knob.up) != set(self.fidelity_layers)
                                     or knob.config.rank != self.fidelity_config.rank):  # fmt: skip
            raise ConceptMismatchError(
                f"Concept '{concept.class_word}' has no fidelity knob of rank {self.fidelity_config.rank} on the "
                f"layers {self.fidelity_layers[:2]}...; resume it with the knob options it was trained with."
            )
        with torch.no_grad():
            for name, delta in zip(self.layer_names, self.deltas):
                delta.copy_(concept.residuals[name].to(delta))
            for name, up, down in zip(self.fidelity_layers, self.fidelity_up, self.fidelity_down):
                up.copy_(knob.up[name].to(up))
                down.copy_(knob.down[name].to(down))

    def to_concept(self, class_word: str, *, base_model: str | None = None) -> InfusionConcept:
        """The current residuals (and knob) as an ``InfusionConcept`` (detached float32 copies on the CPU)."""
        copy = lambda t: t.detach().float().cpu().clone()  # noqa: E731
        residuals = {name: copy(d) for name, d in zip(self.layer_names, self.deltas)}
        knob = None
        if self.fidelity_layers:
            up = {name: copy(u) for name, u in zip(self.fidelity_layers, self.fidelity_up)}
            down = {name: copy(v) for name, v in zip(self.fidelity_layers, self.fidelity_down)}
            knob = ConceptFidelity(self.fidelity_config, up, down)
        return InfusionConcept(class_word, residuals, base_model=base_model, fidelity=knob)


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
    fidelity: FidelityConfig | None = None,
) -> torch.Tensor:
    """Eq. 8: ``E‖ε − ε_θ'(z_t, t, y)‖²`` with the C stream attending with the F stream's queries.

    Args:
        unet: The frozen base UNet.
        noise_scheduler: The training noise scheduler (``add_noise``; ``get_velocity`` for v-prediction).
        residuals: Layer path -> Δ (requires grad); with a knob also its ``U``, ``V`` (``InfusionResiduals()``).
        latents: Clean latents ``z_0`` (batch, channels, h, w), already scaled.
        encoder_hidden_states: Caption encodings (batch, tokens, dim).
        positions: Per sample, the class word's token positions in its caption.
        noise: ``ε`` (same shape as ``latents``).
        timesteps: (batch,) training timesteps.
        mask: Optional object mask at latent size (batch, 1, h, w): the loss counts only the object.
        replace_queries: False trains the own-query ablation instead of the paper's method.
        batched: Run F and C in one call (True) or F first without gradient (False, the default: cheaper).
        fidelity: The options of the knob whose ``U``, ``V`` are in ``residuals`` (``None``: no knob).
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
        fidelity=None if fidelity is None else {"concept": fidelity},
    )  # fmt: skip
    error = (pred.float() - target.float()) ** 2  # (batch, channels, h, w)
    if mask is None:
        return error.mean()
    weight = mask.float().expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1e-8)
