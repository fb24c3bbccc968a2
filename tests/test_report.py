"""`spogw report`: images from a small real run, Figure 3 from evaluated runs, errors and fallbacks; the notebook."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import REPO
from test_tracking import read_run

from spogw.cli import cli_main, run_fit
from spogw.report import report, run_summary
from spogw.report_sweep import figure3, settings, table3, table4


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
    assert row["steps"] == len(steps) == 2
    assert row["score"] is None  # not evaluated: no score, and no training signal stands in for one
    assert "not evaluated" in md and "1 run(s) without a held-out evaluation" in md
    (offline,) = (small_run / "wandb").glob("offline-run-*")
    logged = read_run(offline, "report/figure2")["history"][0]
    assert logged["report/figure2"]["_type"] == "image-file" and logged["report/summary"]["nrows"] == 1


def _point(root, name, score, *, seed, beta=0.1, t=2, top_n=4, mode="screen_sharpen", ref="previous", mask=True):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "seed_everything": seed, "model": {"beta": beta, "kl_reference": ref, "kl_mask": mask},
        "data": {"curation": {"t": t, "top_n": top_n, "mode": mode}}}))
    if score is not None:
        (run / "eval").mkdir()
        (run / "eval" / "results.json").write_text(json.dumps(
            {"table": {"generator": {"benchmarks": {"drop": {"mean": score}}}}}))
    return run_summary(run)


def test_figure3_and_tables_show_each_setting_over_its_seeds_and_missing_points_as_missing(tmp_path):
    rows = [_point(tmp_path, f"b{beta}s{seed}", score, seed=seed, beta=beta)
            for beta, scores in ((0.05, (10.0, 12.0, None)), (0.2, (7.0, 8.0, 9.0)))
            for seed, score in enumerate(scores)]
    by_beta = {s["beta"]: s for s in settings(rows)}
    assert by_beta[0.05]["scores"] == [10.0, 12.0] and by_beta[0.05]["mean"] == 11.0
    assert by_beta[0.05]["std"] == pytest.approx(2 ** 0.5) and by_beta[0.05]["missing"] == ["b0.05s2"]
    assert by_beta[0.2]["mean"] == 8.0 and by_beta[0.2]["std"] == 1.0 and by_beta[0.2]["seeds"] == [0, 1, 2]
    assert _image_is_drawn(figure3(rows, tmp_path / "figure3.png", {"base generator": 9.5}))
    assert table3(rows, {}) is None and table4(rows, {}) is None  # neither was swept
    kl = [_point(tmp_path, f"kl-{ref}-{mask}-{seed}", score, seed=seed, ref=ref, mask=mask)
          for (ref, mask, scores) in (("none", False, (5.0, 6.0)), ("none", True, (5.0, 6.0)),
                                      ("base", False, (7.0, 7.0)), ("previous", True, (9.0, None)))
          for seed, score in enumerate(scores)]
    md = table3(kl, {"static: IO": 4.0})
    assert "| no KL | 5.50 | 0.58 | 4 |" in md and "| KL to the base model | 7.00 | 0.00 | 2 |" in md
    assert "| KL to the previous model + mask (mKL) | 9.00 | 0.00 | 1 | kl-previous-True-1 |" in md
    assert "| KL to the previous model | not swept |" in md and "| reference: static: IO | 4.00 |" in md
    modes = [_point(tmp_path, f"m-{mode}-{seed}", 3.0 + i + seed, seed=seed, mode=mode)
             for i, mode in enumerate(("random", "screen")) for seed in (0, 1)]
    md = table4(modes, {})
    assert "| random sampling | 3.50 |" in md and "| screening | 4.50 |" in md
    assert "| random + filtering | not swept" in md


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


def test_the_learning_goal_is_judged_against_the_spread_over_seeds_and_the_best_static_workflow():
    from spogw.report_learning import _mean_std, goal

    def summary(base, final, static):
        runs = [{"held_out": {0: b, 3: f}} for b, f in zip(base, final, strict=True)]
        return {"iterations": 3, "runs": runs, "held_out": {0: _mean_std(base), 3: _mean_std(final)},
                "baselines": {"io": _mean_std([static] * 3), "cot": _mean_std([static - 1] * 3)}}

    clear = goal(summary([3.0, 4.0, 3.5], [7.0, 8.0, 7.5], 6.0))
    assert clear["gain"] == pytest.approx(4.0) and clear["spread"] == pytest.approx(0.5)
    assert clear["beats_base_by_more_than_spread"] and clear["bands_apart"] and clear["every_seed_gains"]
    assert clear["best_static"] == "io" and clear["reaches_best_static"]
    # every seed gains, but one seed's luck carries the mean: the gain is inside the final adapter's spread
    lucky = goal(summary([3.0, 4.0, 3.5], [3.5, 8.6, 4.0], 5.8))
    assert lucky["paired_gains"] == pytest.approx([0.5, 4.6, 0.5]) and lucky["every_seed_gains"]
    assert lucky["spread"] == pytest.approx(_mean_std([3.5, 8.6, 4.0])["std"])
    assert not lucky["beats_base_by_more_than_spread"] and not lucky["bands_apart"]
    assert not lucky["reaches_best_static"]
    # the base's own spread counts too
    noisy_base = goal(summary([1.0, 7.0, 4.0], [6.0, 6.2, 6.4], 5.0))
    assert noisy_base["spread"] == pytest.approx(3.0) and not noisy_base["beats_base_by_more_than_spread"]
    assert goal({"iterations": 3, "runs": [], "held_out": {3: _mean_std([1.0])}, "baselines": {}}) is None
