"""`spogw fit` end to end on a 2-layer random model: files, metrics, weights, reproduction, DDP, configs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_scored
from safetensors.torch import load_file

from spogw.cli import COMMANDS, cli_main, run_fit


def fit_args(tiny_model, scored, run_dir, *extra) -> list[str]:
    return ["fit", "--model.model", tiny_model, "--data.scored_samples", str(scored),
            "--data.curation.n", "6", "--data.curation.t", "2", "--data.curation.top_n", "4",
            "--trainer.default_root_dir", str(run_dir), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.lr", "1e-3", "--model.lora.r", "4", "--model.lora.alpha", "8", *extra]


def spogw(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "spogw.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_fit_end_to_end(tmp_path, tiny_model, scored_file):
    run = tmp_path / "run"
    proc = spogw(*fit_args(tiny_model, scored_file, run, "--trainer.max_epochs", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the files a run leaves behind
    assert (run / "config.yaml").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    (data_dir,) = (run / "data").glob("groups-*")
    stats = json.loads((data_dir / "stats.json").read_text())
    assert stats["groups"] == 4 and (data_dir / "dataset" / "dataset_info.json").is_file()
    (ckpt,) = (run / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state)  # trainable weights only
    # the metrics a run logs: one row per step (4 groups x 2 epochs)
    rows = list(csv.DictReader((run / "lightning_logs" / "version_0" / "metrics.csv").open()))
    steps = [r for r in rows if r.get("train/loss")]
    assert len(steps) == 8
    for key in ("train/loss", "train/policy", "train/kl", "train/clip_frac_high", "train/clip_frac_low",
                "train/ratio_mean", "train/adv_mean", "train/grad_norm", "train/lr", "train/kl_weight"):
        assert all(r[key] != "" for r in steps), key
    assert float(steps[0]["train/ratio_mean"]) == pytest.approx(1.0) and float(steps[0]["train/kl"]) == 0.0


def test_fit_changes_lora_weights_only(tmp_path, tiny_model, scored_file):
    cli = run_fit(fit_args(tiny_model, scored_file, tmp_path / "run", "--trainer.max_steps", "3"))
    policy = cli.model.policy
    from spogw.models import load_causal_lm

    base = dict(load_causal_lm(tiny_model).named_parameters())
    trained = {n: p for n, p in policy.named_parameters()}
    lora = {n: p for n, p in trained.items() if "lora_" in n}
    # LoRA B starts at zero and moved; every base weight is exactly as loaded
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    for name, p in trained.items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p, base[key]), name
    # trainable count: 2 layers x 4 projections x r (in + out); hidden 64, 2 kv heads of 16
    r, shapes = 4, {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}
    expected = 2 * sum(r * (i + o) for i, o in shapes.values())
    assert cli.model.count_parameters()["trainable"] == expected


def test_saved_config_reproduces_the_run(tmp_path, tiny_model, scored_file):
    first = tmp_path / "first"
    run_fit(fit_args(tiny_model, scored_file, first, "--trainer.max_steps", "2"))
    config = yaml.safe_load((first / "config.yaml").read_text())
    assert config["model"]["lora"]["r"] == 4 and config["data"]["curation"]["top_n"] == 4
    second = tmp_path / "second"
    run_fit(["fit", "--config", str(first / "config.yaml"), "--trainer.default_root_dir", str(second)])
    a = load_file(first / "adapter" / "adapter_model.safetensors")
    b = load_file(second / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flag,value,message", [
    ("--model.beta", "-0.5", "`--model.beta` must be >= 0"),
    ("--data.curation.t", "4", "2t = 8 must not exceed `--data.curation.n` = 6"),
    ("--model.epsilon", "0", "`--model.epsilon` must be > 0"),
])
def test_invalid_values_are_usage_errors(tmp_path, tiny_model, scored_file, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        run_fit(fit_args(tiny_model, scored_file, tmp_path / "run", flag, value))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_is_reported_without_traceback(tmp_path, tiny_model):
    scored = write_scored(tmp_path / "s.jsonl")
    with scored.open("a") as f:
        f.write('{"query_id": "q0", "prompt": "p", "completion": "c", "score": 7}\n')
    proc = spogw(*fit_args(tiny_model, scored, tmp_path / "run"), timeout=300)
    assert proc.returncode == 2
    assert "s.jsonl:49: 'score' 7 is outside [0, 1]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_ddp_two_processes_equal_one_process(tmp_path, tiny_model):
    scored = write_scored(tmp_path / "s.jsonl", queries=4, m=8)
    common = ["--trainer.max_steps", "1", "--data.shuffle", "false", "--model.lora.dropout", "0",
              "--model.lr", "1e-2"]
    one = spogw(*fit_args(tiny_model, scored, tmp_path / "one", *common, "--trainer.devices", "1",
                          "--data.groups_per_batch", "2"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = spogw(*fit_args(tiny_model, scored, tmp_path / "two", *common, "--trainer.devices", "2",
                          "--trainer.strategy", "ddp", "--data.groups_per_batch", "1"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Starting with 2 processes" in two.stderr
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    lr = 1e-2
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 0.5 * lr  # one Adam step moved LoRA B by about lr
    # the same update: a different global batch or no gradient averaging flips signs (differences of 2·lr)
    assert all(torch.allclose(a[k], b[k], atol=0.1 * lr, rtol=0) for k in a)


def _command_for(path: Path) -> str:
    config = yaml.safe_load(path.read_text()) or {}
    return "fit" if {"trainer", "model", "data"} & set(config) else ""


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path, capsys):
    if "sweeps" in path.parts:
        pytest.skip("W&B sweep definitions are checked by the sweep tests")
    command = _command_for(path)
    candidates = [command] if command else list(COMMANDS)
    errors = []
    for cmd in candidates:
        try:
            if cmd == "fit":
                run_fit(["fit", "--config", str(path), "--print_config"])
            else:
                cli_main([cmd, "--config", str(path), "--print_config"])
        except SystemExit as e:
            if e.code in (0, None):
                break
            errors.append(f"{cmd}: {capsys.readouterr().err[-500:]}")
    else:
        pytest.fail(f"{path} is not a valid config for any spogw command:\n" + "\n".join(errors))


def test_broken_config_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  beta: not-a-number\n")
    with pytest.raises(SystemExit) as exit_info:
        run_fit(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code == 2
