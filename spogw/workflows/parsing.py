"""From generated text to a workflow that may run, or a recorded reason why it may not.

The convention (AFlow's class, ScoreFlow's free generation around a template)::

    class Workflow:
        def __init__(self, llm) -> None:
            self.custom = operator.Custom(llm)

        async def __call__(self, problem: str):              # code family: (self, problem, entry_point)
            solution = await self.custom(input=problem, instruction="...")
            return solution["response"]

``operator`` is provided in the workflow's namespace, holding only the family's offered operators.
We chose AFlow's ``async __call__(problem)`` over ScoreFlow's problem-in-constructor
``run_workflow()`` because it keeps one workflow object reusable across problems and matches the
operators' own call style; the generator prompt (``prompts/generator.yaml``) states it.

Validation is static and cheap, and it is *not* the security boundary: generated code always runs
in the sandbox. It rejects what would certainly fail or what no honest workflow needs: text without
code, syntax errors, a missing ``Workflow`` class or a non-async ``__call__``, operators the family
does not offer, imports outside :data:`ALLOWED_IMPORTS`, and reflection/escape hatches
(``exec``, ``eval``, ``open``, ``__import__``, dunder attributes).
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass

from spogw.workflows.families import ALL_OPERATORS, load_family

ALLOWED_IMPORTS = frozenset({"asyncio", "re", "math", "json", "collections", "itertools", "functools", "typing",
                             "string", "random", "fractions"})
"""Standard-library modules a workflow may import: text and number helpers, nothing with I/O."""

FORBIDDEN_NAMES = frozenset({"exec", "eval", "compile", "__import__", "open", "globals", "locals", "vars",
                             "getattr", "setattr", "delattr", "breakpoint", "input", "exit", "quit", "__builtins__"})
ALLOWED_DUNDERS = frozenset({"__init__", "__call__", "__name__", "__doc__"})
CLASS_NAME = "Workflow"

_GRAPH = re.compile(r"<graph>\s*(.*?)\s*(?:</graph>|$)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


class InvalidWorkflow(ValueError):
    """Generated text that is not a runnable workflow; ``reason`` is what the score stage records."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ParsedWorkflow:
    code: str
    class_name: str
    operators_used: tuple[str, ...]


def extract_workflow_code(text: str) -> str:
    """The code inside ``<graph>`` tags (ScoreFlow) or a fenced block (AFlow, chat models), else the text."""
    text = text or ""
    match = _GRAPH.search(text)
    if match:
        text = match.group(1)
    fences = _FENCE.findall(text)
    if fences:
        with_class = [f for f in fences if re.search(rf"\bclass\s+{CLASS_NAME}\b", f)]
        text = (with_class or fences)[-1]
    return text.strip("\n")


def parse_workflow(text: str, *, family: str) -> ParsedWorkflow:
    """Extract and validate a workflow for ``family``; raise :class:`InvalidWorkflow` with the reason.

    Results are memoised per (text, family): the score stage runs each workflow r times."""
    return _parse_workflow(text, family)


@functools.lru_cache(maxsize=4096)
def _parse_workflow(text: str, family: str) -> ParsedWorkflow:
    spec = load_family(family)
    code = extract_workflow_code(text)
    if not code.strip():
        raise InvalidWorkflow("no code in the generated text")
    try:
        tree = ast.parse(code)
        compile(tree, "<workflow>", "exec")
    except SyntaxError as exc:
        if not re.search(rf"\bclass\s+{CLASS_NAME}\b", code):
            raise InvalidWorkflow("no workflow code in the generated text (no <graph> block, no ```python fence, "
                                  f"no `class {CLASS_NAME}`)") from None
        raise InvalidWorkflow(f"syntax error at line {exc.lineno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # null bytes, absurd nesting
        raise InvalidWorkflow(f"does not compile: {exc}") from None
    _check_top_level(tree)
    cls = _find_class(tree)
    _check_methods(cls, needs_entry_point=spec.needs_entry_point)
    used = _check_names(tree, offered=set(spec.offered), family=family)
    return ParsedWorkflow(code + "\n", CLASS_NAME, tuple(sorted(used)))


def _check_top_level(tree: ast.Module) -> None:
    allowed = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.Assign,
               ast.AnnAssign)
    for node in tree.body:
        if isinstance(node, allowed):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # a docstring
            continue
        raise InvalidWorkflow(f"line {node.lineno}: only imports, definitions and constants may appear at module "
                              f"level, found {type(node).__name__}")


def _find_class(tree: ast.Module) -> ast.ClassDef:
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == CLASS_NAME]
    if not classes:
        names = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        raise InvalidWorkflow(f"no class `{CLASS_NAME}` defined" + (f" (found classes {names})" if names else ""))
    return classes[-1]


def _positional(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    return [a.arg for a in fn.args.posonlyargs + fn.args.args]


def _check_methods(cls: ast.ClassDef, *, needs_entry_point: bool) -> None:
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    call = methods.get("__call__")
    if call is None:
        raise InvalidWorkflow(f"class `{CLASS_NAME}` has no `async def __call__(self, problem, ...)`")
    if not isinstance(call, ast.AsyncFunctionDef):
        raise InvalidWorkflow(f"line {call.lineno}: `{CLASS_NAME}.__call__` must be `async def`")
    params = _positional(call)
    wanted = 3 if needs_entry_point else 2
    if len(params) < wanted and call.args.vararg is None:
        sig = "(self, problem, entry_point)" if needs_entry_point else "(self, problem)"
        raise InvalidWorkflow(f"line {call.lineno}: `{CLASS_NAME}.__call__` must accept {sig}, "
                              f"has ({', '.join(params)})")
    required_extra = len(params) - len(call.args.defaults) - wanted
    if required_extra > 0:
        raise InvalidWorkflow(f"line {call.lineno}: `{CLASS_NAME}.__call__` has required parameters beyond the "
                              f"problem: {params[wanted:wanted + required_extra]}")
    init = methods.get("__init__")
    if init is not None and len(_positional(init)) < 2 and init.args.vararg is None:
        raise InvalidWorkflow(f"line {init.lineno}: `{CLASS_NAME}.__init__` must accept (self, llm)")
    if init is not None and len(_positional(init)) - len(init.args.defaults) > 2:
        raise InvalidWorkflow(f"line {init.lineno}: `{CLASS_NAME}.__init__` may require only (self, llm)")


def _check_names(tree: ast.Module, *, offered: set[str], family: str) -> set[str]:
    used: set[str] = set()

    def operator_name(name: str, line: int) -> None:
        if name not in ALL_OPERATORS:
            raise InvalidWorkflow(f"line {line}: unknown operator `operator.{name}`; the {family} family offers "
                                  f"{sorted(offered)}")
        if name not in offered:
            raise InvalidWorkflow(f"line {line}: operator `{name}` is not offered for the {family} family "
                                  f"(offered: {sorted(offered)})")
        used.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _check_import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            _check_import(node.module or "." * node.level, node.lineno)
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "operator":
                operator_name(node.attr, node.lineno)
            if node.attr.startswith("__") and node.attr.endswith("__") and node.attr not in ALLOWED_DUNDERS:
                raise InvalidWorkflow(f"line {node.lineno}: attribute `{node.attr}` is not allowed in a workflow")
        elif isinstance(node, ast.Name):
            if node.id in FORBIDDEN_NAMES:
                raise InvalidWorkflow(f"line {node.lineno}: `{node.id}` is not allowed in a workflow")
            if node.id in ALL_OPERATORS and isinstance(node.ctx, ast.Load):
                operator_name(node.id, node.lineno)
    return used


def _check_import(module: str, line: int) -> None:
    root = module.split(".")[0]
    if root == "operator":
        raise InvalidWorkflow(f"line {line}: do not import `operator`; the workflow's operators are provided as "
                              "`operator.<Name>`")
    if root not in ALLOWED_IMPORTS:
        raise InvalidWorkflow(f"line {line}: import of `{module}` is not allowed (allowed: {sorted(ALLOWED_IMPORTS)})")
