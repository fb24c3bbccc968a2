"""Sweep YAMLs: each expands to its grid through W&B's engine, each point parses, and a local sweep runs and resumes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from spogw.cli import cli_main
from spogw.sweep import check_parameters, expand, load_sweep, point_args, point_command, sweep

SWEEPS = REPO / "configs" / "sweeps"
SEEDS = {"seed_everything": [0, 1, 2]}
EXPECTED = {  # the paper's grids (GPU), seeds a dimension of each
    "beta": {"model.beta": [0.025, 0.05, 0.1, 0.2], **SEEDS},
    "group_size": {"data.curation.t": [2, 3, 4, 5, 6], **SEEDS},
    "dataset_size": {"data.curation.top_n": [50, 100, 200, 400, 600], "data.curation.scope": ["global"], **SEEDS},
    "kl_ablation": {"model.kl_reference": ["none", "base", "previous"], "model.kl_mask": [False, True], **SEEDS},
    "data_processing": {"data.curation.mode": ["random", "random_filter", "screen", "screen_sharpen"], **SEEDS},
}
EXPECTED_CPU = {  # the same on the embedded model and the learning experiment's data (m = 6)
    "cpu/beta": {"model.beta": [0.025, 0.05, 0.1, 0.2], **SEEDS},
    "cpu/group_size": {"data.curation.t": [1, 2, 3], **SEEDS},
    "cpu/dataset_size": {"data.curation.top_n": [6, 12, 24, 48, 96], "data.curation.scope": ["global"],
                         "data.curation.n": [4], **SEEDS},
    "cpu/kl_ablation": {"model.kl_reference": ["none", "base", "previous"], "model.kl_mask": [False, True], **SEEDS},
    "cpu/data_processing": {"data.curation.mode": ["random", "random_filter", "screen", "screen_sharpen"],
                            "data.curation.n": [4], **SEEDS},
}
ALL = {**EXPECTED, **EXPECTED_CPU}


def test_the_sweeps_are_the_papers_and_rank_by_the_held_out_score():
    assert {p.stem for p in SWEEPS.glob("*.yaml")} == set(EXPECTED)
    assert {f"cpu/{p.stem}" for p in SWEEPS.glob("cpu/*.yaml") if not p.stem.startswith("point")} == set(EXPECTED_CPU)
    for name in ALL:
        config = load_sweep(SWEEPS / f"{name}.yaml")
        assert config["metric"] == {"name": "eval/score", "goal": "maximize"}, name
        command = [str(c) for c in config["command"]]
        configs = [command[i + 1] for i, c in enumerate(command) if c == "--config"]
        points = [yaml.safe_load((REPO / c).read_text()) for c in configs[1:]] if name in EXPECTED else [
            yaml.safe_load((REPO / c).read_text()) for c in configs]
        callbacks = [cb for p in points for cb in (p.get("trainer") or {}).get("callbacks") or []]
        assert [cb["class_path"] for cb in callbacks] == ["spogw.heldout.HeldOutEvaluation"], name
        assert callbacks[0]["init_args"]["split"] == "test"
        assert any((p.get("data") or {}).get("scored_samples", "").endswith("scored.jsonl") for p in points), name


@pytest.fixture(scope="module")
def fit_parser():
    """`spogw fit`'s parser, built once (without subcommands: the same option names as under `fit`)."""
    from spogw.cli import SPOGWCLI, TRAINER_DEFAULTS, GroupDataModule, RunConfigCallback, SPOGWModule

    cli = SPOGWCLI(SPOGWModule, GroupDataModule, save_config_callback=RunConfigCallback,
                   trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0, auto_configure_optimizers=False,
                   run=False, args=["--config", str(REPO / "configs" / "fit" / "quickstart.yaml"),
                                    "--trainer.logger", "false"])
    return cli.parser


@pytest.mark.parametrize("name", sorted(ALL))
def test_sweep_expands_to_its_grid_and_every_point_parses(name, fit_parser, monkeypatch):
    monkeypatch.chdir(REPO)
    path = SWEEPS / f"{name}.yaml"
    config = load_sweep(path)
    points = expand(config)
    grid = ALL[name]
    expected = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    assert sorted(map(json.dumps, points)) == sorted(json.dumps(dict(sorted(p.items()))) for p in expected)
    check_parameters(path, config)  # every name is a `spogw fit` flag
    command = point_command(config, points[0])
    assert command[1:5] == ["-m", "spogw.cli", "fit", "--config"] and (REPO / command[5]).is_file()
    configs = [x for i, c in enumerate(command) if c == "--config" for x in ("--config", str(REPO / command[i + 1]))]
    # the embedded model, no previous adapter and the shipped data here: instantiating needs no GPU and no run
    local = ["--model.model", "embedded", "--model.reference_adapter", "null", "--trainer.accelerator", "cpu",
             "--trainer.devices", "1", "--trainer.strategy", "auto",
             "--data.scored_samples", str(REPO / "examples" / "synthetic_scored_samples.jsonl")]
    for point in points:  # the flags `wandb agent` would pass parse, land where they should, and instantiate
        parsed = fit_parser.parse_args([*configs, *point_args(point), *local, "--trainer.logger", "false"])
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


def tiny_overlay(tmp_path, tiny_model, scored_file, base_url):
    """The tiny model on the scored file; the held-out evaluation on 2 HumanEval test queries through a stub."""
    overlay = tmp_path / "tiny.yaml"
    heldout = {"class_path": "spogw.heldout.HeldOutEvaluation", "init_args": {
        "benchmarks": ["humaneval"], "split": "test", "limit": 2, "runs": 1,
        "executor": {"kind": "openai", "model": "stub", "base_url": base_url, "api_key_env": "SPOGW_STUB_KEY",
                     "max_tokens": 64, "cache": str(tmp_path / "executor_cache.sqlite")},
        "generation": {"backend": "transformers", "guided": True, "max_new_tokens": 400, "batch_size": 2},
        "baselines": ["io"]}}
    overlay.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true", "max_steps": 2,
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": [heldout]},
        "model": {"model": tiny_model, "lora": {"r": 4, "alpha": 8}, "lr": 1e-3, "gradient_checkpointing": False,
                  "dtype": "float32"},
        "data": {"scored_samples": str(scored_file), "curation": {"n": 6, "t": 2, "top_n": 4, "m": None,
                                                                  "scope": "global"},
                 "max_prompt_tokens": 64, "max_completion_tokens": 64}}))
    return overlay


def test_local_sweep_ranks_points_by_their_held_out_score_resumes_and_reports(tmp_path, tiny_model, scored_file,
                                                                              monkeypatch):
    """The β sweep's own command on two β values and a tiny model: each point trains on the shared data, then its
    adapter is evaluated on held-out queries; one point runs, the rerun resumes, and the report draws the points'
    own held-out scores (no training proxy), with the base generator and IO as reference lines."""
    from openai_stub import OpenAIStub, StubConfig

    monkeypatch.chdir(REPO)  # the command names its configs relative to the repo, as wandb agent does
    monkeypatch.setenv("SPOGW_STUB_KEY", "x")
    config = yaml.safe_load((SWEEPS / "beta.yaml").read_text())
    config["parameters"] = {"model.beta": {"values": [0.05, 0.2]}, "seed_everything": {"values": [0]}}
    small = tmp_path / "beta2.yaml"
    small.write_text(yaml.safe_dump(config))
    out = tmp_path / "sweep"
    # the executor unreachable during the first point's evaluation: the point fails with the reason, no metric
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    broken = tiny_overlay(tmp_path, tiny_model, scored_file, dead)
    spec = yaml.safe_load(broken.read_text())
    spec["trainer"]["callbacks"][0]["init_args"]["executor"].update(max_retries=0, timeout_s=5)
    broken.write_text(yaml.safe_dump(spec))
    failed = sweep(str(small), sweep_dir=str(out), config_overlay=str(broken), max_runs=1)
    assert [r["state"] for r in failed] == ["failed", "pending"] and failed[0]["metric"] is None
    log = (out / "beta=0.05,seed_everything=0" / "fit.log").read_text()
    assert "the held-out evaluation is incomplete" in log and "executor_error" in log
    with OpenAIStub(StubConfig(responder=lambda messages: "def f():\n    return 1\n")) as stub:
        overlay = tiny_overlay(tmp_path, tiny_model, scored_file, stub.base_url)
        first = sweep(str(small), sweep_dir=str(out), config_overlay=str(overlay), max_runs=1)
        assert [r["state"] for r in first] == ["finished", "pending"]
        point = out / "beta=0.05,seed_everything=0"
        assert (point / "adapter" / "adapter_config.json").is_file() and (point / "eval.json").is_file()
        again = sweep(str(small), sweep_dir=str(out), config_overlay=str(overlay))
    assert [r["state"] for r in again] == ["finished", "finished"]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["beta=0.05,seed_everything=0"] * 2 + ["beta=0.2,seed_everything=0"]
    assert [x["state"] for x in lines] == ["failed", "finished", "finished"]  # the failed point ran again
    for r in again:
        run = out / r["name"]
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["beta"] == r["params"]["model.beta"] and saved["model"]["model"] == tiny_model
        results = json.loads((run / "eval" / "results.json").read_text())
        assert results["settings"]["split"] == "test" and results["settings"]["adapter"] == str(run / "adapter")
        own = results["table"]["generator"]["benchmarks"]["humaneval"]["mean"]
        assert r["metric"] == {"value": own, "source": "eval", "label": "held-out score (%) from eval/results.json"}
        assert json.loads((run / "eval.json").read_text())["score"] == own
        logged = (run / "lightning_logs").glob("version_*/metrics.csv")
        assert any("eval/score" in f.read_text().splitlines()[0] for f in logged)  # the metric the sweep names
    reference = json.loads((out / "reference" / "results.json").read_text())
    assert set(reference["table"]) == {"io", "generator"} and reference["settings"]["adapter"] is None
    from spogw.report import report

    result = report(str(out), wandb=False)
    assert result["figures"]["figure3"].stat().st_size > 10_000
    assert set(result["references"]) == {"base generator", "static: IO"}
    assert [row["score"] for row in result["rows"]] == [r["metric"]["value"] for r in again]
    md = (out / "report" / "summary.md").read_text()
    assert "beta=0.05" in md and "beta=0.2" in md and "proxy" not in md


def test_a_point_the_shared_data_cannot_build_is_refused_before_anything_runs(tmp_path, scored_file, monkeypatch):
    from spogw.sweep import SweepError

    monkeypatch.chdir(REPO)
    config = yaml.safe_load((SWEEPS / "cpu" / "group_size.yaml").read_text())
    overlay = tmp_path / "data.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"scored_samples": str(scored_file),
                                                "curation": {"n": 6, "m": 8, "top_n": 1}}}))

    def run(params: dict, overlay_file=overlay) -> str:
        bad = tmp_path / "sweep.yaml"
        bad.write_text(yaml.safe_dump({**config, "parameters": params}))
        with pytest.raises(SweepError) as err:
            sweep(str(bad), sweep_dir=str(tmp_path / "out"), config_overlay=str(overlay_file))
        assert not (tmp_path / "out").exists()  # refused before any point ran
        return str(err.value)

    msg = run({"data.curation.t": {"values": [2, 4]}})  # 2t = 8 > n = 6
    assert "point t=4" in msg and "`--data.curation.t`" in msg and "2t = 8" in msg and "n` = 6" in msg
    msg = run({"data.curation.n": {"values": [6, 10]}})  # n > m = 8
    assert "point n=10" in msg and "must not exceed `--data.curation.m` = 8" in msg
    # d above the distinct groups the shared data holds (6 queries x C(8, 6) = 28 instances each, per query)
    msg = run({"data.curation.top_n": {"values": [1, 10_000]}, "data.curation.scope": {"value": "per_query"}})
    assert "point scope=per_query,top_n=10000" in msg
    assert "`data.curation.top_n` (the dataset size d) = 10000 exceeds" in msg
    limit = int(msg.split("exceeds the ")[1].split()[0])
    assert 1 <= limit <= 28
    overlay.write_text(yaml.safe_dump({"data": {"scored_samples": str(tmp_path / "none.jsonl")}}))
    msg = run({"data.curation.t": {"values": [2]}})
    assert "none.jsonl" in msg and "does not exist" in msg and "spogw iterate --config configs/learn.yaml" in msg


def test_sweep_from_the_wrong_directory_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the command's configs/fit/paper.yaml is relative to the repository root
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(SWEEPS / "beta.yaml"), "--dry_run", "true"])
    assert exit_info.value.code == 2
    assert "`--config configs/fit/paper.yaml` is not found" in capsys.readouterr().err


def test_only_runs_the_points_it_names(tmp_path, scored_file, monkeypatch, capsys):
    from spogw.sweep import SweepError

    monkeypatch.chdir(REPO)
    overlay = tmp_path / "data.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"scored_samples": str(scored_file), "curation": {"m": 8}}}))
    records = sweep(str(SWEEPS / "cpu" / "beta.yaml"), sweep_dir=str(tmp_path / "out"), config_overlay=str(overlay),
                    dry_run=True, only={"seed_everything": 0})
    planned = [r["params"] for r in records if r["state"] == "planned"]
    assert planned == [{"model.beta": b, "seed_everything": 0} for b in (0.025, 0.05, 0.1, 0.2)]
    assert sum(r["state"] == "pending" for r in records) == 8
    # without --sweep_dir the points go where the command's --trainer.default_root_dir says (as under wandb agent)
    default = sweep(str(SWEEPS / "cpu" / "beta.yaml"), config_overlay=str(overlay), dry_run=True)
    assert {str(Path(r["run_dir"]).parent) for r in default} == {"runs/sweeps/cpu/beta"}
    with pytest.raises(SweepError, match="`--only`: seed is not a parameter"):
        sweep(str(SWEEPS / "cpu" / "beta.yaml"), config_overlay=str(overlay), dry_run=True, only={"seed": 0})
