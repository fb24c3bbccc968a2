"""How much does the workflow matter to this executor? Static workflows on training queries, side by side.

Learning can only move the score as far as the workflows it can write differ. This script measures that room
before any training: the paper's six static baselines and every structure of the guided grammar (each `first`
option, alone and followed by each `then` option, with a plain instruction) run on the first ``--limit``
*training* queries of each benchmark with one executor, and it prints the mean score of each workflow and the
spread between the best and the worst (code benchmarks: pass/fail, the paper's metric, and the share of tests
passed, the partial credit a run can train on). Held-out (test) queries are never touched.

    python scripts/workflow_spread.py --benchmarks drop hotpotqa math humaneval mbpp --limit 30 \\
        --data_dir ../shared/data/aflow          # spogw's engine: the embedded executor, as in the loop
    python scripts/workflow_spread.py --base_url http://127.0.0.1:8000/v1 --model smollm2 ...   # your server

Writes ``<out>/spread.json`` and ``<out>/spread.md``; executor replies are cached in ``<out>``, so a rerun
with more workflows pays only for the new ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path

INSTRUCTIONS = {
    "code": "Write a correct Python function.",
    "math": "Solve the problem step by step and put the final answer in \\boxed{}.",
    "qa": "Answer with only the answer: a number, a name or a short phrase.",
}


def grammar_workflows(family: str, then: bool = True) -> dict[str, str]:
    """Every `first` option alone and (``then``) followed by each single `then` option, with the family's plain
    instruction."""
    from spogw.workflows.guide import load_guide

    guide = load_guide(family)
    out = {}
    for i in range(len(guide.first)):
        for j in range(len(guide.then) + 1) if then else [len(guide.then)]:
            path = [i, j] if j < len(guide.then) else [i, len(guide.then)]
            if j < len(guide.then) and guide.max_then > 1:
                path.append(len(guide.then))
            name = f"first{i}" + (f"+then{j}" if j < len(guide.then) else "")
            out[name] = guide.render(path, [INSTRUCTIONS[family]] * 8).removeprefix("<graph>\n").removesuffix(
                "</graph>")
    return out


async def run_benchmark(name: str, args, executor) -> dict:
    from spogw.baselines import BASELINES, baseline_workflow
    from spogw.benchmarks import ascore_output_detailed, load_benchmark
    from spogw.runtime.runner import INFRA_STATUSES, WorkflowJob, run_many

    records = load_benchmark(name, "train", data_dir=args.data_dir, limit=args.limit)
    family = records[0].family
    workflows = {b: baseline_workflow(b, family) for b in BASELINES}
    workflows.update(grammar_workflows(family, then=args.variants == "all"))
    jobs = [(w, r) for w in workflows for r in records]
    start = time.perf_counter()
    from spogw.runtime.sandbox import SandboxLimits

    # long passages on a CPU server: a workflow of several calls may wait minutes for its turn
    limits = SandboxLimits(wall_s=3600.0, cpu_s=120.0, memory_mb=1024)
    from spogw.runtime.runner import workflow_pool

    pool = workflow_pool(args.concurrency)  # warm zygotes: a run costs a fork, not a fresh interpreter
    try:
        results, usage = await run_many([WorkflowJob(workflows[w], r.to_dict(), family) for w, r in jobs], executor,
                                        concurrency=args.concurrency, temperature=0.0, max_tokens=args.max_tokens,
                                        limits=limits, entry_pool=pool)
    finally:
        if pool is not None:
            pool.close()
    checks = asyncio.Semaphore(2)
    code = family == "code"  # code: the paper's pass/fail, and the share of tests passed next to it

    async def score(record, result):
        if not result.ok:
            return 0.0, (0.0 if code else None), result.status
        async with checks:
            scored = await ascore_output_detailed(name, record, result.output)
            part = (await ascore_output_detailed(name, record, result.output, partial=True)).score if code else None
        return scored.score, part, "ok"

    broken = [res for res in results if res.status in INFRA_STATUSES]
    if broken:  # the executor or the sandbox failed: no verdict on the workflow, and nothing to average
        raise RuntimeError(f"{name}: {len(broken)} runs failed for infrastructure reasons, e.g. {broken[0].reason}; "
                           "rerun (finished calls are cached)")
    scored = await asyncio.gather(*(score(r, res) for (_, r), res in zip(jobs, results, strict=True)))
    per = {w: [] for w in workflows}
    partial = {w: [] for w in workflows}
    failed = {w: 0 for w in workflows}
    for (w, _), (s, part, status) in zip(jobs, scored, strict=True):
        per[w].append(s)
        if part is not None:
            partial[w].append(part)
        failed[w] += status != "ok"
    row = {"benchmark": name, "queries": len(records), **_spread(per), "failed": failed,
           "seconds": round(time.perf_counter() - start, 1), "completion_tokens": usage.completion_tokens,
           "calls": usage.calls, "cached_calls": usage.cached_calls}
    if code:
        row["partial"] = _spread(partial)
    return row


def _spread(per: dict[str, list[float]]) -> dict:
    means = {w: 100 * statistics.fmean(v) for w, v in per.items()}
    best, worst = max(means, key=means.get), min(means, key=means.get)
    return {"means": means, "best": best, "worst": worst, "spread": means[best] - means[worst],
            "ratio": means[best] / means[worst] if means[worst] > 0 else None}


def markdown(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        part = row.get("partial")
        lines += [f"### {row['benchmark']} ({row['queries']} training queries, {row['seconds']} s)", "",
                  "| workflow | mean score | " + ("tests passed (partial credit) | " if part else "") + "failed runs |",
                  "|---|---|---|" + ("---|" if part else "")]
        for w, m in sorted(row["means"].items(), key=lambda kv: (-kv[1], -(part["means"][kv[0]] if part else 0))):
            tests = f"{part['means'][w]:.1f} | " if part else ""
            lines.append(f"| {w} | {m:.1f} | {tests}{row['failed'][w]} |")
        for label, r in [("", row)] + ([("partial credit: ", part)] if part else []):
            ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "inf"
            lines += ["", f"{label}best {r['best']} - worst {r['worst']}: **{r['spread']:.1f} points** ({ratio})"]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", nargs="+", default=["drop", "hotpotqa", "math", "humaneval", "mbpp"])
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--data_dir", default="../shared/data/aflow")
    p.add_argument("--base_url", help="an OpenAI-compatible server of your own (else spogw starts its engine)")
    p.add_argument("--model", default="embedded", help="the served model name with --base_url; else the engine's")
    p.add_argument("--dtype", default="native",
                   help="the engine's dtype (without --base_url); native: bfloat16 where the CPU computes it")
    p.add_argument("--max_tokens", type=int, default=192)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--variants", choices=["all", "first"], default="all",
                   help="grammar structures besides the six baselines: every first step alone and with each `then`"
                   " step (all), or each first step alone (first: about half the executor calls)")
    p.add_argument("--out", default="runs/spread")
    args = p.parse_args()
    from spogw.runtime.cache import CachedExecutor
    from spogw.runtime.executor import OpenAIExecutor

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # earlier benchmarks' rows are kept (a run per benchmark adds to the same table)
    rows = [r for r in (json.loads((out / "spread.json").read_text()) if (out / "spread.json").is_file() else [])
            if r["benchmark"] not in args.benchmarks]
    with contextlib.ExitStack() as stack:
        if args.base_url:  # a server of your own
            url, model, identity = args.base_url, args.model, None
        else:  # spogw's engine for the embedded model (or --model), as `spogw iterate` starts it
            from spogw.engine import EngineOptions, open_engine
            from spogw.engine.server import SERVED_NAME

            engine = stack.enter_context(open_engine(EngineOptions(dtype=args.dtype), args.model, out))
            if engine.ready() is None:
                raise SystemExit("workflow_spread: the engine could not start (see above); pass --base_url instead")
            url, model, identity = engine.url, SERVED_NAME, engine.identity
        for name in args.benchmarks:
            async def one(name=name):
                executor = CachedExecutor(OpenAIExecutor(url, model, concurrency=args.concurrency, timeout_s=600.0,
                                                         identity=identity), out / "executor_cache.sqlite")
                try:
                    return await run_benchmark(name, args, executor)
                finally:
                    await executor.executor.aclose()

            row = asyncio.run(one())
            rows.append(row)
            print(markdown([row]), flush=True)
            (out / "spread.json").write_text(json.dumps(rows, indent=2))
            (out / "spread.md").write_text(markdown(rows))

if __name__ == "__main__":
    main()
