"""InfusionXLPipeline: Stable Diffusion XL with Infusion concepts (the dual-stream call is in ``generation.py``).

SDXL concatenates the two text encoders' token states along the feature axis, so token position k of the prompt
embedding is token k of ``prompt`` (CLIP ViT-L) and of ``prompt_2`` (OpenCLIP ViT-bigG); a class word in both must
sit at the same positions in both tokenizations. A ``prompt_2`` without the class word (a style prompt, as in
diffusers' own tests) is fine: the residual goes where the word sits in ``prompt``, with a warning. Pooled
embeddings and the size/crop conditioning are untouched: they are expanded to the ``[F | C]`` batch row by row, like
the prompt embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from .errors import InfusionCallError
from .generation import InfusionGenerationMixin, InfusionPipelineOutput
from .tokens import find_class_word_positions
from .validation import check_call, check_fidelity_strengths

__all__ = ["InfusionXLPipeline", "InfusionPipelineOutput"]
logger = logging.getLogger(__name__)


class InfusionXLPipeline(StableDiffusionXLPipeline, InfusionGenerationMixin):
    """``StableDiffusionXLPipeline`` with Infusion concepts (70 cross-attention layers, 83,200 values for SDXL)."""

    def _check_second_tokenizer(self, groups, prompts, prompts_2, infusion_token_indices) -> None:
        """The class word must sit at the same positions in ``prompt_2`` under ``tokenizer_2``."""
        if self.tokenizer_2 is None or prompts is None or infusion_token_indices is not None:
            return
        prompts_2 = self.maybe_convert_prompt(list(prompts_2 or prompts), self.tokenizer_2)
        for placements in groups:
            for p, placed in enumerate(placements):
                for name, _, positions in placed:
                    word = self.infusion_concepts[name].class_word
                    second = tuple(find_class_word_positions(self.tokenizer_2, prompts_2[p], word))
                    if not second:
                        logger.warning(
                            "Concept %r: prompt_2 %d has no %r; its residual goes where prompt %d has it (positions "
                            "%s).", name, p, word, p, list(positions),
                        )  # fmt: skip
                    elif second != positions:
                        raise InfusionCallError(
                            f"Concept {name!r}: class word {word!r} is at positions {list(positions)} of prompt {p} "
                            f"for tokenizer but at {list(second)} of prompt_2 for tokenizer_2. Use the same wording "
                            "in both prompts, or pass infusion_token_indices."
                        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
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
    ):
        """Generate images with the active Infusion concepts; every ``StableDiffusionXLPipeline`` argument works.

        The Infusion arguments are those of ``InfusionPipeline.__call__``.
        """
        check_call(prompt, kwargs)  # a misspelled infusion_* keyword would vanish into **kwargs
        fidelity_strengths = check_fidelity_strengths(infusion_fidelity, self.get_list_infusion_concepts())
        shared = dict(
            height=height, width=width, num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
            denoising_end=denoising_end, guidance_scale=guidance_scale, eta=eta, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds, output_type=output_type, return_dict=True,
            cross_attention_kwargs=cross_attention_kwargs, guidance_rescale=guidance_rescale,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
        )  # fmt: skip
        # 1. Which concepts go into which prompt, at which tokens (one placement list per variant).
        prompts = [prompt] if isinstance(prompt, str) else prompt
        prompts_2 = [prompt_2] if isinstance(prompt_2, str) else prompt_2
        n_prompts = len(prompts) if prompts is not None else 0 if prompt_embeds is None else prompt_embeds.shape[0]
        groups = self._place_variants(prompts, n_prompts, infusion_concepts, infusion_variants,
                                      infusion_token_indices, infusion_mode, return_base_images,
                                      infusion_streams, sequence_length=None if prompt_embeds is None
                                      else prompt_embeds.shape[1])  # fmt: skip
        self._check_second_tokenizer(groups, prompts, prompts_2, infusion_token_indices)

        # 2. No C row anywhere: exactly the plain pipeline.
        plain = dict(
            prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip,
        )  # fmt: skip
        if not any(any(placements) for placements in groups):
            output = self._plain_call(StableDiffusionXLPipeline.__call__, prompt, **plain, **shared)
            output.nsfw_content_detected = None
            return self._plain_output(output, len(groups), return_base_images, return_dict)

        # 3. Encode the prompts once (both encoders, pooled too) and draw the noise as the plain pipeline does.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        tensor_inputs = getattr(callback_on_step_end, "tensor_inputs", callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, tensor_inputs,
        )  # fmt: skip
        device = self._execution_device
        n_images = num_images_per_prompt or 1
        do_cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        embeds = self.encode_prompt(
            prompt, prompt_2, device, n_images, do_cfg, negative_prompt, negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip,
        )  # fmt: skip
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        embeds = dict(zip(names, embeds))
        n_f = n_prompts * n_images
        latents = self._initial_noise(n_f, height, width, generator, latents, device, embeds["prompt_embeds"].dtype)

        # 4. The plain loop on the [F | C] batch, with the Infusion hooks on.
        def run(**expanded):
            output = StableDiffusionXLPipeline.__call__(
                self, None, None, num_images_per_prompt=1, **{**shared, **expanded}
            )
            return output.images, None

        return self._generate(
            groups, n_images=n_images, exact=infusion_mode == "exact", sequential=infusion_streams == "sequential",
            fidelity_strengths=fidelity_strengths, latents=latents, generator=generator,
            embeds=embeds, run=run, return_base_images=return_base_images, return_dict=return_dict,
            callback_on_step_end=callback_on_step_end, callback_on_step_end_tensor_inputs=tensor_inputs,
        )  # fmt: skip
