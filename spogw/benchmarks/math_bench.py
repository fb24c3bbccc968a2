"""MATH (Hendrycks et al., 2021), level 5 of Counting & Probability, Number Theory, Prealgebra and Precalculus.

(Named ``math_bench`` so that it never shadows the standard library's ``math``.)

Gold: the last ``\\boxed{}`` of the reference solution. Scoring extracts the model's final answer and asks
math-verify (Hugging Face's maintained equivalence checker, built on latex2sympy and sympy) whether the two
are the same mathematical object, so ``\\frac{1}{2}``, ``\\dfrac12``, ``0.5`` and ``1/2`` agree, ``\\text{}``
wrappers, units, degrees, ``\\$`` and ``\\%`` are handled, and sets, intervals, matrices and equations compare
structurally rather than as strings.

Extraction order (the first that finds something wins):

1. the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces; ``\\boxed 5`` too);
2. the last "final answer is X" / "answer is X" / "Answer: X", up to the end of that line;
3. the last number in the output (integer, decimal or ``a/b``, with sign and thousands separators).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

from spogw.benchmarks.base import Benchmark, BenchmarkDataError, Record, ScoreResult, require

FIELDS = ("problem", "solution")
SUBJECTS = ("counting_and_probability", "number_theory", "prealgebra", "precalculus")
"""The four MATH subjects the paper keeps (as configs of ``EleutherAI/hendrycks_math``)."""
MAX_ANSWER_CHARS = 1000
"""Longer extracted answers are not parsed: no MATH answer is that long, and sympy on a huge expression can hang."""
TIMEOUT_S = 5
"""math-verify's own per-call time guard (``parsing_timeout`` / ``timeout_seconds``), main thread only."""
HARD_TIMEOUT_S = 20.0
"""Outside the main thread: when the forked check is killed (two parses and one verify, 5 s each, plus slack)."""

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*[:\s]*(?P<ans>[^\n]+)",
    re.I,
)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Linear time even for thousands of unclosed boxes: when a box never closes, no earlier box can close after
    its start (it would have to close the later one first), so each earlier scan stops there.
    """
    limit = len(text)
    for m in reversed(list(_BOX.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, limit):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
            limit = m.start()  # unbalanced: try an earlier box, within the text before this one
            continue
        if m.group(0) != m.group(0).rstrip():  # "\\boxed 5": the next token
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0)
    return None


def extract_answer(text: str) -> tuple[str | None, str]:
    """``(answer, method)``: the model's final answer and which rule found it (``boxed``, ``answer-is``,
    ``last-number``), or ``(None, "none")``."""
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    hits = list(_ANSWER_IS.finditer(text))
    if hits:
        # Markdown emphasis, math delimiters and a closing full stop are not part of the answer: "**Answer:** $42$."
        # ... and the sentence ends at a full stop followed by a space: "is 12. Also ..." -> "12".
        ans = re.split(r"\.\s", hits[-1].group("ans"), maxsplit=1)[0]
        ans = ans.strip().strip("*$ ").rstrip(".").strip("*$ ")
        if ans:
            return ans, "answer-is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(" ", ""), "last-number"
    return None, "none"


def math_equal(gold: str, pred: str) -> tuple[bool, str]:
    """Whether two final answers are equivalent, by math-verify; ``(equal, reason when not)``.

    Both sides are wrapped in ``\\boxed{}`` and parsed with LaTeX and plain-expression extraction. math-verify's
    time guard uses ``signal.alarm``, which only works in the main thread. Elsewhere (a worker thread of the score
    stage) the check runs in a forked child that is killed after :data:`HARD_TIMEOUT_S`: without a guard, an answer
    like ``10^{10^{10^{10}}}`` keeps sympy busy for good, holding the GIL.
    """
    if threading.current_thread() is threading.main_thread() or not hasattr(os, "fork"):
        return _math_equal(gold, pred)
    return _math_equal_forked(gold, pred)


def _math_equal(gold: str, pred: str) -> tuple[bool, str]:
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as exc:  # pragma: no cover - math-verify is a dependency
        raise ImportError("MATH scoring needs math-verify: pip install math-verify") from exc
    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=config, parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{pred}}}", extraction_config=config, parsing_timeout=timeout)
        if not gold_parsed:
            return False, f"math-verify could not parse the gold answer {gold!r}"
        if not pred_parsed:
            return False, f"math-verify could not parse the answer {pred!r}"
        if verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
            return True, ""
        return False, f"answer {pred!r} is not equivalent to gold {gold!r}"
    except Exception as exc:  # math-verify raises on timeouts and on sympy edge cases: a zero score, not a crash
        return False, f"math-verify failed: {type(exc).__name__}: {str(exc)[:200]}"


_PARENT_WARM = False


def _math_equal_forked(gold: str, pred: str) -> tuple[bool, str]:
    """:func:`_math_equal` in a forked child (there the forking thread is the main thread, so math-verify's own
    guard works too), killed if it outlives :data:`HARD_TIMEOUT_S`."""
    import json
    import select
    import signal
    import time

    global _PARENT_WARM
    if not _PARENT_WARM:  # parse once here, so every child starts with math-verify's parsers built
        _math_equal("1", "1")
        _PARENT_WARM = True
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, report, leave without running any of the parent's cleanup
        try:
            os.close(read_fd)
            os.write(write_fd, json.dumps(_math_equal(gold, pred)).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + HARD_TIMEOUT_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                break
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            chunks = []
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    try:
        equal, reason = json.loads(b"".join(chunks))
    except ValueError:
        return False, f"math-verify did not finish within {HARD_TIMEOUT_S:g} s"
    return bool(equal), str(reason)


class MATH(Benchmark):
    name = "math"
    family = "math"
    aflow_stem = "math"
    aflow_fields = FIELDS
    hub_id = "EleutherAI/hendrycks_math"
    hub_configs = SUBJECTS
    hub_split = "test"

    def from_aflow(self, row: Mapping[str, Any], where: str) -> Record:
        require(row, FIELDS, where)
        problem, solution = str(row["problem"]), str(row["solution"])
        gold = last_boxed(solution)
        if not gold:
            raise BenchmarkDataError(f"{where}: the solution has no \\boxed{{}} answer")
        return Record(
            id="math/" + hashlib.sha1(problem.encode("utf-8")).hexdigest()[:16],
            benchmark=self.name,
            family=self.family,
            question=problem,
            answer=gold,
            meta={"source": where, "level": row.get("level"), "type": row.get("type"), "solution": solution},
        )

    from_hub = from_aflow

    def hub_filter(self, row: Mapping[str, Any]) -> bool:
        return row.get("level") == "Level 5"

    def score(self, record: Record, output: str, **_: Any) -> ScoreResult:
        answer, method = extract_answer(output)
        if answer is None:
            return ScoreResult(0.0, "no \\boxed{}, 'answer is' or number in output")
        if len(answer) > MAX_ANSWER_CHARS:
            return ScoreResult(0.0, f"extracted answer longer than {MAX_ANSWER_CHARS} chars", answer[:200])
        equal, reason = math_equal(record.answer, answer)
        return ScoreResult(1.0 if equal else 0.0, reason, answer, {"extraction": method})
