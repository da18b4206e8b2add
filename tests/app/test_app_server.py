"""The running page on localhost through gradio_client: its named endpoints, errors in the page, the app survives."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest
import torch

if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):  # in CI a missing extra fails, never skips
    pytest.importorskip("gradio_client", reason="the app's extra: pip install -e '.[app]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from diffusers_infusion import InfusionConcept  # noqa: E402

OFF = dict(concept_2="", concept_3="", concept_4="", on_2=False, on_3=False, on_4=False, strength_2=1.0,
           strength_3=1.0, strength_4=1.0)  # fmt: skip


@pytest.fixture(scope="module")
def client(served):
    client = Client(served[1], verbose=False, download_files=True, httpx_kwargs={"timeout": 600})  # slow CI
    yield client
    client.close()


def images(gallery) -> np.ndarray:
    return np.stack([np.asarray(PIL.Image.open(item["image"])) for item in gallery])


def generate(client, prompt, *, on=True, **kwargs):
    settings = dict(negative_prompt="", steps=3, guidance_scale=7.5, seed=5, randomize_seed=False, num_images=2,
                    concept_1="my_cat", on_1=on, strength_1=1.0, **OFF)  # fmt: skip
    return client.predict(prompt=prompt, **{**settings, **kwargs}, api_name="/generate")


def test_generate_endpoint_gives_base_and_concept_images(client, served):
    base, concept, seed = generate(client, "a photo of a cat")
    assert seed == 5 and images(base).shape == images(concept).shape == (2, served[0].resolution,
                                                                          served[0].resolution, 3)  # fmt: skip
    assert (images(base) != images(concept)).any()
    off_base, off, _ = generate(client, "a photo of a cat", on=False)
    assert np.array_equal(images(off), images(base)) and np.array_equal(images(off_base), images(base))
    _, _, drawn = generate(client, "a photo of a cat", randomize_seed=True, num_images=1, steps=1)
    assert isinstance(drawn, int | float) and 0 <= drawn < 2**31


def test_concept_endpoints_load_list_download_unload(client, trained_file, tmp_path):
    table = client.predict(source="", upload=handle_file(str(trained_file)), name="uploaded", class_word="",
                           api_name="/load_concept")[0]  # fmt: skip
    assert [row[:2] for row in table["data"]] == [["my_cat", "cat"], ["uploaded", "cat"]]
    assert [row[0] for row in client.predict(api_name="/list_concepts")[0]["data"]] == ["my_cat", "uploaded"]
    downloaded = InfusionConcept.from_file(client.predict(name="uploaded", api_name="/concept_file"))
    for layer, tensor in InfusionConcept.from_file(trained_file).residuals.items():
        assert torch.equal(downloaded.residuals[layer], tensor)
    table = client.predict(name="uploaded", api_name="/unload_concept")[0]
    assert [row[0] for row in table["data"]] == ["my_cat"]


def test_bad_input_is_shown_with_the_librarys_message_and_the_app_keeps_running(client, tmp_path):
    pickled = tmp_path / "concept.ckpt"
    torch.save({"x": torch.zeros(3)}, pickled)
    with pytest.raises(AppError, match="never unpickles"):
        client.predict(source="", upload=handle_file(str(pickled)), name="", class_word="", api_name="/load_concept")
    with pytest.raises(AppError, match="nope"):  # the page only offers loaded names
        client.predict(name="nope", api_name="/unload_concept")
    with pytest.raises(AppError, match="No photos"):
        client.predict(photos=[], class_word="cat", name="", steps=2, learning_rate=0.01, seed=0,
                       validation_prompt="", validation_steps=1, api_name="/train")  # fmt: skip
    fake = tmp_path / "photo.png"
    fake.write_text("not an image")
    with pytest.raises(AppError, match="cannot read image"):
        client.predict(photos=[handle_file(str(fake))], class_word="cat", name="", steps=2, learning_rate=0.01,
                       seed=0, validation_prompt="", validation_steps=1, api_name="/train")  # fmt: skip
    with pytest.raises(AppError, match="☃"):
        client.predict(photos=[], class_word="☃", name="", steps=2, learning_rate=0.01, seed=0,
                       validation_prompt="", validation_steps=1, api_name="/train")  # fmt: skip
    assert [row[0] for row in client.predict(api_name="/list_concepts")[0]["data"]] == ["my_cat"]
    base, concept, _ = generate(client, "a cat", steps=1, num_images=1)  # still serving
    assert images(base).shape == images(concept).shape


def test_train_endpoint_streams_progress_then_loads_the_concept(client, photos):
    job = client.submit(photos=[handle_file(str(p)) for p in photos], class_word="cat", name="trained_here",
                        steps=5, learning_rate=0.01, seed=0, validation_prompt="a cat", validation_steps=2,
                        api_name="/train")  # fmt: skip
    status, validation, concept_file, table, *_ = job.result(timeout=600)
    assert "trained_here" in status and "Done" in status
    assert PIL.Image.open(validation).size[0] == 2 * PIL.Image.open(validation).size[1]  # base | concept
    assert InfusionConcept.from_file(concept_file).class_word == "cat"
    assert [row[0] for row in table["data"]] == ["my_cat", "trained_here"]
    assert len(job.outputs()) >= 3  # validation at steps 2 and 4 were shown before the end
    client.predict(name="trained_here", api_name="/unload_concept")
