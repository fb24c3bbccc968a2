"""`spogw iterate`: the whole loop on a tiny workflow-writing model and a loopback executor, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SHARED_DATA, WRITER_PROMPT
from openai_stub import OpenAIStub, StubConfig

from spogw.sampling import read_jsonl_tolerant

AFLOW = SHARED_DATA / "aflow"
pytestmark = pytest.mark.skipif(not (AFLOW / "humaneval_validate.jsonl").is_file(), reason="needs ../shared/data/aflow")


def correct_code_by_entry_point(limit: int) -> dict[str, str]:
    from spogw.benchmarks import load_benchmark

    records = load_benchmark("humaneval", "train", data_dir=str(AFLOW), limit=limit)
    return {r.entry_point: r.answer for r in records}


def make_responder(solutions: dict[str, str], *, right_when: str = "step by step"):
    """The executor: right code when the prompt contains ``right_when``, a wrong function otherwise."""

    def respond(messages: list[dict]) -> str:
        text = messages[-1]["content"]
        entry = next((ep for ep in solutions if f"def {ep}(" in text), None)
        if entry is None:
            return "I don't know."
        if right_when in text:
            return f"```python\n{solutions[entry]}\n```"
        return f"```python\ndef {entry}(*args, **kwargs):\n    return None\n```"

    return respond


def write_config(tmp_path: Path, writer: str, base_url: str, *, iterations: int = 2) -> Path:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(WRITER_PROMPT)  # the tiny writer answers this prompt with a workflow
    config = {
        "benchmark": "humaneval", "run_dir": str(tmp_path / "run"), "iterations": iterations, "generator": writer,
        "fit_config": str(REPO / "configs" / "fit" / "quickstart.yaml"),
        "fit_args": ["--data.curation.n", "4", "--data.curation.t", "1", "--data.curation.top_n", "2",
                     "--data.curation.failed_score", "0.0",
                     "--model.lora.r", "4", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false", "--model.lr", "1e-3",
                     "--data.max_prompt_tokens", "64", "--data.max_completion_tokens", "96"],
        "sampling": {"m": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 140, "max_resample": 1,
                     "batch_size": 4, "prompt_file": str(prompt), "backend": "transformers"},
        "executor": {"kind": "openai", "model": "stub", "base_url": base_url, "api_key_env": "STUB_KEY",
                     "concurrency": 8, "max_tokens": 256},
        "runs": 1, "data_dir": str(AFLOW), "train_limit": 3,
        "evaluation": {"enabled": True, "limit": 2, "runs": 1, "baselines": []},
    }
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "STUB_KEY": "test", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "spogw.cli", "iterate", "--config", str(config)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 400) -> bool:
    """kill -9 the whole process group as soon as ``condition()`` holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the condition never held")


def check_artifacts(run: Path, *, m: int, queries: int) -> None:
    """No duplicated or lost record in any stage's artifact, whatever was interrupted."""
    for it in sorted(run.glob("iter-*")):
        samples = read_jsonl_tolerant(it / "samples.jsonl")
        keys = Counter((s["query_id"], s["sample"]) for s in samples)
        assert all(c == 1 for c in keys.values()), f"duplicate samples in {it}"
        per_query = Counter(q for q, _ in keys)
        assert all(c == m for c in per_query.values()), f"a partial query survived in {it}: {per_query}"
        if (it / "scored.json").is_file():
            scored = read_jsonl_tolerant(it / "scored.jsonl")
            assert Counter((s["query_id"], s["sample"]) for s in scored) == keys, f"lost or duplicated scores in {it}"
            assert len(per_query) == queries


@pytest.mark.slow
def test_iterate_survives_kill_9_anywhere(tmp_path, workflow_writer):
    solutions = correct_code_by_entry_point(3)
    with OpenAIStub(StubConfig(responder=make_responder(solutions))) as stub:
        config = write_config(tmp_path, workflow_writer, stub.base_url)
        run = tmp_path / "run"
        it1 = run / "iter-1"
        kill_points = [
            lambda: len(read_jsonl_tolerant(it1 / "samples.jsonl")) >= 4,  # while sampling
            lambda: (it1 / "samples.json").is_file(),                       # while scoring
            lambda: (it1 / "fit").is_dir() and not (it1 / "fit" / "fit.done.json").is_file(),  # while fitting
            lambda: (run / "iter-2" / "samples.json").is_file(),            # iteration 2, after its sampling
        ]
        for condition in kill_points:
            killed = kill_when(start(config), condition)
            check_artifacts(run, m=4, queries=3)
            if not killed:
                break
        proc = start(config)
        out = proc.communicate(timeout=600)[0].decode(errors="replace")
        assert proc.returncode == 0, out[-4000:]
        check_artifacts(run, m=4, queries=3)
        summary = json.loads((run / "summary.json").read_text())
        assert [it["iteration"] for it in summary["iterations"]] == [1, 2]
        # π_1 sampled iteration 2 and was its reference: the fit of iteration 2 continued adapter 1
        fit2 = yaml.safe_load((run / "iter-2" / "fit" / "config.yaml").read_text())
        assert fit2["model"]["reference_adapter"] == str(run / "iter-1" / "fit" / "adapter")
        assert (run / "iter-2" / "fit" / "adapter" / "adapter_config.json").is_file()
        assert (run / "eval" / "table.md").is_file()
        scored = read_jsonl_tolerant(run / "iter-1" / "scored.jsonl")
        assert {s["score"] for s in scored if s["score"] is not None} >= {0.0, 1.0}  # the scores vary
        # a finished run is not redone: a rerun changes no artifact and makes no executor request
        stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.jsonl")}
        requests = stub.requests
        proc = start(config)
        assert proc.wait(timeout=600) == 0
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*.jsonl")} == stamps
        assert stub.requests == requests


def test_a_guided_iteration_end_to_end(tmp_path, tiny_model):
    """The quickstart's path in small: an untrained model samples guided (every workflow valid), the executor
    scores the plan-then-code workflows higher, and the loop builds groups, trains and evaluates."""
    # right code when the problem came with a plan (the plan-then-code option), wrong code otherwise
    respond = make_responder(correct_code_by_entry_point(3), right_when="Plan:")
    with OpenAIStub(StubConfig(responder=respond)) as stub:
        config = yaml.safe_load(write_config(tmp_path, tiny_model, stub.base_url, iterations=1).read_text())
        config["sampling"].update(prompt_file=None, guided=True, max_new_tokens=600)
        config["fit_args"][config["fit_args"].index("--data.max_completion_tokens") + 1] = "600"
        config["evaluation"]["baselines"] = ["io"]
        path = tmp_path / "guided.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = start(path)
        out = proc.communicate(timeout=600)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    run = tmp_path / "run"
    samples = read_jsonl_tolerant(run / "iter-1" / "samples.jsonl")
    assert len(samples) == 12 and all(s["valid"] and s["guided"] for s in samples)
    scored = read_jsonl_tolerant(run / "iter-1" / "scored.jsonl")
    planned = {s["score"] for s in scored if "Plan:" in s["completion"]}
    unplanned = {s["score"] for s in scored if "Plan:" not in s["completion"]}
    assert 1.0 in planned and unplanned == {0.0}  # (a plan's code may still be revised into wrong code)
    summary = json.loads((run / "summary.json").read_text())
    (iteration,) = summary["iterations"]
    assert iteration["build"]["groups"] > 0 and iteration["build"]["seconds"] >= 0
    assert summary["evaluation_seconds"] > 0
    assert (run / "iter-1" / "fit" / "adapter" / "adapter_config.json").is_file()
    workflows = read_jsonl_tolerant(run / "eval" / "workflows.jsonl")
    assert len(workflows) == 2 and all("class Workflow" in w["workflow"] for w in workflows)
    assert "| Generator |" in (run / "eval" / "table.md").read_text()


def test_a_run_dir_from_another_config_is_refused(tmp_path):
    from spogw.loop import RunDirMismatch, _check_run_dir

    _check_run_dir(tmp_path, {"benchmark": "humaneval", "runs": 3, "iterations": 3})
    _check_run_dir(tmp_path, {"benchmark": "humaneval", "runs": 3, "iterations": 5})  # more iterations: fine
    with pytest.raises(RunDirMismatch, match="differs in: runs"):
        _check_run_dir(tmp_path, {"benchmark": "humaneval", "runs": 1, "iterations": 5})


def test_bad_fit_settings_fail_before_sampling(tmp_path):
    from spogw.evaluate import ExecutorOptions
    from spogw.loop import iterate
    from spogw.sampling import SamplingOptions

    with pytest.raises(ValueError, match="--model.beta"):
        iterate("humaneval", run_dir=str(tmp_path / "run"), executor=ExecutorOptions(kind="local"),
                sampling=SamplingOptions(backend="transformers"),
                fit_config=str(REPO / "configs" / "fit" / "quickstart.yaml"), fit_args=["--model.beta", "-1"],
                data_dir=str(AFLOW), train_limit=1)
    assert not (tmp_path / "run" / "iter-1").exists()


PLAN_FIRST = "plan = (await self.custom("
"""How a plan-first workflow begins its body (the code family's second `first` option)."""


def share_planned(texts: list[str]) -> float:
    return sum(PLAN_FIRST in t for t in texts) / len(texts)


def sample_share(model: str, adapter: str | None, prompts: list[list[dict]], n: int) -> float:
    """The plan-first share of ``n`` guided workflows per prompt from base model + adapter, same seed for all."""
    from spogw.generation import TransformersGenerator

    texts = TransformersGenerator(model, adapter, batch_size=8).generate(
        prompts, n=n, temperature=1.0, top_p=1.0, max_new_tokens=600, seed=123, guide="code")
    return share_planned([t for row in texts for t in row])


def test_the_generator_learns_a_planted_preference(tmp_path, tiny_model):
    """End to end, the sign, the mask, the reference and the adapter chain are right: the executor rewards
    plan-first workflows only, and after two ioGRPO iterations the generator writes them much more often.

    The margin is five standard deviations of the difference of two shares under chance (no learning), so a
    seeded run clears it and an unchanged, or wrongly trained, generator does not."""
    respond = make_responder(correct_code_by_entry_point(6), right_when="Plan:")
    prompt = tmp_path / "short_prompt.txt"
    prompt.write_text("Write a workflow that solves this problem:\n{question}")
    with OpenAIStub(StubConfig(responder=respond)) as stub:
        config = yaml.safe_load(write_config(tmp_path, tiny_model, stub.base_url, iterations=2).read_text())
        config["sampling"].update(prompt_file=str(prompt), guided=True, m=8, max_new_tokens=600, batch_size=8)
        config["train_limit"] = 6
        config["evaluation"].update(limit=2, runs=1, baselines=["io"], compare_base=True, each_iteration=True)
        flags = dict(zip(config["fit_args"][::2], config["fit_args"][1::2], strict=True))
        flags.update({"--data.curation.n": "4", "--data.curation.t": "2", "--data.curation.top_n": "4",
                      "--data.curation.scope": "per_query", "--model.lr": "5e-3", "--model.lora.r": "8",
                      "--data.max_prompt_tokens": "384", "--data.max_completion_tokens": "600",
                      "--trainer.max_epochs": "2"})
        config["fit_args"] = [x for kv in flags.items() for x in kv]
        path = tmp_path / "learn.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = start(path)
        out = proc.communicate(timeout=900)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    run = tmp_path / "run"
    first, second = (read_jsonl_tolerant(run / f"iter-{k}" / "samples.jsonl") for k in (1, 2))
    assert all(s["valid"] and s["completion_ids"] for s in first + second)  # trained on the ids as sampled
    scored = read_jsonl_tolerant(run / "iter-1" / "scored.jsonl")
    assert {s["score"] for s in scored if PLAN_FIRST in s["completion"]} == {1.0}
    assert {s["score"] for s in scored if PLAN_FIRST not in s["completion"]} == {0.0}
    # iteration 2 sampled with π_1: already more plan-first workflows than π_0 wrote
    assert share_planned([s["completion"] for s in second]) > share_planned([s["completion"] for s in first])
    # π_2 (the adapter of iteration 2, trained on π_1's samples with π_1 as reference) against the base model
    prompts = list({s["query_id"]: s["prompt"] for s in first}.values())
    n = 24
    base = sample_share(tiny_model, None, prompts, n)
    final = sample_share(tiny_model, str(run / "iter-2" / "fit" / "adapter"), prompts, n)
    assert 0.05 < base < 0.8, f"the base generator's share {base:.2f} leaves no room to learn or no signal"
    margin = 5 * (2 * base * (1 - base) / (n * len(prompts))) ** 0.5
    assert final - base > margin, f"plan-first share: base {base:.2f}, after two {final:.2f} (> {margin:.2f})"
    # the learning report reads the run alone: the RL curve and the held-out score of π_0, π_1 and π_2
    from spogw.report_learning import learning_report

    report = learning_report(run, wandb=False)
    curve = []
    for k in (1, 2):
        lines = read_jsonl_tolerant(run / f"iter-{k}" / "scored.jsonl")
        curve.append(100 * sum(s["score"] or 0.0 for s in lines) / len(lines))
    assert [report["training"][k]["mean"] for k in (1, 2)] == pytest.approx(curve)
    assert report["training"][2]["mean"] > report["training"][1]["mean"]
    held = {k: json.loads((run / d / "results.json").read_text())["table"]["generator"]
            for k, d in ((0, "eval-base"), (1, "eval-iter-1"), (2, "eval"))}
    assert set(report["held_out"]) == {0, 1, 2} and all(
        report["held_out"][k]["mean"] == held[k]["benchmarks"]["humaneval"]["mean"] for k in held)
    assert set(report["baselines"]) == {"io"} and (run / "report" / "learning.png").is_file()
    mean = {k: held[k]["benchmarks"]["humaneval"]["mean"] for k in held}
    assert report["goal"]["iteration"] == 2 and report["goal"]["gain"] == pytest.approx(mean[2] - mean[0])
    assert "## The goal" in (run / "report" / "learning.md").read_text()


def _scored_file(path: Path, scores: dict[str, list]) -> Path:
    with path.open("w") as f:
        for q, values in scores.items():
            for i, s in enumerate(values):
                f.write(json.dumps({"query_id": q, "sample": i, "completion": "x", "score": s}) + "\n")
    return path


def test_a_run_without_score_variance_stops_with_what_to_change(tmp_path):
    from spogw.loop import NothingToLearn, check_variance

    scored = _scored_file(tmp_path / "scored.jsonl", {"q1": [0.0, 0.0, None], "q2": [1.0, 1.0, 1.0]})
    with pytest.raises(NothingToLearn) as err:
        check_variance(scored, 2, "humaneval", 3, partial_credit=False)
    msg = str(err.value)
    assert "iteration 2" in msg and "none of the 2 training queries" in msg
    assert "--sampling.m" in msg and "--partial_credit" in msg and "another benchmark" in msg
    assert scored.is_file() and "intact" in msg  # nothing is deleted
    # a failed workflow (None) counts 0, as in training: 0 beside None is no variance; 1 beside None is
    assert check_variance(_scored_file(tmp_path / "b.jsonl", {"q1": [1.0, None, 1.0], "q2": [0.5, 0.5]}), 1,
                          "drop", 3, partial_credit=True) == 1
    # infrastructure failures awaiting a retry are no score at all
    lines = [{"query_id": "q", "sample": 0, "score": 1.0}, {"query_id": "q", "sample": 1, "score": None, "retry": True}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(NothingToLearn):
        check_variance(tmp_path / "c.jsonl", 1, "drop", 2, partial_credit=True)


def test_an_adapter_that_does_not_load_stops_the_next_iteration_with_the_fix(tmp_path):
    import torch
    from safetensors.torch import save_file

    from spogw.loop import check_adapter

    adapter = tmp_path / "iter-1" / "fit" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    save_file({"w": torch.zeros(2)}, str(adapter / "adapter_model.safetensors"))
    check_adapter(adapter, 2)  # a good one passes
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 20)  # truncated weights
    with pytest.raises(RuntimeError, match=r"iteration 2: the adapter of iteration 1 .* does not load.*delete"):
        check_adapter(adapter, 2)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="no adapter_model"):
        check_adapter(adapter, 2)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="does not load"):
        check_adapter(adapter, 2)
    assert (tmp_path / "iter-1" / "fit").is_dir()  # the run directory is left as it was
