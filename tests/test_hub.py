"""The real Hub code paths, offline: ``hf_hub_download`` from a pre-populated cache, ``push_to_hub`` to loopback."""

import huggingface_hub
import pytest
import torch
from hub_server import LocalHub, point_hub_at, populate_cache

from diffusers_infusion import CONCEPT_WEIGHT_NAME, ConceptFileError, ConceptNotFoundError, InfusionConcept


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def concept_bytes(concept, tmp_path, name="saved") -> bytes:
    concept.save_pretrained(tmp_path / name)
    return (tmp_path / name / CONCEPT_WEIGHT_NAME).read_bytes()


@pytest.fixture
def hub_cache(pipe, make_concept, tmp_path):
    """A cache holding user/my-cat at main (default file name) and at v2 (subfolder + custom weight name)."""
    cache = tmp_path / "cache"
    main, v2 = make_concept(pipe.unet, "cat", seed=1), make_concept(pipe.unet, "cat", seed=2)
    populate_cache(cache, "user/my-cat", {CONCEPT_WEIGHT_NAME: concept_bytes(main, tmp_path, "a")})
    commit = populate_cache(
        cache, "user/my-cat", {"concepts/cat-v2.safetensors": concept_bytes(v2, tmp_path, "b")}, revision="v2"
    )
    return cache, main, v2, commit


def test_load_by_repo_id_from_cache(pipe, gen, hub_cache):
    cache, main, _, _ = hub_cache
    name = pipe.load_infusion_concept("user/my-cat", cache_dir=cache)
    assert name == "default_0"
    for layer, tensor in main.residuals.items():
        assert torch.equal(pipe.infusion_concepts[name].residuals[layer], tensor)


def test_revision_subfolder_and_weight_name(pipe, hub_cache):
    cache, _, v2, commit = hub_cache
    for revision in ("v2", commit):
        pipe.load_infusion_concept(
            "user/my-cat", f"v2-{revision}", revision=revision, subfolder="concepts",
            weight_name="cat-v2.safetensors", cache_dir=cache, local_files_only=True,
        )  # fmt: skip
        loaded = pipe.infusion_concepts[f"v2-{revision}"]
        assert all(torch.equal(loaded.residuals[k], v) for k, v in v2.residuals.items())


def test_load_from_cache_gives_the_same_images_as_the_object(pipe, gen, hub_cache):
    cache, main, _, _ = hub_cache
    pipe.load_infusion_concept("user/my-cat", "hub", cache_dir=cache)
    from_hub = pipe("a cat", num_inference_steps=2, generator=gen(), output_type="np").images
    pipe.unload_infusion_concept()
    pipe.load_infusion_concept(main, "object")
    from_object = pipe("a cat", num_inference_steps=2, generator=gen(), output_type="np").images
    assert (from_hub == from_object).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pretrained_model_name_or_path": "user/unknown"}, "repo 'user/unknown'"),
        ({"pretrained_model_name_or_path": "user/my-cat", "revision": "v9"}, "revision 'v9'"),
        ({"pretrained_model_name_or_path": "user/my-cat", "subfolder": "nope"}, "subfolder 'nope'"),
        ({"pretrained_model_name_or_path": "user/my-cat", "weight_name": "other.safetensors"}, "other.safetensors"),
    ],
)
def test_missing_repo_or_file_offline(hub_cache, kwargs, match):
    cache = hub_cache[0]
    with pytest.raises(ConceptNotFoundError, match=match) as info:
        InfusionConcept.from_pretrained(cache_dir=cache, **kwargs)
    assert "offline" in str(info.value)


def test_pickle_weight_name_is_refused_before_download(hub_cache):
    with pytest.raises(ConceptFileError, match="never unpickles"):
        InfusionConcept.from_pretrained("user/my-cat", weight_name="concept.bin", cache_dir=hub_cache[0])


def test_push_to_hub_uses_huggingface_hub_commits(pipe, make_concept, monkeypatch, tmp_path):
    concept = make_concept(pipe.unet, "cat")
    with LocalHub() as hub:
        point_hub_at(monkeypatch, hub.endpoint)
        url = concept.push_to_hub("user/my-cat", token="hf_test")
    files = hub.repos["user/my-cat"]
    assert sorted(files) == ["README.md", CONCEPT_WEIGHT_NAME]
    assert "load_infusion_concept" in files["README.md"].decode()
    (tmp_path / "pulled").mkdir()
    (tmp_path / "pulled" / CONCEPT_WEIGHT_NAME).write_bytes(files[CONCEPT_WEIGHT_NAME])
    pulled = InfusionConcept.from_pretrained(tmp_path / "pulled")
    assert pulled.class_word == "cat"
    assert all(torch.equal(pulled.residuals[k], v) for k, v in concept.residuals.items())
    assert "commit" in str(url)
