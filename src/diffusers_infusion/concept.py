"""InfusionConcept: a class word plus one value residual Δ_i per cross-attention layer (eq. 7); file, Hub, card.

File format (``infusion_concept.safetensors``): one 1-D tensor per cross-attention layer, named by the layer's
diffusers module path (``down_blocks.1.attentions.0.transformer_blocks.0.attn2``), of length
``attn2.to_v.out_features``; ``__metadata__`` holds ``class_word``, ``base_model``, ``format``,
``format_version``, ``library_version`` and ``dtype``. A concept with the opt-in fidelity knob (``fidelity.py``) also
holds ``<layer>.fidelity_up`` (value_dim, r) and ``<layer>.fidelity_down`` (query_dim, r) for its layers and the
knob's options as ``fidelity_*`` metadata; such a file has ``format_version`` 2, any other file 1 (files written
before versions were recorded have none and read as 1). A file of a newer version than this library reads is refused
with ``ConceptFormatVersionError``. Loading never unpickles and reads the file into memory once (``concept_io.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_hf_hub_args, validate_repo_id

from .attention import cross_attention_layers, layer_sizes, value_size
from .concept_io import FORMAT_VERSION as _NEWEST
from .concept_io import KNOB_VERSION, PICKLE_SUFFIXES, atomic_save, read_safetensors, refuse_pickle
from .errors import (
    ClassWordError,
    ConceptFileError,
    ConceptMismatchError,
    ConceptNotFoundError,
    FidelityConfigError,
    FileClassWordError,
)
from .fidelity import METADATA_KEYS, ConceptFidelity, FidelityConfig, split_tensors
from .validation import check_relative_path, check_source

logger = logging.getLogger(__name__)

CONCEPT_WEIGHT_NAME = "infusion_concept.safetensors"
FORMAT_NAME = "infusion-concept"
FORMAT_VERSION = str(_NEWEST)  # the newest file format this library reads and writes
__all__ = ["CONCEPT_WEIGHT_NAME", "PICKLE_SUFFIXES", "InfusionConcept"]
_RESERVED_METADATA = ("format", "format_version", "class_word", "base_model", "library", "library_version", "dtype",
                      *METADATA_KEYS)  # fmt: skip

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# Infusion concept: `{{ class_word }}`

A personal concept for Stable Diffusion learned with [Infusion]({{ paper_url }}) (Zeng et al., 2024): one value
residual per cross-attention layer ({{ num_layers }} layers, {{ num_values }} values, {{ dtype }}), bound to the
class word **{{ class_word }}**. The base model keeps deciding layout, pose and background; prompts without the class
word are untouched.
{% if fidelity %}
It also carries the opt-in fidelity knob (a query-conditioned low-rank value residual on the class word, gated by
its attention map): {{ fidelity }}.
{% endif %}
Base model: {{ base_model | default("not recorded", true) }}

## Use it

```python
from diffusers_infusion import InfusionPipeline

pipe = InfusionPipeline.from_pretrained("{{ base_model | default("<base model>", true) }}")
pipe.load_infusion_concept("{{ repo_id | default("<this repo>", true) }}")
image = pipe("a photo of a {{ class_word }} on the beach").images[0]
```
{% if training_details %}
## Training

{{ training_details }}
{% endif %}
Made with [diffusers-infusion]({{ repo_url }}).
"""


class InfusionConcept(
    ModelHubMixin,
    library_name="diffusers-infusion",
    tags=["diffusers", "infusion", "text-to-image", "stable-diffusion"],
    pipeline_tag="text-to-image",
    paper_url="https://arxiv.org/abs/2404.14007",
    repo_url="https://github.com/diffusers-infusion/diffusers-infusion",
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """A learned Infusion concept.

    Args:
        class_word: The word (or short phrase) of the prompt whose value receives the residual, e.g. ``"cat"``.
        residuals: Layer path -> 1-D residual Δ_i of length ``attn2.to_v.out_features``.
        base_model: Name or path of the base model the concept was trained on (informational).
        metadata: Extra string notes kept in the file's metadata (e.g. ``converted_from``).
        fidelity: The opt-in fidelity knob (``diffusers_infusion.fidelity.ConceptFidelity``); ``None`` (the
            default): the paper's method.
    """

    def __init__(self, class_word: str, residuals: Mapping[str, torch.Tensor], *, base_model: str | None = None,
                 metadata: Mapping[str, str] | None = None,
                 fidelity: ConceptFidelity | None = None):  # fmt: skip
        if not isinstance(class_word, str) or not class_word.strip():
            raise ClassWordError(
                f"class_word={class_word!r} is not a non-empty string. Pass the concept's word, e.g. class_word='cat'."
            )
        if not residuals:
            raise ConceptMismatchError("residuals is empty. Build a concept with `InfusionConcept.zeros(unet, ...)`.")
        for name, tensor in residuals.items():
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1 or not tensor.is_floating_point():
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ConceptMismatchError(
                    f"residuals[{name!r}] must be a 1-D floating-point tensor (one value vector), got {shape}."
                )
        if fidelity is not None and not isinstance(fidelity, ConceptFidelity):
            raise ConceptMismatchError(
                f"fidelity={type(fidelity).__name__} must be a ConceptFidelity (diffusers_infusion.fidelity) or None."
            )
        self.fidelity = fidelity
        self.class_word = class_word.strip()
        self.residuals: dict[str, torch.Tensor] = dict(residuals)
        self.base_model = base_model
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._hub_mixin_config = None  # the class word lives in the file's metadata, not in a config.json

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def zeros(
        cls, unet: torch.nn.Module, class_word: str, *, base_model: str | None = None, dtype=torch.float32
    ) -> InfusionConcept:
        """A concept with Δ = 0 in every cross-attention layer of ``unet`` (works for a UNet on ``meta``)."""
        layers = cross_attention_layers(unet)
        if not layers:
            raise ConceptMismatchError(f"{type(unet).__name__} has no cross-attention layers to put a concept on.")
        residuals = {name: torch.zeros(value_size(attn), dtype=dtype) for name, attn in layers.items()}
        return cls(class_word, residuals, base_model=base_model)

    @property
    def num_values(self) -> int:
        """Number of learned numbers in the concept (the fidelity knob's included)."""
        return sum(t.numel() for t in self.residuals.values()) + (self.fidelity.num_values if self.fidelity else 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.residuals.values())).dtype

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> InfusionConcept:
        """A copy (always: new tensors) with residuals converted to ``dtype`` and/or moved to ``device``."""
        residuals = {k: v.detach().to(device=device, dtype=dtype, copy=True) for k, v in self.residuals.items()}
        fidelity = None if self.fidelity is None else self.fidelity.to(dtype=dtype, device=device)
        return type(self)(self.class_word, residuals, base_model=self.base_model, metadata=self.metadata,
                          fidelity=fidelity)  # fmt: skip

    def validate_for(self, unet: torch.nn.Module) -> None:
        """Raise ``ConceptMismatchError`` unless the concept has one vector of the right length per layer."""
        expected = {name: value_size(attn) for name, attn in cross_attention_layers(unet).items()}
        unknown = sorted(set(self.residuals) - set(expected))
        missing = sorted(set(expected) - set(self.residuals))
        made_for = f" It was made for base model '{self.base_model}'." if self.base_model else ""
        if unknown or missing:
            raise ConceptMismatchError(
                f"Concept '{self.class_word}' does not fit this UNet ({len(expected)} cross-attention layers):"
                + (f" unknown layer names {unknown[:3]}{' ...' if len(unknown) > 3 else ''};" if unknown else "")
                + (f" missing layers {missing[:3]}{' ...' if len(missing) > 3 else ''};" if missing else "")
                + f"{made_for} Load it into a pipeline of the base model it was trained on."
            )
        for name, size in expected.items():
            got = self.residuals[name].numel()
            if got != size:
                raise ConceptMismatchError(
                    f"Concept '{self.class_word}': layer '{name}' expects a vector of length {size} "
                    f"(attn2.to_v.out_features), got {got}.{made_for} Load it into a pipeline of that base model."
                )
        if self.fidelity is not None:
            self.fidelity.check_fits(layer_sizes(unet), concept=self.class_word)

    # ----------------------------------------------------------------------------------------------- saving
    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``infusion_concept.safetensors`` (atomically) into ``save_directory``."""
        from . import __version__

        metadata = {
            **self.metadata,
            "format": FORMAT_NAME,
            "format_version": str(KNOB_VERSION if self.fidelity is not None else 1),
            "class_word": self.class_word,
            "base_model": self.base_model or "",
            "library": "diffusers-infusion",
            "library_version": __version__,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.fidelity is not None:
            metadata.update(self.fidelity.config.to_metadata())
        knob = self.fidelity.tensors() if self.fidelity is not None else {}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in {**self.residuals, **knob}.items()}
        atomic_save(tensors, Path(save_directory) / CONCEPT_WEIGHT_NAME, metadata)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The model card (``README.md``) written next to the concept file."""
        card_data = ModelCardData(**self._hub_mixin_info.model_card_data.to_dict())
        if self.base_model and not os.path.exists(self.base_model):
            card_data.base_model = self.base_model
        return ModelCard.from_template(
            card_data=card_data,
            template_str=self._hub_mixin_info.model_card_template,
            repo_url=self._hub_mixin_info.repo_url,
            paper_url=self._hub_mixin_info.paper_url,
            class_word=self.class_word,
            base_model=self.base_model,
            num_layers=len(self.residuals),
            num_values=self.num_values,
            dtype=str(self.dtype).removeprefix("torch."),
            fidelity=self._fidelity_summary(),
            **kwargs,
        )

    def _fidelity_summary(self) -> str:
        """One line on the knob for the model card ('' without one)."""
        if self.fidelity is None:
            return ""
        c = self.fidelity.config
        gate = "none" if c.max_timestep is None else f"t < {c.max_timestep:g}"
        bound = "none" if c.norm_bound is None else f"{c.norm_bound:g}"
        return (
            f"rank {c.rank} on {len(self.fidelity.up)} layers ({self.fidelity.num_values} values), timestep gate "
            f"{gate}, norm bound {bound}, default strength {c.strength:g}"
        )

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    @validate_hf_hub_args
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
        class_word: str | None = None,
    ) -> InfusionConcept:
        """Load a concept from a Hub repo id, a local folder, or a ``.safetensors`` file.

        Args:
            pretrained_model_name_or_path: Hub repo id (``"user/my-cat"``), folder, or file path.
            weight_name: File name inside the repo or folder (default ``infusion_concept.safetensors``).
            subfolder: Subfolder of the repo or folder holding the file.
            revision: Hub branch, tag or commit.
            token: Hub credential (as everywhere in diffusers).
            cache_dir: huggingface_hub cache folder.
            local_files_only: Only look in the local cache (also implied by ``HF_HUB_OFFLINE=1``).
            force_download: Download again even if cached.
            class_word: Overrides (or supplies) the class word stored in the file.
        """
        path = cls._resolve_file(
            check_source(pretrained_model_name_or_path),
            weight_name=weight_name,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            force_download=force_download,
        )
        return cls.from_file(path, class_word=class_word)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, class_word: str | None = None) -> InfusionConcept:
        """Read a concept from a local ``.safetensors`` file (into memory, once), validating it on the way.

        Raises ``ConceptFileError`` (``ConceptNotFoundError`` for a missing file) for anything wrong with the file:
        a folder, an unreadable, truncated or corrupt file, a pickle, tensors that are not one finite 1-D float
        vector per layer, or no usable class word (then also a ``ClassWordError``).
        """
        path = Path(path)
        tensors, metadata = read_safetensors(path)
        residuals, up, down = split_tensors(tensors)
        fidelity = None
        if up or down:
            try:
                config = FidelityConfig.from_metadata(metadata)
                fidelity = ConceptFidelity(config, up, down)
            except (FidelityConfigError, ConceptMismatchError) as error:
                raise ConceptFileError(
                    f"'{path}': its fidelity knob is inconsistent ({error}). Re-save the concept with "
                    "`save_pretrained`."
                ) from None
        word = class_word or metadata.get("class_word", "").strip()
        if not word:
            raise FileClassWordError(
                f"'{path}' stores no class_word in its metadata. Pass it when loading, e.g. "
                "`pipe.load_infusion_concept(..., class_word='cat')`."
            )
        if class_word and metadata.get("class_word") and class_word != metadata["class_word"]:
            logger.info("Using class_word=%r instead of the file's %r.", class_word, metadata["class_word"])
        extra = {k: v for k, v in metadata.items() if k not in _RESERVED_METADATA}
        return cls(word, residuals, base_model=metadata.get("base_model") or None, metadata=extra, fidelity=fidelity)

    @staticmethod
    def _resolve_file(name: str, *, weight_name: str | None, subfolder: str | None, **hub_kwargs) -> str:
        """Find the concept file for a file path, a folder, or a Hub repo id (downloading it if needed)."""
        weight_name = check_relative_path(weight_name, argument="weight_name")
        subfolder = check_relative_path(subfolder, argument="subfolder")
        if weight_name is not None and Path(weight_name).suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(weight_name)
        if os.path.isfile(name):
            return name
        if os.path.isdir(name):
            folder = Path(name, subfolder or "")
            candidate = folder / (weight_name or CONCEPT_WEIGHT_NAME)
            if candidate.is_file():
                return str(candidate)
            pickles = sorted(p.name for p in folder.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
            if weight_name is None and pickles:
                refuse_pickle(folder / pickles[0])
            raise ConceptNotFoundError(
                f"No '{candidate.name}' in folder '{folder}'. Pass weight_name= (and subfolder=) to pick the file."
            )
        try:
            validate_repo_id(name)
            return hf_hub_download(
                repo_id=name, filename=weight_name or CONCEPT_WEIGHT_NAME, subfolder=subfolder, **hub_kwargs
            )
        except (HFValidationError, ValueError) as error:
            raise ConceptNotFoundError(
                f"'{name}' is neither an existing file or folder nor a valid Hub repo id ({error}). "
                "Check the path, or pass a repo id like 'user/my-cat'."
            ) from error
        except (EntryNotFoundError, HfHubHTTPError, OSError) as error:
            where = f"repo '{name}'" + (f", subfolder '{subfolder}'" if subfolder else "")
            where += f", revision '{hub_kwargs['revision']}'" if hub_kwargs.get("revision") else ""
            raise ConceptNotFoundError(
                f"Could not get '{weight_name or CONCEPT_WEIGHT_NAME}' from {where}: {type(error).__name__}: {error}. "
                "Check the repo id, weight_name, subfolder and revision; offline (HF_HUB_OFFLINE=1 or "
                "local_files_only=True) the file must already be in the cache (cache_dir)."
            ) from error
