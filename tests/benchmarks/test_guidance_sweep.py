"""benchmarks/guidance_sweep.py on a tiny run: the overfitting benchmark's rows, reproduced at its own guidance;
Infusion's push exactly conditional; reruns skip what is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def sweep(load_benchmark):
    return load_benchmark("guidance_sweep")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def test_sweep_reproduces_the_benchmark_at_its_guidance_and_infusion_moves_only_the_conditional(
    sweep, load_benchmark, tmp_path
):
    """Same training and seeds as overfitting.py: at its guidance the sweep's similarity and alignment are its own.

    Infusion leaves the empty prompt's prediction exactly as the base model's (uncond share 0); DreamBooth, which
    fine-tunes the UNet, moves it too."""
    common = ["--concepts", "my_cat", "--methods", "infusion", "dreambooth", "--steps", "2"]
    sampling = ["--scene-images", "1", "--inference-steps", "10"]  # overfitting.py --quick's
    sweep.main([*common, *sampling, "--guidance", "7.5", "2", "--output-dir", str(tmp_path / "sweep")])
    load_benchmark("overfitting").main(["--quick", *common, "--output-dir", str(tmp_path / "bench")])  # guidance 7.5

    measured = rows(tmp_path / "sweep")
    bench = {r["method"]: r for r in rows(tmp_path / "bench")}
    for method in ("base", "base_described", "infusion", "dreambooth"):
        at = {r["guidance"]: r for r in measured if r["method"] == method and "guidance" in r}
        assert set(at) == {7.5, 2.0}
        for key in ("concept_similarity", "text_alignment"):
            assert at[7.5][key] == pytest.approx(bench[method][key], abs=1e-9), (method, key)
    push = {r["method"]: r for r in measured if "uncond_share" in r}
    assert push["infusion"]["uncond_share"] == 0.0 and push["infusion"]["cond_strength"] > 0
    assert push["dreambooth"]["uncond_share"] > 0.01
    report = (tmp_path / "sweep" / "guidance_sweep.md").read_text()
    assert "| infusion | 0.000 |" in report and (tmp_path / "sweep" / "guidance_sweep.png").stat().st_size > 0

    sweep.main(["--report-only", "--output-dir", str(tmp_path / "new"), "--merge", str(tmp_path / "sweep")])
    assert (tmp_path / "new" / "guidance_sweep.md").read_text() == report  # a report over merged dirs, into a new one
    sweep.main([*common, *sampling, "--guidance", "7.5", "2", "--output-dir", str(tmp_path / "sweep")])  # skips
    assert len(rows(tmp_path / "sweep")) == len(measured)
    with pytest.raises(SystemExit, match="would mix"):  # other sampling into the same dir
        sweep.main([*common, *sampling, "--guidance", "3", "--output-dir", str(tmp_path / "sweep")])


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--guidance", "0.5"], ["--concepts", "my_yak"]])
def test_bad_options_are_refused(sweep, tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as err:
        sweep.main([*flags, "--output-dir", str(tmp_path)])
    said = capsys.readouterr().err + str(err.value.code)
    assert flags[0] in said and flags[1] in said


def test_report_only_without_rows_says_what_to_run(sweep, tmp_path):
    with pytest.raises(SystemExit, match="Run without --report-only"):
        sweep.main(["--report-only", "--output-dir", str(tmp_path)])
