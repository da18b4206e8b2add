"""The fidelity knob (issue #15): an opt-in, query-conditioned low-rank value residual on the class word.

The paper's Δ_l gives the class word one value per layer: every pixel that attends to the class word receives the
same vector. The knob lets that value depend on the pixel through the F stream's query there (the base model's
queries know the parts of the object; the class word's map does not). In cross-attention layer ``l``, with the
concept's strength ``s``, the class word's value at pixel ``p`` becomes

    v̄_obj(p) = v_obj + s · (Δ_l + φ · g(t) · b(U_l V_lᵀ q_F(p)))                                        (F1)

``U_l`` (value_dim × r) and ``V_l`` (query_dim × r) are learned; ``q_F(p)`` is the F stream's query at ``p`` (the
``to_q`` output, all heads); ``φ`` is the knob's own strength; ``g(t) = [t < max_timestep]`` is the optional timestep
gate (on at low noise only); ``b`` is the optional norm bound ``b(w) = w · min(1, ρ‖v_obj‖ / ‖w‖)`` relative to the
base model's value of the class word. The C stream's output at ``p`` is ``Σ_k m_k(p) v̄_k`` per head (eq. 6, with
F's maps), so (F1) adds to head ``h`` of the attention output (before ``to_out``)

    Δout_h(p) = s · φ · g(t) · m_obj,h(p) · [b(U_l V_lᵀ q_F(p))]_h,
    m_obj,h(p) = softmax_k(q_F,h(p) · k_k,h · scale)[obj]                                            (F2)

It is gated by the class word's own map like Δ itself: prompts without the class word get no C row at all, pixels
that do not attend to it get nothing, and the C stream still attends with F's maps. ``U_l = 0`` at initialization,
so a fresh knob is the exact method; rank 0 (the default) or a concept without the knob's tensors never computes
(F2), which keeps the paper's method bit for bit.

This module holds the knob's options (:class:`FidelityConfig`), its tensors and their names in the concept file
(:class:`ConceptFidelity`), their layout for one call (:func:`build_fidelity_layers`) and (F2) itself
(:func:`fidelity_term`), which a forward pre-hook on ``attn2.to_out[0]`` adds (``attention.py``).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import ConceptMismatchError, FidelityConfigError

UP_SUFFIX = ".fidelity_up"  # file name of U_l: "<layer path>.fidelity_up", shape (value_dim, rank)
DOWN_SUFFIX = ".fidelity_down"  # file name of V_l: "<layer path>.fidelity_down", shape (query_dim, rank)
METADATA_KEYS = ("fidelity_rank", "fidelity_max_timestep", "fidelity_layers", "fidelity_norm_bound",
                 "fidelity_strength")  # fmt: skip
MAX_RANK = 1024
MAX_STRENGTH = 1000.0


def _real(value) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass(frozen=True, kw_only=True)
class FidelityConfig:
    """Options of the fidelity knob (equation F1 of ``diffusers_infusion.fidelity``); the default is off.

    Args:
        rank: ``r``, the rank of ``U_l V_lᵀ``; 0 turns the knob off (the paper's method). Storage per layer is
            ``r × (value_dim + query_dim)`` numbers.
        max_timestep: The timestep gate ``g(t) = [t < max_timestep]``: the knob acts only at low noise, where the
            layout is settled (timesteps count 0 .. 999 for Stable Diffusion). ``None``: every timestep.
        layers: Which cross-attention layers get the knob: ``None`` (all), ``"finest"`` (the layers with the
            smallest value size, i.e. the finest resolution that has cross-attention), or layer-path prefixes such
            as ``("up_blocks.3",)``.
        norm_bound: ``ρ`` of the bound ``‖b(w)‖ ≤ ρ‖v_obj‖`` relative to the base model's value of the class word
            in that layer. ``None``: unbounded.
        strength: The knob's default strength ``φ`` at inference; a call can override it per concept
            (``infusion_fidelity=``). Training always uses 1.0.
    """

    rank: int = 0
    max_timestep: float | None = None
    layers: str | tuple[str, ...] | None = None
    norm_bound: float | None = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank <= MAX_RANK:
            raise FidelityConfigError(
                f"rank={rank!r} must be a whole number from 0 to {MAX_RANK}: 0 turns the knob off (the paper's "
                "method), 4 is a start."
            )
        object.__setattr__(self, "rank", int(rank))
        for name, hint in (
            ("max_timestep", "the knob acts for t < max_timestep, e.g. 400 of 1000), or None for every timestep."),
            ("norm_bound", "ρ in ‖knob‖ ≤ ρ‖v_obj‖, e.g. 0.5), or None for no bound."),
        ):
            given = getattr(self, name)
            if given is None:
                continue
            value = _real(given)
            if value is None or not math.isfinite(value) or value <= 0:
                raise FidelityConfigError(f"{name}={given!r} must be a positive number ({hint}")
            object.__setattr__(self, name, value)
        strength = _real(self.strength)
        if strength is None or not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
            raise FidelityConfigError(
                f"strength={self.strength!r} must be a finite number of magnitude at most {MAX_STRENGTH:g} "
                "(1.0 = as trained, 0.0 = the knob off)."
            )
        object.__setattr__(self, "strength", strength)
        object.__setattr__(self, "layers", _check_layers(self.layers))

    @property
    def enabled(self) -> bool:
        """Whether the knob adds anything (rank > 0)."""
        return self.rank > 0

    def select_layers(self, sizes: Mapping[str, tuple[int, int]]) -> list[str]:
        """The layer paths of ``sizes`` (``{layer: (value_dim, query_dim)}``) that get the knob, in their order.

        Raises:
            FidelityConfigError: A prefix of ``layers`` matches no layer.
        """
        if self.layers is None:
            return list(sizes)
        if self.layers == "finest":
            smallest = min(value for value, _ in sizes.values())
            return [name for name, (value, _) in sizes.items() if value == smallest]
        unmatched = [p for p in self.layers if not any(name.startswith(p) for name in sizes)]
        if unmatched:
            raise FidelityConfigError(
                f"layers={list(self.layers)!r}: {unmatched} match no cross-attention layer of this UNet (e.g. "
                f"{next(iter(sizes))!r}). Pass layer-path prefixes such as 'up_blocks.3', or 'finest'."
            )
        return [name for name in sizes if any(name.startswith(p) for p in self.layers)]

    def to_metadata(self) -> dict[str, str]:
        """The options as the concept file's string metadata (``fidelity_*`` keys)."""
        return {
            "fidelity_rank": str(self.rank),
            "fidelity_max_timestep": "" if self.max_timestep is None else repr(self.max_timestep),
            "fidelity_layers": json.dumps(self.layers),
            "fidelity_norm_bound": "" if self.norm_bound is None else repr(self.norm_bound),
            "fidelity_strength": repr(self.strength),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> FidelityConfig:
        """The options recorded by :meth:`to_metadata` (absent keys take their defaults).

        Raises:
            FidelityConfigError: A recorded value cannot be read back.
        """

        def number(key: str, kind=float):
            text = metadata.get(key, "")
            try:
                return None if text == "" else kind(text)
            except ValueError:
                raise FidelityConfigError(f"metadata {key}={text!r} is not a number.") from None

        try:
            layers = json.loads(metadata.get("fidelity_layers", "null"))
        except ValueError:
            text = metadata["fidelity_layers"]
            raise FidelityConfigError(f"metadata fidelity_layers={text!r} is not JSON.") from None
        strength = number("fidelity_strength")
        return cls(
            rank=number("fidelity_rank", int) or 0,
            max_timestep=number("fidelity_max_timestep"),
            layers=tuple(layers) if isinstance(layers, list) else layers,
            norm_bound=number("fidelity_norm_bound"),
            strength=1.0 if strength is None else strength,
        )


def _check_layers(given) -> str | tuple[str, ...] | None:
    if given is None or given == "finest":
        return given
    layers = (given,) if isinstance(given, str) else given
    if isinstance(layers, Sequence) and layers and all(isinstance(p, str) and p for p in layers):
        return tuple(layers)
    layers = given
    raise FidelityConfigError(
        f"layers={layers!r} must be None (every cross-attention layer), 'finest' (the finest resolution), or a "
        "non-empty list of layer-path prefixes such as ['up_blocks.3', 'down_blocks.0']."
    )


# ------------------------------------------------------------------------------------------------ the tensors
@dataclass
class ConceptFidelity:
    """A concept's knob: its options and ``U_l``, ``V_l`` for the layers that have it.

    Args:
        config: The options (``config.rank`` is the second dimension of every tensor).
        up: Layer path -> ``U_l`` (value_dim, rank); zero at initialization.
        down: Layer path -> ``V_l`` (query_dim, rank).
    """

    config: FidelityConfig
    up: dict[str, torch.Tensor]
    down: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if not self.config.enabled:
            raise FidelityConfigError("A ConceptFidelity needs rank > 0; a concept without a knob has fidelity=None.")
        if set(self.up) != set(self.down) or not self.up:
            raise ConceptMismatchError(
                f"The knob's U and V must cover the same, non-empty set of layers; U has {sorted(self.up)[:3]}, "
                f"V has {sorted(self.down)[:3]}."
            )
        for kind, tensors in (("U", self.up), ("V", self.down)):
            for layer, tensor in tensors.items():
                ok = isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.ndim == 2
                if not ok or tensor.shape[1] != self.config.rank:
                    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise ConceptMismatchError(
                        f"The knob's {kind} of layer {layer!r} must be a 2-D float tensor with {self.config.rank} "
                        f"columns (the rank), got {shape}."
                    )

    @classmethod
    def init(
        cls,
        sizes: Mapping[str, tuple[int, int]],
        config: FidelityConfig,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ConceptFidelity:
        """A fresh knob for layers ``{layer: (value_dim, query_dim)}``: ``U = 0`` (so it is the exact method) and
        ``V`` uniform in ``±1/sqrt(query_dim)`` (LoRA's initialization of its down projection).
        """
        up, down = {}, {}
        for layer in config.select_layers(sizes):
            value_dim, query_dim = sizes[layer]
            up[layer] = torch.zeros(value_dim, config.rank, dtype=dtype)
            bound = 1.0 / math.sqrt(query_dim)
            down[layer] = (torch.rand(query_dim, config.rank, generator=generator) * 2 - 1).mul_(bound).to(dtype)
        return cls(config, up, down)

    @property
    def num_values(self) -> int:
        """Numbers stored by the knob: ``rank × (value_dim + query_dim)`` per layer."""
        return sum(t.numel() for t in (*self.up.values(), *self.down.values()))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under their file names (``<layer>.fidelity_up``, ``<layer>.fidelity_down``)."""
        return {**{k + UP_SUFFIX: v for k, v in self.up.items()}, **{k + DOWN_SUFFIX: v for k, v in self.down.items()}}

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ConceptFidelity:
        """A copy with new tensors converted to ``dtype`` and/or moved to ``device``."""
        move = lambda d: {k: v.detach().to(device=device, dtype=dtype, copy=True) for k, v in d.items()}  # noqa: E731
        return ConceptFidelity(self.config, move(self.up), move(self.down))

    def check_fits(self, sizes: Mapping[str, tuple[int, int]], *, concept: str) -> None:
        """Raise ``ConceptMismatchError`` unless every knob layer is a layer of ``sizes`` with the right shapes."""
        for layer in self.up:
            if layer not in sizes:
                raise ConceptMismatchError(
                    f"Concept '{concept}': the fidelity knob has layer {layer!r}, which this UNet does not have. "
                    "Load it into a pipeline of the base model it was trained on."
                )
            value_dim, query_dim = sizes[layer]
            if self.up[layer].shape[0] != value_dim or self.down[layer].shape[0] != query_dim:
                raise ConceptMismatchError(
                    f"Concept '{concept}': the fidelity knob of layer {layer!r} has U {tuple(self.up[layer].shape)} "
                    f"and V {tuple(self.down[layer].shape)}; this UNet needs ({value_dim}, r) and ({query_dim}, r). "
                    "Load it into a pipeline of the base model it was trained on."
                )


def split_tensors(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A concept's flat tensors (as in its file) -> ``(Δ by layer, U by layer, V by layer)``."""
    deltas, up, down = {}, {}, {}
    for name, tensor in tensors.items():
        if name.endswith(UP_SUFFIX):
            up[name.removesuffix(UP_SUFFIX)] = tensor
        elif name.endswith(DOWN_SUFFIX):
            down[name.removesuffix(DOWN_SUFFIX)] = tensor
        else:
            deltas[name] = tensor
    return deltas, up, down


# ------------------------------------------------------------------------------------------------ one call
@dataclass
class FidelityLayer:
    """The knob's tensors of one layer for one call, one row per residual entry ``e`` (``InfusionPlan``)."""

    up: torch.Tensor  # (entries, value_dim, R): U of entry e's concept, zero-padded to the largest rank R
    down: torch.Tensor  # (entries, query_dim, R)
    coefficient: torch.Tensor  # (entries,) float32 (float64 for float64 calls): s_e · φ_e
    max_timestep: torch.Tensor  # (entries,): the gate's threshold, +inf for none
    norm_bound: torch.Tensor  # (entries,): ρ, 0 for none


def build_fidelity_layers(
    weights: Mapping[str, tuple[FidelityConfig, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    entry_concepts: Sequence[str],
    entry_coefficients: Sequence[float],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, FidelityLayer]:
    """Lay the knobs of a call's concepts out per layer, one row per entry (``{}`` when no concept has one).

    Args:
        weights: Concept name -> ``(config, U by layer, V by layer)`` for the concepts with an enabled knob.
            Tensors that require grad keep their graph (training).
        entry_concepts: The concept of each residual entry.
        entry_coefficients: ``s_e · φ_e`` of each entry.
        device: Device of the UNet.
        dtype: Dtype of ``U`` and ``V`` handed to the hooks.
    """
    weights = {name: w for name, w in weights.items() if name in entry_concepts and w[0].enabled}
    if not weights:
        return {}
    names = list(dict.fromkeys(entry_concepts))
    index = torch.tensor([names.index(c) for c in entry_concepts], dtype=torch.long, device=device)

    scalars = torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 call (tight tests)

    def per_entry(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=scalars, device=device)[index]

    configs = {name: weights[name][0] if name in weights else None for name in names}
    max_t = per_entry([math.inf if c is None or c.max_timestep is None else c.max_timestep for c in configs.values()])
    bound = per_entry([0.0 if c is None or c.norm_bound is None else c.norm_bound for c in configs.values()])
    coefficient = torch.tensor(list(entry_coefficients), dtype=scalars, device=device)
    rank = max(c.rank for c in configs.values() if c is not None)
    layers = {}
    for layer in dict.fromkeys(layer for _, up, _ in weights.values() for layer in up):
        stacks = []
        for position in (1, 2):  # U, then V
            present = [w[position][layer] for w in weights.values() if layer in w[position]]
            rows = present[0].shape[0]
            per_concept = []
            for name in names:
                tensor = weights[name][position].get(layer) if name in weights else None
                if tensor is None:
                    tensor = torch.zeros(rows, rank, device=device)
                tensor = torch.nn.functional.pad(tensor.to(device), (0, rank - tensor.shape[1]))
                per_concept.append(tensor.to(dtype))
            stacks.append(torch.stack(per_concept)[index])
        layers[layer] = FidelityLayer(stacks[0], stacks[1], coefficient, max_t, bound)
    return layers


def fidelity_term(
    query: torch.Tensor,
    key: torch.Tensor,
    value_obj: torch.Tensor,
    layer: FidelityLayer,
    *,
    positions: torch.Tensor,
    timesteps: torch.Tensor | None,
    heads: int,
    scale: float,
    norm_q: torch.nn.Module | None = None,
    norm_k: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Equation F2 for every entry: what the knob adds to the attention output of the entry's row.

    Args:
        query: (entries, pixels, query_dim): the F stream's query ``q_F`` of each entry's C row.
        key: (entries, tokens, query_dim): the keys of that row.
        value_obj: (entries, value_dim): the base model's value of the entry's class-word token (``v_obj``).
        layer: The knob's tensors of this layer for the call.
        positions: (entries,) long: the class word's token position of each entry.
        timesteps: (entries,) timestep of each entry's row, or ``None`` when the UNet reported none.
        heads: Number of attention heads.
        scale: The attention scale (``attn.scale``, ``1/sqrt(head_dim)``).
        norm_q: The layer's ``attn.norm_q`` (applied per head to the query before the map), if any.
        norm_k: The layer's ``attn.norm_k``, if any.

    Returns:
        (entries, pixels, value_dim), in float32 (float64 for float64 inputs).
    """
    exact = torch.promote_types(query.dtype, torch.float32)
    q, k = query.to(exact), key.to(exact)
    entries, pixels, _ = q.shape
    qh = q.view(entries, pixels, heads, -1).transpose(1, 2)  # (entries, heads, pixels, head_dim)
    kh = k.view(entries, k.shape[1], heads, -1).transpose(1, 2)  # (entries, heads, tokens, head_dim)
    if norm_q is not None:
        qh = norm_q(qh)
    if norm_k is not None:
        kh = norm_k(kh)
    logits = qh @ kh.transpose(-1, -2) * scale  # (entries, heads, pixels, tokens)
    column = logits.gather(-1, positions.view(entries, 1, 1, 1).expand(entries, heads, pixels, 1)).squeeze(-1)
    m_obj = (column - logits.logsumexp(-1)).exp()  # (entries, heads, pixels): softmax(·)[obj]
    w = (q @ layer.down.to(exact)) @ layer.up.to(exact).transpose(1, 2)  # U Vᵀ q_F(p): (entries, pixels, value_dim)
    bounded = layer.norm_bound > 0
    limit = (torch.where(bounded, layer.norm_bound, 1.0) * value_obj.to(exact).norm(dim=-1))[:, None]
    shrink = (limit / w.norm(dim=-1).clamp_min(torch.finfo(exact).tiny)).clamp(max=1.0)  # min(1, ρ‖v‖/‖w‖)
    w = w * torch.where(bounded[:, None], shrink, 1.0)[..., None]
    gate = torch.ones_like(layer.coefficient)
    if timesteps is not None:
        gate = (timesteps < layer.max_timestep).to(layer.coefficient.dtype)  # g(t)
    w = w * (layer.coefficient * gate).to(exact)[:, None, None]
    term = m_obj.transpose(1, 2)[..., None] * w.view(entries, pixels, heads, -1)  # per head h: m_obj,h(p) · w_h(p)
    return term.reshape(entries, pixels, -1)
