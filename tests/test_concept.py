"""The concept file: format, round trip, model card, SD 1.5 size, and refusals of bad files."""

import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_infusion import (
    CONCEPT_WEIGHT_NAME,
    ClassWordError,
    ConceptFileError,
    ConceptMismatchError,
    ConceptNotFoundError,
    InfusionConcept,
)
from diffusers_infusion.configs import SD15_UNET, build_unet


def sd15_unet_on_meta() -> torch.nn.Module:
    """Stable Diffusion 1.5's UNet config, built without weights."""
    return build_unet(SD15_UNET)


def test_sd15_concept_has_16_layers_and_12480_values(tmp_path):
    concept = InfusionConcept.zeros(sd15_unet_on_meta(), "cat", dtype=torch.float16)
    assert len(concept.residuals) == 16
    assert concept.num_values == 12_480
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2" in concept.residuals
    assert {t.numel() for t in concept.residuals.values()} == {320, 640, 1280}
    concept.save_pretrained(tmp_path)
    size = (tmp_path / CONCEPT_WEIGHT_NAME).stat().st_size
    assert 24_960 < size < 24_960 + 4_096  # 2 bytes per value plus the safetensors header


def test_file_format_names_tensors_by_layer_path_with_metadata(pipe, make_concept, tmp_path):
    concept = make_concept(pipe.unet, "cat")
    concept.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    with safe_open(str(tmp_path / CONCEPT_WEIGHT_NAME), "pt") as f:
        metadata = f.metadata()
        assert set(f.keys()) == set(concept.residuals)
    assert metadata["class_word"] == "cat"
    assert metadata["base_model"] == "tiny-sd"
    assert metadata["format"] == "infusion-concept"
    assert metadata["dtype"] == "float32"
    assert metadata["library_version"]


def test_round_trip_is_exact(pipe, make_concept, tmp_path):
    concept = make_concept(pipe.unet, "teddy bear")
    concept.save_pretrained(tmp_path)
    loaded = InfusionConcept.from_pretrained(tmp_path)
    assert loaded.class_word == "teddy bear" and loaded.base_model == "tiny-sd"
    for name, tensor in concept.residuals.items():
        assert torch.equal(loaded.residuals[name], tensor)
    by_file = InfusionConcept.from_pretrained(tmp_path / CONCEPT_WEIGHT_NAME, class_word="teddy")
    assert by_file.class_word == "teddy"


def test_model_card(pipe, make_concept, tmp_path):
    make_concept(pipe.unet, "cat").save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    expected = ("library_name: diffusers-infusion", "- infusion", "- text-to-image", "`cat`", "load_infusion_concept")
    for text in expected:
        assert text in card


def test_save_is_atomic_when_the_write_fails(pipe, make_concept, tmp_path, monkeypatch):
    concept = make_concept(pipe.unet, "cat")
    concept.save_pretrained(tmp_path)
    before = (tmp_path / CONCEPT_WEIGHT_NAME).read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("diffusers_infusion.concept_io.os.fsync", killed)  # killed with the temp file written
    with pytest.raises(KeyboardInterrupt):
        make_concept(pipe.unet, "cat", seed=5)._save_pretrained(tmp_path)
    assert (tmp_path / CONCEPT_WEIGHT_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------------------------- bad input
class Boom:
    def __reduce__(self):
        return (open, ("UNPICKLED", "w"))  # would create a file if anything unpickled it


@pytest.mark.parametrize("name", ["concept.bin", "concept.pt", "concept.ckpt", "infusion_concept.safetensors"])
def test_pickles_are_refused_without_unpickling(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    if name.endswith(".safetensors"):  # a pickle wearing a safetensors name
        path.write_bytes(pickle.dumps(Boom()))
    else:
        torch.save({"x": Boom()}, path)
    with pytest.raises(ConceptFileError, match="never unpickles.*safetensors"):
        InfusionConcept.from_pretrained(path)
    assert not (tmp_path / "UNPICKLED").exists()


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConceptFileError, match="pytorch_model.bin.*never unpickles"):
        InfusionConcept.from_pretrained(tmp_path)


def test_truncated_file(pipe, make_concept, tmp_path):
    make_concept(pipe.unet).save_pretrained(tmp_path)
    path = tmp_path / CONCEPT_WEIGHT_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConceptFileError, match=f"{CONCEPT_WEIGHT_NAME}.*truncated or corrupt"):
        InfusionConcept.from_pretrained(tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ConceptFileError, match="x.safetensors"):
        InfusionConcept.from_pretrained(path)


def test_missing_class_word_says_how_to_pass_it(tmp_path):
    save_file({"a.attn2": torch.zeros(4)}, tmp_path / CONCEPT_WEIGHT_NAME)
    with pytest.raises(ClassWordError, match="class_word='cat'"):
        InfusionConcept.from_pretrained(tmp_path)
    assert InfusionConcept.from_pretrained(tmp_path, class_word="cat").class_word == "cat"


def test_a_lora_file_is_not_a_concept(tmp_path):
    save_file({"lora.down.weight": torch.zeros(4, 8)}, tmp_path / "lora.safetensors", metadata={"class_word": "c"})
    with pytest.raises(ConceptFileError, match=r"'lora.down.weight' has shape \(4, 8\)"):
        InfusionConcept.from_pretrained(tmp_path / "lora.safetensors")


def test_missing_local_file_and_folder(tmp_path):
    with pytest.raises(ConceptNotFoundError, match="weight_name="):
        InfusionConcept.from_pretrained(tmp_path)
    with pytest.raises(ConceptNotFoundError, match="neither an existing file"):
        InfusionConcept.from_pretrained(str(tmp_path / "no" / "such" / "place"))


def test_constructor_validates(pipe):
    with pytest.raises(ClassWordError, match="class_word=''"):
        InfusionConcept("", {"a": torch.zeros(3)})
    with pytest.raises(ConceptMismatchError, match=r"residuals\['a'\] must be a 1-D"):
        InfusionConcept("cat", {"a": torch.zeros(3, 3)})


def test_concept_for_another_unet_is_refused(pipe):
    concept = InfusionConcept.zeros(sd15_unet_on_meta(), "cat", base_model="runwayml/stable-diffusion-v1-5")
    with pytest.raises(ConceptMismatchError, match="unknown layer names.*stable-diffusion-v1-5"):
        concept.validate_for(pipe.unet)


def test_wrong_vector_length_says_expected_and_got(pipe):
    concept = InfusionConcept.zeros(pipe.unet, "cat")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    concept.residuals[name] = torch.zeros(7)
    with pytest.raises(ConceptMismatchError, match=f"'{name}' expects a vector of length 16.*got 7"):
        concept.validate_for(pipe.unet)


def test_config_json_is_not_written(pipe, tmp_path):
    InfusionConcept.zeros(pipe.unet, "cat").save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONCEPT_WEIGHT_NAME]
