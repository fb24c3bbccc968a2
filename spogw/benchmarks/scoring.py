"""Scoring a workflow's output against a record: one entry point for all five benchmarks.

``score_output`` returns the float the score stage averages; ``score_output_detailed`` returns a
:class:`ScoreResult` with the reason for anything short of a full score. Neither raises on bad model output:
``None``, empty, huge or non-UTF-8 output, unparsable code or maths, a crash or a hang in the tests all become
a score of 0 with the reason recorded. What does raise is a programming error on our side: an unknown
benchmark name, or a record that is missing fields or belongs to another benchmark.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from spogw.benchmarks.base import Record, ScoreResult
from spogw.benchmarks.code_exec import (
    DEFAULT_TIMEOUT_S,
    CheckProgram,
    CodeBenchmark,
    check_limits,
    interpret,
    run_checks,
)
from spogw.benchmarks.registry import get_benchmark

MAX_OUTPUT_CHARS = 1_000_000
"""Outputs longer than this score 0 unread: no benchmark answer is anywhere near it, and a runaway generation
should not cost minutes of regex and sympy time."""


def coerce_output(output: Any, *, max_chars: int = MAX_OUTPUT_CHARS) -> tuple[str | None, str]:
    """``(text, "")`` for usable output, else ``(None, reason)``. Bytes must be UTF-8; text must encode as UTF-8."""
    if output is None:
        return None, "no output (None)"
    if isinstance(output, bytes | bytearray):
        try:
            output = bytes(output).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"output is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    if not isinstance(output, str):
        return None, f"output is a {type(output).__name__}, not text"
    try:
        output.encode("utf-8")
    except UnicodeEncodeError as exc:
        return None, f"output is not valid UTF-8 text ({exc.reason} at character {exc.start})"
    if not output.strip():
        return None, "empty output"
    if len(output) > max_chars:
        return None, f"output too large ({len(output):,} characters > {max_chars:,})"
    return output, ""


def as_record(name: str, record: Record | Mapping[str, Any]) -> Record:
    """Accept a :class:`Record` or its dict form (as stored in artifacts); check it belongs to ``name``."""
    bench = get_benchmark(name)
    rec = record if isinstance(record, Record) else Record.from_dict(record)
    if rec.benchmark != bench.name:
        raise ValueError(f"record {rec.id!r} belongs to {rec.benchmark!r}, not {bench.name!r}")
    return rec


def score_output_detailed(
    name: str,
    record: Record | Mapping[str, Any],
    output: Any,
    *,
    partial: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_chars: int = MAX_OUTPUT_CHARS,
    pool: Any = None,
) -> ScoreResult:
    """Score one output and say why it fell short.

    ``partial`` (code only): the fraction of asserts passed instead of all-or-nothing. ``timeout_s``: wall-clock
    limit of a code check. ``pool``: a warm ``SandboxPool`` for code checks (else a one-off sandbox).
    """
    bench = get_benchmark(name)
    rec = as_record(name, record)
    text, reason = coerce_output(output, max_chars=max_chars)
    if text is None:
        return ScoreResult(0.0, reason)
    try:
        return bench.score(rec, text, partial=partial, timeout_s=timeout_s, pool=pool)
    except Exception as exc:  # a scorer bug or an odd input must cost one score, never the stage
        return ScoreResult(0.0, f"scoring failed: {type(exc).__name__}: {str(exc)[:300]}")


def score_output(name: str, record: Record | Mapping[str, Any], output: Any, **options: Any) -> float:
    """The score of one output in [0, 1] (see :func:`score_output_detailed` for the options and the reasons)."""
    return score_output_detailed(name, record, output, **options).score


def score_outputs(
    name: str,
    items: Sequence[tuple[Record | Mapping[str, Any], Any]],
    *,
    partial: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int = 2,
    max_chars: int = MAX_OUTPUT_CHARS,
    pool: Any = None,
) -> list[ScoreResult]:
    """Score many ``(record, output)`` pairs; code checks run in the sandbox, ``workers`` at a time (or in ``pool``).

    Order is kept."""
    bench = get_benchmark(name)
    if not isinstance(bench, CodeBenchmark):
        return [score_output_detailed(name, r, o, max_chars=max_chars) for r, o in items]
    results: list[ScoreResult | None] = [None] * len(items)
    programs: list[tuple[int, CheckProgram]] = []
    for i, (record, output) in enumerate(items):
        rec = as_record(name, record)
        text, reason = coerce_output(output, max_chars=max_chars)
        if text is None:
            results[i] = ScoreResult(0.0, reason)
            continue
        built = _build(bench, rec, text, partial)
        if isinstance(built, ScoreResult):
            results[i] = built
        else:
            programs.append((i, built))
    outcomes = run_checks([p for _, p in programs], timeout_s=timeout_s, workers=workers, pool=pool)
    for (i, program), outcome in zip(programs, outcomes, strict=True):
        results[i] = interpret(program, outcome)
    return [r if r is not None else ScoreResult(0.0, "not scored") for r in results]


async def ascore_output_detailed(
    name: str,
    record: Record | Mapping[str, Any],
    output: Any,
    *,
    partial: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_chars: int = MAX_OUTPUT_CHARS,
    pool: Any = None,
) -> ScoreResult:
    """:func:`score_output_detailed` for asyncio callers (the score stage).

    Code checks await the sandbox (``pool.arun``; without a pool, a one-off sandbox in a worker thread) instead of
    blocking the event loop. MATH and QA scoring take milliseconds and run inline, in the calling thread, which
    keeps math-verify's time guard working when that is the main thread.
    """
    bench = get_benchmark(name)
    if not isinstance(bench, CodeBenchmark):
        return score_output_detailed(name, record, output, max_chars=max_chars)
    rec = as_record(name, record)
    text, reason = coerce_output(output, max_chars=max_chars)
    if text is None:
        return ScoreResult(0.0, reason)
    built = _build(bench, rec, text, partial)
    if isinstance(built, ScoreResult):
        return built
    if pool is None:
        outcome = (await asyncio.to_thread(run_checks, [built], timeout_s=timeout_s, workers=1))[0]
    else:
        outcome = await pool.acheck(built.spec(), limits=check_limits(timeout_s))
    return interpret(built, outcome)


def _build(bench: CodeBenchmark, record: Record, text: str, partial: bool) -> CheckProgram | ScoreResult:
    try:
        return bench.build(record, text, partial=partial)
    except Exception as exc:  # e.g. tests that do not parse for partial credit: this record's problem only
        return ScoreResult(0.0, f"scoring failed: {type(exc).__name__}: {str(exc)[:300]}")


def solve_rate(runs: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Average of r independent evaluation runs (paper: r = 3), each the mean score over the test problems.

    Returns ``mean`` and ``std`` (population std over runs; 0 for one run) in percent, and ``per_run``.
    """
    if not runs or any(len(run) == 0 for run in runs):
        raise ValueError("solve_rate needs at least one run, each with at least one score")
    per_run = [100.0 * sum(run) / len(run) for run in runs]
    return {"mean": statistics.fmean(per_run), "std": statistics.pstdev(per_run), "per_run": per_run, "runs": len(runs)}
