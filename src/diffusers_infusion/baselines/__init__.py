"""Personalization baselines behind one interface, for benchmarks against Infusion (issue #6).

``METHODS`` maps each method's ``name`` to its class; every class trains through :func:`train_method`.
"""

from __future__ import annotations

from importlib.util import find_spec

from .base import PersonalizationMethod, copy_module, encode_photos, step_generator, train_method
from .custom_diffusion import CustomDiffusionMethod
from .dreambooth import DreamBoothMethod
from .infusion import InfusionMethod, InfusionOwnQueryMethod
from .lora import LoRAMethod
from .textual_inversion import TextualInversionMethod

if find_spec(f"{__name__}.perfusion") is not None:  # written separately; registered once it exists
    from . import perfusion  # noqa: F401


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


METHODS: dict[str, type[PersonalizationMethod]] = {
    c.name: c for c in _subclasses(PersonalizationMethod) if "name" in vars(c)
}

__all__ = [
    "METHODS",
    "CustomDiffusionMethod",
    "DreamBoothMethod",
    "InfusionMethod",
    "InfusionOwnQueryMethod",
    "LoRAMethod",
    "PersonalizationMethod",
    "TextualInversionMethod",
    "copy_module",
    "encode_photos",
    "step_generator",
    "train_method",
]
