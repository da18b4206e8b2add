"""The dual-stream call shared by the SD and SDXL pipelines: placement, the ``[F | C]`` layout, the plain loop.

Both streams start from the same noise. Each step runs one UNet call on ``[F | C]`` (twice that under
classifier-free guidance), so the four evaluations ``ε_F^u, ε_C^u, ε_F^c, ε_C^c`` of METHOD.md share one batch;
guidance is applied per row, i.e. per stream, and the scheduler steps both streams in one call on the concatenated
latents, so multistep schedulers keep one history row per sample and never mix the streams. Prompts without a
class word (or with no active concept) get no C row at all; a call with no C row is exactly the plain pipeline's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .attention import infusion_hooks, is_compiled, keep_hooks_if_compiled, sequential_streams
from .callbacks import OutputRowsCallback
from .errors import InfusionCallError
from .loaders import InfusionLoaderMixin
from .residuals import ResidualEntry, build_plan
from .stream import Placement
from .tokens import check_token_indices, find_class_word_positions
from .validation import check_per_prompt, warn_if_class_word_truncated


@dataclass
class InfusionPipelineOutput(BaseOutput):
    """``images`` from the C stream (the F stream's where no concept applies); ``base_images`` from F if asked."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None
    base_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


def _select(images, rows: list[int]):
    """Rows of a batch of images, whatever its type (list of PIL images, numpy array, tensor)."""
    if images is None:
        return None
    if isinstance(images, list):
        return [images[r] for r in rows]
    return images[torch.tensor(rows)] if isinstance(images, torch.Tensor) else images[np.asarray(rows)]


def _clone_generator(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


class InfusionGenerationMixin(InfusionLoaderMixin):
    """Infusion's call logic; a pipeline supplies its text encoding and its plain ``__call__``."""

    def __setattr__(self, name: str, value: Any) -> None:
        """Sets attributes as diffusers does; a compiled ``unet`` gets its idle Infusion hooks before any trace."""
        super().__setattr__(name, value)
        if name == "unet":
            keep_hooks_if_compiled(value)

    def _plain_call(self, call: Callable[..., Any], *args, **kwargs):
        """The plain pipeline's ``call`` (no C row anywhere); a compiled UNet keeps its idle hooks through it."""
        with infusion_hooks(self.unet, None):
            return call(self, *args, **kwargs)

    def place_infusion_concepts(
        self,
        prompts: Sequence[str] | None,
        n_prompts: int,
        infusion_concepts: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
        infusion_token_indices: Mapping[str, Sequence[int]] | Sequence[Mapping[str, Sequence[int]]] | None = None,
        *,
        sequence_length: int | None = None,
    ) -> list[Placement]:
        """For each prompt, the concepts it receives: ``(name, strength, token positions)``.

        Concepts with strength 0 and concepts whose class word is not in the prompt are left out, so a prompt
        with an empty list needs no C stream. ``sequence_length`` is the token count of the call's
        ``prompt_embeds`` (explicit positions must lie below it); by default the tokenizer's padded length.
        """
        _, active = self._infusion_state()
        concept_sets = check_per_prompt(infusion_concepts, n_prompts, argument="infusion_concepts")  # checked floats
        index_sets = check_per_prompt(infusion_token_indices, n_prompts, argument="infusion_token_indices")
        concept_sets = [dict(active if concepts is None else concepts) for concepts in concept_sets]
        if not any(concept_sets) and not any(index_sets):
            # No concept anywhere: the call is the parent's, so no component (tokenizer, text encoder) is read.
            return [[] for _ in range(n_prompts)]
        if prompts is not None and self.tokenizer is not None:
            prompts = self.maybe_convert_prompt(list(prompts), self.tokenizer)  # textual-inversion tokens
        placements = []
        for p in range(n_prompts):
            concepts = concept_sets[p]
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
                if strength == 0:
                    continue
                if name in indices:
                    length = sequence_length or self._prompt_length()
                    positions = check_token_indices(indices[name], name=name, sequence_length=length)
                elif prompts is None or self.tokenizer is None:
                    missing = "no prompt (only prompt_embeds)" if prompts is None else "no tokenizer"
                    raise InfusionCallError(
                        f"Concept {name!r} is active but the call has {missing}, so its class word cannot be found. "
                        f"Pass infusion_token_indices={{{name!r}: positions}} (the positions of the class word in the "
                        "tokenized prompt: `diffusers_infusion.infusion_token_indices(pipe, prompt)` finds them), "
                        "or deactivate it with infusion_concepts={}."
                    )
                else:
                    word = self.infusion_concepts[name].class_word
                    positions = tuple(find_class_word_positions(self.tokenizer, prompts[p], word))
                    if not positions:
                        warn_if_class_word_truncated(self.tokenizer, prompts[p], word, name=name, prompt_index=p)
                if positions:
                    placed.append((name, float(strength), positions))
            placements.append(placed)
        return placements

    def _prompt_length(self) -> int:
        """Tokens per encoded prompt: the tokenizer's padded length, else the text encoder's positions."""
        if self.tokenizer is not None:
            return self.tokenizer.model_max_length
        config = getattr(self.text_encoder, "config", None)
        if config is not None and hasattr(config, "max_position_embeddings"):
            return config.max_position_embeddings
        return 77  # CLIP's, the prompt length of every Stable Diffusion text encoder

    def _place_variants(self, prompts, n_prompts, infusion_concepts, infusion_variants, infusion_token_indices,
                        infusion_mode, return_base_images,
                        infusion_streams="batched", *, sequence_length=None) -> list[list[Placement]]:  # fmt: skip
        """One placement list per variant (a single one without ``infusion_variants``), after checking the mode."""
        if infusion_mode not in ("exact", "fast"):
            raise InfusionCallError(f"infusion_mode={infusion_mode!r} must be 'exact' (the paper's method) or 'fast'.")
        if infusion_streams not in ("batched", "sequential"):
            raise InfusionCallError(
                f"infusion_streams={infusion_streams!r} must be 'batched' (one UNet call per step, the fastest) or "
                "'sequential' (F, then C: less memory)."
            )
        if infusion_streams == "sequential" and infusion_mode == "fast":
            raise InfusionCallError("infusion_streams='sequential' splits the F and C streams; 'fast' mode has one.")
        if infusion_streams == "sequential" and is_compiled(self.unet):
            raise InfusionCallError(
                "infusion_streams='sequential' wraps the UNet's forward, which a compiled UNet does not allow. "
                "Use the default infusion_streams='batched' with a compiled UNet."
            )
        if infusion_mode == "fast" and return_base_images:
            raise InfusionCallError("return_base_images=True needs infusion_mode='exact': 'fast' runs no F stream.")
        if infusion_variants is not None and infusion_concepts is not None:
            raise InfusionCallError("Pass infusion_variants or infusion_concepts, not both.")
        variants = [infusion_concepts] if infusion_variants is None else list(infusion_variants)
        if infusion_variants is not None and (not variants or not all(isinstance(v, Mapping) for v in variants)):
            raise InfusionCallError(
                f"infusion_variants={infusion_variants!r} must be a non-empty list of dicts name -> strength."
            )
        indices, length = infusion_token_indices, sequence_length
        return [self.place_infusion_concepts(prompts, n_prompts, v, indices, sequence_length=length) for v in variants]

    def _initial_noise(self, n_f: int, height: int, width: int, generator, latents, device, dtype) -> torch.Tensor:
        """The F batch's initial noise, drawn exactly as the plain pipeline draws it (or the given ``latents``)."""
        if isinstance(generator, list) and len(generator) != n_f:
            raise InfusionCallError(
                f"generator is a list of {len(generator)} generators for {n_f} images. Pass one per image or one."
            )
        if latents is not None:
            return latents
        shape = (n_f, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _generate(
        self,
        groups: list[list[Placement]],
        *,
        n_images: int,
        exact: bool,
        embeds: dict[str, torch.Tensor | None],
        latents: torch.Tensor,
        generator,
        run: Callable[..., Any],
        return_base_images: bool,
        return_dict: bool,
        sequential: bool = False,
        fidelity_strengths: Mapping[str, float] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        """Lay out ``[F | C]``, run the plain loop once with the hooks on, and pick each image's row.

        Args:
            groups: Placements per variant, per prompt.
            n_images: Images per prompt.
            exact: The paper's method (F rows + C rows) or the fast mode (C rows only, own queries).
            embeds: Per-image tensors of the F batch (prompt embeddings and the like), expanded to the layout.
            latents: Initial noise of the F batch (before ``init_noise_sigma``).
            generator: The call's generator(s).
            run: The plain pipeline call, taking the expanded ``embeds``, ``latents`` and ``generator``.
            return_base_images: Also return F's images.
            return_dict: Return an ``InfusionPipelineOutput`` (else a tuple).
            sequential: Run each UNet call as F, then C with F's recorded queries (less memory, same numbers).
            fidelity_strengths: The fidelity knob's strength ``φ`` by concept for this call (default: each knob's
                own ``FidelityConfig.strength``); concepts without a knob ignore it.
            callback_on_step_end: The user's callback; it sees the returned images' rows (``callbacks.py``).
            callback_on_step_end_tensor_inputs: The tensors it receives.
        """
        n_f = latents.shape[0]
        device = latents.device
        # 1. C row j copies F row f_rows[j] (same prompt, same noise); in fast mode every image is a C row.
        f_rows, entries, group_rows = [], [], []
        for placements in groups:
            start = len(f_rows)
            for p, placed in enumerate(placements):
                for k in range(n_images if (placed or not exact) else 0):
                    entries += [ResidualEntry(len(f_rows), name, s, pos) for name, s, pos in placed]
                    f_rows.append(p * n_images + k)
            group_rows.append((start, len(f_rows)))
        index = torch.tensor(f_rows, device=device)

        def expand(x):
            if x is None:
                return None
            picked = x.index_select(0, index.to(x.device))
            return torch.cat([x, picked]) if exact else picked

        if isinstance(generator, list):  # C rows get a copy of their F row's generator: the same noise draws
            clones = [_clone_generator(generator[r]) for r in f_rows]
            generator = generator + clones if exact else clones
        dtype = next(e for e in embeds.values() if e is not None).dtype
        names = list(dict.fromkeys(e.concept for e in entries))
        residuals = self._infusion_residuals(names, device, dtype)
        plan = build_plan(
            residuals, entries, f_rows=f_rows, n_f=0 if sequential or not exact else n_f, device=device, dtype=dtype,
            replace_queries=exact, captured_queries={} if sequential else None,
            fidelity=self._infusion_fidelity(names), fidelity_strengths=fidelity_strengths,
        )  # fmt: skip

        # 2. Each image comes from its C row if it has one, else from its F row; callbacks see those rows.
        offset = n_f if exact else 0
        c_row_of = [{f_rows[j]: offset + j for j in range(start, stop)} for start, stop in group_rows]
        rows = [c_row_of[g].get(r, r) for g in range(len(groups)) for r in range(n_f)]
        callback = {}
        if callback_on_step_end is not None:
            f_row_of = {offset + j: f for j, f in enumerate(f_rows)} if exact else {}
            callback = dict(
                callback_on_step_end=OutputRowsCallback(callback_on_step_end, shown_rows=rows, f_row_of=f_row_of,
                                                        n_rows=offset + len(f_rows)),
                callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
            )  # fmt: skip

        # 3. The plain sampling loop (and decoding) on [F | C], with the hooks on every cross-attention layer.
        with contextlib.ExitStack() as stack:
            stack.enter_context(infusion_hooks(self.unet, plan))
            if sequential:
                stack.enter_context(sequential_streams(self.unet, plan, n_f=n_f))
            images, nsfw = run(latents=expand(latents), generator=generator,
                               **{k: expand(v) for k, v in embeds.items()}, **callback)  # fmt: skip

        # 4. Pick each image's row.
        out_images, out_nsfw = _select(images, rows), _select(nsfw, rows)
        base = _select(images, list(range(n_f))) if return_base_images else None
        if not return_dict:
            return (out_images, out_nsfw, base) if return_base_images else (out_images, out_nsfw)
        return InfusionPipelineOutput(images=out_images, nsfw_content_detected=out_nsfw, base_images=base)

    @staticmethod
    def _plain_output(output, n_groups: int, return_base_images: bool, return_dict: bool):
        """The plain pipeline's output (no C row anywhere), repeated per variant."""
        rows = list(range(len(output.images))) * n_groups
        images, nsfw = _select(output.images, rows), _select(output.nsfw_content_detected, rows)
        base = _select(output.images, rows[: len(output.images)]) if return_base_images else None
        if not return_dict:
            return (images, nsfw, base) if return_base_images else (images, nsfw)
        return InfusionPipelineOutput(images=images, nsfw_content_detected=nsfw, base_images=base)
