"""The benchmark registry: one instance per benchmark, looked up by a forgiving name."""

from __future__ import annotations

import re

from spogw.benchmarks.base import Benchmark, UnknownBenchmarkError
from spogw.benchmarks.drop import DROP
from spogw.benchmarks.hotpotqa import HotpotQA
from spogw.benchmarks.humaneval import HumanEval
from spogw.benchmarks.math_bench import MATH
from spogw.benchmarks.mbpp import MBPP

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (HumanEval(), MBPP(), MATH(), DROP(), HotpotQA())}


def canonical_name(name: str) -> str:
    """``"HumanEval"``, ``"hotpot_qa"``, ``"MATH"`` -> registry keys; unknown names raise with the known ones."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if key in BENCHMARKS:
        return key
    raise UnknownBenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")


def get_benchmark(name: str) -> Benchmark:
    return BENCHMARKS[canonical_name(name)]
