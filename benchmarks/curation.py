"""Curation time: how long ``spogw.groups.build_groups`` takes to build a group-wise dataset.

Measured: wall-clock seconds of one ``build_groups`` call (median of ``--repeats``) on random scores,
for the paper's setting (m = 16 workflows per query, n = 14, t = 4, top_n = 100) over 1,000
queries, and for a larger one (m = 64, n = 32, t = 4; C(64, 32) ≈ 1.8e18 instances per query) over
a handful of queries and over 1,000. Scores are either binary (0/1, as solve rates with r = 1: many
ties) or continuous (uniform in [0, 1], as token F1), drawn from a fixed seed. Both global and
per-query screening are timed for the paper's setting.

Run: ``python benchmarks/curation.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

from spogw.groups import build_groups


def random_records(queries: int, m: int, kind: str, seed: int) -> list[dict]:
    """``m`` scored workflows for each of ``queries`` queries; ``kind`` is ``binary`` or ``continuous``."""
    rng = random.Random(seed)
    draw = (lambda: float(rng.random() < 0.5)) if kind == "binary" else rng.random
    return [{"query_id": q, "score": draw(), "i": i} for q in range(queries) for i in range(m)]


def time_case(queries: int, m: int, n: int, t: int, top_n: int, kind: str, scope: str, repeats: int,
              seed: int) -> dict:
    records = random_records(queries, m, kind, seed)
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = build_groups(records, n=n, t=t, top_n=top_n, seed=seed, scope=scope)
        times.append(time.perf_counter() - t0)
    stats = result.stats
    return {
        "queries": queries, "m": m, "n": n, "t": t, "top_n": top_n, "scores": kind, "scope": scope,
        "seconds": statistics.median(times), "groups": stats["groups"],
        "instances": stats["instances"], "duplicate_subsets": stats["duplicate_subsets"],
    }


CASES = [
    # queries, m, n, t, top_n, scores, scope
    (1000, 16, 14, 4, 100, "binary", "global"),
    (1000, 16, 14, 4, 100, "continuous", "global"),
    (1000, 16, 14, 4, 100, "binary", "per_query"),
    (1000, 16, 14, 4, 100, "continuous", "per_query"),
    (5, 64, 32, 4, 100, "binary", "global"),
    (5, 64, 32, 4, 100, "continuous", "global"),
    (1000, 64, 32, 4, 100, "binary", "global"),
    (1000, 64, 32, 4, 100, "continuous", "global"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="calls per case; the median is printed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"{'queries':>7} {'m':>3} {'n':>3} {'t':>2} {'top_n':>5} {'scores':>10} {'scope':>9} "
          f"{'seconds':>8} {'groups':>7} {'C(m,n) total':>13} {'dup subsets':>11}")
    for queries, m, n, t, top_n, kind, scope in CASES:
        r = time_case(queries, m, n, t, top_n, kind, scope, args.repeats, args.seed)
        total = f"{r['instances']:.2e}" if r["instances"] >= 1e6 else str(r["instances"])
        print(f"{r['queries']:>7} {m:>3} {n:>3} {t:>2} {top_n:>5} {kind:>10} {scope:>9} {r['seconds']:>8.3f} "
              f"{r['groups']:>7} {total:>13} {r['duplicate_subsets']:>11}", flush=True)
    print(f"(C(16, 14) = {math.comb(16, 14)}, C(64, 32) = {math.comb(64, 32):.2e} per query; "
          f"median of {args.repeats} calls)")


if __name__ == "__main__":
    main()
