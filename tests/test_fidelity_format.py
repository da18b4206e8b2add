"""The fidelity knob in ``infusion_concept.safetensors``: format version 2, old files, newer files refused."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from diffusers_infusion import CONCEPT_WEIGHT_NAME, ConceptFileError, ConceptMismatchError, InfusionConcept
from diffusers_infusion.errors import ConceptFormatVersionError
from diffusers_infusion.fidelity import ConceptFidelity, FidelityConfig
from diffusers_infusion.tiny import tiny_sd_components


def _header(path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def test_round_trip_keeps_the_knob_exactly_with_format_version_2(pipe, make_knob_concept, tmp_path):
    options = dict(rank=3, max_timestep=400, layers="finest", norm_bound=0.5, strength=0.8)
    concept = make_knob_concept(pipe.unet, "cat", **options)
    concept.save_pretrained(tmp_path)
    header = _header(tmp_path / CONCEPT_WEIGHT_NAME)
    meta = header["__metadata__"]
    assert meta["format_version"] == "2" and meta["fidelity_rank"] == "3" and meta["fidelity_layers"] == '"finest"'
    layer = next(iter(concept.fidelity.up))
    assert header[f"{layer}.fidelity_up"]["shape"] == [16, 3] and header[f"{layer}.fidelity_down"]["shape"] == [16, 3]
    loaded = InfusionConcept.from_pretrained(tmp_path)
    assert loaded.fidelity.config == FidelityConfig(**options)
    assert loaded.metadata == {}  # the knob's options are not stray notes
    for name in concept.fidelity.up:
        assert torch.equal(loaded.fidelity.up[name], concept.fidelity.up[name])
        assert torch.equal(loaded.fidelity.down[name], concept.fidelity.down[name])
    for name, delta in concept.residuals.items():
        assert torch.equal(loaded.residuals[name], delta)
    # storage: rank × (value_dim + query_dim) per knob layer, on top of Δ
    assert loaded.num_values == sum(d.numel() for d in concept.residuals.values()) + 3 * (16 + 16) * 3


def test_a_concept_without_the_knob_is_written_as_before_version_1(pipe, make_concept, tmp_path):
    make_concept(pipe.unet, "cat").save_pretrained(tmp_path)
    header = _header(tmp_path / CONCEPT_WEIGHT_NAME)
    assert header["__metadata__"]["format_version"] == "1"
    assert not [k for k in header if "fidelity" in k] and not [k for k in header["__metadata__"] if "fidelity" in k]
    assert InfusionConcept.from_pretrained(tmp_path).fidelity is None


def test_files_without_a_version_and_of_version_1_keep_loading(pipe, make_concept, tmp_path):
    concept = make_concept(pipe.unet, "cat")
    for version in (None, "1"):
        meta = {"class_word": "cat"} | ({} if version is None else {"format_version": version})
        save_file(dict(concept.residuals), tmp_path / "old.safetensors", metadata=meta)
        loaded = InfusionConcept.from_file(tmp_path / "old.safetensors")
        assert loaded.fidelity is None and all(
            torch.equal(loaded.residuals[k], v) for k, v in concept.residuals.items()
        )


def test_a_newer_format_is_refused_saying_to_upgrade(pipe, make_knob_concept, tmp_path):
    make_knob_concept(pipe.unet, "cat").save_pretrained(tmp_path)
    path = tmp_path / CONCEPT_WEIGHT_NAME
    tensors, meta = load_file(path), _header(path)["__metadata__"]
    tensors["some.new.kind"] = torch.zeros(2, 2, 2)  # what a future version might hold
    save_file(tensors, path, metadata={**meta, "format_version": "3", "library_version": "9.0"})
    newer = r"format version 3 \(written by diffusers-infusion 9\.0\).*up to 2\. Upgrade diffusers-infusion"
    with pytest.raises(ConceptFormatVersionError, match=newer):
        InfusionConcept.from_pretrained(tmp_path)
    assert issubclass(ConceptFormatVersionError, ConceptFileError)
    save_file(tensors, path, metadata={**meta, "format_version": "two"})
    with pytest.raises(ConceptFileError, match="format_version 'two' is not a whole number"):
        InfusionConcept.from_pretrained(tmp_path)


def test_knob_tensors_in_a_version_1_file_or_inconsistent_knobs_are_refused(pipe, make_knob_concept, tmp_path):
    make_knob_concept(pipe.unet, "cat").save_pretrained(tmp_path)
    path = tmp_path / CONCEPT_WEIGHT_NAME
    tensors, meta = load_file(path), _header(path)["__metadata__"]
    save_file(tensors, path, metadata={**meta, "format_version": "1"})
    with pytest.raises(ConceptFileError, match=r"fidelity_(up|down)' has shape \(16, 2\).*one 1-D float vector per"):
        InfusionConcept.from_pretrained(tmp_path)
    save_file(tensors, path, metadata={**meta, "fidelity_rank": "5"})  # the tensors have 2 columns
    with pytest.raises(ConceptFileError, match=r"fidelity knob is inconsistent.*with 5 columns"):
        InfusionConcept.from_pretrained(tmp_path)
    down = next(k for k in tensors if k.endswith(".fidelity_down"))
    save_file({k: v for k, v in tensors.items() if k != down}, path, metadata=meta)
    with pytest.raises(ConceptFileError, match="must cover the same, non-empty set of layers"):
        InfusionConcept.from_pretrained(tmp_path)
    bad = dict(tensors)
    bad[down] = bad[down].clone()
    bad[down][0, 0] = float("nan")
    save_file(bad, path, metadata=meta)
    with pytest.raises(ConceptFileError, match="NaN or infinite"):
        InfusionConcept.from_pretrained(tmp_path)


def test_a_knob_for_another_unet_is_refused_on_load(pipe, make_concept):
    other = tiny_sd_components(seed=0, block_out_channels=(16, 48))["unet"]
    from diffusers_infusion.attention import layer_sizes

    concept = make_concept(pipe.unet, "cat")
    sizes = layer_sizes(other)
    concept.fidelity = ConceptFidelity.init({k: v for k, v in sizes.items() if k in concept.residuals},
                                            FidelityConfig(rank=2))  # fmt: skip
    with pytest.raises(ConceptMismatchError, match=r"the fidelity knob of layer .* has U \(48, 2\)"):
        pipe.load_infusion_concept(concept)


def test_loading_under_another_class_word_keeps_the_knob(pipe, make_knob_concept):
    name = pipe.load_infusion_concept(make_knob_concept(pipe.unet, "cat"), class_word="dog")
    assert pipe.infusion_concepts[name].class_word == "dog" and pipe.infusion_concepts[name].fidelity is not None


def test_model_card_describes_the_knob(pipe, make_knob_concept, tmp_path):
    make_knob_concept(pipe.unet, "cat", rank=4, max_timestep=300, norm_bound=0.5).save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert "fidelity knob" in text and "rank 4 on 7 layers" in text and "t < 300" in text and "norm bound 0.5" in text


def test_constructor_checks_the_knob(pipe, make_concept):
    concept = make_concept(pipe.unet, "cat")
    with pytest.raises(ConceptMismatchError, match="fidelity=dict must be a ConceptFidelity"):
        InfusionConcept("cat", concept.residuals, fidelity={})
    with pytest.raises(ConceptMismatchError, match="must be a 2-D float tensor with 2 columns"):
        ConceptFidelity(FidelityConfig(rank=2), {"a": torch.zeros(4, 3)}, {"a": torch.zeros(4, 2)})
