"""Concept files on disk: read once into memory (never unpickled, never mapped), written atomically.

Reading opens the file once and reads it whole through that one handle, so a reader sees one complete file even
while another process replaces it (writers only ever ``os.replace`` a finished file into place), and nothing loaded
stays backed by the file: rewriting or truncating it later cannot change a loaded concept or crash the process.
The header is checked before the data is read, so a file that is not a concept (a whole checkpoint, a pickle, a
corrupt length field) is refused without reading it. Every failure is a ``ConceptFileError`` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import ConceptFileError, ConceptFormatVersionError, ConceptNotFoundError
from .fidelity import DOWN_SUFFIX, UP_SUFFIX

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
STALE_TEMP_SECONDS = 60  # a temporary file of a dead writer older than this is removed by the next save
# Format versions: 1 = one 1-D residual per layer (no version recorded before 0.2); 2 adds the fidelity knob's
# 2-D tensors (``<layer>.fidelity_up``/``_down``). A file records the lowest version that reads it.
FORMAT_VERSION = 2  # the newest version this library reads
KNOB_VERSION = 2  # the version that introduced the fidelity knob's tensors


def refuse_pickle(path: str | Path) -> None:
    """Raise the error for a pickle-based file (it is never unpickled)."""
    raise ConceptFileError(
        f"'{path}' is a pickle-based file, and diffusers-infusion never unpickles (it can run arbitrary code). "
        "Convert it to safetensors in a trusted environment (load it, then `InfusionConcept(...).save_pretrained`; "
        "for a checkpoint of the authors' code, `diffusers-infusion-convert` reads it without running anything) "
        "and load the 'infusion_concept.safetensors' file instead."
    )


def _looks_like_pickle(head: bytes) -> bool:
    """A torch zip archive, or a pickle of protocol 2 or newer (``0x80``, protocol byte, then opcodes).

    A safetensors file starts with its header length (8 bytes, little endian) and then ``{``: its first byte may
    well be ``0x80`` (any header length of 128 modulo 256), so a file with ``{`` at byte 8 is never a pickle here.
    """
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _corrupt(path: Path, what: str) -> ConceptFileError:
    return ConceptFileError(
        f"'{path}' is not a readable safetensors file (truncated or corrupt?): {what}. Download it again "
        "(force_download=True) or re-save the concept with `save_pretrained`."
    )


def format_version(path: Path, metadata: dict) -> int:
    """The file's ``format_version`` (1 when absent); ``ConceptFormatVersionError`` when newer than this library's."""
    from . import __version__

    text = metadata.get("format_version", "1")
    if not text.isdigit() or int(text) < 1:
        raise _corrupt(path, f"its format_version {text!r} is not a whole number >= 1")
    if int(text) > FORMAT_VERSION:
        made = metadata.get("library_version")
        raise ConceptFormatVersionError(
            f"'{path}' is an Infusion concept file of format version {text}"
            + (f" (written by diffusers-infusion {made})" if made else "")
            + f"; this diffusers-infusion ({__version__}) reads versions up to {FORMAT_VERSION}. Upgrade "
            "diffusers-infusion (`pip install -U diffusers-infusion`) to load it."
        )
    return int(text)


def _check_header(path: Path, header: dict) -> None:
    """Refuse, from the header alone, a file that is not one 1-D float vector per layer (plus the knob's 2-D ones)."""
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt(path, "its __metadata__ is not a mapping of strings")
    version = format_version(path, metadata or {})
    if not header:
        raise ConceptFileError(f"'{path}' holds no tensors; it is not an Infusion concept.")
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise _corrupt(path, f"the header entry of tensor {name!r} is malformed")
        knob = version >= KNOB_VERSION and name.endswith((UP_SUFFIX, DOWN_SUFFIX))
        if len(info["shape"]) != (2 if knob else 1) or info.get("dtype") not in FLOAT_DTYPES:
            raise ConceptFileError(
                f"'{path}' is not an Infusion concept: tensor '{name}' has shape {tuple(info['shape'])} and dtype "
                f"{info.get('dtype')}; a concept holds one 1-D float vector per cross-attention layer"
                + (" (and 2-D float matrices for the fidelity knob)." if version >= KNOB_VERSION else ".")
            )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (in memory, writable, finite) and metadata of a concept file; ``ConceptFileError`` on any problem."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    try:
        with open(path, "rb") as f:  # one handle: one whole file, even if another process replaces it meanwhile
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            if _looks_like_pickle(head):
                refuse_pickle(path)
            if len(head) < 9:
                raise _corrupt(path, f"{size} bytes, shorter than a safetensors header")
            length = int.from_bytes(head[:8], "little")
            if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
                raise _corrupt(path, f"its header length field says {length} bytes, the file has {size}")
            raw = head[8:] + f.read(length - 1)
            try:
                header = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as error:
                raise _corrupt(path, f"its header is not JSON ({type(error).__name__})") from None
            if not isinstance(header, dict):
                raise _corrupt(path, "its header is not a JSON object")
            _check_header(path, dict(header))
            data = head[:8] + raw + f.read()
    except FileNotFoundError:
        raise ConceptNotFoundError(f"No concept file '{path}'. Check the path.") from None
    except IsADirectoryError:
        raise ConceptFileError(
            f"'{path}' is a folder, not a file. Pass it to `InfusionConcept.from_pretrained` (or "
            "`load_infusion_concept`), which finds the concept file inside it."
        ) from None
    except ConceptFileError:
        raise
    except OSError as error:
        raise ConceptFileError(f"Cannot read '{path}': {error}. Check that the file is readable by you.") from None
    try:
        tensors = {name: tensor.clone() for name, tensor in load(data).items()}
        metadata = header.get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, TypeError) as error:
        raise _corrupt(path, str(error)) from None
    for name, tensor in tensors.items():
        ndim = 2 if name.endswith((UP_SUFFIX, DOWN_SUFFIX)) and format_version(path, metadata) >= KNOB_VERSION else 1
        if tensor.ndim != ndim or not tensor.is_floating_point():  # the header said otherwise: a lying header
            raise _corrupt(path, f"tensor '{name}' has shape {tuple(tensor.shape)} and dtype {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ConceptFileError(
                f"'{path}': tensor '{name}' holds {bad} NaN or infinite values; such a concept renders noise or "
                "black images. It was saved from a diverged training run: retrain it (e.g. with a lower "
                "--learning_rate) or load an earlier checkpoint."
            )
    return tensors, metadata


# ------------------------------------------------------------------------------------------------------- writing
def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _writer_alive(temp: Path) -> bool:
    """Whether the process that wrote ``temp`` (its pid is in the name) still runs on this machine."""
    try:
        pid = int(temp.name.split(".")[-3])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Remove temporary files of earlier saves of ``path`` whose writer was killed; returns what was removed.

    A temporary file is stale when its writer no longer runs and it is older than a minute (a writer on another
    machine sharing the folder is never that slow), or when it is older than an hour whatever its name says.
    """
    removed, now = [], time.time()
    for temp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            age = now - temp.stat().st_mtime
            if age > 3600 or (age > STALE_TEMP_SECONDS and not _writer_alive(temp)):
                temp.unlink()
                removed.append(temp)
        except FileNotFoundError:  # another writer finished or cleaned it meanwhile
            continue
    if removed:
        logger.info("Removed %d temporary file(s) left by a killed save: %s", len(removed), [p.name for p in removed])
    return removed


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that ``path`` only ever holds a complete file (old or new).

    The bytes go to a temporary file in the same folder (created with the usual permissions, i.e. ``0o666`` less
    the umask, like any file the user writes), are flushed to disk, and the file is renamed over ``path``.
    """
    path = Path(path)
    remove_stale_temp_files(path)
    data = save(tensors, metadata=metadata)
    temp = _temp_name(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
