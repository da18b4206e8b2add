"""A naive, slow reference of Infusion sampling (prompt-to-prompt style), for tests and benchmarks only.

The F stream runs alone and stores the softmax attention maps of every cross-attention layer; the C stream then
runs alone and multiplies those stored maps with its values ``V̄ = V + s·Δ`` (eq. 7), in float32 (or
float64 for a float64 pipeline). Each stream
has its own scheduler. Nothing here is shared with the fused implementation except the UNet weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention


class _MapAttnProcessor:
    """Plain cross-attention that records (mode "record") or replays (mode "replay") the softmax maps."""

    def __init__(self, name: str, store: dict, residuals: Sequence[tuple[torch.Tensor, Sequence[int]]]):
        self.name, self.store, self.residuals, self.mode = name, store, residuals, "record"

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        residual = hidden_states
        exact = torch.promote_types(hidden_states.dtype, torch.float32)  # float32, or float64 for tight tests
        q = attn.to_q(hidden_states).to(exact)  # (rows, pixels, inner)
        k = attn.to_k(encoder_hidden_states).to(exact)  # (rows, tokens, inner)
        v = attn.to_v(encoder_hidden_states).to(exact)
        rows, heads = q.shape[0], attn.heads
        split = lambda x: x.reshape(rows, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731 (rows, heads, n, d)
        q, k, v = split(q), split(k), split(v)
        cond = slice(rows // 2, rows)  # [uncond | cond]
        maps = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (rows, heads, pixels, tokens)
        if self.mode == "record":
            self.store[self.name] = maps[cond].clone()
        else:
            if self.mode == "replay":
                maps[cond] = self.store[self.name]  # the F stream's maps (else: own maps, the ablation)
            v_bar = v.transpose(1, 2).reshape(rows, v.shape[2], -1).clone()  # (rows, tokens, value_dim)
            for delta, positions in self.residuals:
                for position in positions:
                    v_bar[cond, position] += delta.to(exact)
            v = split(v_bar)
        out = (maps @ v).transpose(1, 2).reshape(rows, q.shape[2], -1).to(residual.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@torch.no_grad()
def naive_infusion_latents(
    pipe: DiffusionPipeline,
    prompt: str,
    concepts: Sequence[tuple[dict[str, torch.Tensor], float, Sequence[int]]],
    *,
    latents: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    own_queries: bool = False,
    callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents ``(z_F, z_C)`` of one prompt, sampled naively with classifier-free guidance.

    Args:
        pipe: A Stable Diffusion or SDXL pipeline (UNet, text encoders, scheduler; processors restored).
        prompt: The prompt.
        concepts: ``(residuals by layer, strength, token positions)`` for each concept in the prompt.
        latents: Initial noise (1, channels, height, width), before ``init_noise_sigma`` scaling.
        num_inference_steps: Number of denoising steps.
        guidance_scale: Classifier-free guidance scale (> 1).
        own_queries: The ablation: C keeps its own attention maps (only ``V̄`` changes).
        callback: ``callback(step, z_C) -> z_C'`` after each step, as ``callback_on_step_end`` acts on a returned
            image; F takes the same change, ``z_F + (z_C' − z_C)`` (the rule of ``callbacks.py``).
    """
    unet = pipe.unet
    device = latents.device
    added = None
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: pooled embeddings and size conditioning
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt, None, device, 1, True)
        side = latents.shape[-1] * pipe.vae_scale_factor
        projection = pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids((side, side), (0, 0), (side, side), cond.dtype, projection)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": torch.cat([ids, ids]).to(device)}
    else:
        cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
    text = torch.cat([uncond, cond])
    original = dict(unet.attn_processors)
    store: dict = {}
    processors = {}
    for name in original:
        layer = name.removesuffix(".processor")
        if layer.endswith("attn2"):
            residuals = [(res[layer].to(device) * strength, pos) for res, strength, pos in concepts]
            processors[name] = _MapAttnProcessor(layer, store, residuals)
        else:
            processors[name] = original[name]
    naive = [p for p in processors.values() if isinstance(p, _MapAttnProcessor)]
    schedulers = [copy.deepcopy(pipe.scheduler) for _ in range(2)]
    for scheduler in schedulers:
        scheduler.set_timesteps(num_inference_steps, device=device)
    z = [latents * schedulers[0].init_noise_sigma, latents * schedulers[1].init_noise_sigma]
    unet.set_attn_processor(dict(processors))
    try:
        for step, t in enumerate(schedulers[0].timesteps):
            for stream, mode in enumerate(
                ("record", "own" if own_queries else "replay")
            ):  # F first (stores maps), then C (uses them)
                for processor in naive:
                    processor.mode = mode
                x = schedulers[stream].scale_model_input(torch.cat([z[stream]] * 2), t)
                eps_u, eps_c = unet(x, t, text, added_cond_kwargs=added, return_dict=False)[0].chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
                z[stream] = schedulers[stream].step(eps, t, z[stream], return_dict=False)[0]
            if callback is not None:
                edited = callback(step, z[1].clone())
                z = [z[0] + (edited - z[1]), edited]
    finally:
        unet.set_attn_processor(original)
    return z[0], z[1]
