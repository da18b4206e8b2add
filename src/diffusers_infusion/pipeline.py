"""InfusionPipeline: Stable Diffusion with Infusion concepts — the F and C streams in one batched loop.

Both streams start from the same noise. Each step runs one UNet call on ``[F | C]`` (twice that under
classifier-free guidance), so the four evaluations ``ε_F^u, ε_C^u, ε_F^c, ε_C^c`` of METHOD.md share one batch;
guidance is applied per row, i.e. per stream, and the scheduler steps both streams in one call on the concatenated
latents, so multistep schedulers keep one history row per sample and never mix the streams. Prompts without a
class word (or with no active concept) get no C row at all: their image is the F stream's, and a call with no C
row is exactly ``StableDiffusionPipeline.__call__``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .attention import infusion_hooks
from .errors import InfusionCallError
from .loaders import InfusionLoaderMixin
from .residuals import ResidualEntry, build_plan
from .tokens import check_token_indices, find_class_word_positions


@dataclass
class InfusionPipelineOutput(StableDiffusionPipelineOutput):
    """Output of ``InfusionPipeline``: ``images`` from the C stream, ``base_images`` from the F stream (if asked)."""

    base_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


def torch_or_np_cat(parts):
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def _copy_images(images):
    if isinstance(images, list):
        return [image.copy() for image in images]
    return images.clone() if isinstance(images, torch.Tensor) else np.copy(images)


class InfusionPipeline(StableDiffusionPipeline, InfusionLoaderMixin):
    """``StableDiffusionPipeline`` with Infusion concepts (load them with ``load_infusion_concept``)."""

    # ------------------------------------------------------------------------------------------ placement
    def _per_prompt(self, value: Any, n_prompts: int, *, argument: str) -> list:
        """Broadcast a dict (or None) to every prompt, or check a per-prompt list has one entry per prompt."""
        if value is None or isinstance(value, Mapping):
            return [value] * n_prompts
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != n_prompts:
                raise InfusionCallError(
                    f"{argument} has {len(value)} entries for {n_prompts} prompts. Pass one dict per prompt, "
                    "or a single dict for the whole batch."
                )
            return list(value)
        raise InfusionCallError(f"{argument}={value!r} must be a dict, a list of dicts (one per prompt), or None.")

    def place_infusion_concepts(
        self,
        prompts: Sequence[str] | None,
        n_prompts: int,
        infusion_concepts: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
        infusion_token_indices: Mapping[str, Sequence[int]] | Sequence[Mapping[str, Sequence[int]]] | None = None,
    ) -> list[list[tuple[str, float, tuple[int, ...]]]]:
        """For each prompt, the concepts it receives: ``(name, strength, token positions)``.

        Concepts with strength 0 and concepts whose class word is not in the prompt are left out, so a prompt
        with an empty list needs no C stream.
        """
        _, active = self._infusion_state()
        concept_sets = self._per_prompt(infusion_concepts, n_prompts, argument="infusion_concepts")
        index_sets = self._per_prompt(infusion_token_indices, n_prompts, argument="infusion_token_indices")
        if prompts is not None:
            prompts = self.maybe_convert_prompt(list(prompts), self.tokenizer)  # textual-inversion tokens
        sequence_length = self.tokenizer.model_max_length
        placements = []
        for p in range(n_prompts):
            concepts = dict(active if concept_sets[p] is None else concept_sets[p])
            self._check_names(list(concepts), argument="infusion_concepts")
            indices = index_sets[p] or {}
            self._check_names(list(indices), argument="infusion_token_indices")
            stray = [n for n in indices if n not in concepts]
            if stray:
                raise InfusionCallError(
                    f"infusion_token_indices names {stray}, which are not active for prompt {p} (active: "
                    f"{list(concepts)}). Activate them with set_infusion_concepts or infusion_concepts."
                )
            placed = []
            for name, strength in concepts.items():
                if not isinstance(strength, (int, float)) or isinstance(strength, bool):
                    raise InfusionCallError(f"infusion_concepts[{name!r}]={strength!r} must be a number.")
                if strength == 0:
                    continue
                if name in indices:
                    positions = check_token_indices(indices[name], name=name, sequence_length=sequence_length)
                elif prompts is None:
                    raise InfusionCallError(
                        f"Concept {name!r} is active but the call has prompt_embeds and no prompt, so its class word "
                        "cannot be found. Pass infusion_token_indices={name: [positions]} or the prompt, or "
                        "deactivate it with infusion_concepts={}."
                    )
                else:
                    word = self.infusion_concepts[name].class_word
                    positions = tuple(find_class_word_positions(self.tokenizer, prompts[p], word))
                if positions:
                    placed.append((name, float(strength), positions))
            placements.append(placed)
        return placements

    # ------------------------------------------------------------------------------------------ call
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
        **kwargs,
    ):
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

        Returns:
            ``InfusionPipelineOutput`` with ``images``, ``nsfw_content_detected`` and ``base_images``; or, with
            ``return_dict=False``, ``(images, nsfw)`` plus ``base_images`` when asked. Callbacks see the latents of
            the whole ``[F | C]`` batch.
        """
        shared = dict(
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            eta=eta,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            **kwargs,
        )
        # 1. Which concepts go into which prompt, at which tokens: one placement list per variant.
        if infusion_mode not in ("exact", "fast"):
            raise InfusionCallError(f"infusion_mode={infusion_mode!r} must be 'exact' (the paper's method) or 'fast'.")
        exact = infusion_mode == "exact"
        if not exact and return_base_images:
            raise InfusionCallError("return_base_images=True needs infusion_mode='exact': 'fast' runs no F stream.")
        if infusion_variants is not None and infusion_concepts is not None:
            raise InfusionCallError("Pass infusion_variants or infusion_concepts, not both.")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        n_prompts = len(prompts) if prompts is not None else 0 if prompt_embeds is None else prompt_embeds.shape[0]
        variants = [infusion_concepts] if infusion_variants is None else list(infusion_variants)
        if infusion_variants is not None and (not variants or not all(isinstance(v, Mapping) for v in variants)):
            raise InfusionCallError(
                f"infusion_variants={infusion_variants!r} must be a non-empty list of dicts name -> strength."
            )
        groups = [self.place_infusion_concepts(prompts, n_prompts, v, infusion_token_indices) for v in variants]

        # 2. No C row: exactly the plain pipeline (once, whatever the number of variants).
        if not any(any(placements) for placements in groups):
            output = super().__call__(
                prompt, height, width, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                generator=generator, latents=latents, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, output_type=output_type, return_dict=True,
                clip_skip=clip_skip, **shared,
            )  # fmt: skip
            images, nsfw = output.images, output.nsfw_content_detected
            if len(groups) > 1:
                images = images * len(groups) if isinstance(images, list) else torch_or_np_cat([images] * len(groups))
                nsfw = None if nsfw is None else nsfw * len(groups)
            base = _copy_images(output.images) if return_base_images else None
            return self._output(images, nsfw, base, return_base_images, return_dict)

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
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, n_images, do_cfg, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip,
        )  # fmt: skip
        n_f = n_prompts * n_images
        if isinstance(generator, list) and len(generator) != n_f:
            raise InfusionCallError(
                f"generator is a list of {len(generator)} generators for {n_f} images. Pass one per image or one."
            )
        shape = (n_f, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)

        # 4. Lay out the batch [F rows | C rows]: C row j copies F row f_rows[j] (same prompt, same noise). In
        #    'fast' mode there are no F rows: every image is a C row that attends with its own queries.
        f_rows, entries, group_rows = [], [], []
        for placements in groups:
            start = len(f_rows)
            for p, placed in enumerate(placements):
                for k in range(n_images if (placed or not exact) else 0):
                    entries += [ResidualEntry(len(f_rows), name, s, pos) for name, s, pos in placed]
                    f_rows.append(p * n_images + k)
            group_rows.append((start, len(f_rows)))
        index = torch.tensor(f_rows, device=device)
        pick = lambda x: None if x is None else x.index_select(0, index.to(x.device))  # noqa: E731
        expand = lambda x: None if x is None else torch.cat([x, pick(x)]) if exact else pick(x)  # noqa: E731
        if isinstance(generator, list):  # C rows get a copy of their F row's generator: the same noise draws
            clones = [self._clone_generator(generator[r]) for r in f_rows]
            generator = generator + clones if exact else clones
        names = list(dict.fromkeys(e.concept for e in entries))
        plan = build_plan(
            self._infusion_residuals(names, device, prompt_embeds.dtype), entries, f_rows=f_rows,
            n_f=n_f if exact else 0, device=device, dtype=prompt_embeds.dtype, replace_queries=exact,
        )  # fmt: skip

        # 5. The plain sampling loop on [F | C], with the Infusion hooks on every cross-attention layer.
        with infusion_hooks(self.unet, plan):
            all_latents = super().__call__(
                None, height, width, num_images_per_prompt=1, generator=generator, latents=expand(latents),
                prompt_embeds=expand(prompt_embeds), negative_prompt_embeds=expand(negative_prompt_embeds),
                output_type="latent", return_dict=False, **shared,
            )[0]  # fmt: skip

        # 6. Each image comes from its C row if it has one, else from its F row; decode what is returned.
        base_latents, c_latents = (all_latents[:n_f], all_latents[n_f:]) if exact else (None, all_latents)
        finals = []
        for start, stop in group_rows:
            rows = index[start:stop].to(all_latents.device)
            finals.append(
                c_latents[start:stop] if not exact else base_latents.index_copy(0, rows, c_latents[start:stop])
            )
        final = torch.cat(finals)
        n_out = final.shape[0]
        if output_type == "latent":
            return self._output(final, None, base_latents if return_base_images else None, return_base_images,
                                return_dict)  # fmt: skip
        to_decode = torch.cat([final, base_latents]) if return_base_images else final
        images, nsfw = self._decode(to_decode, device, prompt_embeds.dtype, output_type)
        self.maybe_free_model_hooks()
        if return_base_images:
            split = lambda x: (x[:n_out], x[n_out:]) if x is not None else (None, None)  # noqa: E731
            (images, base), (nsfw, _) = split(images), split(nsfw)
            return self._output(images, nsfw, base, True, return_dict)
        return self._output(images, nsfw, None, False, return_dict)

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _clone_generator(generator: torch.Generator) -> torch.Generator:
        clone = torch.Generator(device=generator.device)
        clone.set_state(generator.get_state())
        return clone

    def _decode(self, latents: torch.Tensor, device, dtype, output_type: str):
        """VAE decode, safety checker and post-processing, as at the end of ``StableDiffusionPipeline``."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        image, nsfw = self.run_safety_checker(image, device, dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw

    @staticmethod
    def _output(images, nsfw, base_images, return_base_images: bool, return_dict: bool):
        if not return_dict:
            return (images, nsfw, base_images) if return_base_images else (images, nsfw)
        return InfusionPipelineOutput(images=images, nsfw_content_detected=nsfw, base_images=base_images)
