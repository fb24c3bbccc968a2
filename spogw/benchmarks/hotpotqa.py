"""HotpotQA (Yang et al., 2018), distractor setting: multi-hop questions over ten Wikipedia paragraphs.

The workflow receives AFlow's input: the paragraphs' sentences, one paragraph per line, then the question
(``Context: ...\\n\\nQuestion: ...\\n\\nAnswer:``). Scoring is HotpotQA's official answer F1
(see :mod:`spogw.benchmarks.f1`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spogw.benchmarks.base import Benchmark, BenchmarkDataError, Record, ScoreResult, require
from spogw.benchmarks.f1 import hotpot_f1, normalize_hotpot

FIELDS = ("_id", "question", "answer", "context")


def format_question(question: str, context: Any, where: str) -> str:
    """AFlow's prompt: each paragraph's sentences joined by spaces, paragraphs by newlines, titles left out."""
    if not isinstance(context, list):
        raise BenchmarkDataError(f"{where}: field 'context' must be a list of [title, sentences] pairs")
    paragraphs = [item[1] for item in context if isinstance(item, list | tuple) and len(item) == 2]
    if any(not isinstance(p, list) for p in paragraphs):
        raise BenchmarkDataError(f"{where}: field 'context' has a paragraph that is not a list of sentences")
    text = "\n".join(" ".join(str(s) for s in p) for p in paragraphs)
    return f"Context: {text}\n\nQuestion: {question}\n\nAnswer:"


class HotpotQA(Benchmark):
    name = "hotpotqa"
    family = "qa"
    aflow_stem = "hotpotqa"
    aflow_fields = FIELDS
    hub_id = "hotpotqa/hotpot_qa"
    hub_configs = ("distractor",)
    hub_split = "validation"
    hub_sample = 1000

    def from_aflow(self, row: Mapping[str, Any], where: str) -> Record:
        require(row, FIELDS, where)
        return Record(
            id=str(row["_id"]),
            benchmark=self.name,
            family=self.family,
            question=format_question(str(row["question"]), row["context"], where),
            answer=str(row["answer"]),
            meta={
                "source": where,
                "raw_question": str(row["question"]),
                "type": row.get("type"),
                "level": row.get("level"),
                "supporting_facts": row.get("supporting_facts"),
            },
        )

    def from_hub(self, row: Mapping[str, Any], where: str) -> Record:
        """A ``hotpotqa/hotpot_qa`` row: its column-wise ``context`` (titles, sentences) becomes AFlow's pairs."""
        require(row, ("id", "question", "answer", "context"), where)
        ctx = row["context"]
        if not isinstance(ctx, Mapping) or "title" not in ctx or "sentences" not in ctx:
            raise BenchmarkDataError(f"{where}: hub field 'context' must have 'title' and 'sentences'")
        pairs = [[t, list(s)] for t, s in zip(ctx["title"], ctx["sentences"], strict=False)]
        sf = row.get("supporting_facts") or {}
        facts = [[t, i] for t, i in zip(sf.get("title", []), sf.get("sent_id", []), strict=False)]
        return self.from_aflow({**row, "_id": row["id"], "context": pairs, "supporting_facts": facts}, where)

    def score(self, record: Record, output: str, **_: Any) -> ScoreResult:
        f1 = hotpot_f1(output.strip(), record.answer)
        reason = "" if f1 >= 1.0 else f"F1 {f1:.2f} against gold {record.answer!r}"
        return ScoreResult(f1, reason, normalize_hotpot(output))
