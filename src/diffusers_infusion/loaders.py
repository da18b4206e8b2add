"""InfusionLoaderMixin: load, set, list and unload Infusion concepts on a pipeline (diffusers' adapter verbs).

Concepts are kept by adapter name on the pipeline object, never inside the UNet, so pipelines that share the
UNet (``from_pipe``) stay plain and nothing other adapters do to attention processors can lose them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from huggingface_hub.utils import validate_hf_hub_args

from .concept import InfusionConcept
from .errors import UnknownConceptError
from .fidelity import FidelityConfig
from .tokens import class_word_token_ids
from .validation import check_adapter_name, check_finite_concept, check_names, check_strengths

logger = logging.getLogger(__name__)


class InfusionLoaderMixin:
    """Adds ``load_infusion_concept`` / ``set_infusion_concepts`` / ``unload_infusion_concept`` to a pipeline."""

    @property
    def infusion_concepts(self) -> dict[str, InfusionConcept]:
        """Loaded concepts by adapter name (read-only view; use the load/unload verbs to change it)."""
        return dict(self._infusion_state()[0])

    def _infusion_state(self) -> tuple[dict[str, InfusionConcept], dict[str, float]]:
        if "_infusion_loaded" not in self.__dict__:
            self.__dict__["_infusion_loaded"] = {}
            self.__dict__["_infusion_active"] = {}
        return self.__dict__["_infusion_loaded"], self.__dict__["_infusion_active"]

    @validate_hf_hub_args
    def load_infusion_concept(
        self,
        pretrained_model_name_or_path_or_concept: str | os.PathLike | InfusionConcept,
        adapter_name: str | None = None,
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
        class_word: str | None = None,
    ) -> str:
        """Load a concept and activate it (strength 1.0) next to the already active ones.

        Args:
            pretrained_model_name_or_path_or_concept: Hub repo id, local folder, ``.safetensors`` file, or an
                ``InfusionConcept``.
            adapter_name: Name to refer to the concept by; default ``default_0``, ``default_1``, ...
            weight_name: File name in the repo or folder (default ``infusion_concept.safetensors``).
            subfolder: Subfolder holding the file.
            revision: Hub branch, tag or commit.
            token: Hub credential.
            cache_dir: huggingface_hub cache folder.
            local_files_only: Only use the local cache.
            force_download: Download again even if cached.
            class_word: Overrides (or supplies) the concept's class word.

        Returns:
            The adapter name of the loaded concept.
        """
        loaded, active = self._infusion_state()
        # 1. Check the name before any download.
        adapter_name = check_adapter_name(adapter_name)
        if adapter_name is not None and adapter_name in loaded:
            raise UnknownConceptError(
                f"adapter_name={adapter_name!r} is already loaded. Pick another name, or "
                f"`unload_infusion_concept({adapter_name!r})` first."
            )
        # 2. Get the concept.
        source = pretrained_model_name_or_path_or_concept
        if isinstance(source, InfusionConcept):
            concept = (
                source
                if class_word is None
                else InfusionConcept(
                    class_word, source.residuals, base_model=source.base_model, fidelity=source.fidelity
                )
            )
        else:
            concept = InfusionConcept.from_pretrained(
                source,
                weight_name=weight_name,
                subfolder=subfolder,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
                class_word=class_word,
            )
        # 3. Check it fits this pipeline: every cross-attention layer, right lengths, a known class word.
        concept.validate_for(self.unet)
        check_finite_concept(concept)
        for tokenizer in (self.tokenizer, getattr(self, "tokenizer_2", None)):
            if tokenizer is not None:
                class_word_token_ids(tokenizer, concept.class_word)
        # 4. Keep it (detached, on CPU; moved to the UNet's device once per call) and activate it.
        name = adapter_name or self._next_infusion_name()
        loaded[name] = concept.to(device="cpu")
        same_word = [n for n in active if loaded[n].class_word == concept.class_word]
        if same_word:
            logger.warning(
                "Concepts %s and %r share the class word %r and are all active: their residuals add up on the same "
                "tokens. Use `set_infusion_concepts` to pick one.",
                same_word,
                name,
                concept.class_word,
            )
        active[name] = 1.0
        return name

    def _next_infusion_name(self) -> str:
        loaded, _ = self._infusion_state()
        index = len(loaded)
        while f"default_{index}" in loaded:
            index += 1
        return f"default_{index}"

    def set_infusion_concepts(
        self, names: str | Sequence[str], strengths: float | Sequence[float] | None = None
    ) -> None:
        """Choose which loaded concepts are active, and how strongly (1.0 by default; 0.0 gives the base image).

        Args:
            names: One name or a list of names; an empty list deactivates every concept.
            strengths: One strength for all, or one per name.
        """
        loaded, active = self._infusion_state()
        names = check_names(names, argument="names")
        self._check_names(names, argument="names")
        strengths = check_strengths(strengths, names)
        active.clear()
        active.update(dict(zip(names, strengths)))

    def get_list_infusion_concepts(self) -> list[str]:
        """Names of all loaded concepts."""
        return list(self._infusion_state()[0])

    def get_active_infusion_concepts(self) -> dict[str, float]:
        """Active concepts and their strengths."""
        return dict(self._infusion_state()[1])

    def unload_infusion_concept(self, names: str | Sequence[str] | None = None) -> None:
        """Remove concepts (all of them when ``names`` is None). Nothing in the UNet needs restoring."""
        loaded, active = self._infusion_state()
        names = list(loaded) if names is None else list(dict.fromkeys(check_names(names, unique=False)))
        self._check_names(names, argument="names")
        for name in names:
            loaded.pop(name)
            active.pop(name, None)

    def _check_names(self, names: Sequence[str], *, argument: str) -> None:
        loaded, _ = self._infusion_state()
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise UnknownConceptError(
                f"{argument} has concept names {unknown} that are not loaded (loaded: {list(loaded)}). "
                "Load them with `load_infusion_concept(..., adapter_name=...)` first."
            )

    def _infusion_residuals(self, names: Sequence[str], device, dtype) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors of the named concepts on ``device``/``dtype``, by concept then name (Δ by layer path; the
        fidelity knob's ``U``, ``V`` under their file names)."""
        loaded, _ = self._infusion_state()
        tensors = {n: {**loaded[n].residuals, **(loaded[n].fidelity.tensors() if loaded[n].fidelity else {})}
                   for n in names}  # fmt: skip
        return {n: {k: v.to(device=device, dtype=dtype) for k, v in t.items()} for n, t in tensors.items()}

    def _infusion_fidelity(self, names: Sequence[str]) -> dict[str, FidelityConfig]:
        """The fidelity knob's options of the named concepts that have one."""
        loaded, _ = self._infusion_state()
        return {n: loaded[n].fidelity.config for n in names if loaded[n].fidelity is not None}
