"""The shipped toy Stable Diffusion loads with plain diffusers and follows text on held-out combinations."""

from __future__ import annotations

import pytest
import torch

from diffusers_infusion.toy.model import TOY_MODEL_DIR
from diffusers_infusion.toy.reader import READER_PATH

pytestmark = pytest.mark.skipif(
    not (TOY_MODEL_DIR / "model_index.json").exists() or not READER_PATH.exists(), reason="toy model not trained yet"
)


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_model_folder_is_small_and_complete(toy_pipe):
    size = sum(f.stat().st_size for f in TOY_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 25e6
    assert toy_pipe.safety_checker is None
    assert type(toy_pipe.scheduler).__name__ == "DDIMScheduler"
    blocks = [n for n, m in toy_pipe.unet.named_modules() if n.endswith("attn2")]
    resolutions = {n.split(".attentions")[0] for n in blocks}
    assert len(resolutions) >= 2


def test_follows_text_on_held_out_combinations(toy_pipe):
    from diffusers_infusion.toy.evaluate import evaluate_text_following

    torch.set_num_threads(min(2, torch.get_num_threads()))
    scores = evaluate_text_following(toy_pipe, num_samples=25, num_inference_steps=10, batch_size=25)
    # loose thresholds (the full benchmark on 200 samples and 25 steps is in examples/toy_world/RESULTS.md);
    # a text-blind model scores about 1/5, 1/8 and 1/5
    assert scores["class"] >= 0.6, scores
    assert scores["color"] >= 0.5, scores
    assert scores["background"] >= 0.5, scores
    # position is not asserted: the shipped model does not follow position words yet (reads at chance, see RESULTS.md)
