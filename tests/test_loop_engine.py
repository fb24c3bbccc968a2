"""`spogw iterate` on the engine: one server for the whole run (both roles, every stage), killed and resumed.

The server is the stand-in (tests/engine_standin.py): guided workflows for the generator, and for the executor the
right HumanEval code when a workflow passed a plan, wrong code otherwise, so that groups get score variance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from test_engine import STANDIN, group_members
from test_loop import AFLOW, kill_when, start, write_config

from spogw.engine import EngineOptions
from spogw.sampling import read_jsonl_tolerant

pytestmark = pytest.mark.skipif(not (AFLOW / "humaneval_validate.jsonl").is_file(), reason="needs ../shared/data/aflow")


def engine_config(tmp_path: Path, model: str, *, iterations: int) -> Path:
    config = yaml.safe_load(write_config(tmp_path, model, "http://unused", iterations=iterations).read_text())
    config["sampling"].update(prompt_file=None, guided=True, max_new_tokens=600, backend="engine")
    config["fit_args"][config["fit_args"].index("--data.max_completion_tokens") + 1] = "600"
    config["executor"] = {"kind": "engine", "model": model, "concurrency": 8, "max_tokens": 256}
    config["engine"] = {"command": [sys.executable, STANDIN], "startup_timeout_s": 60}
    config["evaluation"]["baselines"] = ["io"]
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def standin_env(tmp_path, monkeypatch) -> Path:
    record = tmp_path / "requests.jsonl"
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    monkeypatch.setenv("STANDIN_SOLUTIONS", str(AFLOW))
    monkeypatch.setenv("SPOGW_ENGINE_REGISTRY", str(tmp_path / "registry"))
    return record


def served(record: Path, endpoint: str) -> list[dict]:
    return [r["body"] for r in map(json.loads, record.read_text().splitlines()) if r["path"] == endpoint]


def gone(pid: int, timeout: float = 30.0) -> bool:
    """The process has exited (a zombie not yet reaped counts as exited), waiting up to ``timeout`` under load."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        time.sleep(0.2)
    return False


def test_one_engine_serves_every_stage_of_a_run(tmp_path, tiny_model, standin_env):
    proc = start(engine_config(tmp_path, tiny_model, iterations=1))
    out = proc.communicate(timeout=600)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    run = tmp_path / "run"
    samples = read_jsonl_tolerant(run / "iter-1" / "samples.jsonl")
    dtype = EngineOptions().dtype  # the default, native: bfloat16 where the CPU computes it, else float32
    assert len(samples) == 12 and all(s["valid"] and s["generator"] == f"engine:{tiny_model}:{dtype}"
                                      for s in samples)
    scores = {s["score"] for s in read_jsonl_tolerant(run / "iter-1" / "scored.jsonl")}
    assert {0.0, 1.0} <= scores  # the plan-then-code workflows got the right code
    log = (run / "engine" / "server.log").read_text()
    assert log.count("spogw starts:") == 1  # sample, score, evaluate: one server
    summary = json.loads((run / "summary.json").read_text())
    (engine,) = summary["engine"]
    assert engine["backend"] == "vllm" and engine["dtype"] == dtype and engine["fallback_reason"] is None
    assert summary["iterations"][0]["mean_score"] == pytest.approx(summary["iterations"][0]["score"]["score_mean"])
    # the evaluation's generator is the base model plus iteration 1's adapter, loaded into the same server
    (load,) = served(standin_env, "/v1/load_lora_adapter")
    assert load["lora_path"] == str((run / "iter-1" / "fit" / "adapter").resolve())
    assert "| Generator |" in (run / "eval" / "table.md").read_text()
    assert "mean training score" in out and f"engine: vllm, {dtype}" in out
    pid = int(log.split("engine core pid ")[1].split()[0])
    assert gone(pid), "the engine outlived the run"
    assert not list((tmp_path / "registry").glob("*.json"))


@pytest.mark.slow
def test_a_rerun_after_kill_9_adopts_the_server_and_continues(tmp_path, tiny_model, standin_env):
    config = engine_config(tmp_path, tiny_model, iterations=2)
    run = tmp_path / "run"
    assert kill_when(start(config), lambda: (run / "iter-1" / "scored.json").is_file())
    (state,) = [json.loads(p.read_text()) for p in (tmp_path / "registry").glob("*.json")]
    assert group_members(state["pid"]), "the server went down with its run"
    proc = start(config)
    out = proc.communicate(timeout=900)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    assert f"reusing the vLLM server a stopped run left on port {state['port']}" in out
    assert (run / "engine" / "server.log").read_text().count("spogw starts:") == 1
    assert [it["iteration"] for it in json.loads((run / "summary.json").read_text())["iterations"]] == [1, 2]
    # iteration 2 sampled through adapter 1, the evaluation through adapter 2
    paths = [b["lora_path"] for b in served(standin_env, "/v1/load_lora_adapter")]
    assert paths == [str((run / f"iter-{k}" / "fit" / "adapter").resolve()) for k in (1, 2)]
    assert not group_members(state["pid"]) and not list((tmp_path / "registry").glob("*.json"))
