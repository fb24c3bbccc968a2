"""Turning a model's code into a check, running it, and reading the verdict.

A check runs the solution and its tests in two sandboxed processes that share nothing
(``spogw/runtime/zygote/check.py``): the solution's process S runs the *preamble* (HumanEval: the prompt, which
brings its imports and helpers such as ``poly`` or ``encode_cyclic``; MBPP: ``test_imports``) and the
*solution*, then serves calls; the tests' process T runs the preamble and the *tests*, with the names under
test bound to proxies that call into S and decode its replies into T's own plain values. So every comparison is
made by the tests on values the solution cannot shape (no ``__eq__`` of its making, no patched builtins, no
exit code or printed line that means "pass"), the tests' helpers are T's trusted copies (a solution that
redefines ``poly`` changes only its own), and the verdict reaches the parent on a channel only T holds.

Which names T binds to the solution (``remote``): the entry point, plus every free name of the tests that the
solution defines (by ``def``, ``class``, assignment or ``from ... import``) and the preamble does not. A free
name the solution binds by ``import M`` of a standard-library module (MBPP 596 uses ``sys``) is imported by T
itself (``imports``); the module object is then T's, and the name must be the module's own (``import os as sys``
is not followed: it would let the solution choose what the tests get). Other free names stay unbound.

Partial credit rewrites every ``assert`` in the tests (with :mod:`ast`) into a try/except that reports pass or
fail on T's verdict channel, so asserts inside loops count once per execution and a failing assert does not
stop the others. An abort outside an assert (a crash in set-up code, a timeout) counts as one more failed
assert. What a solution returns that is not plain data is an opaque value in T (its truth value only; see
``spogw/runtime/zygote/plain.py``), recorded in ``details["notes"]``.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spogw.benchmarks.base import Benchmark, Record, ScoreResult

DEFAULT_TIMEOUT_S = 10.0
"""Wall-clock limit per check program; HumanEval's and MBPP's reference solutions all finish well under 1 s."""

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.\-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
_PY_LANGS = {"", "python", "py", "python3", "py3"}

# Top-level statements a solution may keep. Everything else (demo prints, example asserts, loops that exercise
# the function) is dropped, as AFlow's `sanitize` does, so that a correct function is not failed by its own
# wrong example or hung by an `input()` call.
_KEEP = (
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Assign,
    ast.AnnAssign,
    ast.AugAssign,
    ast.Try,
)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a model's answer.

    Order: fenced blocks (```python ... ```, an unterminated last fence included) - the last Python block
    that defines ``entry_point``, else all Python blocks joined, else all blocks joined; with no fence, the
    whole text.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return text.strip("\n")
    candidates = [b for lang, b in blocks if lang in _PY_LANGS] or [b for _, b in blocks]
    if entry_point:
        pattern = re.compile(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.M)
        defining = [b for b in candidates if pattern.search(b)]
        if defining:
            return defining[-1].strip("\n")
    return "\n\n".join(b.strip("\n") for b in candidates)


def defines_top_level(code: str, name: str) -> bool:
    """Whether ``code`` defines function ``name`` at module level (by ast; by regex when it does not parse)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name for n in tree.body)


def sanitize(code: str) -> tuple[str, list[str]]:
    """Keep imports, definitions, assignments, try blocks and non-``__main__`` ifs at module level.

    Returns the kept source (original text, comments and decorators included) and a description of each dropped
    statement. Code that does not parse is returned unchanged: it then fails with its own SyntaxError, which is
    the most useful reason to record.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code, []
    lines = code.splitlines(keepends=True)
    kept: list[str] = []
    dropped: list[str] = []
    for node in tree.body:
        keep = isinstance(node, _KEEP) or (isinstance(node, ast.If) and not _is_main_guard(node))
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        end = node.end_lineno or node.lineno
        if keep:
            kept.append("".join(lines[start - 1 : end]))
        else:
            dropped.append(f"line {start}: {type(node).__name__}")
    return "".join(kept), dropped


def _is_main_guard(node: ast.If) -> bool:
    t = node.test
    return (
        isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Name)
        and t.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators)
    )


class _AssertCounter(ast.NodeTransformer):
    """Rewrite ``assert t, m`` as ``try: assert t, m`` / ``except BaseException: report(False)`` / ``else: ...``."""

    def __init__(self, reporter: str) -> None:
        self.reporter = reporter
        self.count = 0

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        self.count += 1

        def report(ok: bool) -> ast.stmt:
            call = ast.Call(
                func=ast.Name(id=self.reporter, ctx=ast.Load()),
                args=[ast.Constant(ok), ast.Constant(node.lineno)],
                keywords=[],
            )
            return ast.Expr(call)

        handler = ast.ExceptHandler(type=ast.Name(id="BaseException", ctx=ast.Load()), name=None, body=[report(False)])
        return ast.copy_location(ast.Try(body=[node], handlers=[handler], orelse=[report(True)], finalbody=[]), node)


def count_asserts(tests: str) -> tuple[str, int]:
    """The tests with every assert made to report its outcome, and how many assert statements there are."""
    tree = ast.parse(tests)
    counter = _AssertCounter("__spogw_assert__")
    tree = ast.fix_missing_locations(counter.visit(tree))
    return ast.unparse(tree), counter.count


@dataclass(frozen=True)
class CheckProgram:
    """A check (``spogw.runtime.sandbox``'s ``check`` dict) and what is needed to read its verdict."""

    preamble: str
    solution: str
    tests: str
    """The tests as T runs them: asserts rewritten to report when ``partial``."""
    remote: tuple[str, ...]
    imports: tuple[str, ...]
    partial: bool
    n_asserts: int
    dropped: tuple[str, ...] = ()

    def spec(self) -> dict[str, Any]:
        return {"preamble": self.preamble, "solution": self.solution, "tests": self.tests,
                "remote": list(self.remote), "imports": list(self.imports)}


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name a module binds anywhere (assignments, defs, imports, arguments, handlers, comprehensions)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            out.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
            out.add(node.name)
    return out


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError):
        return None


def names_under_test(preamble: str, solution: str, tests: str, entry_point: str | None
                     ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names T binds to the solution, import statements T runs itself); see the module docstring."""
    import builtins

    remote = [entry_point] if entry_point else []
    test_tree, sol_tree = _parse(tests), _parse(solution)
    if test_tree is None or sol_tree is None:
        return tuple(remote), ()
    pre_tree = _parse(preamble)
    used = {n.id for n in ast.walk(test_tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    free = used - _bound_names(test_tree) - (_bound_names(pre_tree) if pre_tree else set()) - set(dir(builtins))
    imports: list[str] = []
    top_imports: dict[str, str] = {}
    for node in sol_tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:  # `import sys` only: with `import os as sys` the solution would pick the module
                top = a.name.split(".")[0]
                if top in sys.stdlib_module_names and a.asname in (None, a.name):
                    top_imports[top] = f"import {a.name}"
    defined = _bound_names(ast.Module(body=[n for n in sol_tree.body if not isinstance(n, ast.Import)],
                                      type_ignores=[]))
    for name in sorted(free - set(remote)):
        if name in top_imports:
            imports.append(top_imports[name])
        elif name in defined:
            remote.append(name)
    return tuple(remote), tuple(imports)


def build_check_program(preamble: str, solution: str, tests: str, *, entry_point: str | None = None,
                        partial: bool = False) -> CheckProgram:
    """The check of ``solution`` against ``tests`` (see the module docstring)."""
    remote, imports = names_under_test(preamble, solution, tests, entry_point)
    n_asserts = 0
    if partial:
        tests, n_asserts = count_asserts(tests)
    return CheckProgram(preamble, solution, tests, remote, imports, partial, n_asserts)


def check_limits(timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """The sandbox limits of one check: ``timeout_s`` of wall and CPU time, the sandbox's defaults else."""
    from spogw.runtime.sandbox import SandboxLimits

    return SandboxLimits(wall_s=timeout_s, cpu_s=timeout_s)


def run_checks(programs: Sequence[CheckProgram], *, timeout_s: float = DEFAULT_TIMEOUT_S, workers: int = 2,
               pool: Any = None) -> list[Any]:
    """Run each check in the sandbox (``spogw.runtime.sandbox``); ``SandboxResult`` per check, in order.

    ``pool``: a warm ``SandboxPool`` to reuse; without one, a pool of ``workers`` zygotes is started for this
    batch. Each check gets ``timeout_s`` of wall and CPU time and the sandbox's other default limits."""
    from spogw.runtime.sandbox_pool import SandboxPool

    if not programs:
        return []
    limits = check_limits(timeout_s)
    specs = [p.spec() for p in programs]
    if pool is not None:
        return pool.map_checks(specs, limits=limits)
    with SandboxPool(workers=max(1, min(workers, len(specs))), limits=limits) as own:
        return own.map_checks(specs)


def interpret(program: CheckProgram, outcome: Any) -> ScoreResult:
    """Turn a check's ``SandboxResult`` into a score and a reason, from the tests' verdict channel alone.

    The solution's stdout, stderr and exit status are diagnostics (``details``), never a verdict."""
    verdict = outcome.verdict or {}
    passed_all = verdict.get("final") == "PASS" and outcome.status == "ok"
    fail_info = verdict.get("fail") or {}
    details: dict[str, Any] = {"status": outcome.status, "duration_s": round(float(outcome.duration_s or 0.0), 3)}
    if program.dropped:
        details["dropped_statements"] = list(program.dropped)
    if verdict.get("notes"):
        details["notes"] = list(verdict["notes"])
    if outcome.status == "sandbox_error":
        details["infrastructure_error"] = True  # not the program's fault: the score stage may retry it
    if passed_all:
        reason = ""
    elif fail_info:
        reason = _describe_failure(fail_info)
        details["failure"] = fail_info
        solution = outcome.solution or {}
        if solution.get("status") not in (None, "ok") and fail_info.get("error") == "SolutionError":
            reason += f" (the solution's process: {solution['status']}: {solution.get('reason', '')})"
    else:
        reason = f"{outcome.status}: {outcome.reason}" if outcome.reason else outcome.status
    if not passed_all:
        details["stderr_tail"] = outcome.stderr[-500:]
        details["tests_stderr_tail"] = str(verdict.get("stderr", ""))[-500:]
        if outcome.solution:
            details["solution_process"] = outcome.solution
    if not program.partial:
        return ScoreResult(1.0 if passed_all else 0.0, reason, program.solution, details)
    passed, failed = int(verdict.get("passed", 0)), int(verdict.get("failed", 0))
    aborted = not passed_all
    total = passed + failed + (1 if aborted else 0)
    details.update(asserts_passed=passed, asserts_failed=failed, aborted=aborted, asserts_static=program.n_asserts)
    score = 1.0 if total == 0 else passed / total
    if not reason and failed:
        reason = f"{failed} of {passed + failed} asserts failed"
    return ScoreResult(score, reason, program.solution, details)


def _describe_failure(info: dict[str, Any]) -> str:
    where = info.get("where")
    loc = f" at {where[0]} line {where[1]}" if where else ""
    msg = f": {info['message']}" if info.get("message") else ""
    stage = info.get("stage", "?")
    head = "tests failed" if stage == "tests" else f"{stage} failed"
    return f"{head}: {info.get('error', 'error')}{msg}{loc}"


class CodeBenchmark(Benchmark):
    """A benchmark scored by running its tests against the produced code (HumanEval, MBPP)."""

    family = "code"

    def preamble(self, record: Record) -> str:
        """Source run before the solution (in its process) and before the tests (in theirs)."""
        return ""

    def solution(self, record: Record, output: str) -> str:
        """The code to test, taken from the model's output."""
        return extract_code(output, record.entry_point)

    def build(self, record: Record, output: str, *, partial: bool = False) -> CheckProgram | ScoreResult:
        """The check program for ``output``, or a zero score when there is nothing to run."""
        if not record.tests.strip():
            return ScoreResult(0.0, f"record {record.id} has no tests")
        code, dropped = sanitize(self.solution(record, output))
        if not code.strip():
            return ScoreResult(0.0, "no code in output" + (f" (dropped: {', '.join(dropped)})" if dropped else ""))
        program = build_check_program(self.preamble(record), code, record.tests, entry_point=record.entry_point,
                                      partial=partial)
        return dataclasses.replace(program, dropped=tuple(dropped))

    def score(
        self,
        record: Record,
        output: str,
        *,
        partial: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        pool: Any = None,
        **_: Any,
    ) -> ScoreResult:
        program = self.build(record, output, partial=partial)
        if isinstance(program, ScoreResult):
            return program
        return interpret(program, run_checks([program], timeout_s=timeout_s, workers=1, pool=pool)[0])

    def public_tests_for(self, record: Record, rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
        """This record's public tests among the rows of ``<stem>_public_test.jsonl``."""
        raise NotImplementedError
