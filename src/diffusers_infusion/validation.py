"""Validation of the arguments users pass to the Infusion verbs and to a pipeline call (huggingface_hub's style).

Each check either returns the value in its canonical form or raises a named error that says which argument was
wrong, what it got, and what to pass instead. Nothing is coerced silently: a string is not a list of token
positions, ``5.7`` is not a position, ``True`` is not a strength.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np
import torch

from .errors import ConceptNotFoundError, InfusionCallError, UnknownConceptError

logger = logging.getLogger(__name__)

CALL_KEYWORDS = (
    "infusion_concepts",
    "infusion_token_indices",
    "infusion_variants",
    "infusion_mode",
    "infusion_streams",
    "return_base_images",
    "infusion_fidelity",
)
MAX_STRENGTH = 1000.0  # strengths are around 1 (0 = the base image); far beyond, a residual only overflows


def _real(value) -> float | None:
    """``value`` as a float if it is a real number (a 1-element tensor included), never for a bool or a string."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def check_strength(value, *, argument: str) -> float:
    """A finite strength of magnitude at most ``MAX_STRENGTH``, as a float."""
    number = _real(value)
    if number is None:
        raise InfusionCallError(f"{argument}={value!r} must be a number: a strength such as 1.0 (0.0 = off).")
    if not math.isfinite(number) or abs(number) > MAX_STRENGTH:
        raise InfusionCallError(
            f"{argument}={value!r} is not a usable strength: strengths must be finite numbers of magnitude at most "
            f"{MAX_STRENGTH:g} (1.0 = as trained, 0.0 = the base image)."
        )
    return number


def check_strengths(strengths, names: Sequence[str], *, argument: str = "strengths") -> list[float]:
    """One strength per name: ``None`` (all 1.0), one number for all, or a sequence as long as ``names``."""
    if strengths is None:
        return [1.0] * len(names)
    if _real(strengths) is not None:
        return [check_strength(strengths, argument=argument)] * len(names)
    if isinstance(strengths, (str, bytes)) or not isinstance(strengths, (Sequence, torch.Tensor)):
        raise InfusionCallError(f"{argument}={strengths!r} must be a number or a list of numbers, one per name.")
    strengths = list(strengths)
    if len(strengths) != len(names):
        raise InfusionCallError(
            f"{argument} has {len(strengths)} values for {len(names)} names ({list(names)}). "
            "Pass one strength per name, or a single number for all."
        )
    return [check_strength(s, argument=f"{argument}[{i}]") for i, s in enumerate(strengths)]


def check_names(names, *, argument: str = "names", unique: bool = True) -> list[str]:
    """Concept names: one string or a sequence of strings (each once)."""
    if isinstance(names, str):
        names = [names]
    elif isinstance(names, Sequence) and not isinstance(names, bytes):
        names = list(names)
    else:
        raise UnknownConceptError(
            f"{argument}={names!r} must be a concept name or a list of names (see `get_list_infusion_concepts()`)."
        )
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise UnknownConceptError(f"{argument} has {wrong}, which are not concept names (strings).")
    twice = sorted({n for n in names if names.count(n) > 1})
    if unique and twice:
        raise InfusionCallError(f"{argument} names {twice} more than once. Name each concept once.")
    return names


def check_adapter_name(adapter_name) -> str | None:
    """``None`` (a default name is chosen) or a non-empty string."""
    if adapter_name is None:
        return None
    if not isinstance(adapter_name, str) or not adapter_name.strip():
        raise UnknownConceptError(
            f"adapter_name={adapter_name!r} must be a non-empty string, or None to get 'default_N'."
        )
    return adapter_name


def check_per_prompt(value, n_prompts: int, *, argument: str) -> list[Mapping | None]:
    """``infusion_concepts`` / ``infusion_token_indices``: a dict (or None) for every prompt, or one per prompt.

    Strengths of ``infusion_concepts`` come back as checked floats; token positions are checked where they are
    used (``tokens.check_token_indices``).
    """
    example = "{'my-cat': [5]}" if argument == "infusion_token_indices" else "{'my-cat': 1.0}"
    if value is None or isinstance(value, Mapping):
        entries = [value] * n_prompts
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != n_prompts:
            raise InfusionCallError(
                f"{argument} has {len(value)} entries for {n_prompts} prompts. Pass one dict per prompt, "
                "or a single dict for the whole batch."
            )
        entries = list(value)
    else:
        raise InfusionCallError(
            f"{argument}={value!r} must be a dict, a list of dicts (one per prompt), or None; a dict by concept "
            f"name, e.g. {example}."
        )
    for p, entry in enumerate(entries):
        if entry is not None and not isinstance(entry, Mapping):
            where = argument if isinstance(value, Mapping) else f"{argument}[{p}]"
            raise InfusionCallError(
                f"{where}={entry!r} must be a dict by concept name, e.g. {example}, or None. ({argument} takes one "
                "dict for the whole batch or a list of dicts, one per prompt.)"
            )
    if argument == "infusion_concepts":
        entries = [
            None if e is None else {n: check_strength(s, argument=f"{argument}[{n!r}]") for n, s in e.items()}
            for e in entries
        ]
    return entries


def check_fidelity_strengths(value, names: Sequence[str]) -> dict[str, float] | None:
    """``infusion_fidelity``: ``None`` (each knob's own default), one number for all concepts, or a dict by name."""
    if value is None:
        return None
    if _real(value) is not None:
        return {name: check_strength(value, argument="infusion_fidelity") for name in names}
    if not isinstance(value, Mapping):
        raise InfusionCallError(
            f"infusion_fidelity={value!r} must be a number (the fidelity knob's strength for every concept), a dict "
            "by concept name, e.g. {'my-cat': 0.5}, or None for each knob's own default."
        )
    unknown = [n for n in value if n not in names]
    if unknown:
        raise UnknownConceptError(
            f"infusion_fidelity names {unknown}, which are not loaded (loaded: {list(names)}). Name loaded concepts."
        )
    return {n: check_strength(s, argument=f"infusion_fidelity[{n!r}]") for n, s in value.items()}


def _position(value) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def check_token_positions(indices, *, name: str) -> list[int]:
    """Explicit token positions: an integer or a sequence (list, tuple, range, array, tensor) of integers."""
    single = _position(indices)
    if single is not None:
        return [single]
    if isinstance(indices, (torch.Tensor, np.ndarray)):  # arrays of integers (floats and bools stay refused)
        indices = indices.reshape(-1).tolist()
    positions = (
        [_position(i) for i in indices]
        if isinstance(indices, (Sequence, range)) and not isinstance(indices, (str, bytes))
        else [None]
    )
    if None in positions:
        raise InfusionCallError(
            f"infusion_token_indices[{name!r}]={indices!r} is not a list of integers (token positions; strings, "
            "floats and bools are not converted). Pass token positions, e.g. {'my-cat': [5]}."
        )
    return positions


def check_relative_path(value: str | None, *, argument: str) -> str | None:
    """A path inside the folder or repository: not absolute, no ``..``; refused before anything is read."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConceptNotFoundError(f"{argument}={value!r} must be a string (a path inside the folder or repo).")
    text = os.fspath(value)
    for pure in (PurePosixPath(text), PureWindowsPath(text)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise ConceptNotFoundError(
                f"{argument}={text!r} points outside the folder or repository (an absolute path or '..'). Pass a "
                "path inside it, e.g. weight_name='infusion_concept.safetensors', subfolder='concepts'; to load a "
                "file elsewhere, pass its path as the first argument."
            )
    return text


def check_source(source, *, argument: str = "pretrained_model_name_or_path") -> str:
    """A Hub repo id, folder or file path, as a string."""
    if isinstance(source, (str, os.PathLike)) and os.fspath(source):
        return os.fspath(source)
    raise ConceptNotFoundError(
        f"{argument}={source!r} is not a concept source. Pass a Hub repo id ('user/my-cat'), a folder, a "
        "'.safetensors' file, or an `InfusionConcept`."
    )


# ------------------------------------------------------------------------------------------------ pipeline call
def check_call(prompt, kwargs: Mapping) -> None:
    """Refuse a prompt of the wrong type and misspelled Infusion keywords (which ``**kwargs`` would swallow)."""
    if prompt is not None and not isinstance(prompt, str):
        if not isinstance(prompt, Sequence) or not all(isinstance(p, str) for p in prompt):
            raise InfusionCallError(f"prompt={prompt!r} must be a string, a list of strings, or None.")
    known = set(CALL_KEYWORDS)
    for key in kwargs:
        close = difflib.get_close_matches(key, CALL_KEYWORDS, n=1, cutoff=0.8)
        if key.startswith("infusion") or close:
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InfusionCallError(
                f"Unknown keyword argument {key!r}.{hint} Infusion's call arguments are {sorted(known)}."
            )


def warn_if_class_word_truncated(tokenizer, prompt: str, class_word: str, *, name: str, prompt_index: int) -> bool:
    """Warn when ``class_word`` is in ``prompt`` only past the tokenizer's limit (cut off, so not infused)."""
    from .tokens import class_word_token_ids

    word = class_word_token_ids(tokenizer, class_word)
    ids = tokenizer(prompt, truncation=False).input_ids
    n, limit = len(word), tokenizer.model_max_length - 1  # the last kept position holds the end token
    cut = [s for s in range(1, len(ids) - n + 1) if ids[s : s + n] == word and s + n > limit]
    if cut:
        logger.warning(
            "Concept %r: its class word %r in prompt %d comes after token %d, where prompts are truncated, so that "
            "prompt gets no concept. Move the class word nearer the start of the prompt.",
            name,
            class_word,
            prompt_index,
            limit,
        )
    return bool(cut)


def check_finite_concept(concept) -> None:
    """Refuse a concept holding NaN or infinite residuals (it would render noise or black images)."""
    knob = concept.fidelity.tensors() if getattr(concept, "fidelity", None) is not None else {}
    for layer, tensor in {**concept.residuals, **knob}.items():
        if not torch.isfinite(tensor).all():
            raise InfusionCallError(
                f"Concept {concept.class_word!r} has NaN or infinite values in layer {layer!r}: it comes from a "
                "diverged training run. Retrain it (e.g. with a lower learning rate) or use an earlier checkpoint."
            )
