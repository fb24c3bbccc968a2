"""Benchmark families as data: which operators a workflow may use, how the generator sees them.

A family (``code``: HumanEval/MBPP, ``math``: MATH, ``qa``: DROP/HotpotQA) is one YAML file in
``families/``: the operators it offers with the description and interface the generator reads,
prompt overrides for the executor, the entry-point signature, and the template workflow that seeds
the generator prompt (and doubles as a hand-written baseline). The executor prompts of the
operators live in ``prompts/operators.yaml`` and the generator prompt around them in
``prompts/generator.yaml``. Changing what a benchmark offers is an edit to data, not code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FAMILIES: tuple[str, ...] = ("code", "math", "qa")
ALL_OPERATORS: tuple[str, ...] = ("Custom", "AnswerGenerate", "CustomCodeGenerate", "ScEnsemble", "Programmer",
                                  "Test", "Review", "Revise", "Format")


@dataclass(frozen=True)
class OperatorSpec:
    """How one operator is shown to the generator."""

    name: str
    attribute: str
    """The attribute name the template and examples use (``self.custom``)."""
    interface: str
    description: str
    example: str = ""


@dataclass(frozen=True)
class FamilySpec:
    name: str
    call_signature: str
    """The ``__call__`` signature workflows of this family must have, as shown to the generator."""
    operators: tuple[OperatorSpec, ...]
    template: str
    prompts: dict[str, dict[str, Any]] = field(repr=False)
    """Executor prompts per operator (``operators.yaml`` with the family's overrides applied)."""

    @property
    def offered(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.operators)

    @property
    def needs_entry_point(self) -> bool:
        return "entry_point" in self.call_signature


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with path.open() as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


@functools.cache
def operator_prompts() -> dict[str, dict[str, Any]]:
    data = _read_yaml(HERE / "prompts" / "operators.yaml")
    missing = set(ALL_OPERATORS) - set(data)
    if missing:
        raise ValueError(f"{HERE / 'prompts' / 'operators.yaml'}: no prompt for operators {sorted(missing)}")
    return data


@functools.cache
def load_family(name: str) -> FamilySpec:
    """The family ``name``; unknown names and malformed files fail with the file and field named."""
    if name not in FAMILIES:
        raise ValueError(f"unknown workflow family {name!r}; expected one of {list(FAMILIES)}")
    path = HERE / "families" / f"{name}.yaml"
    data = _read_yaml(path)
    for key in ("family", "call_signature", "operators", "template"):
        if key not in data:
            raise ValueError(f"{path}: missing field `{key}`")
    ops = []
    for i, op in enumerate(data["operators"]):
        if op.get("name") not in ALL_OPERATORS:
            raise ValueError(f"{path}: operators[{i}].name {op.get('name')!r} is not one of {list(ALL_OPERATORS)}")
        ops.append(OperatorSpec(**op))
    prompts = {k: dict(v) for k, v in operator_prompts().items()}
    for op_name, text in (data.get("prompts") or {}).items():
        if op_name not in prompts:
            raise ValueError(f"{path}: prompts.{op_name} overrides an unknown operator")
        prompts[op_name]["prompt"] = text
    return FamilySpec(data["family"], data["call_signature"], tuple(ops), data["template"].strip() + "\n", prompts)


def operator_list(spec: FamilySpec) -> str:
    """The numbered operator descriptions the generator reads."""
    lines = []
    for i, op in enumerate(spec.operators, 1):
        lines.append(f"{i}. {op.name} (create with `self.{op.attribute} = operator.{op.name}(llm)`)")
        lines.append(f"   Usage: {op.description}")
        lines.append(f"   Interface: {op.interface}")
        if op.example:
            lines.append(f"   Example: {op.example}")
    return "\n".join(lines)


@functools.cache
def _generator_template() -> str:
    return _read_yaml(HERE / "prompts" / "generator.yaml")["prompt"]


def generator_prompt(family: str, question: str) -> str:
    """The prompt that asks the generator for a workflow for ``question`` (ScoreFlow-style, query-specific)."""
    spec = load_family(family)
    template = _generator_template()
    return template.format(template=spec.template.rstrip(), operators=operator_list(spec),
                           call_signature=spec.call_signature, question=question)
