"""Render many jobs across processes: shared F streams, batches, an atomic manifest, resumable runs.

The pieces ``examples/generate_infusion.py`` is made of, kept here so they can be tested and reused:

1. ``plan_batches``: jobs that differ only in their concepts share one F stream (``infusion_variants``); groups of
   the same shape are batched. The batches depend on the jobs only, never on the number of processes, so a run on
   N processes renders bit for bit what one process renders.
2. ``finished_jobs``: the manifest shards already written; a rerun skips every job listed there whose image exists.
3. ``render_batch``: one ``InfusionPipeline`` call (the library's public API) for one batch.
4. ``ManifestWriter``: each image is written to a temporary file and renamed; then its manifest line is appended
   with one ``write`` to this process's shard (``manifest.rank<R>.jsonl``). A killed run loses at most the batch in
   flight; ``merge_manifests`` writes the ordered ``manifest.jsonl`` at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .jobs import GenerationJob

__all__ = ["Batch", "ManifestWriter", "finished_jobs", "merge_manifests", "plan_batches", "render_batch", "sha256"]

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.jsonl"
SHARD_GLOB = "manifest.rank*.jsonl"


def sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (for the manifest: which concept file made an image)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Batch:
    """Jobs rendered by one pipeline call: ``groups[p][v]`` is prompt ``p``'s job for variant ``v``.

    All groups share the steps, guidance, size and the list of variants (concept dicts), so the call is
    ``pipe(prompts, infusion_variants=variants, generator=[one per prompt])``.
    """

    groups: list[list[tuple[int, GenerationJob]]]  # (job index, job), one list per prompt+seed, in variant order
    variants: list[dict[str, float]]

    @property
    def jobs(self) -> list[tuple[int, GenerationJob]]:
        return [item for group in self.groups for item in group]

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)


def plan_batches(jobs: Sequence[GenerationJob], *, batch_size: int) -> list[Batch]:
    """Group jobs by shared F stream, then batch up to ``batch_size`` prompts of the same shape per call.

    Duplicate jobs (same fields) are rendered once. The plan depends on ``jobs`` and ``batch_size`` only.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1 (prompts per pipeline call).")
    groups: dict[tuple, list[tuple[int, GenerationJob]]] = {}
    seen: dict[str, str] = {}
    for index, job in enumerate(jobs):
        key = json.dumps(job.fields(), sort_keys=True)
        if key in seen:
            logger.warning("%s repeats the job of %s; it is rendered once.", job.source, seen[key])
            continue
        seen[key] = job.source
        groups.setdefault(job.shared_stream_key, []).append((index, job))
    shapes: dict[tuple, list[list[tuple[int, GenerationJob]]]] = {}
    for group in groups.values():
        job = group[0][1]
        variants = tuple(json.dumps(j.fields()["concepts"], sort_keys=True) for _, j in group)
        shapes.setdefault((job.steps, job.guidance_scale, job.height, job.width, variants), []).append(group)
    batches = []
    for shape_groups in shapes.values():
        for start in range(0, len(shape_groups), batch_size):
            chunk = shape_groups[start : start + batch_size]
            batches.append(Batch(groups=chunk, variants=[dict(j.concepts) for _, j in chunk[0]]))
    batches.sort(key=lambda b: b.groups[0][0][0])  # in the order of the jobs file
    return batches


def render_batch(pipe, batch: Batch, **call_kwargs) -> list[tuple[int, GenerationJob, Any]]:
    """Render one batch with one pipeline call; ``(job index, job, PIL image)`` per job.

    Each prompt gets its own CPU generator seeded with its job's seed, so an image does not depend on the batch it
    is in (to the float rounding of batched kernels) nor on the device. ``call_kwargs`` go to the pipeline.
    """
    first = batch.groups[0][0][1]
    jobs = [group[0][1] for group in batch.groups]
    output = pipe(
        [j.prompt for j in jobs],
        negative_prompt=[j.negative_prompt for j in jobs],
        num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale,
        height=first.height,
        width=first.width,
        generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
        infusion_variants=batch.variants,
        **call_kwargs,
    )
    n = len(jobs)  # images come variant by variant: variant v of prompt p is image v * n + p
    return [(index, job, output.images[v * n + p]) for p, group in enumerate(batch.groups)
            for v, (index, job) in enumerate(group)]  # fmt: skip


def _read_lines(path: Path) -> Iterable[dict]:
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            yield json.loads(text)
        except json.JSONDecodeError:
            logger.warning("Ignoring unreadable line %d of %s (a run killed while writing it?).", number, path)


def finished_jobs(output_dir: str | Path) -> dict[str, dict]:
    """Manifest records by job id, for the jobs whose line and image both exist under ``output_dir``."""
    output_dir = Path(output_dir)
    done = {}
    for shard in sorted(output_dir.glob(SHARD_GLOB)):
        for record in _read_lines(shard):
            if isinstance(record, dict) and "job_id" in record and (output_dir / record.get("file", "")).is_file():
                done[record["job_id"]] = record
    return done


class ManifestWriter:
    """Writes images and this process's manifest shard under ``output_dir`` (images first, then their lines)."""

    def __init__(self, output_dir: str | Path, *, process_index: int):
        self.output_dir = Path(output_dir)
        (self.output_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self.shard = self.output_dir / f"manifest.rank{process_index}.jsonl"
        self.process_index = process_index

    def _save_image(self, image, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write(self, results: Sequence[tuple[str, GenerationJob, Any]], records: Mapping[str, Mapping]) -> None:
        """Write each ``(job id, job, image)``; then one line per image: the ``records[job id]`` plus the file."""
        lines = []
        for job_id, _job, image in results:
            relative = f"{IMAGES_DIR}/{job_id}.png"
            self._save_image(image, self.output_dir / relative)
            lines.append(json.dumps({**records[job_id], "file": relative, "process": self.process_index}) + "\n")
        fd = os.open(self.shard, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for line in lines:  # one write per line: a line is either wholly there or not at all
                os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def merge_manifests(output_dir: str | Path, job_ids: Sequence[str]) -> Path:
    """Write ``manifest.jsonl``: the finished jobs' lines in the order of ``job_ids`` (atomically)."""
    output_dir = Path(output_dir)
    done = finished_jobs(output_dir)
    path = output_dir / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=output_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for job_id in dict.fromkeys(job_ids):
            if job_id in done:
                f.write(json.dumps(done[job_id]) + "\n")
    os.replace(tmp, path)
    return path
