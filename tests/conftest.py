"""Seeded tiny components (built in code, no download) shared by the tests."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
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


@pytest.fixture
def cpu_sequential_offload(monkeypatch):
    """diffusers' ``cpu_offload`` on ``cpu`` instead of ``cpu:0`` (why: test_processor_kwargs_and_offload.py)."""
    import accelerate

    cpu_offload = accelerate.cpu_offload  # diffusers imports it from accelerate inside the method

    def offload(model, execution_device=None, **kwargs):
        if execution_device is not None and torch.device(execution_device).type == "cpu":
            execution_device = torch.device("cpu")
        return cpu_offload(model, execution_device, **kwargs)

    monkeypatch.setattr(accelerate, "cpu_offload", offload)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA file in diffusers' format, made in code: peft LoRA on a copy of the tiny UNet, random non-zero B."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(tiny_sd_components(seed=0)["unet"])
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)  # fmt: skip
    unet.add_adapter(config)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def _random_knob_concept(unet, class_word: str = "cat", seed: int = 0, scale: float = 1.0, **options):
    """A ``_random_concept`` with a fidelity knob: ``FidelityConfig(**options)`` (rank 2 by default), random U."""
    from diffusers_infusion.attention import layer_sizes
    from diffusers_infusion.fidelity import ConceptFidelity, FidelityConfig

    concept = _random_concept(unet, class_word, seed, scale)
    gen = torch.Generator().manual_seed(seed + 1000)
    knob = ConceptFidelity.init(layer_sizes(unet), FidelityConfig(**{"rank": 2, **options}), generator=gen)
    for name in sorted(knob.up):
        knob.up[name] = scale * torch.randn(knob.up[name].shape, generator=gen)
    concept.fidelity = knob
    return concept


@pytest.fixture
def make_knob_concept():
    """``make_knob_concept(unet, class_word="cat", seed=0, scale=1.0, **FidelityConfig options)``: random Δ and U."""
    return _random_knob_concept


@pytest.fixture
def setup(components, tmp_path):
    """For the training script's tests: a tiny base model folder and 4 photos with captions in metadata.jsonl."""
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(tmp_path / "base")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    with open(photos / "metadata.jsonl", "w") as f:
        for i in range(4):
            pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
            pixels[5:15, 6:18] = [200, 40 * i, 40]
            PIL.Image.fromarray(pixels).save(photos / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a photo of a cat"}) + "\n")
    return tmp_path
