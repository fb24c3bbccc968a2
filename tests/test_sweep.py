"""Sweep YAMLs: each expands to its grid through W&B's engine, each point parses, and a local sweep runs and resumes."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml
from conftest import REPO

from spogw.cli import cli_main
from spogw.sweep import check_parameters, expand, load_sweep, point_args, point_command, sweep

SWEEPS = REPO / "configs" / "sweeps"
EXPECTED = {
    "beta": {"model.beta": [0.025, 0.05, 0.1, 0.2]},
    "group_size": {"data.curation.t": [2, 3, 4, 5, 6]},
    "dataset_size": {"data.curation.top_n": [50, 100, 200, 400, 600], "data.curation.scope": ["global"]},
    "kl_ablation": {"model.kl_reference": ["none", "base", "previous"], "model.kl_mask": [False, True]},
    "data_processing": {"data.curation.mode": ["random", "random_filter", "screen", "screen_sharpen"]},
}


def test_the_sweeps_are_the_papers():
    assert {p.stem for p in SWEEPS.glob("*.yaml")} == set(EXPECTED)


@pytest.fixture(scope="module")
def fit_parser():
    """`spogw fit`'s parser, built once (without subcommands: the same option names as under `fit`)."""
    from spogw.cli import SPOGWCLI, TRAINER_DEFAULTS, GroupDataModule, RunConfigCallback, SPOGWModule

    cli = SPOGWCLI(SPOGWModule, GroupDataModule, save_config_callback=RunConfigCallback,
                   trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0, auto_configure_optimizers=False,
                   run=False, args=["--config", str(REPO / "configs" / "fit" / "quickstart.yaml"),
                                    "--trainer.logger", "false"])
    return cli.parser


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sweep_expands_to_its_grid_and_every_point_parses(name, fit_parser):
    path = SWEEPS / f"{name}.yaml"
    config = load_sweep(path)
    points = expand(config)
    grid = EXPECTED[name]
    expected = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    assert sorted(map(json.dumps, points)) == sorted(json.dumps(dict(sorted(p.items()))) for p in expected)
    check_parameters(path, config)  # every name is a `spogw fit` flag
    command = point_command(config, points[0])
    assert command[1:5] == ["-m", "spogw.cli", "fit", "--config"] and (REPO / command[5]).is_file()
    for point in points:  # the flags `wandb agent` would pass parse, land where they should, and instantiate
        parsed = fit_parser.parse_args(["--config", str(REPO / command[5]), *point_args(point),
                                        "--trainer.logger", "false"])
        for flag, value in point.items():
            assert parsed[flag] == value, flag
        init = fit_parser.instantiate_classes(parsed)  # the value checks (e.g. 2t <= n) run here
        assert init["model"].beta == (0.0 if parsed["model.kl_reference"] == "none" else parsed["model.beta"])


@pytest.mark.parametrize("params,message", [
    ({"model.betta": {"values": [0.1]}}, "unknown parameter 'model.betta': not a `spogw fit` option; did you mean "
                                         "'model.beta'?"),
    ({"model.beta": {"values": []}}, "parameter 'model.beta' has an empty grid"),
    ({}, "`parameters` is empty"),
])
def test_bad_sweep_files_are_usage_errors(tmp_path, capsys, params, message):
    config = yaml.safe_load((SWEEPS / "beta.yaml").read_text())
    config["parameters"] = params
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(bad), "--dry_run", "true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err


def tiny_overlay(tmp_path, tiny_model, scored_file):
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": 2, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": {"model": tiny_model, "lora": {"r": 4, "alpha": 8}, "lr": 1e-3},
        "data": {"scored_samples": str(scored_file), "curation": {"n": 6, "t": 2, "top_n": 4, "m": None,
                                                                  "scope": "global"},
                 "max_prompt_tokens": 64, "max_completion_tokens": 64}}))
    return overlay


def test_local_sweep_runs_resumes_and_reports(tmp_path, tiny_model, scored_file, monkeypatch):
    """The beta sweep's own command on two β values and a tiny model: run one point, resume, then report."""
    monkeypatch.chdir(REPO)  # the command names configs/fit/quickstart.yaml relative to the repo, as wandb agent does
    config = yaml.safe_load((SWEEPS / "beta.yaml").read_text())
    config["parameters"] = {"model.beta": {"values": [0.05, 0.2]}}
    small = tmp_path / "beta2.yaml"
    small.write_text(yaml.safe_dump(config))
    overlay, out = tiny_overlay(tmp_path, tiny_model, scored_file), tmp_path / "sweep"
    first = sweep(str(small), sweep_dir=str(out), config_overlay=str(overlay), max_runs=1)
    assert [r["state"] for r in first] == ["finished", "pending"]
    assert (out / "beta=0.05" / "adapter" / "adapter_config.json").is_file()
    again = sweep(str(small), sweep_dir=str(out), config_overlay=str(overlay))
    assert [r["state"] for r in again] == ["finished", "finished"]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["beta=0.05", "beta=0.2"]  # the finished point did not run again
    for r in again:
        saved = yaml.safe_load((tmp_path / "sweep" / r["name"] / "config.yaml").read_text())
        assert saved["model"]["beta"] == r["params"]["model.beta"] and saved["model"]["model"] == tiny_model
        assert r["metric"]["source"] == "proxy"
    # the report over the sweep: Figure 3 against β, with the proxy named on it
    from spogw.report import report

    result = report(str(out), wandb=False)
    assert result["figures"]["figure3"].stat().st_size > 10_000
    md = (out / "report" / "summary.md").read_text()
    assert "beta=0.05" in md and "beta=0.2" in md and "proxy" in md


def test_sweep_from_the_wrong_directory_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the command's configs/fit/quickstart.yaml is relative to the repository root
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(SWEEPS / "beta.yaml"), "--dry_run", "true"])
    assert exit_info.value.code == 2
    assert "`--config configs/fit/quickstart.yaml` is not found" in capsys.readouterr().err
