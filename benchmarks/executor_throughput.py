"""Executor throughput: workflows/s against the loopback OpenAI-compatible stub, as ratios of the bound.

The stub (``tests/openai_stub.py``) runs in its own process and answers every request after a fixed
latency L (default 200 ms). With at most c requests in flight, no client can finish more than
c / L single-call workflows per second: that is the **bound**. Three sides are measured in one run,
on the same server, so CPU noise from neighbours hits them alike:

* ``raw aiohttp`` — the floor side: bare HTTP POSTs with aiohttp and a semaphore, no parsing, no retries.
* ``executor/T``  — ``OpenAIExecutor.chat`` alone (retries, accounting) with transport T: ``openai``
  (``openai.AsyncOpenAI`` over its aiohttp backend) or ``lean`` (bare aiohttp, same retry policy).
* ``workflow/T``  — what the score stage does: ``run_many`` over the math-family template workflow
  (one ``Custom`` operator call: prompt from data, executor call, reply parsing, usage per workflow
  and per stage), run in-process (``sandbox=False``; the sandbox's own cost is measured by
  ``benchmarks/sandbox_throughput.py``; one extra row, ``sandboxed/lean``, runs each workflow in its
  own sandbox as the score stage does, to show that cost). A "workflow" here is exactly that one-call
  template.

Each side runs once without faults and once with ``--fail-rate`` of attempts failing (429 or 500,
which the client retries; pass ``--fail-kinds 429,500,hang,malformed`` to add hangs and bodies that
are not JSON). ``lost`` counts workflows without a result (must be 0); ``failed`` those whose result
is a recorded failure after retries. Goals (issue 3): ratio >= 0.9 at c = 64 without faults,
>= 0.8 with 10 % faults, nothing lost.

    python benchmarks/executor_throughput.py                 # c=64, L=0.2 s, 1280 workflows per row
    python benchmarks/executor_throughput.py --n 640 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_stub(latency: float, fail_rate: float, kinds: str, seed: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_stub.py"), "--latency", str(latency),
                             "--fail-rate", str(fail_rate), "--fail-kinds", kinds, "--seed", str(seed)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"stub did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


async def side_raw(base_url: str, c: int, n: int, tag: str) -> tuple[float, int, int]:
    import aiohttp

    limit = asyncio.Semaphore(c)
    done = failed = 0
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> None:
            nonlocal done, failed
            body = {"model": "stub", "messages": [{"role": "user", "content": f"{tag} raw {i}"}], "max_tokens": 64}
            async with limit:
                try:
                    async with session.post(f"{base_url}/chat/completions", json=body,
                                            timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        await resp.read()
                        failed += resp.status != 200
                except Exception:
                    failed += 1
            done += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
    return elapsed, n - done, failed


def make_executor(base_url: str, c: int, transport: str):
    from spogw.runtime.executor import OpenAIExecutor

    return OpenAIExecutor(base_url, "stub", api_key_env="SPOGW_BENCH_NO_KEY", concurrency=c, timeout_s=2.0,
                          max_retries=4, transport=transport)


async def side_executor(base_url: str, c: int, n: int, tag: str, transport: str) -> tuple[float, int, int]:
    ex = make_executor(base_url, c, transport)
    await ex.chat([{"role": "user", "content": "warm-up"}])  # imports and connection set-up, not timed
    start = time.perf_counter()
    results = await asyncio.gather(*(ex.chat([{"role": "user", "content": f"{tag} exec {i}"}], max_tokens=64)
                                     for i in range(n)))
    elapsed = time.perf_counter() - start
    await ex.aclose()
    _note_failures(tag, [r.error for r in results if not r.ok])
    return elapsed, n - len(results), sum(not r.ok for r in results)


async def side_workflow(base_url: str, c: int, n: int, tag: str, transport: str,
                        sandbox: bool = False) -> tuple[float, int, int]:
    from spogw.runtime.runner import WorkflowJob, run_many
    from spogw.workflows.families import load_family

    ex = make_executor(base_url, c, transport)
    await ex.chat([{"role": "user", "content": "warm-up"}])
    template = load_family("math").template
    jobs = [WorkflowJob(template, {"id": str(i), "question": f"{tag} problem {i}"}, "math") for i in range(n)]
    start = time.perf_counter()
    results, total = await run_many(jobs, ex, concurrency=c, sandbox=sandbox, max_tokens=64)
    elapsed = time.perf_counter() - start
    await ex.aclose()
    lost = n - sum(r is not None for r in results)
    assert total.calls >= n - lost
    _note_failures(tag, [r.reason for r in results if r is not None and r.status != "ok"])
    return elapsed, lost, sum(r.status != "ok" for r in results)


FAILURES: dict[str, str] = {}


def _note_failures(tag: str, reasons: list[str]) -> None:
    if reasons:
        FAILURES[tag] = f"{len(reasons)} failed, e.g. {reasons[0][:160]}"


SIDES = {
    "raw aiohttp": side_raw,
    "executor/openai": partial(side_executor, transport="openai"),
    "executor/lean": partial(side_executor, transport="lean"),
    "workflow/openai": partial(side_workflow, transport="openai"),
    "workflow/lean": partial(side_workflow, transport="lean"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--n", type=int, default=1280, help="workflows per row")
    parser.add_argument("--fail-rate", type=float, default=0.1)
    parser.add_argument("--fail-kinds", default="429,500")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sandboxed", type=int, default=128,
                        help="workflows for the extra row that runs each workflow in its own sandbox (0: skip)")
    args = parser.parse_args()
    c, lat, n = args.concurrency, args.latency, args.n
    bound = c / lat
    print(f"executor throughput: c={c}, latency={lat * 1000:.0f} ms per call, {n} workflows per row, "
          f"bound c/latency = {bound:.0f} workflows/s")
    print("a workflow = the math template: one Custom operator call (prompt from data, executor call, parsing)")
    print(f"{'faults':<22} {'side':<16} {'seconds':>8} {'wf/s':>8} {'ratio':>6} {'lost':>5} {'failed':>7}")
    for fail_rate in (0.0, args.fail_rate):
        proc, url = start_stub(lat, fail_rate, args.fail_kinds, args.seed)
        label = "none" if fail_rate == 0 else f"{fail_rate:.0%} ({args.fail_kinds})"
        try:
            for name, side in SIDES.items():
                elapsed, lost, failed = asyncio.run(side(url, c, n, f"{name}-{fail_rate}"))
                rate = n / elapsed
                print(f"{label:<22} {name:<16} {elapsed:8.2f} {rate:8.1f} {rate / bound:6.2f} {lost:5d} {failed:7d}",
                      flush=True)
        finally:
            proc.kill()
            proc.wait()
    if args.n_sandboxed:
        proc, url = start_stub(lat, 0.0, args.fail_kinds, args.seed)
        try:
            m = args.n_sandboxed
            elapsed, lost, failed = asyncio.run(side_workflow(url, c, m, "sandboxed", "lean", sandbox=True))
            rate = m / elapsed
            print(f"{'none':<22} {'sandboxed/lean':<16} {elapsed:8.2f} {rate:8.1f} {rate / bound:6.2f} {lost:5d} "
                  f"{failed:7d}   ({m} workflows, each in a fresh sandbox: set-up cost, not the executor)")
        finally:
            proc.kill()
            proc.wait()
    print("ratio = measured / bound; 'raw aiohttp' does not retry, so its failed count is the injected faults")
    for tag, note in FAILURES.items():
        print(f"  {tag}: {note}")


if __name__ == "__main__":
    main()
