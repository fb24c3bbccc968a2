"""MBPP, sanitized split (Austin et al., 2021): 427 short Python tasks, each with three or so asserts.

The workflow receives AFlow's prompt: the task description, then the reference solution's import lines and
signature line (``def tuple_to_int(nums):``), one per line. ``test_imports`` run before the solution, as in the original
evaluation, then the asserts of ``test_list``, which call the function by its name.

Known quirk: task 630's reference code raises NameError (its helper uses undefined names), so its gold
does not pass its own tests.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from spogw.benchmarks.base import BenchmarkDataError, Record, require
from spogw.benchmarks.code_exec import CodeBenchmark, defines_top_level, extract_code

FIELDS = ("task_id", "prompt", "code", "test_list", "entry_point")
HUB_FIELDS = ("task_id", "prompt", "code", "test_list")


def signature_line(code: str, entry_point: str) -> str | None:
    """The ``def <entry_point>(...)`` line of ``code``, as written (AFlow keeps its trailing spaces)."""
    m = re.search(rf"^[ \t]*def[ \t]+{re.escape(entry_point)}[ \t]*\(.*$", code, re.M)
    return m.group(0) if m else None


def infer_entry_point(code: str, tests: Sequence[str]) -> str:
    """The function the asserts test: the first name called in the first assert that ``code`` defines.

    ``assert set(similar_elements(a, b)) == ...`` calls ``set`` first, which the code does not define, so the
    answer is ``similar_elements``. Falls back to the last function defined in ``code``.
    """
    defined = re.findall(r"^[ \t]*def[ \t]+([A-Za-z_]\w*)[ \t]*\(", code, re.M)
    for test in tests:
        try:
            tree = ast.parse(test)
        except SyntaxError:
            continue
        calls = sorted(
            (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)),
            key=lambda n: (n.lineno, n.col_offset),
        )
        for call in calls:
            if call.func.id in defined:
                return call.func.id
    if defined:
        return defined[-1]
    raise BenchmarkDataError(f"cannot infer the entry point: no function defined in {code[:80]!r}")


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


class MBPP(CodeBenchmark):
    name = "mbpp"
    aflow_stem = "mbpp"
    aflow_fields = FIELDS
    hub_id = "google-research-datasets/mbpp"
    hub_configs = ("sanitized",)
    # All 427 sanitized tasks, as the paper uses "the entire collection"; the protocol then splits them 1:4.
    hub_split = "prompt+train+validation+test"

    def from_aflow(self, row: Mapping[str, Any], where: str) -> Record:
        require(row, FIELDS, where)
        tests = row["test_list"]
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests) or not tests:
            raise BenchmarkDataError(f"{where}: field 'test_list' must be a non-empty list of strings")
        imports = row.get("test_imports") or []
        if not isinstance(imports, list):
            raise BenchmarkDataError(f"{where}: field 'test_imports' must be a list of strings")
        return Record(
            id=str(row["task_id"]),
            benchmark=self.name,
            family=self.family,
            question=str(row["prompt"]),
            answer=str(row["code"]),
            entry_point=str(row["entry_point"]),
            tests="\n".join(tests) + "\n",
            meta={
                "source": where,
                "test_imports": [str(i) for i in imports],
                "source_file": row.get("source_file"),
            },
        )

    def from_hub(self, row: Mapping[str, Any], where: str) -> Record:
        """A hub row (no ``entry_point``; ``prompt`` is only the description) in AFlow's form."""
        require(row, HUB_FIELDS, where)
        code, tests = str(row["code"]), list(row["test_list"])
        entry_point = infer_entry_point(code, tests)
        sig = signature_line(code, entry_point)
        # AFlow's prompt: the description, the reference code's import lines, its signature line, one per line.
        imports = [line for line in code.splitlines() if re.match(r"(?:import|from)\s", line)]
        prompt = f"{row['prompt']}\n" + "\n".join(imports) + f"\n{sig}" if sig else str(row["prompt"])
        return self.from_aflow({**row, "prompt": prompt, "entry_point": entry_point}, where)

    def preamble(self, record: Record) -> str:
        return "\n".join(record.meta.get("test_imports") or []) + "\n"

    def solution(self, record: Record, output: str) -> str:
        code = extract_code(output, record.entry_point)
        if record.entry_point and not defines_top_level(code, record.entry_point):
            # A body that continues the signature line the prompt ends with.
            sig = signature_line(record.question, record.entry_point)
            if sig and code.startswith((" ", "\t")):
                return sig + "\n" + code
        return code

    def public_tests_for(self, record: Record, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        """Match ``mbpp_public_test.jsonl`` rows, which carry only ``entry_point`` and ``test``.

        Several tasks share an entry point name (``replace_spaces``, ``Split``, ...), so among the rows with
        this entry point prefer the one whose assert, with ``candidate`` renamed, equals the record's first
        test (ignoring whitespace), then one that equals any of its tests, then a sole row for the name.
        """
        same = [r for r in rows if r.get("entry_point") == record.entry_point]
        if not same:
            return ()
        mine = [_squash(t) for t in record.tests.splitlines() if t.strip()]

        def renamed(r: Mapping[str, Any]) -> list[str]:
            return [_squash(str(t).replace("candidate", str(record.entry_point))) for t in r.get("test") or ()]

        for pick in (
            lambda r: bool(mine) and mine[0] in renamed(r),
            lambda r: any(t in mine for t in renamed(r)),
        ):
            hits = [r for r in same if pick(r)]
            if hits:
                return tuple(str(t) for t in hits[0].get("test") or ())
        if len(same) == 1:
            return tuple(str(t) for t in same[0].get("test") or ())
        return ()
