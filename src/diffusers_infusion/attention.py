"""The C stream's cross-attention: attend with the F stream's query over values with the concept residuals.

Infusion never replaces attention processors. While an Infusion call runs, two forward hooks sit on each
cross-attention layer (``attn2``) of the UNet:

* on ``attn2.to_q``: the query rows of the C stream's conditional samples are overwritten with the query rows of
  their F stream samples, so whatever processor the layer has computes ``softmax(Q_F K^T / sqrt(d)) V̄``
  (METHOD.md, "The C stream's cross-attention, exactly"; with diffusers' default ``AttnProcessor2_0`` that is one
  fused SDPA call and no attention map is ever materialized);
* on ``attn2.to_v``: ``s · Δ_i`` is added to the value rows of the class-word tokens of those samples (eq. 7, 9).

The hooks are removed when the call ends, so a ``StableDiffusionPipeline`` sharing the same UNet stays plain, LoRA
(peft wraps ``to_q``/``to_v``; the hooks sit on the wrapper) and IP-Adapter processors keep working, and unloading
other adapters cannot lose Infusion state. Self-attention (``attn1``) is never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention

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


def _query_hook(plan: InfusionPlan, layer: str):
    def hook(module: torch.nn.Module, args: tuple, query: torch.Tensor) -> torch.Tensor:
        # query: (rows, pixels, inner_dim); C rows take the F rows' queries, i.e. the F stream's attention maps.
        offset = _half_offset(plan, query.shape[0])
        if plan.captured_queries is not None:  # F ran in an earlier call (training without gradient through F)
            source = plan.captured_queries[layer].index_select(0, plan.f_rows).to(query.dtype)
        else:
            source = query.index_select(0, plan.f_rows + offset)
        return query.index_copy_(0, plan.c_rows + offset, source)

    return hook


def _value_hook(plan: InfusionPlan, layer: str):
    def hook(module: torch.nn.Module, args: tuple, value: torch.Tensor) -> torch.Tensor:
        # value: (rows, tokens, value_dim); residuals land on (row, token) pairs of C rows only.
        residuals = plan.value_residuals[layer]  # (entries, value_dim)
        if residuals.numel() == 0:
            return value
        offset = _half_offset(plan, value.shape[0])
        index = (plan.value_rows + offset, plan.value_positions)
        return value.index_put_(index, residuals.to(value.dtype), accumulate=True)

    return hook


@contextlib.contextmanager
def infusion_hooks(unet: torch.nn.Module, plan: InfusionPlan) -> Iterator[None]:
    """Activate ``plan`` on ``unet`` for the duration of the ``with`` block (hooks are always removed)."""
    layers = cross_attention_layers(unet)
    handles = []
    try:
        for name, attn in layers.items():
            if getattr(attn, "fused_projections", False) and "Fused" in type(attn.processor).__name__:
                raise RuntimeError(
                    f"Layer '{name}' has fused QKV projections, which Infusion cannot hook. "
                    "Call `pipe.unfuse_qkv_projections()` before using Infusion concepts."
                )
            if plan.replace_queries:
                handles.append(attn.to_q.register_forward_hook(_query_hook(plan, name)))
            if name in plan.value_residuals:
                handles.append(attn.to_v.register_forward_hook(_value_hook(plan, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_queries(unet: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the query (``to_q`` output) of every cross-attention layer during the ``with`` block.

    Yields a dict that fills with ``{layer path: (rows, pixels, inner_dim)}`` as the UNet runs; a plan with
    ``captured_queries`` set to it makes a later C-stream call attend with these queries.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(name: str):
        def hook(module, args, query):
            captured[name] = query.detach()

        return hook

    try:
        for name, attn in cross_attention_layers(unet).items():
            handles.append(attn.to_q.register_forward_hook(recorder(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
