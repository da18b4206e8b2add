"""The overfitting benchmark's report (``benchmarks/overfitting.py``): tables, curves, trade-off plot, grids.

Reads the rows that ``overfitting.py`` appended to ``<output-dir>/results.jsonl`` (and to each ``--merge`` dir) and
writes ``overfitting.md`` (mean ± std over concepts at 400 steps and at the last step, then each metric by step),
``overfitting.png`` (curves), ``tradeoff.png`` (similarity against Wasserstein and against text alignment) and one
``grid_<concept>.png`` per concept (rows: methods, columns: steps; Fig. 11).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_rows(path: Path) -> list[dict]:
    """The rows of one ``results.jsonl`` (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def report(args: argparse.Namespace, *, method_order: tuple[str, ...]) -> None:
    """Markdown tables, curves and grids from ``results.jsonl`` of ``args.output_dir`` and ``args.merge``.

    Rows are listed in ``method_order`` (the benchmark's, with any diagnostic rows registered after it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out = args.output_dir
    # one row per (concept, method, step): a concept split over several dirs has its base rows in each
    merged = [r for d in (out, *args.merge) for r in read_rows(d / "results.jsonl")]
    rows = list({(r["concept"], r["method"], r["step"]): r for r in merged}.values())
    if not rows:
        raise SystemExit(f"{out / 'results.jsonl'} has no results yet. Run without --report-only first.")
    out.mkdir(parents=True, exist_ok=True)  # a report over --merge dirs may go to a new one
    methods = [m for m in method_order if any(r["method"] == m for r in rows)]
    steps = sorted({r["step"] for r in rows})
    concepts = sorted({r["concept"] for r in rows})
    metrics = ("wasserstein", "fisher", "text_alignment", "concept_similarity")

    def stat(method: str, step: int, key: str) -> tuple[float, float, int]:
        vals = [r[key] for r in rows if r["method"] == method and r["step"] == step]
        return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else (float("nan"), 0.0, 0)

    lines = [f"Concepts: {', '.join(concepts)}; mean ± std over concepts.", "", *_ceiling_lines(concepts), ""]
    last = steps[-1]
    for at in [s for s in (400, last) if s in steps]:  # a short and the longest training (Table 1's analogue)
        lines += [f"### At {at} steps" + (" (Table 1's analogue)" if at == last else ""), "", TABLE_HEAD,
                  "|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        for m in [m for m in methods if stat(m, at, "wasserstein")[2]]:  # rows run to that step
            cells = [f"{stat(m, at, k)[0]:.3f} ± {stat(m, at, k)[1]:.3f}" for k in metrics[2:] + metrics[:2]]
            size, n = stat(m, at, "storage_bytes")[0], stat(m, at, "storage_bytes")[2]
            lines.append(f"| {m} | {' | '.join(cells)} | {_bytes(size)} | {n} |")
        lines.append("")
    for key in metrics:
        lines += ["", f"### {key.replace('_', ' ')} by training steps", "",
                  "| method | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "--:|" * len(steps)]  # fmt: skip
        for m in methods:
            cells = (f"{stat(m, s, key)[0]:.3f}" if stat(m, s, key)[2] else "—" for s in steps)  # — : not run
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "overfitting.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for ax, key in zip(axes, metrics):
        palette = plt.get_cmap("tab20").colors  # one color per method (tab10 repeats after ten)
        for i, m in enumerate(methods):
            ran = [s for s in steps if stat(m, s, key)[2]]  # a method may have been measured at fewer steps
            mean = np.array([stat(m, s, key)[0] for s in ran])
            std = np.array([stat(m, s, key)[1] for s in ran])
            knob = m.startswith("infusion_fidelity")
            style = (
                dict(lw=2.5, color="black")
                if m == "infusion"
                else dict(lw=1.2, color=palette[2 * i % 20 + i // 10 % 2], ls="--" if knob else "-")
            )
            ax.plot(ran, mean, marker="o", ms=3, label=m, **style)
            ax.fill_between(ran, mean - std, mean + std, alpha=0.12, color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title(key.replace("_", " "))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(out / "overfitting.png", dpi=110)
    plt.close(fig)
    _tradeoff_plot(out / "tradeoff.png", methods, [s for s in (400, last) if s in steps], stat)

    for concept in concepts:

        def cell(name: str) -> Path:
            """The cell image from whichever output dir has it (a concept may be split over several)."""
            paths = [d / "cells" / name for d in (out, *args.merge)]
            return next((p for p in paths if p.exists()), paths[0])

        base = [cell(f"{concept}_base_0_{i}.png") for i in range(2)]
        trained = [m for m in methods if not m.startswith("base")]
        grid = Image.new("RGB", (66 * (2 * len(steps) + 2) + 150, 66 * (len(trained) + 1)), "white")
        from PIL import ImageDraw

        draw = ImageDraw.Draw(grid)
        for i, p in enumerate(base):
            if p.exists():
                grid.paste(Image.open(p), (150 + 66 * i, 0))
        draw.text((4, 26), "base model", fill="black")
        for r, m in enumerate(trained, start=1):
            draw.text((4, 66 * r + 26), m, fill="black")
            for c, s in enumerate(steps):
                for i in range(2):
                    p = cell(f"{concept}_{m}_{s}_{i}.png")
                    if p.exists():
                        grid.paste(Image.open(p), (150 + 66 * (2 + 2 * c + i), 66 * r))
        for c, s in enumerate(steps):
            draw.text((150 + 66 * (2 + 2 * c) + 40, 2), f"{s} steps", fill="black")
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(out / f"grid_{concept}.png")
    print((out / "overfitting.md").read_text())


TABLE_HEAD = "| method | text alignment ↑ | concept similarity ↑ | Wasserstein ↓ | Fisher ↓ | storage | concepts |"


def _tradeoff_plot(path: Path, methods: list[str], steps: list[int], stat) -> None:
    """Fidelity against overfitting: mean concept similarity against Wasserstein and against text alignment.

    One point per method (mean over concepts), one row of panels per step count; Infusion's rows in black, the
    fidelity knob's in green (labelled ``knob_<setting>``), the base model's in blue, the baselines' in red. Labels
    are moved apart where two points lie close (``free_label_offsets``).
    """
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(len(steps), 2, figsize=(11, 4.2 * len(steps)), squeeze=False)
    labels = []  # (axes, annotation, anchor) per point
    for row, step in zip(axes, steps):
        for ax, key in zip(row, ("wasserstein", "text_alignment")):
            for m in [m for m in methods if stat(m, step, key)[2]]:  # the rows measured at that step
                x, y = stat(m, step, key)[0], stat(m, step, "concept_similarity")[0]
                knob = m.startswith("infusion_fidelity_")
                color = ("tab:green" if knob else "black" if m.startswith("infusion") else
                         "tab:blue" if m.startswith("base") else "tab:red")  # fmt: skip
                ax.scatter([x], [y], color=color, s=22)
                label = "knob_" + m.removeprefix("infusion_fidelity_") if knob else m
                labels.append((ax, ax.annotate(label, (x, y), (3, 3), fontsize=7, textcoords="offset points"), (x, y)))
            if key == "wasserstein":  # from under the base model's floor to many times it: a log scale
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
                ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(key.replace("_", " ") + (" (lower: less overfitting)" if key == "wasserstein" else ""))
            ax.set_ylabel("concept similarity")
            ax.set_title(f"{step} steps, mean over concepts")
    fig.tight_layout()
    fig.canvas.draw()  # the text sizes and the data-to-display transform are final only now
    renderer, to_points = fig.canvas.get_renderer(), 72.0 / fig.dpi
    for ax in axes.flat:
        mine = [(a, xy) for owner, a, xy in labels if owner is ax]
        anchors = [tuple(ax.transData.transform(xy) * to_points) for _, xy in mine]
        sizes = [tuple(a.get_window_extent(renderer).size * to_points) for a, _ in mine]
        x0, y0, _, y1 = ax.get_window_extent(renderer).extents * to_points  # right of the axes: free space
        bounds = (x0, y0, fig.bbox.width * to_points, y1)
        for (a, xy), (w, h), (dx, dy) in zip(mine, sizes, free_label_offsets(anchors, sizes, bounds=bounds)):
            a.remove()  # drawn again at its place, with a leader line where that is not beside its point
            far = dy > h or dy < -2 * h or -w < dx < 0
            line = dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=3) if far else None
            ax.annotate(a.get_text(), xy, (dx, dy), fontsize=7, textcoords="offset points", arrowprops=line)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def free_label_offsets(
    anchors: list[tuple[float, float]],
    sizes: list[tuple[float, float]],
    *,
    bounds: tuple[float, float, float, float] | None = None,
    pad: float = 3.0,
    marker: float = 3.0,
) -> list[tuple[float, float]]:
    """Offsets (in points) that put each label beside its point without covering another label or point.

    Greedy, from the highest point down: each label takes, among places right or left of its point and up to two
    label heights above or below, the one that covers the least of the labels placed before, of the other points
    and of the outside of ``bounds``; between equally free places, the nearest (up-right first).

    Args:
        anchors: each point's position, in points (display units).
        sizes: each label's (width, height), in points.
        bounds: the box ``(x0, y0, x1, y1)`` labels should stay in, in points; None: anywhere.
        pad: the gap between a point and its label.
        marker: the half-width of a point's marker, kept clear of other labels.

    Returns:
        One ``(dx, dy)`` per label: its lower-left corner's offset from its point.
    """
    placed: list[tuple[float, float, float, float]] = []  # labels placed so far, (x0, y0, x1, y1)
    points = [(x - marker, y - marker, x + marker, y + marker) for x, y in anchors]
    offsets: list[tuple[float, float]] = [(pad, pad)] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda i: -anchors[i][1]):
        (x, y), (w, h) = anchors[i], sizes[i]
        others = placed + [p for j, p in enumerate(points) if j != i]
        places = [
            (dx, dy)
            for dy in (
                pad,
                -pad - h,
                -h / 2,
                pad + h / 2,
                -pad - 1.5 * h,
                pad + h,
                -pad - 2 * h,
                pad + 2 * h,
                -pad - 3 * h,
            )
            for dx in (pad, -pad - w, -w / 2)
            if dx != -w / 2 or abs(dy + h / 2) > h / 2 + marker
        ]  # centred: only above or below the point

        def cost(offset, w=w, h=h, x=x, y=y, others=others):
            box = (x + offset[0], y + offset[1], x + offset[0] + w, y + offset[1] + h)
            covered = sum(_overlap_area(box, o, gap=1.0) for o in others)
            return covered + (w * h - _overlap_area(box, bounds) if bounds else 0.0)

        offsets[i] = min(places, key=cost)  # min keeps the first of equal costs: the nearest place
        placed.append((x + offsets[i][0], y + offsets[i][1], x + offsets[i][0] + w, y + offsets[i][1] + h))
    return offsets


def _overlap_area(a: tuple[float, ...], b: tuple[float, ...], *, gap: float = 0.0) -> float:
    """The area two boxes ``(x0, y0, x1, y1)`` share, the second grown by ``gap`` on every side."""
    width = min(a[2], b[2] + gap) - max(a[0], b[0] - gap)
    height = min(a[3], b[3] + gap) - max(a[1], b[1] - gap)
    return max(width, 0.0) * max(height, 0.0)


def _ceiling_lines(concepts: list[str]) -> list[str]:
    """The concept similarity of the photos and of the toy VAE's reconstructions of them (the most any method gets)."""
    from diffusers_infusion.metrics import toy_concept_similarity, toy_reconstruction_similarity
    from diffusers_infusion.toy import CONCEPTS, load_toy_pipeline

    vae = load_toy_pipeline().vae
    cells = [
        f"{c} {np.mean(toy_concept_similarity(CONCEPTS[c].photos(), c)):.3f} / "
        f"{toy_reconstruction_similarity(vae, c):.3f}"
        for c in concepts
    ]
    return [
        f"Concept similarity of the photos / of the VAE's reconstructions of them (the ceiling): {'; '.join(cells)}."
    ]


def _bytes(n: float) -> str:
    if n != n:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
