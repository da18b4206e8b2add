"""Concept files on disk: no false pickle alarms, in-memory loading, whole files only, permissions, stale temps."""

import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from diffusers_infusion import CONCEPT_WEIGHT_NAME, ConceptFileError, ConceptNotFoundError, InfusionConcept, concept_io
from diffusers_infusion.concept_io import remove_stale_temp_files


def header_length(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


# ------------------------------------------------------------------------------- item 1: 0x80 is not a pickle
def test_every_saved_concept_loads_whatever_its_header_length(pipe, make_concept, tmp_path):
    concept = make_concept(pipe.unet, "cat")
    lengths = set()
    for n in range(256):  # the base_model's length moves the header length through every value mod 256
        concept.base_model = "x" * n
        concept._save_pretrained(tmp_path)
        lengths.add(header_length(tmp_path / CONCEPT_WEIGHT_NAME) % 256)
        if header_length(tmp_path / CONCEPT_WEIGHT_NAME) % 256 == 0x80:
            assert (tmp_path / CONCEPT_WEIGHT_NAME).read_bytes()[0] == 0x80
        loaded = InfusionConcept.from_pretrained(tmp_path)
        assert loaded.base_model == (concept.base_model or None)
    assert 0x80 in lengths  # the case of the report was exercised


def test_a_huge_header_length_is_corrupt_not_a_pickle(pipe, make_concept, tmp_path):
    make_concept(pipe.unet).save_pretrained(tmp_path)
    path = tmp_path / CONCEPT_WEIGHT_NAME
    data = path.read_bytes()
    path.write_bytes(b"\x80\x02" + b"\xff" * 6 + data[8:])  # starts like a protocol-2 pickle
    with pytest.raises(ConceptFileError, match="header length field says") as error:
        InfusionConcept.from_file(path)
    assert "pickle" not in str(error.value)


# ------------------------------------------------------------------------------- item 4: non-finite residuals
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_residuals_in_a_file_are_refused(pipe, make_concept, tmp_path, bad):
    concept = make_concept(pipe.unet)
    layer = sorted(concept.residuals)[1]
    concept.residuals[layer][3] = bad
    concept.save_pretrained(tmp_path)
    with pytest.raises(ConceptFileError, match=f"tensor '{layer}' holds 1 NaN or infinite values.*retrain"):
        InfusionConcept.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="NaN or infinite values in layer"):  # the object itself, not loadable
        pipe.load_infusion_concept(concept)


# ------------------------------------------------------------------------------- item 5: in memory, once
def test_a_loaded_concept_does_not_change_when_the_file_is_rewritten_or_truncated(pipe, make_concept, tmp_path):
    first, second = make_concept(pipe.unet, seed=1), make_concept(pipe.unet, seed=2)
    first.save_pretrained(tmp_path)
    path = tmp_path / CONCEPT_WEIGHT_NAME
    loaded = InfusionConcept.from_pretrained(tmp_path)
    with open(path, "r+b") as f:  # rewrite in place (what an mmap would see), then truncate (SIGBUS under mmap)
        size = len(f.read())
        f.seek(size // 2)
        f.write(os.urandom(size - size // 2))
        f.truncate(200)
    for name, tensor in first.residuals.items():
        assert torch.equal(loaded.residuals[name], tensor), name
    loaded.residuals[name].add_(1)  # writable memory of its own
    second.save_pretrained(tmp_path)
    assert torch.equal(InfusionConcept.from_pretrained(tmp_path).residuals[name], second.residuals[name])


def test_to_always_copies(pipe, make_concept):
    concept = make_concept(pipe.unet)
    same = concept.to(dtype=torch.float32, device="cpu")
    name = next(iter(concept.residuals))
    assert same.residuals[name].data_ptr() != concept.residuals[name].data_ptr()
    concept.residuals[name].add_(1)
    assert not torch.equal(same.residuals[name], concept.residuals[name])


def test_concurrent_writers_and_readers_see_whole_files_only(pipe, tmp_path):
    """Two writers save different concepts into one folder while a reader loads it: every read is one whole file."""
    concepts = {}
    for word, value in (("cat", 1.0), ("dog", 2.0)):
        concepts[word] = InfusionConcept.zeros(pipe.unet, word)
        for name in concepts[word].residuals:
            concepts[word].residuals[name].fill_(value)
    concepts["cat"].save_pretrained(tmp_path)
    stop, errors, reads = threading.Event(), [], []

    def write(concept):
        while not stop.is_set():
            concept._save_pretrained(tmp_path)

    def read():
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                loaded = InfusionConcept.from_pretrained(tmp_path)
            except Exception as error:  # noqa: BLE001 - any error is a failure of the promise
                errors.append(error)
                break
            expected = {"cat": 1.0, "dog": 2.0}[loaded.class_word]
            values = torch.cat(list(loaded.residuals.values()))
            reads.append(bool((values == expected).all()))
        stop.set()

    threads = [threading.Thread(target=write, args=(c,)) for c in concepts.values()] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(reads) > 20 and all(reads), (errors, len(reads))
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------- item 9: from_file on bad paths
def test_from_file_on_a_folder_a_missing_or_an_unreadable_file(pipe, make_concept, tmp_path, monkeypatch):
    with pytest.raises(ConceptFileError, match="is a folder, not a file.*from_pretrained"):
        InfusionConcept.from_file(tmp_path)
    with pytest.raises(ConceptNotFoundError, match="No concept file '.*missing.safetensors'"):
        InfusionConcept.from_file(tmp_path / "missing.safetensors")
    make_concept(pipe.unet).save_pretrained(tmp_path)
    path = tmp_path / CONCEPT_WEIGHT_NAME
    path.chmod(0)
    if os.access(path, os.R_OK):  # running as root, where permissions are not enforced: the same error, simulated

        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(concept_io, "open", denied, raising=False)
    try:
        with pytest.raises(ConceptFileError, match=f"Cannot read '.*{CONCEPT_WEIGHT_NAME}'.*Permission denied"):
            InfusionConcept.from_file(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_name": "../../x.safetensors"},
        {"weight_name": "ABSOLUTE"},
        {"subfolder": "../.."},
        {"subfolder": "a/../../b"},
        {"weight_name": "..\\x.safetensors"},
    ],
)
def test_paths_outside_the_folder_are_refused(pipe, make_concept, tmp_path, kwargs):
    outside = tmp_path / "x.safetensors"
    make_concept(pipe.unet).save_pretrained(tmp_path)
    save_file({"a.attn2": torch.zeros(4)}, outside, metadata={"class_word": "cat"})
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    kwargs = {k: str(outside) if v == "ABSOLUTE" else v for k, v in kwargs.items()}
    argument = next(iter(kwargs))
    for source in (folder, "user/my-cat"):  # a folder, and a Hub repo id (refused before any download)
        with pytest.raises(ConceptNotFoundError, match=f"{argument}=.* points outside the folder or repository"):
            InfusionConcept.from_pretrained(source, **kwargs)


# ------------------------------------------------------------------------------- item 10: permissions, temps
def test_concept_file_gets_the_usual_permissions(pipe, make_concept, tmp_path):
    old = os.umask(0o022)
    try:
        make_concept(pipe.unet).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / CONCEPT_WEIGHT_NAME).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "README.md").stat().st_mode) == 0o644


def test_stale_temp_files_of_a_killed_save_are_removed_by_the_next_save(pipe, make_concept, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    old = time.time() - 120
    stale = tmp_path / f".{CONCEPT_WEIGHT_NAME}.{dead_pid}.0badc0de.tmp"  # a writer killed two minutes ago
    legacy = tmp_path / f".{CONCEPT_WEIGHT_NAME}.k3j4h5.tmp"  # mkstemp's name, from an older version
    live = tmp_path / f".{CONCEPT_WEIGHT_NAME}.{os.getpid()}.12345678.tmp"  # a writer still running (this one)
    fresh = tmp_path / f".{CONCEPT_WEIGHT_NAME}.{dead_pid}.87654321.tmp"  # too recent to judge
    for path in (stale, legacy, live, fresh):
        path.write_bytes(b"partial")
    for path in (stale, legacy, live):
        os.utime(path, (old, old))
    make_concept(pipe.unet).save_pretrained(tmp_path)
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and fresh.exists()
    assert InfusionConcept.from_pretrained(tmp_path).class_word == "cat"
    os.utime(live, (time.time() - 7200,) * 2)  # after an hour nothing is still writing it
    assert remove_stale_temp_files(tmp_path / CONCEPT_WEIGHT_NAME) == [live]
