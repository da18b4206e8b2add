"""Seeded tiny components (built in code, no download) shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from diffusers_infusion import InfusionConcept, InfusionPipeline  # noqa: E402
from diffusers_infusion.tiny import tiny_sd_components  # noqa: E402


@pytest.fixture
def components() -> dict:
    """Fresh seeded tiny SD components (UNet with cross-attention at two resolutions)."""
    return tiny_sd_components(seed=0)


@pytest.fixture
def pipe(components) -> InfusionPipeline:
    pipe = InfusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pipe(components) -> StableDiffusionPipeline:
    """A plain pipeline sharing the same component objects as ``pipe``."""
    sd = StableDiffusionPipeline(**components, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def _random_concept(unet, class_word: str = "cat", seed: int = 0, scale: float = 1.0) -> InfusionConcept:
    concept = InfusionConcept.zeros(unet, class_word, base_model="tiny-sd")
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(concept.residuals):
        concept.residuals[name] = scale * torch.randn(concept.residuals[name].shape, generator=gen)
    return concept


@pytest.fixture
def make_concept():
    """``make_concept(unet, class_word="cat", seed=0, scale=1.0)``: seeded random residuals, visibly non-zero."""
    return _random_concept


@pytest.fixture
def gen():
    """``gen(seed=0)``: a fresh seeded CPU generator."""
    return lambda seed=0: torch.Generator().manual_seed(seed)
