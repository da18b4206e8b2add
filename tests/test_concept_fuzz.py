"""Fuzzing the concept loader: any mutation of a valid file gives a valid concept or a ``ConceptFileError``.

Mutations: truncation, byte flips in the header and in the data, the header length field, and edits of the header
JSON (dtypes, shapes, offsets, metadata, the class word, extra or missing entries, arbitrary JSON). Each case has a
deadline, so a hang fails the test. The default run is derandomized (the same cases in every CI run); set
``INFUSION_FUZZ_EXAMPLES=20000`` to explore more, with fresh randomness.
"""

import json
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_infusion import ConceptFileError, InfusionConcept

EXAMPLES = int(os.environ.get("INFUSION_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=EXAMPLES or 400,
    derandomize=not EXAMPLES,
    deadline=2000,  # ms per case: a hang fails
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def valid_file(tmp_path) -> bytes:
    gen = torch.Generator().manual_seed(0)
    residuals = {"down.0.attn2": torch.randn(8, generator=gen), "mid.attn2": torch.randn(16, generator=gen)}
    InfusionConcept("cat", residuals, base_model="tiny-sd")._save_pretrained(tmp_path)
    return (tmp_path / "infusion_concept.safetensors").read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body: bytes, *, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return len(raw).to_bytes(8, "little") + raw + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    header, body = split(data)
    header_end = int.from_bytes(data[:8], "little") + 8
    kind = draw(st.sampled_from(["truncate", "flip header", "flip data", "length field", "json edit", "json edit"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind in ("flip header", "flip data"):
        lo, hi = (0, header_end - 1) if kind == "flip header" else (header_end, len(data) - 1)
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(lo, hi))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "length field":
        length = draw(
            st.integers(0, 2**64 - 1) | st.integers(header_end - 16, header_end + 16).map(lambda n: max(n, 0))
        )
        return length.to_bytes(8, "little") + data[8:]
    # json edit
    names = [k for k in header if k != "__metadata__"]
    edit = draw(st.sampled_from(["dtype", "shape", "offsets", "metadata", "class_word", "drop", "add", "replace"]))
    if edit == "dtype":
        header[draw(st.sampled_from(names))]["dtype"] = draw(
            st.sampled_from(["F16", "BF16", "F64", "I32", "I64", "BOOL", "U8", "F8_E4M3", "XX", ""]) | json_values
        )
    elif edit == "shape":
        header[draw(st.sampled_from(names))]["shape"] = draw(
            st.lists(st.integers(-3, 2**40), max_size=3) | json_values
        )
    elif edit == "offsets":
        header[draw(st.sampled_from(names))]["data_offsets"] = draw(
            st.lists(st.integers(-5, len(body) + 64), min_size=2, max_size=2) | json_values
        )
    elif edit == "metadata":
        header["__metadata__"] = draw(json_values)
    elif edit == "class_word":
        header["__metadata__"]["class_word"] = draw(st.text(max_size=6) | st.sampled_from(["", "  ", "\n"]))
    elif edit == "drop":
        del header[draw(st.sampled_from([*names, "__metadata__"]))]
    elif edit == "add":
        header[draw(st.text(max_size=6))] = draw(json_values)
    else:
        header = draw(json_values)
    return join(header, body, pad=draw(st.integers(0, 8)))


def test_mutated_concept_files_load_or_raise_concept_file_error(tmp_path):
    data = valid_file(tmp_path)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"loaded": 0, "refused": 0}
    start = time.perf_counter()

    @SETTINGS
    @given(blob=mutated(data))
    def check(blob):
        path.write_bytes(blob)
        try:
            concept = InfusionConcept.from_file(path)
        except ConceptFileError:
            outcomes["refused"] += 1
            return
        # Whatever loads is a usable concept: a class word, finite 1-D float vectors held in memory.
        outcomes["loaded"] += 1
        assert concept.class_word.strip()
        for tensor in concept.residuals.values():
            assert tensor.ndim == 1 and tensor.is_floating_point() and torch.isfinite(tensor).all()
            assert math.isfinite(float(tensor.float().sum()))

    check()
    total = outcomes["loaded"] + outcomes["refused"]
    print(f"fuzz: {total} cases ({outcomes}) in {time.perf_counter() - start:.1f} s")
    assert total >= min(SETTINGS.max_examples, 400) // 2
    assert outcomes["refused"] > total // 2 and outcomes["loaded"] > 0  # the mutations hit both outcomes


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 9, 20])
def test_tiny_and_empty_files_are_corrupt_files(tmp_path, cut):
    path = tmp_path / "c.safetensors"
    path.write_bytes(valid_file(tmp_path)[:cut])
    with pytest.raises(ConceptFileError, match="truncated or corrupt"):
        InfusionConcept.from_file(path)
