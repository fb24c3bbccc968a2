"""Benchmarks: loading the five benchmarks into one record schema, and scoring workflow outputs.

    from spogw.benchmarks import load_benchmark, score_output
    records = load_benchmark("humaneval", "test", data_dir="../shared/data/aflow")
    score_output("humaneval", records[0], model_output)  # -> 1.0 / 0.0

One module per benchmark (``humaneval``, ``mbpp``, ``math_bench``, ``drop``, ``hotpotqa``) behind the
registry ``BENCHMARKS``; ``loaders`` holds the three sources, ``scoring`` the public scoring functions,
``code_exec`` the check programs for code, ``f1`` the official QA F1s, ``judge`` the optional LLM judge.
Only the standard library is imported here; math-verify, datasets and the sandbox load when first used.
"""

from spogw.benchmarks.base import BenchmarkDataError, Record, ScoreResult, UnknownBenchmarkError
from spogw.benchmarks.loaders import load_benchmark, protocol_split
from spogw.benchmarks.registry import BENCHMARKS, get_benchmark
from spogw.benchmarks.scoring import (
    ascore_output_detailed,
    score_output,
    score_output_detailed,
    score_outputs,
    solve_rate,
)

__all__ = [
    "BENCHMARKS",
    "BenchmarkDataError",
    "Record",
    "ScoreResult",
    "UnknownBenchmarkError",
    "ascore_output_detailed",
    "get_benchmark",
    "load_benchmark",
    "protocol_split",
    "score_output",
    "score_output_detailed",
    "score_outputs",
    "solve_rate",
]
