"""One UNet evaluation of the F and C streams on the same noisy latents (the training step's and metrics' forward).

``ε_C(z_t, t, y)`` with the F stream's attention maps and the concept residuals, computed in one batched call on
``[F | C]`` where F is the frozen base model on the same ``(z_t, t, y)`` (METHOD.md, "Training step").
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence

import torch

from .attention import capture_queries, infusion_hooks
from .fidelity import FidelityConfig
from .residuals import ResidualEntry, build_plan


@contextlib.contextmanager
def _hooks_through_backward(unet: torch.nn.Module, plan) -> Iterator[None]:
    """``infusion_hooks`` for one forward; kept until the backward pass when the UNet checkpoints gradients.

    Gradient checkpointing recomputes blocks during backward, and the recomputation must see the same hooks. The
    hooks are then removed once every residual has received its gradient (or at the next forward, if no backward
    ever comes).
    """
    _remove_stale_hooks(unet)
    knob = [t for layer in plan.fidelity_layers.values() for t in (layer.up, layer.down)]
    residuals = [r for r in (*plan.value_residuals.values(), *knob) if r.requires_grad]
    if not (torch.is_grad_enabled() and residuals and getattr(unet, "is_gradient_checkpointing", False)):
        with infusion_hooks(unet, plan):
            yield
        return
    stack = contextlib.ExitStack()
    stack.enter_context(infusion_hooks(unet, plan))
    unet.__dict__["_infusion_pending_hooks"] = stack
    try:
        yield
    except BaseException:
        unet.__dict__.pop("_infusion_pending_hooks", None)
        stack.__exit__(*sys.exc_info())  # the hooks see the error: no check that they ran
        raise
    torch.autograd.graph.register_multi_grad_hook(residuals, lambda grads: _remove_stale_hooks(unet), mode="all")


def _remove_stale_hooks(unet: torch.nn.Module) -> None:
    stack = unet.__dict__.pop("_infusion_pending_hooks", None)
    if stack is not None:
        stack.close()


Placement = Sequence[tuple[str, float, Sequence[int]]]  # (concept name, strength, token positions)


def dual_stream_noise_pred(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    placements: Sequence[Placement],
    residuals: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    replace_queries: bool = True,
    batched: bool = True,
    fidelity: Mapping[str, FidelityConfig] | None = None,
    **unet_kwargs: object,
) -> torch.Tensor:
    """The customized model's noise prediction ``ε_θ'`` for each sample (eq. 8).

    Args:
        unet: The frozen base UNet.
        latents: Noisy latents ``z_t`` (batch, channels, height, width).
        timesteps: (batch,) or scalar timesteps.
        encoder_hidden_states: Text encodings of the captions (batch, tokens, dim).
        placements: Per sample, the concepts it receives; a sample with none is predicted by F alone (exactly the
            base model's prediction, which is what makes concept-agnostic overfitting zero).
        residuals: Concept name -> layer path -> Δ (plus the fidelity knob's ``U``, ``V`` under their file names,
            ``fidelity.split_tensors``); may require grad (training).
        replace_queries: False gives the own-query ablation (the authors' public code).
        batched: True runs F and C in one UNet call on ``[F | C]``. False runs F first without gradient, recording
            its queries, then C alone: the same numbers, and cheaper when C needs gradients (training), since
            autograd then neither stores nor back-propagates the F half.
        fidelity: Concept name -> the options of its fidelity knob (``fidelity.py``); the knob runs at strength
            ``φ = 1`` here (the training step's). ``None``: no knob, the paper's method.
        unet_kwargs: Passed to the UNet (e.g. ``added_cond_kwargs``).

    Returns:
        (batch, channels, height, width): the C prediction where a sample has concepts, else the F prediction.
    """
    n_f = latents.shape[0]
    f_rows = [row for row, placed in enumerate(placements) if placed]
    if not f_rows:
        return unet(latents, timesteps, encoder_hidden_states, return_dict=False, **unet_kwargs)[0]
    entries = [
        ResidualEntry(j, name, strength, tuple(positions))
        for j, row in enumerate(f_rows)
        for name, strength, positions in placements[row]
    ]
    index = torch.tensor(f_rows, device=latents.device)
    knob = dict(fidelity=fidelity, fidelity_strengths={name: 1.0 for name in fidelity or {}})
    per_row = torch.is_tensor(timesteps) and timesteps.ndim == 1
    if not replace_queries:  # own queries: no F stream at all, one call with the residuals on the placed rows
        plan = build_plan(
            residuals, [ResidualEntry(f_rows[e.c_index], e.concept, e.strength, e.positions) for e in entries],
            f_rows=list(range(n_f)), n_f=0, device=latents.device, dtype=encoder_hidden_states.dtype,
            replace_queries=False, **knob,
        )  # fmt: skip
        with _hooks_through_backward(unet, plan):
            return unet(latents, timesteps, encoder_hidden_states, return_dict=False, **unet_kwargs)[0]
    if not batched:
        with torch.no_grad(), capture_queries(unet) as queries:
            f_pred = unet(latents, timesteps, encoder_hidden_states, return_dict=False, **unet_kwargs)[0]
        plan = build_plan(
            residuals, entries, f_rows=f_rows, n_f=0, device=latents.device, dtype=encoder_hidden_states.dtype,
            replace_queries=replace_queries, captured_queries=queries, **knob,
        )  # fmt: skip
        pick = lambda x: x.index_select(0, index)  # noqa: E731
        with _hooks_through_backward(unet, plan):
            c_pred = unet(pick(latents), pick(timesteps) if per_row else timesteps, pick(encoder_hidden_states),
                          return_dict=False, **unet_kwargs)[0]  # fmt: skip
        return f_pred.index_copy(0, index, c_pred)
    expand = lambda x: torch.cat([x, x.index_select(0, index)])  # noqa: E731
    plan = build_plan(
        residuals, entries, f_rows=f_rows, n_f=n_f, device=latents.device, dtype=encoder_hidden_states.dtype,
        replace_queries=replace_queries, **knob,
    )  # fmt: skip
    with _hooks_through_backward(unet, plan):
        pred = unet(expand(latents), expand(timesteps) if per_row else timesteps, expand(encoder_hidden_states),
                    return_dict=False, **unet_kwargs)[0]  # fmt: skip
    return pred[:n_f].index_copy(0, index, pred[n_f:])
