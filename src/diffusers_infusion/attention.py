"""The C stream's cross-attention: attend with the F stream's query over values with the concept residuals.

Infusion never replaces attention processors. While an Infusion call runs, two forward hooks sit on each
cross-attention layer (``attn2``) of the UNet:

* on ``attn2.to_q``: the query rows of the C stream's conditional samples are overwritten with the query rows of
  their F stream samples, so whatever processor the layer has computes ``softmax(Q_F K^T / sqrt(d)) V̄``
  (METHOD.md, "The C stream's cross-attention, exactly"; with diffusers' default ``AttnProcessor2_0`` that is one
  fused SDPA call and no attention map is ever materialized);
* on ``attn2.to_v``: ``s · Δ_i`` is added to the value rows of the class-word tokens of those samples (eq. 7, 9);
  with fused projections (``fuse_qkv_projections()``) the same hook sits on the value half of ``attn2.to_kv``;
* for the opt-in fidelity knob only (``fidelity.py``, equation F2): ``attn2.to_k`` keeps the keys, a forward
  pre-hook on ``attn2.to_out[0]`` adds ``s·φ·g(t)·m_obj(p)·U Vᵀ q_F(p)`` to the class word's rows of the attention
  output, and a forward pre-hook on the UNet's ``time_proj`` reads each row's timestep (for the gate ``g``). Without
  a knob in the call these hooks return at once: the paper's method, bit for bit.

The hooks read the active plan from one ``_HookState`` per UNet. On an eager UNet they are removed when the call ends,
so a ``StableDiffusionPipeline`` sharing the same UNet stays plain, LoRA (peft wraps ``to_q``/``to_v``; the hooks sit
on the wrapper) and IP-Adapter processors keep working, and unloading other adapters cannot lose Infusion state.
Self-attention (``attn1``) is never touched.

On a compiled UNet (``torch.compile(unet)``, ``unet.compile()`` or compiled blocks) the hooks stay installed, idle
(plan ``None``: they change nothing) between Infusion calls. Dynamo does not guard on module hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards`` is True by default): hooks added or removed after a trace are
silently ignored or kept by the compiled code. Hooks that are always there and branch on the plan make every trace
contain them; changing concepts, strengths or token positions then only changes tensors the hooks read, which
recompiles nothing (docs/performance.md). A call whose hooks never ran (a UNet traced before Infusion installed its
hooks, or a processor that bypasses ``to_q``/``to_v``) stops with an error instead of returning base images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch.utils.hooks import RemovableHandle

from .fidelity import FidelityLayer, fidelity_term
from .residuals import InfusionPlan


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """The cross-attention modules of a UNet, keyed by their diffusers module path (e.g. ``...attn2``)."""
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet keeps its module paths on the original
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }


def value_size(attn: Attention) -> int:
    """Length of a layer's value vectors: the output size of ``attn.to_v`` (seen through a peft wrapper)."""
    to_v = attn.to_v
    return getattr(to_v, "out_features", None) or to_v.base_layer.out_features


def query_size(attn: Attention) -> int:
    """Length of a layer's query vectors: the output size of ``attn.to_q`` (seen through a peft wrapper)."""
    to_q = attn.to_q
    return getattr(to_q, "out_features", None) or to_q.base_layer.out_features


def layer_sizes(unet: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer path: (value size, query size)}`` of every cross-attention layer (the fidelity knob's shapes)."""
    return {name: (value_size(attn), query_size(attn)) for name, attn in cross_attention_layers(unet).items()}


def _half_offset(plan: InfusionPlan, n_rows: int) -> int:
    """Row offset of the conditional half: ``[uncond | cond]`` under classifier-free guidance, else 0."""
    if n_rows == 2 * plan.rows_per_half:
        return plan.rows_per_half
    if n_rows == plan.rows_per_half:
        return 0
    raise RuntimeError(
        f"An Infusion call expected the UNet batch to have {plan.rows_per_half} or {2 * plan.rows_per_half} rows, "
        f"got {n_rows}. Something between the pipeline and the UNet changed the batch; call the UNet only "
        "through the Infusion pipeline while concepts are active."
    )


@dataclass
class _LayerSlot:
    """The active plan's tensors for one layer, read by that layer's hooks.

    Per-layer data lives in tensors reached through this slot, never in constants of the hook (such as the layer's
    name), so that dynamo compiles one graph for all blocks of the same shape (regional compilation).
    """

    residuals: torch.Tensor | None = None  # (entries, value_dim), or None: no residual in this layer
    captured_query: torch.Tensor | None = None  # (rows, pixels, inner_dim): F's query from an earlier UNet call
    fidelity: FidelityLayer | None = None  # the knob's tensors in this layer, or None: no knob here
    query: torch.Tensor | None = None  # with a knob: this call's query (C rows hold F's), until to_out uses it
    key: torch.Tensor | None = None  # with a knob: this call's keys
    value_obj: torch.Tensor | None = None  # with a knob: (entries, value_dim) the class word's value before Δ
    heads: int = 1  # the layer's attention heads, scale and qk norms (the same for blocks of the same shape)
    scale: float = 1.0
    norm_q: torch.nn.Module | None = None
    norm_k: torch.nn.Module | None = None


@dataclass
class _HookState:
    """What the Infusion hooks of one UNet read: the active plan (``None``: idle, the hooks change nothing)."""

    plan: InfusionPlan | None = None
    fired: bool = False  # set by the hooks when they act on a plan (a constant store: no dynamo guard on it)
    fidelity_fired: bool = False  # set by the to_out hook when it adds the fidelity knob
    timesteps: torch.Tensor | None = None  # with a knob: (rows,) timesteps of the running UNet call
    depth: int = 0  # open ``infusion_hooks`` blocks
    layers: dict[str, _LayerSlot] = field(default_factory=dict)
    handles: dict[tuple[str, str], tuple[torch.nn.Module, RemovableHandle]] = field(default_factory=dict)

    def activate(self, plan: InfusionPlan | None) -> None:
        """Point the hooks at ``plan`` (``None``: idle)."""
        self.plan, self.timesteps = plan, None
        for name, slot in self.layers.items():
            slot.residuals = None if plan is None else plan.value_residuals.get(name)
            captured = None if plan is None else plan.captured_queries
            slot.captured_query = None if captured is None else captured.get(name)
            slot.fidelity = None if plan is None else plan.fidelity_layers.get(name)
            slot.query = slot.key = slot.value_obj = None


def _hook_state(unet: torch.nn.Module) -> _HookState:
    unet = getattr(unet, "_orig_mod", unet)
    if "_infusion_hook_state" not in unet.__dict__:
        unet.__dict__["_infusion_hook_state"] = _HookState()
    return unet.__dict__["_infusion_hook_state"]


def is_compiled(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` (or any of its blocks) runs through ``torch.compile``."""
    if hasattr(unet, "_orig_mod"):
        return True
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in unet.modules())


def _query_hook(state: _HookState, slot: _LayerSlot):
    def hook(module: torch.nn.Module, args: tuple, query: torch.Tensor) -> torch.Tensor | None:
        # query: (rows, pixels, inner_dim); C rows take the F rows' queries, i.e. the F stream's attention maps.
        plan = state.plan
        if plan is None:
            return None
        if slot.fidelity is not None:
            slot.query = query  # the knob reads the C rows' query after they took F's (below, in place)
        if not plan.replace_queries:
            return None
        state.fired = True
        offset = _half_offset(plan, query.shape[0])
        if slot.captured_query is not None:  # F ran in an earlier UNet call (training, or sequential streams)
            captured = slot.captured_query  # (F rows, pixels, inner_dim): the conditional half's only, under guidance
            source = captured.index_select(0, plan.f_rows).to(query.dtype)
        else:
            source = query.index_select(0, plan.f_rows + offset)
        return query.index_copy_(0, plan.c_rows + offset, source)

    return hook


def _value_hook(state: _HookState, slot: _LayerSlot):
    def hook(module: torch.nn.Module, args: tuple, value: torch.Tensor) -> torch.Tensor | None:
        # value: (rows, tokens, value_dim); residuals land on (row, token) pairs of C rows only.
        plan, residuals = state.plan, slot.residuals  # residuals: (entries, value_dim)
        if plan is None or residuals is None:
            return None
        state.fired = True
        if residuals.numel() == 0:
            return value
        offset = _half_offset(plan, value.shape[0])
        index = (plan.value_rows + offset, plan.value_positions)
        if slot.fidelity is not None:
            slot.value_obj = value[index].detach()  # v_obj before Δ: the knob's norm bound is relative to it
        return value.index_put_(index, residuals.to(value.dtype), accumulate=True)

    return hook


def _key_hook(state: _HookState, slot: _LayerSlot):
    def hook(module: torch.nn.Module, args: tuple, key: torch.Tensor) -> None:
        if state.plan is not None and slot.fidelity is not None:
            slot.key = key  # (rows, tokens, inner_dim): the knob computes the class word's map m_obj from it

    return hook


def _output_hook(state: _HookState, slot: _LayerSlot):
    def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
        # forward pre-hook on attn2.to_out[0]; args[0]: (rows, pixels, value_dim), the heads' outputs side by side
        plan, layer = state.plan, slot.fidelity
        if plan is None or layer is None:
            return None
        if slot.query is None or slot.key is None or slot.value_obj is None:
            raise RuntimeError(
                "The fidelity knob found no query, key or value of this cross-attention layer: its processor does "
                "not call attn.to_q, attn.to_k (or attn.to_kv) and attn.to_v. Use diffusers' AttnProcessor2_0 (or "
                "a processor that calls them) with a concept that has the fidelity knob."
            )
        hidden = args[0]
        state.fired = state.fidelity_fired = True
        offset = _half_offset(plan, hidden.shape[0])
        rows = plan.value_rows + offset
        timesteps = state.timesteps
        if timesteps is not None:
            timesteps = timesteps.reshape(-1).expand(hidden.shape[0]).index_select(0, rows)
        term = fidelity_term(
            slot.query.index_select(0, rows), slot.key.index_select(0, rows), slot.value_obj, layer,
            positions=plan.value_positions, timesteps=timesteps, heads=slot.heads, scale=slot.scale,
            norm_q=slot.norm_q, norm_k=slot.norm_k,
        )  # fmt: skip
        slot.query = slot.key = slot.value_obj = None
        return (hidden.index_add(0, rows, term.to(hidden.dtype)), *args[1:])

    return hook


def _timestep_hook(state: _HookState):
    def hook(module: torch.nn.Module, args: tuple) -> None:
        # forward pre-hook on unet.time_proj; args[0]: the call's timesteps, already expanded to (rows,)
        if state.plan is not None and state.plan.fidelity_layers:
            state.timesteps = args[0]

    return hook


def _fused_value_hook(state: _HookState, slot: _LayerSlot):
    value_hook = _value_hook(state, slot)

    def hook(module: torch.nn.Module, args: tuple, kv: torch.Tensor) -> torch.Tensor | None:
        # kv: (rows, tokens, 2 * value_dim) = [key | value]; diffusers' FusedAttnProcessor2_0 splits it in halves.
        half = kv.shape[-1] // 2
        if state.plan is not None and slot.fidelity is not None:
            slot.key = kv.narrow(-1, 0, half)
        changed = value_hook(module, args, kv.narrow(-1, half, kv.shape[-1] - half))  # in place, on kv's storage
        return None if changed is None else kv

    return hook


def _projections(attn: Attention) -> list[tuple[str, torch.nn.Module, Any, bool]]:
    """The modules that carry a layer's query, key, value and output, with the hook each gets (and if a pre-hook).

    ``to_q`` and ``to_v`` always; ``to_kv`` too once ``fuse_qkv_projections()`` has made it: a cross-attention
    layer with fused projections reads its query from ``to_q`` and key and value from ``to_kv``. A processor calls
    ``to_v`` or ``to_kv``, never both, so the residual is added exactly once whichever one runs (diffusers'
    ``unfuse_qkv_projections()`` keeps ``to_kv`` but goes back to processors that call ``to_v``). ``to_k`` and
    ``to_out[0]`` serve the fidelity knob only.
    """
    modules = [("to_q", attn.to_q, _query_hook, False), ("to_v", attn.to_v, _value_hook, False),
               ("to_k", attn.to_k, _key_hook, False), ("to_out", attn.to_out[0], _output_hook, True)]  # fmt: skip
    if isinstance(getattr(attn, "to_kv", None), torch.nn.Module):
        modules.append(("to_kv", attn.to_kv, _fused_value_hook, False))
    return modules


def _seat(state: _HookState, key: tuple[str, str], module: torch.nn.Module, hook, pre: bool) -> None:
    seated = state.handles.get(key)
    if seated is not None and seated[0] is module:
        return
    if seated is not None:
        seated[1].remove()
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    state.handles[key] = (module, handle)


def _seat_hooks(state: _HookState, layers: dict[str, Attention], unet: torch.nn.Module) -> None:
    """Put the hooks on the current projections of every layer (moving them if peft or fusion replaced one)."""
    for name, attn in layers.items():
        slot = state.layers.setdefault(name, _LayerSlot())
        slot.heads, slot.scale, slot.norm_q, slot.norm_k = attn.heads, attn.scale, attn.norm_q, attn.norm_k
        for kind, module, make, pre in _projections(attn):
            _seat(state, (name, kind), module, make(state, slot), pre)
    time_proj = getattr(getattr(unet, "_orig_mod", unet), "time_proj", None)
    if isinstance(time_proj, torch.nn.Module):
        _seat(state, ("", "time_proj"), time_proj, _timestep_hook(state), True)


def _remove_hooks(state: _HookState) -> None:
    for _, handle in state.handles.values():
        handle.remove()
    state.handles.clear()


def keep_hooks_if_compiled(unet: torch.nn.Module | None) -> None:
    """On a compiled UNet, install the idle hooks now, so that its first trace already contains them."""
    if isinstance(unet, torch.nn.Module) and is_compiled(unet):
        _seat_hooks(_hook_state(unet), cross_attention_layers(unet), unet)


@contextlib.contextmanager
def infusion_hooks(unet: torch.nn.Module, plan: InfusionPlan | None) -> Iterator[None]:
    """Activate ``plan`` on ``unet`` for the duration of the ``with`` block.

    On an eager UNet the hooks are installed for the block and always removed; ``plan=None`` then does nothing. On a
    compiled UNet they stay installed and idle after the block (``plan=None`` only makes sure they are there).

    Raises:
        RuntimeError: The block ran the UNet with ``plan`` but no hook ever acted.
    """
    compiled = is_compiled(unet)
    if plan is None and not compiled:
        yield
        return
    layers = cross_attention_layers(unet)
    time_proj = getattr(getattr(unet, "_orig_mod", unet), "time_proj", None)
    if plan is not None and plan.fidelity_gated and not isinstance(time_proj, torch.nn.Module):
        raise RuntimeError(
            "A concept's fidelity knob has a timestep gate (max_timestep), but this UNet has no `time_proj` to read "
            "the timesteps from. Load the concept without the gate, or use a diffusers UNet2DConditionModel."
        )
    state = _hook_state(unet)
    previous, state.fired, state.fidelity_fired = state.plan, False, False
    state.depth += 1
    try:
        _seat_hooks(state, layers, unet)
        state.activate(plan)
        yield
        if plan is not None and plan.fidelity_layers and state.fired and not state.fidelity_fired:
            raise RuntimeError(
                "A concept of this call has the fidelity knob, but the hook on attn2.to_out[0] never ran, so the "
                "knob was left out. The attention processors do not call `attn.to_out[0]`; use diffusers' "
                "AttnProcessor2_0, or load the concept without the knob."
            )
        if plan is not None and not state.fired:
            raise RuntimeError(
                "The Infusion hooks on attn2.to_q/attn2.to_v never ran during this call, so the C stream would be "
                "the base model. Either the attention processors do not call `attn.to_q`/`attn.to_v`, or the UNet "
                "was compiled and traced before Infusion installed its hooks (dynamo ignores hooks added after a "
                "trace). Fix: call `torch.compiler.reset()` and run the Infusion pipeline again, or assign the "
                "compiled UNet to the Infusion pipeline (`pipe.unet = torch.compile(pipe.unet)`) before running it."
            )
    finally:
        state.activate(previous)
        state.depth -= 1
        if state.depth == 0 and not compiled:
            _remove_hooks(state)


@contextlib.contextmanager
def capture_queries(unet: torch.nn.Module, *, conditional_half: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the query (``to_q`` output) of every cross-attention layer during the ``with`` block.

    Yields a dict that fills with ``{layer path: (rows, pixels, inner_dim)}`` as the UNet runs; a plan with
    ``captured_queries`` set to it makes a later C-stream call attend with these queries. With
    ``conditional_half`` (a ``[uncond | cond]`` batch under guidance) only the second half's rows are kept: the
    unconditional branch attends with its own queries, so the C call reads only the conditional ones.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(name: str):
        def hook(module, args, query):
            # a copy of the half, not a view: a view would keep the whole ``to_q`` output alive
            captured[name] = query[query.shape[0] // 2 :].detach().clone() if conditional_half else query.detach()

        return hook

    try:
        for name, attn in cross_attention_layers(unet).items():
            handles.append(attn.to_q.register_forward_hook(recorder(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _take_rows(value: Any, index: torch.Tensor, n_rows: int) -> Any:
    """``value`` with every tensor whose first dimension is the batch (``n_rows``) reduced to the rows ``index``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device)) if value.ndim and value.shape[0] == n_rows else value
    if isinstance(value, dict):
        return {k: _take_rows(v, index, n_rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take_rows(v, index, n_rows) for v in value)
    return value


@contextlib.contextmanager
def sequential_streams(unet: torch.nn.Module, plan: InfusionPlan, *, n_f: int) -> Iterator[None]:
    """Run every UNet call on the ``[F | C]`` batch as two calls: F alone, recording its queries, then C with them.

    The same numbers as one batched call, with the activation memory of the larger of the two halves instead of
    their sum. ``plan`` lays out the C rows alone (``n_f=0``) and must carry a ``captured_queries`` dict, which
    each F call refills. Use inside ``infusion_hooks(unet, plan)``; the pipeline refuses it on a compiled UNet.
    """
    state, captured = _hook_state(unet), plan.captured_queries
    had_own_forward, forward = "forward" in unet.__dict__, unet.forward  # accelerate's offload wrapper, if any

    def split_forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # sample: (rows, C, h, w) with rows = [F | C] or [F^u | C^u | F^c | C^c] under guidance
        rows, half = sample.shape[0], n_f + plan.rows_per_half
        halves = [0, half] if rows == 2 * half else [0]
        f_index = torch.tensor([h + i for h in halves for i in range(n_f)], device=sample.device)
        c_index = torch.tensor([h + n_f + i for h in halves for i in range(plan.rows_per_half)], device=sample.device)
        captured.clear()  # drop the previous step's queries before recording this step's
        state.activate(None)  # (and the slots' references to them)
        with capture_queries(unet, conditional_half=len(halves) == 2) as queries:
            f_out = forward(*_take_rows((sample, *args), f_index, rows), **_take_rows(kwargs, f_index, rows))
        captured.update(queries)
        state.activate(plan)
        c_out = forward(*_take_rows((sample, *args), c_index, rows), **_take_rows(kwargs, c_index, rows))
        f_pred, c_pred = (out[0] if isinstance(out, tuple) else out.sample for out in (f_out, c_out))
        pred = (
            f_pred.new_empty((rows, *f_pred.shape[1:])).index_copy_(0, f_index, f_pred).index_copy_(0, c_index, c_pred)
        )
        return (pred,) if isinstance(f_out, tuple) else type(f_out)(sample=pred)

    unet.forward = split_forward
    try:
        yield
    finally:
        if had_own_forward:
            unet.forward = forward
        else:
            del unet.forward
