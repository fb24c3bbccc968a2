"""`spogw report`: images from a small real run, Figure 3 from evaluated runs, errors and fallbacks; the notebook."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import REPO
from test_tracking import read_run

from spogw.cli import cli_main, run_fit
from spogw.report import figure3, report, run_summary


def _image_is_drawn(path) -> bool:
    import matplotlib.image as mpimg

    pixels = mpimg.imread(path)
    return path.stat().st_size > 10_000 and pixels.std() > 0.01  # not blank


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model):
    from conftest import write_scored

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")  # the fit logs to CSV only; the report's own W&B run is then the only one
    tmp = tmp_path_factory.mktemp("report")
    scored = write_scored(tmp / "scored.jsonl")
    run = tmp / "run"
    run_fit(["fit", "--model.model", tiny_model, "--data.scored_samples", str(scored), "--data.curation.n", "6",
             "--data.curation.t", "2", "--data.curation.top_n", "4", "--trainer.default_root_dir", str(run),
             "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--model.lora.r", "4"])
    mp.undo()
    return run


def test_report_on_a_run_writes_images_and_logs_them(small_run, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli_main(["report", str(small_run)])
    out = small_run / "report"
    assert _image_is_drawn(out / "figure2.png")
    for mode in ("random", "random_filter", "screen", "screen_sharpen"):  # Fig. 2's datasets, from the same samples
        stats = json.loads((out / "datasets" / mode / "stats.json").read_text())
        assert stats["mode"] == mode and stats["source"] == yaml.safe_load(
            (small_run / "config.yaml").read_text())["data"]["scored_samples"]
    md = (out / "summary.md").read_text()
    assert "![figure2](figure2.png)" in md and "| screen_sharpen | 4 | 2 |" in md
    assert "Figure 3 not drawn" in capsys.readouterr().out  # one run: said, not silently skipped
    import csv

    steps = [r for r in csv.DictReader((small_run / "lightning_logs" / "version_0" / "metrics.csv").open())
             if r["train/loss"]]
    row = run_summary(small_run)
    assert row["steps"] == len(steps) == 2 and row["score_source"] == "proxy"  # mean train/policy of the last epoch
    assert row["score"] == pytest.approx(sum(float(r["train/policy"]) for r in steps) / 2)
    (offline,) = (small_run / "wandb").glob("offline-run-*")
    logged = read_run(offline, "report/figure2")["history"][0]
    assert logged["report/figure2"]["_type"] == "image-file" and logged["report/summary"]["nrows"] == 1


def test_figure3_prefers_eval_results(tmp_path):
    rows = []
    for beta, rate in ((0.025, 90.0), (0.1, 96.0), (0.2, 93.0)):
        run = tmp_path / f"beta={beta}"
        (run / "eval").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"beta": beta}, "data": {"curation": {"t": 4,
                                                                                                       "top_n": 100}}}))
        (run / "eval" / "results.json").write_text(json.dumps({"table": {"generator": {"avg": rate,
                                                                                       "benchmarks": {}}}}))
        rows.append(run_summary(run))
    assert [r["score"] for r in rows] == [90.0, 96.0, 93.0] and {r["score_source"] for r in rows} == {"eval"}
    assert "no metrics (lightning_logs" in " ".join(rows[0]["notes"])
    assert _image_is_drawn(figure3(rows, tmp_path / "figure3.png"))


def test_bad_run_dirs_are_reported(tmp_path, scored_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        cli_main(["report", str(tmp_path / "empty")])
    assert "no run directory here (a run directory holds config.yaml" in capsys.readouterr().err
    # a run whose scored samples are gone and that has no metrics: the summary and notes say so, nothing crashes
    run = tmp_path / "gone"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"beta": 0.1}, "data": {
        "scored_samples": str(tmp_path / "deleted.jsonl"), "curation": {"n": 6, "t": 2, "top_n": 4}}}))
    result = report(str(run), wandb=False)
    assert result["figures"] == {}
    notes = " ".join(result["notes"])
    assert "Figure 2 not drawn" in notes and "deleted.jsonl" in notes and "no metrics" in notes


def test_report_notebook_runs_on_a_run_dir(small_run, monkeypatch, capsys):
    notebook = json.loads((REPO / "notebooks" / "report.ipynb").read_text())
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    monkeypatch.setenv("SPOGW_RUN_DIR", str(small_run))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {}
    for source in code:
        exec(compile(source, "report.ipynb", "exec"), namespace)  # noqa: S102 - our own notebook
    out = capsys.readouterr().out
    assert "--- best (score" in out and "--- worst (score" in out
    assert "figure2" in namespace["figures"] and len(namespace["summary"]) == 1
    assert os.path.isfile(small_run / "report" / "figure2.png")
