"""A naive, slow reference of Infusion sampling (prompt-to-prompt style), for tests and benchmarks only.

The F stream runs alone and stores the softmax attention maps of every cross-attention layer; the C stream then
runs alone and multiplies those stored maps with its values ``V̄ = V + s·Δ`` (eq. 7), in float32 (or
float64 for a float64 pipeline). Each stream
has its own scheduler. Nothing here is shared with the fused implementation except the UNet weights.

A concept with the fidelity knob (``fidelity.py``) is computed here from equation F1 as it reads: every pixel ``p``
of the C stream gets its own value matrix, the class word's row being ``v_obj + s·(Δ + φ·g(t)·b(U Vᵀ q_F(p)))`` with
``q_F`` the F stream's stored query, and the output is ``Σ_k m_k(p) v̄_k(p)`` with F's stored maps: no factoring
into the map column ``m_obj`` that the fused hook uses (F2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention


class _MapAttnProcessor:
    """Plain cross-attention that records (mode "record") or replays (mode "replay") the softmax maps."""

    def __init__(self, name: str, store: dict, residuals: Sequence[tuple[torch.Tensor, Sequence[int]]], knobs=()):
        self.name, self.store, self.residuals, self.mode = name, store, residuals, "record"
        self.knobs = knobs  # (U, V, config, s·φ, positions) of the concepts with a knob in this layer
        self.timestep: float | None = None

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
        flat_q = q.transpose(1, 2).reshape(rows, q.shape[2], -1)  # (rows, pixels, inner)
        if self.mode == "record":
            self.store[self.name] = maps[cond].clone()
            self.store[self.name + ":query"] = flat_q[cond].clone()
        else:
            q_f = flat_q[cond]
            if self.mode == "replay":
                maps[cond] = self.store[self.name]  # the F stream's maps (else: own maps, the ablation)
                q_f = self.store[self.name + ":query"]
            v_base = v.transpose(1, 2).reshape(rows, v.shape[2], -1)  # (rows, tokens, value_dim)
            v_bar = v_base.clone()
            for delta, positions in self.residuals:
                for position in positions:
                    v_bar[cond, position] += delta.to(exact)
            v = split(v_bar)
        out = maps @ v  # (rows, heads, pixels, head_dim)
        if self.mode != "record" and self.knobs:
            out[cond] = self._with_knobs(maps[cond], v_bar[cond], v_base[cond], q_f, heads)
        out = out.transpose(1, 2).reshape(rows, q.shape[2], -1).to(residual.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _with_knobs(self, maps, v_bar, v_base, q_f, heads: int) -> torch.Tensor:
        """F1 per pixel: ``out(p) = Σ_k m_k(p) v̄_k(p)`` with the knob's pixel-dependent class-word values."""
        n, pixels = q_f.shape[:2]
        v_pixel = v_bar[:, None].expand(n, pixels, *v_bar.shape[1:]).clone()  # (rows, pixels, tokens, value_dim)
        for up, down, config, coefficient, positions in self.knobs:
            if config.max_timestep is not None and not self.timestep < config.max_timestep:
                continue  # g(t) = 0: high noise
            w = q_f @ down.to(q_f) @ up.to(q_f).T  # U Vᵀ q_F(p): (rows, pixels, value_dim)
            for position in positions:
                bounded = w
                if config.norm_bound is not None:
                    limit = config.norm_bound * v_base[:, position].norm(dim=-1)[:, None]  # ρ‖v_obj‖
                    bounded = w * torch.minimum(torch.ones_like(limit), limit / w.norm(dim=-1))[..., None]
                v_pixel[:, :, position] += coefficient * bounded
        v_pixel = v_pixel.reshape(n, pixels, v_bar.shape[1], heads, -1)
        return torch.einsum("nhpt,npthd->nhpd", maps, v_pixel)


@torch.no_grad()
def naive_infusion_latents(
    pipe: DiffusionPipeline,
    prompt: str,
    concepts: Sequence[tuple],
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
        concepts: ``(residuals by layer, strength, token positions)`` for each concept in the prompt, or
            ``(residuals, strength, positions, (knob, φ))`` for a concept with the fidelity knob
            (``ConceptFidelity``) at strength ``φ``.
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
            residuals = [(res[layer].to(device) * strength, pos) for res, strength, pos, *_ in concepts]
            knobs = []
            for _, strength, positions, *extra in concepts:
                knob, phi = extra[0] if extra and extra[0] is not None else (None, 0.0)
                if knob is not None and layer in knob.up:
                    up, down = knob.up[layer].to(device), knob.down[layer].to(device)
                    knobs.append((up, down, knob.config, strength * phi, positions))
            processors[name] = _MapAttnProcessor(layer, store, residuals, knobs)
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
                    processor.mode, processor.timestep = mode, float(t)
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
