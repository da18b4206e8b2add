"""Training checkpoints: which ones are complete, and which one a resume starts from.

A checkpoint (``checkpoint-N``) is written into a hidden folder and renamed into place, so a killed write never
looks like a checkpoint. Before the rename the main process writes ``manifest.json``: the size and SHA-256 of every
file. A checkpoint is complete when every file is there with its size and hash, so a file deleted or damaged later
(a disk error, a copy cut short) is found before resuming, not half-way through accelerate's loading.
``--resume_from_checkpoint latest`` skips damaged checkpoints, with a warning, and resumes from the newest complete
one; a damaged checkpoint named explicitly is an error naming what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..concept import CONCEPT_WEIGHT_NAME, InfusionConcept
from ..errors import ConceptFileError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(folder: str | Path) -> Path:
    """Record the size and SHA-256 of every file of a finished checkpoint folder in ``manifest.json``."""
    folder = Path(folder)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({"format": "infusion-checkpoint", "files": entries}, indent=1))
    return path


def checkpoint_problem(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder (a sentence), or ``None`` when it is complete."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            entries = [(name, int(info["size"]), str(info["sha256"])) for name, info in files.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"its {MANIFEST_NAME} is unreadable ({type(error).__name__})"
        for name, size, sha in entries:
            path = folder / name
            if not path.is_file():
                return f"'{name}' is missing"
            if path.stat().st_size != size:
                return f"'{name}' has {path.stat().st_size} bytes instead of {size} (truncated?)"
            if _sha256(path) != sha:
                return f"'{name}' is damaged (its SHA-256 differs from the one recorded when it was written)"
        if CONCEPT_WEIGHT_NAME not in files:
            return f"it has no {CONCEPT_WEIGHT_NAME}"
        return None
    # A checkpoint written before manifests: the concept must load and accelerate's optimizer state be there.
    try:
        InfusionConcept.from_file(folder / CONCEPT_WEIGHT_NAME)
    except ConceptFileError as error:
        return str(error)
    if not (folder / "optimizer.bin").is_file() and not (folder / "optimizer.safetensors").is_file():
        return "its optimizer state (optimizer.bin) is missing"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders (``checkpoint-N``), oldest first; hidden ``.checkpoint-N.tmp`` folders are partial."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_resume_checkpoint(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from: ``None`` (start fresh), ``"latest"`` or a checkpoint folder.

    Raises:
        SystemExit: ``resume_from`` is not a checkpoint folder, or it is damaged.
    """
    if resume_from is None:
        return None
    if resume_from == "latest":
        for checkpoint in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            logger.warning("Skipping %s, which is damaged: %s. Trying the checkpoint before it.", checkpoint, problem)
        logger.info("--resume_from_checkpoint latest: no complete checkpoint in %s; starting fresh.", output_dir)
        return None
    path = Path(resume_from)
    if not path.is_dir() or not path.name.split("-")[-1].isdigit():
        raise SystemExit(
            f"--resume_from_checkpoint '{path}' is not a checkpoint folder (checkpoint-N). Pass one, or 'latest'."
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise SystemExit(
            f"--resume_from_checkpoint '{path}' is damaged: {problem}. Pass an earlier checkpoint, or 'latest' to "
            "resume from the newest complete one."
        )
    return path
