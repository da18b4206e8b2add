"""The app's fixtures: the toy model loaded once, a fresh page state per test, a concept trained for 5 steps."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
from app_backend import InfusionApp  # noqa: E402

from diffusers_infusion import InfusionPipeline  # noqa: E402
from diffusers_infusion.toy import TOY_MODEL_DIR  # noqa: E402

CONCEPTS_DIR = ROOT / "examples" / "toy_world" / "concepts"


@pytest.fixture(scope="session")
def toy_pipe() -> InfusionPipeline:
    return InfusionPipeline.from_pretrained(str(TOY_MODEL_DIR))


@pytest.fixture
def app(toy_pipe, tmp_path) -> InfusionApp:
    """A page state of its own (no concept loaded) on the shared toy weights."""
    pipe = InfusionPipeline(**toy_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return InfusionApp(pipe, model_id=str(TOY_MODEL_DIR), workdir=tmp_path / "work")


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The photos of the first shipped concept folder (any will do: the class word is 'cat')."""
    folders = sorted(p for p in CONCEPTS_DIR.iterdir() if p.is_dir())
    assert folders, f"no concept folder in {CONCEPTS_DIR}"
    found = sorted(p for p in folders[0].iterdir() if p.suffix == ".png")
    assert len(found) >= 3, f"{folders[0]} has {len(found)} photos"
    return found


@pytest.fixture(scope="session")
def trained_file(toy_pipe, photos, tmp_path_factory) -> Path:
    """A 'cat' concept trained for 5 steps (lr 0.1, so that it visibly changes images), saved as safetensors."""
    pipe = InfusionPipeline(**toy_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    app = InfusionApp(pipe, model_id=str(TOY_MODEL_DIR), workdir=tmp_path_factory.mktemp("trained"))
    updates = list(app.train(photos, "cat", steps=5, learning_rate=0.1, name="my_cat", validation_steps=100,
                             validation_inference_steps=2))  # fmt: skip
    return updates[-1].concept_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(toy_pipe, trained_file, tmp_path_factory):
    """The page running on localhost (a free port), with the 5-step concept loaded as 'my_cat'; closed after."""
    if not IN_CI:  # in CI a missing extra fails, never skips
        pytest.importorskip("gradio", reason="the app's extra: pip install -e '.[app]'")
    import app as page

    pipe = InfusionPipeline(**toy_pipe.components)
    app = InfusionApp(pipe, model_id=str(TOY_MODEL_DIR), workdir=tmp_path_factory.mktemp("served"))
    app.load_concept(trained_file, name="my_cat")
    demo = page.build_demo(app)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **page.launch_kwargs())  # fmt: skip
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
