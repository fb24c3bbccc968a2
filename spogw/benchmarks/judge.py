"""An optional LLM judge for MATH, DROP and HotpotQA, as the paper uses at evaluation time (GPT-4o-mini).

Rule-based scoring punishes answers that are right but phrased differently ("12 apples" against "12"); the
paper lets an LLM decide at evaluation time and keeps rule-based scores (F1, answer equivalence) for the
training signal. The judge talks to any object with the executor interface
(``async chat(messages, temperature=0, max_tokens=...) -> result with .text``; ``.error`` when the call failed),
so the same OpenAI-compatible or local executor that runs workflows can judge them.

The verdict is binary: 1.0 when the judge says the candidate's final answer matches the reference, else 0.0.
A failed call or an unreadable verdict scores 0 with the reason recorded (``details["judge_error"]`` marks
the ones worth retrying). Code benchmarks are never judged: their tests decide.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

from spogw.benchmarks.base import Record, ScoreResult
from spogw.benchmarks.scoring import as_record, coerce_output

JUDGE_SYSTEM = (
    "You grade answers to {kind} questions. You compare a candidate answer with the reference answer and decide "
    "whether the candidate's final answer means the same thing. Ignore formatting, units written or omitted, "
    "extra explanation and equivalent mathematical forms. Reply with one word: Yes or No."
)
JUDGE_USER = "Question:\n{question}\n\nReference answer:\n{reference}\n\nCandidate answer:\n{candidate}\n\nEquivalent?"
MAX_CANDIDATE_CHARS = 6000
"""Only the tail of a longer candidate is shown: the final answer is at its end, and the judge's context is finite."""
_KIND = {"math": "math competition", "drop": "reading-comprehension", "hotpotqa": "multi-hop factual"}
_YES = {"yes", "correct", "true", "equivalent"}
_NO = {"no", "incorrect", "false", "wrong", "not"}


def judge_question(record: Record) -> str:
    """The question as the judge should see it: without DROP's passage or HotpotQA's ten paragraphs."""
    if record.benchmark == "hotpotqa":
        return str(record.meta.get("raw_question") or record.question)
    if record.benchmark == "drop":
        m = re.search(r"\nQuestion:(.*?)(?:\nAnswer:\s*)?$", record.question, re.S)
        return m.group(1).strip() if m else record.question
    return record.question


def judge_reference(record: Record) -> str:
    """The gold as the judge should see it; DROP's ``|`` alternatives are spelled out."""
    if record.benchmark == "drop":
        golds = [g for g in record.answer.split("|") if g.strip()]
        return golds[0] if len(golds) == 1 else "any of: " + "; ".join(golds)
    return record.answer


def judge_messages(record: Record, output: str) -> list[dict[str, str]]:
    """The chat messages sent to the judge."""
    candidate = output if len(output) <= MAX_CANDIDATE_CHARS else "..." + output[-MAX_CANDIDATE_CHARS:]
    user = JUDGE_USER.format(question=judge_question(record), reference=judge_reference(record), candidate=candidate)
    system = JUDGE_SYSTEM.format(kind=_KIND.get(record.benchmark, "short-answer"))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> bool | None:
    """Yes -> True, No -> False, from the first word, else from the last yes/no word; None when there is none."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    for word in reversed(words):
        if word in ("yes", "no"):
            return word == "yes"
    return None


async def judge_output(
    executor: Any, name: str, record: Record | Mapping[str, Any], output: Any, *, max_tokens: int = 8
) -> ScoreResult:
    """Ask the judge whether ``output`` answers ``record``; never raises for a model-side problem."""
    rec = as_record(name, record)
    if rec.family == "code":
        raise ValueError(f"{rec.benchmark} is scored by its tests, not by a judge")
    text, reason = coerce_output(output)
    if text is None:
        return ScoreResult(0.0, reason)
    try:
        result = await executor.chat(judge_messages(rec, text), temperature=0.0, max_tokens=max_tokens)
    except Exception as exc:  # an executor should record its failures, but one that raises must not end the stage
        return ScoreResult(0.0, f"judge call raised {type(exc).__name__}: {exc}", details={"judge_error": True})
    error = getattr(result, "error", None)
    if error:
        return ScoreResult(0.0, f"judge call failed: {error}", details={"judge_error": True})
    reply = str(getattr(result, "text", "") or "")
    verdict = parse_verdict(reply)
    details = {"judge_reply": reply[:200]}
    if verdict is None:
        return ScoreResult(0.0, f"unreadable judge verdict {reply[:80]!r}", details={**details, "judge_error": True})
    return ScoreResult(1.0 if verdict else 0.0, "" if verdict else "judge: not equivalent", text[-200:], details)


async def judge_outputs(
    executor: Any, name: str, items: Sequence[tuple[Record | Mapping[str, Any], Any]], *, max_tokens: int = 8
) -> list[ScoreResult]:
    """Judge many ``(record, output)`` pairs concurrently (the executor bounds its own concurrency)."""
    return list(await asyncio.gather(*(judge_output(executor, name, r, o, max_tokens=max_tokens) for r, o in items)))
