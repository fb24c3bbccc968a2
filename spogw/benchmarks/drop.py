"""DROP (Dua et al., 2019): reading comprehension with discrete reasoning (counting, arithmetic, dates).

AFlow's files come from OpenAI simple-evals' DROP dev set: ``context`` holds ``Passage: ...\\nQuestion:
...\\nAnswer:`` and is what the workflow receives; ``ref_text`` holds the gold answers, alternatives separated
by ``|``. Scoring is DROP's official F1 (see :mod:`spogw.benchmarks.f1`), the maximum over the alternatives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spogw.benchmarks.base import Benchmark, BenchmarkDataError, Record, ScoreResult, require
from spogw.benchmarks.f1 import drop_f1, max_over_golds, normalize_drop

FIELDS = ("id", "context", "ref_text")
HUB_FIELDS = ("query_id", "passage", "question", "answers_spans")


def gold_answers(record: Record) -> list[str]:
    """The gold alternatives: ``|``-separated, empty ones dropped, order kept."""
    return [a for a in record.answer.split("|") if a.strip()]


class DROP(Benchmark):
    name = "drop"
    family = "qa"
    aflow_stem = "drop"
    aflow_fields = FIELDS
    hub_id = "ucinlp/drop"
    hub_split = "validation"
    hub_sample = 1000

    def from_aflow(self, row: Mapping[str, Any], where: str) -> Record:
        require(row, FIELDS, where)
        if not str(row["ref_text"]).strip("| "):
            raise BenchmarkDataError(f"{where}: field 'ref_text' has no answer")
        return Record(
            id=str(row["id"]),
            benchmark=self.name,
            family=self.family,
            question=str(row["context"]),
            answer=str(row["ref_text"]),
            meta={"source": where, "completion": row.get("completion")},
        )

    def from_hub(self, row: Mapping[str, Any], where: str) -> Record:
        """A ``ucinlp/drop`` row in AFlow's form.

        The hub row keeps only the primary answer's spans (no validated alternatives); its distinct spans are
        joined with ``|`` like AFlow's ``ref_text``, i.e. a multi-span answer is scored as alternatives.
        """
        require(row, HUB_FIELDS, where)
        spans = row["answers_spans"].get("spans") if isinstance(row["answers_spans"], Mapping) else None
        if not spans:
            raise BenchmarkDataError(f"{where}: 'answers_spans' has no spans")
        context = f"Passage: {row['passage']}\nQuestion: {row['question']}\nAnswer:"
        ref = "|".join(dict.fromkeys(str(s) for s in spans))
        return self.from_aflow({"id": row["query_id"], "context": context, "ref_text": ref}, where)

    def score(self, record: Record, output: str, **_: Any) -> ScoreResult:
        golds = gold_answers(record)
        if not golds:
            return ScoreResult(0.0, f"record {record.id} has no gold answer")
        f1, best = max_over_golds(drop_f1, output.strip(), golds)
        reason = "" if f1 >= 1.0 else f"F1 {f1:.2f} against best gold {best!r}"
        return ScoreResult(f1, reason, normalize_drop(output), {"best_gold": best})
