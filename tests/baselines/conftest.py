"""Fixtures for the baselines: a tiny base pipeline (epsilon or v-prediction) and a few synthetic photos."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffusers_infusion.tiny import tiny_sd_components
from diffusers_infusion.training.data import InstanceData

CAPTIONS = ["a photo of a cat", "a cat on the grass", "a photo of the cat at night"]


def make_pipe(*, v_prediction: bool = False) -> StableDiffusionPipeline:
    components = tiny_sd_components(seed=0)
    if v_prediction:
        components["scheduler"] = DDIMScheduler.from_config(
            components["scheduler"].config, prediction_type="v_prediction", rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
        )  # fmt: skip
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def base_pipe() -> StableDiffusionPipeline:
    """The tiny epsilon-prediction base pipeline (fresh per test)."""
    return make_pipe()


@pytest.fixture
def vpred_pipe() -> StableDiffusionPipeline:
    """The tiny components with a v-prediction, zero-terminal-SNR scheduler (as the toy model)."""
    return make_pipe(v_prediction=True)


@pytest.fixture
def data() -> InstanceData:
    """Three seeded 16x16 'photos' in [-1, 1], each with the three captions."""
    pixels = torch.rand((3, 3, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return InstanceData(pixels=pixels, captions=[CAPTIONS] * 3, masks=None, files=["0.png", "1.png", "2.png"])
