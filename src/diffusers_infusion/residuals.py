"""Concepts × prompts × strengths → the per-layer value residuals of one call, laid out for the ``[F | C]`` batch.

The UNet sees, per classifier-free-guidance half, ``rows_per_half`` samples: first the F stream's, then the C
stream's. C row ``c_rows[j]`` takes its attention maps from F row ``f_rows[j]``. A residual entry ``e`` adds
``strength_e · Δ_layer[concept_e]`` to the value of token ``value_positions[e]`` of row ``value_rows[e]``
(eq. 7 for one concept, eq. 9 for several); a concept with the fidelity knob also gets its ``U``, ``V`` laid out per
entry (``fidelity.py``). Everything here is built once per call, never per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .fidelity import FidelityConfig, FidelityLayer, build_fidelity_layers, split_tensors


@dataclass(frozen=True)
class ResidualEntry:
    """One concept placed in one C row: which concept, how strongly, at which token positions."""

    c_index: int  # index into the C stream (0 .. n_c - 1)
    concept: str
    strength: float
    positions: tuple[int, ...]


@dataclass
class InfusionPlan:
    """Everything the attention hooks need for one UNet batch layout (tensors on the UNet's device)."""

    rows_per_half: int  # F rows + C rows
    c_rows: torch.Tensor  # (n_c,) long: rows of the C stream within a half
    f_rows: torch.Tensor  # (n_c,) long: the F row each C row takes its attention maps from
    value_rows: torch.Tensor  # (entries,) long
    value_positions: torch.Tensor  # (entries,) long
    value_residuals: dict[str, torch.Tensor]  # layer path -> (entries, value_dim)
    replace_queries: bool = True  # False: the C stream attends with its own queries (the fast, inexact mode)
    captured_queries: dict[str, torch.Tensor] | None = None  # F's queries from an earlier call, by layer
    fidelity_layers: dict[str, FidelityLayer] = field(default_factory=dict)  # layer path -> the knob; {}: off
    fidelity_gated: bool = False  # some concept's knob has a timestep gate (the hooks then need the timesteps)


def build_plan(
    residuals: Mapping[str, Mapping[str, torch.Tensor]],
    entries: Sequence[ResidualEntry],
    *,
    f_rows: Sequence[int],
    n_f: int,
    device: torch.device | str,
    dtype: torch.dtype,
    replace_queries: bool = True,
    captured_queries: dict[str, torch.Tensor] | None = None,
    fidelity: Mapping[str, FidelityConfig] | None = None,
    fidelity_strengths: Mapping[str, float] | None = None,
) -> InfusionPlan:
    """Lay the residuals of ``entries`` out for a batch of ``n_f`` F rows followed by ``len(f_rows)`` C rows.

    Args:
        residuals: Concept name -> layer path -> Δ (value_dim,), plus the fidelity knob's ``U``, ``V`` under their
            file names (``<layer>.fidelity_up``/``_down``) for a concept that has one. Tensors that require grad
            keep their graph, so the training step builds its plan with this function too.
        entries: The concepts placed in each C row.
        f_rows: For each C row, the F row whose attention maps it uses.
        n_f: Number of F rows.
        device: Device of the UNet.
        dtype: Dtype of the residuals handed to the hooks.
        replace_queries: Whether the C rows attend with the F rows' queries (the exact method).
        captured_queries: F's queries recorded in an earlier UNet call (``attention.capture_queries``); then the
            batch holds only C rows (``n_f=0``) and ``f_rows`` index the recorded rows.
        fidelity: Concept name -> the options of its fidelity knob; concepts not named here (or with rank 0) use
            none of the knob's tensors: the paper's method.
        fidelity_strengths: Concept name -> the knob's strength ``φ`` for this call (default: its
            ``FidelityConfig.strength``). An entry's knob is scaled by ``strength_e · φ``.
    """
    n_c = len(f_rows)
    names = list(dict.fromkeys(e.concept for e in entries))
    concept_index = [names.index(e.concept) for e in entries for _ in e.positions]
    strengths = [e.strength for e in entries for _ in e.positions]
    rows = [n_f + e.c_index for e in entries for _ in e.positions]
    positions = [p for e in entries for p in e.positions]

    def long(values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.long, device=device)

    index = long(concept_index)
    scale = torch.tensor(strengths, dtype=torch.float32, device=device)[:, None]  # (entries, 1)
    split = {name: split_tensors(residuals[name]) for name in names}
    layers = split[names[0]][0].keys() if names else ()
    value_residuals = {}
    for layer in layers:
        stack = torch.stack([split[name][0][layer] for name in names]).to(device)  # (concepts, value_dim)
        value_residuals[layer] = (stack.float()[index] * scale).to(dtype)  # (entries, value_dim)
    configs = {n: c for n, c in (fidelity or {}).items() if n in split and c.enabled and split[n][1]}
    phi = {n: (fidelity_strengths or {}).get(n, c.strength) for n, c in configs.items()}
    fidelity_layers = build_fidelity_layers(
        {n: (c, split[n][1], split[n][2]) for n, c in configs.items()},
        [names[i] for i in concept_index], [s * phi.get(names[i], 0.0) for i, s in zip(concept_index, strengths)],
        device=device, dtype=dtype,
    )  # fmt: skip
    return InfusionPlan(
        rows_per_half=n_f + n_c,
        c_rows=long(range(n_f, n_f + n_c)),
        f_rows=long(f_rows),
        value_rows=long(rows),
        value_positions=long(positions),
        value_residuals=value_residuals,
        replace_queries=replace_queries,
        captured_queries=captured_queries,
        fidelity_layers=fidelity_layers,
        fidelity_gated=any(c.max_timestep is not None for c in configs.values()),
    )
