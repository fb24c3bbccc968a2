"""W&B tracking: a real offline run read back from its files, fallbacks, W&B dying mid-run, stage statistics."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_cli import fit_args

from spogw.cli import run_fit
from spogw.tracking import (
    default_loggers,
    log_stage,
    read_offline_run,
    resolve_trainer_config,
    summarize_samples,
    wandb_mode,
)

TRAIN_KEYS = ("train/loss", "train/policy", "train/kl", "train/kl_all", "train/clip_frac_low", "train/clip_frac_high",
              "train/ratio_mean", "train/ratio_max", "train/adv_mean", "train/adv_std", "train/kl_weight",
              "train/score_mean", "train/grad_norm", "train/lr")


def no_key_env(tmp_path) -> dict:
    """An environment with no W&B key anywhere: the default must fall back to offline on its own."""
    # WANDB_SERVICE: an earlier in-process W&B run of this session would lend the child its service process
    drop = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "NETRC": str(tmp_path / "no-netrc"), "PYTHONWARNINGS": "ignore"}


def read_run(path: Path, key: str, artifacts: int = 0, timeout: float = 30.0) -> dict:
    """An offline run's contents once ``key`` is in its history: wandb-core may still be writing after finish()."""
    deadline = time.monotonic() + timeout
    while True:
        wb = read_offline_run(path)
        if (any(key in h for h in wb["history"]) and len(wb["artifacts"]) >= artifacts) or time.monotonic() > deadline:
            return wb
        time.sleep(0.5)


def offline_run_dir(run: Path) -> Path:
    (found,) = (run / "wandb").glob("offline-run-*")
    return found


def test_default_fit_logs_to_wandb_offline_and_csv(tmp_path, tiny_model, scored_file):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "spogw.cli", *fit_args(tiny_model, scored_file, run)],
                          capture_output=True, text=True, timeout=600, env=no_key_env(tmp_path), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B offline (no W&B API key" in proc.stderr  # the fallback says what it did
    # the CSV copy, where it always was
    rows = [r for r in csv.DictReader((run / "lightning_logs" / "version_0" / "metrics.csv").open()) if r["train/loss"]]
    assert len(rows) == 4
    # the offline W&B run, read back from its .wandb file
    wb = read_run(offline_run_dir(run), "train/loss", artifacts=2)
    steps = [h for h in wb["history"] if "train/loss" in h]
    assert len(steps) == 4
    for key in TRAIN_KEYS:
        assert all(key in h for h in steps), key
    assert [h["trainer/global_step"] for h in steps] == [0, 1, 2, 3]
    assert steps[0]["train/loss"] == pytest.approx(float(rows[0]["train/loss"]), rel=1e-5)
    # dataset statistics: counts, and the distributions of paper Fig. 2
    summary = wb["summary"]
    stats = json.loads(next((run / "data").glob("groups-*/stats.json")).read_text())
    for key in ("groups", "records", "instances", "instances_kept", "duplicate_subsets", "failed"):
        assert summary[f"data/{key}"] == stats[key], key
    assert summary["data/groups"] == 4 and "data/variance_median" in summary and "data/mil_median" in summary
    dataset_row = next(h for h in wb["history"] if "data/variance" in h)
    assert dataset_row["data/variance"]["_type"] == "histogram"
    assert dataset_row["data/median_interval_length"]["_type"] == "histogram"
    # the table of workflows with their scores: 4 groups x 2t = 4 members
    table = dataset_row["data/workflows"]
    assert table["_type"] == "table-file" and table["nrows"] == 16
    content = json.loads((offline_run_dir(run) / "files" / table["path"]).read_text())
    assert content["columns"] == ["group_id", "query_id", "member", "score", "advantage", "workflow"]
    assert all(0.0 <= r[3] <= 1.0 and r[5].startswith("class Workflow") for r in content["data"])
    # the resolved config, flattened to the sweep parameters' names
    assert wb["config"]["model.beta"] == 0.1 and wb["config"]["data.curation.t"] == 2
    # the dataset and the adapter as artifacts
    kinds = dict((t, n) for n, t in wb["artifacts"])
    assert kinds["dataset"].startswith("groups-") and kinds["model"].startswith("adapter-")


@pytest.mark.slow  # ~30 s: one more fit, in a subprocess
def test_wandb_dying_mid_run_loses_no_training(tmp_path, tiny_model, scored_file):
    """The W&B service process is killed after step 3: a message, the run goes on, the CSV keeps every step."""
    run = tmp_path / "run"
    script = tmp_path / "kill_wandb.py"
    script.write_text(f"""
import os, signal, sys
import lightning as L
import psutil
from spogw import cli

class KillWandb(L.Callback):
    killed = False

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step < 3 or self.killed:
            return
        for proc in psutil.Process().children(recursive=True):  # our own wandb-core service
            if "wandb" in " ".join(proc.cmdline()):
                proc.send_signal(signal.SIGKILL)
                self.killed = True
                print("killed wandb service", proc.pid, "at step", trainer.global_step, file=sys.stderr)

cli.TRAINER_DEFAULTS["callbacks"] = [KillWandb()]
cli.run_fit({fit_args(tiny_model, scored_file, run, "--trainer.max_epochs", "2")!r})
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env=no_key_env(tmp_path), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "killed wandb service" in proc.stderr
    assert "W&B failed (log_metrics" in proc.stderr and "training goes on" in proc.stderr
    rows = [r for r in csv.DictReader((run / "lightning_logs" / "version_0" / "metrics.csv").open()) if r["train/loss"]]
    assert len(rows) == 8  # 4 groups x 2 epochs, all of them
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_trainer_logger_flag_switches_to_csv_only(tmp_path, tiny_model, scored_file, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    run_fit(fit_args(tiny_model, scored_file, run, "--trainer.max_steps", "1",
                     "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                     "--trainer.logger.save_dir", str(tmp_path / "csv")))
    assert (tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv").is_file()
    assert not (run / "wandb").exists() and not (run / "lightning_logs" / "version_0" / "metrics.csv").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wandb_mode_falls_back_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    mode, why = wandb_mode()
    assert mode == "offline" and "no W&B API key" in why
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    mode, why = wandb_mode()
    assert mode == "offline" and "unreachable" in why
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode()[0] == "disabled"
    loggers = default_loggers(tmp_path / "run")
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]


def test_wandb_agent_runs_get_their_own_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    config = resolve_trainer_config({"default_root_dir": str(tmp_path / "sweeps" / "beta"), "logger": False})
    assert config["default_root_dir"] == str(tmp_path / "sweeps" / "beta" / "abc123") and config["logger"] is False


def test_log_stage_summarises_scored_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    usage = {"calls": 2, "failed_calls": 0, "prompt_tokens": 100, "completion_tokens": 40, "cost_usd": 0.01,
             "cached_cost_usd": 0.0, "latency_s": 1.5}
    samples = [{"query_id": "q0", "prompt": "p", "completion": "class Workflow: ...", "score": 1.0, "usage": usage,
                "duration_s": 2.0},
               {"query_id": "q0", "prompt": "p", "completion": "class Workflow: ...", "score": 0.0, "usage": usage,
                "duration_s": 4.0},
               {"query_id": "q1", "prompt": "p", "completion": "not a workflow", "score": None, "duration_s": 0.5}]
    summary = summarize_samples(samples)
    assert summary["valid_rate"] == pytest.approx(2 / 3) and summary["score_mean"] == 0.5
    assert summary["executor_prompt_tokens"] == 200 and summary["executor_cost_usd"] == pytest.approx(0.02)
    assert summary["duration_s_median"] == 2.0
    logged = log_stage("score", {"wall_s": 12.5}, samples=samples, run_dir=str(tmp_path))
    assert logged["score/wall_s"] == 12.5 and logged["score/valid_rate"] == pytest.approx(2 / 3)
    wb = read_run(next((tmp_path / "wandb").glob("offline-run-*")), "score/valid_rate")
    (row,) = [h for h in wb["history"] if "score/valid_rate" in h]
    assert row["score/executor_completion_tokens"] == 80 and row["score/workflows"]["nrows"] == 3
    assert row["score/score_hist"]["_type"] == "histogram"


@pytest.mark.slow
def test_ddp_config_two_cpu_processes_log_one_wandb_run(tmp_path, tiny_model):
    """configs/ddp.yaml on 2 CPU processes: both ranks train, rank 0 alone writes the CSV and the W&B run."""
    from conftest import write_scored

    scored = write_scored(tmp_path / "s.jsonl", queries=4, m=8)
    run = tmp_path / "run"
    args = ["fit", "--config", str(REPO / "configs" / "ddp.yaml"), *fit_args(tiny_model, scored, run)[1:],
            "--trainer.devices", "2", "--trainer.precision", "32-true", "--trainer.max_steps", "2"]
    proc = subprocess.run([sys.executable, "-m", "spogw.cli", *args], capture_output=True, text=True, timeout=900,
                          env=no_key_env(tmp_path), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr and proc.stderr.count("W&B offline (") == 1
    wb = read_run(offline_run_dir(run), "train/loss", artifacts=2)  # exactly one offline run
    assert len([h for h in wb["history"] if "train/loss" in h]) == 2
    rows = [r for r in csv.DictReader((run / "lightning_logs" / "version_0" / "metrics.csv").open()) if r["train/loss"]]
    assert len(rows) == 2 and not (run / "lightning_logs" / "version_1").exists()


@pytest.mark.slow  # ~25 s: one more fit, in a subprocess
def test_server_refusing_the_run_falls_back_to_offline(tmp_path, tiny_model, scored_file):
    """A W&B server that answers (so the run starts online) but refuses the key: the fit retries offline."""
    run = tmp_path / "run"
    script = tmp_path / "refusing_server.py"
    script.write_text(f"""
import http.server, os, threading

class Refuse(http.server.BaseHTTPRequestHandler):
    def refuse(self):
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{{"errors": ["bad key"]}}')
    do_GET = do_POST = refuse
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{{server.server_address[1]}}",
                  WANDB_INIT_TIMEOUT="30")
from spogw.cli import run_fit
run_fit({fit_args(tiny_model, scored_file, run, "--trainer.max_steps", "2")!r})
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env=no_key_env(tmp_path), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B offline (" not in proc.stderr  # key + reachable server: it tried online first
    assert "W&B could not start online" in proc.stderr and "retrying offline" in proc.stderr
    wb = read_run(offline_run_dir(run), "train/loss", artifacts=2)
    assert len([h for h in wb["history"] if "train/loss" in h]) == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
