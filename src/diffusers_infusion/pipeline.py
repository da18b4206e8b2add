"""InfusionPipeline: Stable Diffusion with Infusion concepts (the dual-stream call is in ``generation.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from .generation import InfusionGenerationMixin, InfusionPipelineOutput
from .validation import check_call, check_fidelity_strengths

__all__ = ["InfusionPipeline", "InfusionPipelineOutput"]


class InfusionPipeline(StableDiffusionPipeline, InfusionGenerationMixin):
    """``StableDiffusionPipeline`` with Infusion concepts (load them with ``load_infusion_concept``)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        *,
        infusion_concepts: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
        infusion_token_indices: Mapping[str, Sequence[int]] | Sequence[Mapping[str, Sequence[int]]] | None = None,
        return_base_images: bool = False,
        infusion_variants: Sequence[Mapping[str, float]] | None = None,
        infusion_mode: str = "exact",
        infusion_streams: str = "batched",
        infusion_fidelity: float | Mapping[str, float] | None = None,
        **kwargs,
    ) -> InfusionPipelineOutput | tuple:
        """Generate images with the active Infusion concepts; every ``StableDiffusionPipeline`` argument works.

        Args:
            infusion_concepts: Overrides the active concepts for this call: a dict name -> strength for the whole
                batch, or a list of such dicts, one per prompt.
            infusion_token_indices: Explicit token positions instead of looking the class word up: a dict
                name -> list of positions (index 0 is the start token), or a list of such dicts, one per prompt.
            return_base_images: Also return the F stream's images (the base model's images for the same seed).
            infusion_variants: Several concept sets (dicts name -> strength) rendered for the same prompts and seeds
                in one call that computes the F stream once: ``images`` holds the first variant's images, then the
                second's, and so on. Costs (N + 1) / (2N) of N separate calls per image.
            infusion_mode: ``"exact"`` (default): the paper's method, C attends with F's queries. ``"fast"``: one
                stream, C attends with its own queries (what the authors' public code computes): about the cost
                of a plain call, but not the paper's method; the base model no longer decides the layout.
            infusion_streams: ``"batched"`` (default): F and C rows in one UNet call per step, the fastest where
                batching pays (GPUs). ``"sequential"``: each step runs F alone, recording its queries, then C with
                them: the same numbers with about the activation memory of a plain call of the same batch.
            infusion_fidelity: The strength ``φ`` of the concepts' fidelity knob (docs/fidelity.md) for this call: one
                number for every concept, or a dict by concept name; ``None`` (default): each knob's own default
                (``FidelityConfig.strength``). Concepts without the knob ignore it; 0.0 gives the paper's method.

        Returns:
            ``InfusionPipelineOutput`` with ``images``, ``nsfw_content_detected`` and ``base_images``; or, with
            ``return_dict=False``, ``(images, nsfw)`` plus ``base_images`` when asked. ``callback_on_step_end`` sees
            one row per returned image (per guidance half), and what it returns acts on those images; the F rows
            behind concept images take the same change (``diffusers_infusion.callbacks``).
        """
        check_call(prompt, kwargs)  # a misspelled infusion_* keyword would vanish into **kwargs
        fidelity_strengths = check_fidelity_strengths(infusion_fidelity, self.get_list_infusion_concepts())
        shared = dict(
            height=height, width=width, num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
            guidance_scale=guidance_scale, eta=eta, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds, output_type=output_type, return_dict=True,
            cross_attention_kwargs=cross_attention_kwargs, guidance_rescale=guidance_rescale,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
        )  # fmt: skip
        # 1. Which concepts go into which prompt, at which tokens (one placement list per variant).
        prompts = [prompt] if isinstance(prompt, str) else prompt
        n_prompts = len(prompts) if prompts is not None else 0 if prompt_embeds is None else prompt_embeds.shape[0]
        groups = self._place_variants(prompts, n_prompts, infusion_concepts, infusion_variants,
                                      infusion_token_indices, infusion_mode, return_base_images,
                                      infusion_streams, sequence_length=None if prompt_embeds is None
                                      else prompt_embeds.shape[1])  # fmt: skip

        # 2. No C row anywhere: exactly the plain pipeline.
        if not any(any(placements) for placements in groups):
            output = self._plain_call(
                StableDiffusionPipeline.__call__, prompt, negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
                **shared,
            )  # fmt: skip
            return self._plain_output(output, len(groups), return_base_images, return_dict)

        # 3. Encode the prompts once and draw the initial noise exactly as the plain pipeline does.
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        tensor_inputs = getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, tensor_inputs,
        )  # fmt: skip
        device = self._execution_device
        n_images = num_images_per_prompt or 1
        do_cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, n_images, do_cfg, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, lora_scale=(cross_attention_kwargs or {}).get("scale"),
            clip_skip=clip_skip,
        )  # fmt: skip
        n_f = n_prompts * n_images
        latents = self._initial_noise(n_f, height, width, generator, latents, device, prompt_embeds.dtype)

        # 4. The plain loop on the [F | C] batch, with the Infusion hooks on.
        def run(**expanded):
            output = StableDiffusionPipeline.__call__(self, None, num_images_per_prompt=1, **{**shared, **expanded})
            return output.images, output.nsfw_content_detected

        return self._generate(
            groups, n_images=n_images, exact=infusion_mode == "exact", sequential=infusion_streams == "sequential",
            fidelity_strengths=fidelity_strengths, latents=latents, generator=generator,
            embeds={"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}, run=run,
            return_base_images=return_base_images, return_dict=return_dict,
            callback_on_step_end=callback_on_step_end, callback_on_step_end_tensor_inputs=tensor_inputs,
        )  # fmt: skip
