"""The one record schema every benchmark loads into, and the small interface each benchmark implements.

A workflow only ever sees ``Record.question``; everything else (gold answer, tests, metadata) stays
on the scoring side. Keeping all five benchmarks in one schema lets the sample/score/build stages
treat them alike and write them to the same JSONL artifacts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Family = Literal["code", "math", "qa"]
Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")


class BenchmarkDataError(ValueError):
    """A data file or hub row that cannot become a record. The message names the file, line and field."""


class UnknownBenchmarkError(KeyError):
    """A benchmark name that is not in the registry. The message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes around it
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Record:
    """One benchmark problem, the same shape for all five benchmarks."""

    id: str
    """Stable identifier: the dataset's own id where it has one (``HumanEval/84``, MBPP ``630``, DROP and HotpotQA
    ids), else a content hash (MATH has no ids)."""
    benchmark: str
    """Registry name: ``humaneval``, ``mbpp``, ``math``, ``drop`` or ``hotpotqa``."""
    family: Family
    """``code`` (scored by running tests), ``math`` (answer equivalence) or ``qa`` (token F1)."""
    question: str
    """Exactly what the workflow receives as its problem text."""
    answer: str
    """The gold: reference code (code), the final answer (math: last ``\\boxed{}`` of the solution) or the gold
    answer string (qa; DROP's alternatives are ``|``-separated as in the AFlow files)."""
    entry_point: str | None = None
    """Name of the function under test (code benchmarks only)."""
    tests: str = ""
    """Code benchmarks: Python source that, run after the solution in the same namespace, raises when the solution
    is wrong (HumanEval: the ``check`` function followed by ``check(<entry_point>)``; MBPP: the asserts of
    ``test_list``). Its ``assert`` statements are what partial credit counts."""
    public_tests: tuple[str, ...] = ()
    """Asserts that call ``candidate`` (AFlow's ``*_public_test.jsonl``): the tests a workflow may see and use,
    e.g. through the ``Test`` operator. Empty where the dataset has none."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Everything else worth keeping (source file and line, level, type, full solution, preamble, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists), the form artifacts store."""
        d = dataclasses.asdict(self)
        d["public_tests"] = list(self.public_tests)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        """Inverse of :meth:`to_dict`; unknown keys are an error so that artifacts from another schema fail loudly."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise BenchmarkDataError(f"record has unknown fields {sorted(unknown)}; expected some of {sorted(names)}")
        missing = {"id", "benchmark", "family", "question", "answer"} - set(d)
        if missing:
            raise BenchmarkDataError(f"record {d.get('id', '?')!r} lacks fields {sorted(missing)}")
        kw = dict(d)
        kw["public_tests"] = tuple(kw.get("public_tests") or ())
        kw["meta"] = dict(kw.get("meta") or {})
        return cls(**kw)


@dataclass(frozen=True)
class ScoreResult:
    """A score in [0, 1] and, when it is not a full score, why."""

    score: float
    reason: str = ""
    """Empty for a full score; otherwise a short human-readable cause (``"no \\boxed{} or number in output"``,
    ``"tests failed: AssertionError at line 7"``, ``"timeout after 10 s"``)."""
    extracted: str | None = None
    """What was compared: the extracted answer (math), the program's code (code) or the normalised prediction (qa)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Benchmark-specific extras: asserts passed/total, per-gold F1, stderr tail, ..."""

    @property
    def ok(self) -> bool:
        return self.score >= 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require(row: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    """Raise :class:`BenchmarkDataError` naming ``where`` (``file:line``) and the missing fields."""
    if not isinstance(row, Mapping):
        raise BenchmarkDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise BenchmarkDataError(f"{where}: missing field(s) {missing}; present: {sorted(row)}")


class Benchmark:
    """One benchmark: how its rows become records and how an output is scored.

    Subclasses set the class attributes and implement :meth:`from_aflow` and :meth:`score`; the hub source is
    described by :attr:`hub` (dataset id, config(s), split) and converted row by row with :meth:`from_hub`.
    """

    name: ClassVar[str]
    family: ClassVar[Family]
    aflow_stem: ClassVar[str]
    """File stem in the AFlow layout: ``<stem>_validate.jsonl`` (train) and ``<stem>_test.jsonl`` (test)."""
    aflow_fields: ClassVar[tuple[str, ...]]
    """Fields every AFlow row must have."""
    hub_id: ClassVar[str]
    hub_configs: ClassVar[tuple[str | None, ...]] = (None,)
    hub_split: ClassVar[str] = "test"
    hub_sample: ClassVar[int | None] = None
    """How many random instances the paper's protocol draws before splitting (DROP, HotpotQA: 1,000); None: all."""

    def from_aflow(self, row: Mapping[str, Any], where: str) -> Record:
        raise NotImplementedError

    def from_hub(self, row: Mapping[str, Any], where: str) -> Record:
        raise NotImplementedError

    def hub_filter(self, row: Mapping[str, Any]) -> bool:
        """Which hub rows the paper's protocol keeps (MATH: level 5 only); all by default."""
        return True

    def score(self, record: Record, output: str, **options: Any) -> ScoreResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Benchmark {self.name} ({self.family})>"
