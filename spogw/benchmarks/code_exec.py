"""Turning a model's code into a check program, running it, and reading the verdict.

The check program is a small harness that ``exec``s three sources into one namespace, in order: the
*preamble* (HumanEval: the prompt, which brings its imports and helper functions such as ``poly`` or
``encode_cyclic``; MBPP: ``test_imports``), the *solution*, and the *tests*. Running them as separate
``exec`` calls rather than one concatenated file keeps ``from __future__`` imports legal, names the failing
part in tracebacks (``<solution>`` vs ``<tests>``), and leaves ``__name__`` unequal to ``"__main__"`` so a
solution's demo block does not run.

A pass is only believed when the harness prints a per-run random *nonce* after the tests: a solution that
calls ``sys.exit(0)`` or ``os._exit(0)`` from inside the function under test would otherwise exit 0 and
look like a pass.

Partial credit rewrites every ``assert`` in the tests (with :mod:`ast`) into a try/except that reports
pass or fail through the harness, so asserts inside loops count once per execution and a failing assert
does not stop the others. An abort outside an assert (a crash in setup code, a timeout) counts as one more
failed assert.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import secrets
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


_HARNESS = """\
import json as _json, sys as _sys, traceback as _tb
_NONCE = {nonce!r}
def __spogw_assert__(ok, line):
    print(_NONCE + (" P " if ok else " F ") + str(line), flush=True)
def _where(exc):
    last = None
    for frame, line in _tb.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename in ("<tests>", "<solution>", "<preamble>"):
            last = (frame.f_code.co_filename, line)
    return last
def _main():
    ns = {{"__name__": "__spogw_solution__", "__spogw_assert__": __spogw_assert__}}
    stage = "preamble"
    try:
        exec(compile({preamble!r}, "<preamble>", "exec"), ns)
        stage = "solution"
        exec(compile({solution!r}, "<solution>", "exec"), ns)
        stage = "tests"
        exec(compile({tests!r}, "<tests>", "exec"), ns)
    except BaseException as exc:
        _tb.print_exc()
        info = {{"stage": stage, "error": type(exc).__name__, "message": str(exc)[:300], "where": _where(exc)}}
        print(_NONCE + " FAIL " + _json.dumps(info), flush=True)
        _sys.stdout.flush()
        _sys.exit(1)
    print(_NONCE + " PASS", flush=True)
_main()
"""


@dataclass(frozen=True)
class CheckProgram:
    """A runnable check program and what is needed to read its verdict."""

    source: str
    nonce: str
    partial: bool
    n_asserts: int
    solution: str
    dropped: tuple[str, ...] = ()


def build_check_program(preamble: str, solution: str, tests: str, *, partial: bool = False) -> CheckProgram:
    """Assemble the harness around ``preamble``, ``solution`` and ``tests`` (see the module docstring)."""
    nonce = "SPOGW-" + secrets.token_hex(8)
    n_asserts = 0
    if partial:
        tests, n_asserts = count_asserts(tests)
    source = _HARNESS.format(nonce=nonce, preamble=preamble, solution=solution, tests=tests)
    return CheckProgram(source=source, nonce=nonce, partial=partial, n_asserts=n_asserts, solution=solution)


def check_limits(timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """The sandbox limits of one check program: ``timeout_s`` of wall and CPU time, the sandbox's defaults else."""
    from spogw.runtime.sandbox import SandboxLimits

    return SandboxLimits(wall_s=timeout_s, cpu_s=timeout_s)


def run_programs(
    sources: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S, workers: int = 2, pool: Any = None
) -> list[Any]:
    """Run each check program in the sandbox (``spogw.runtime.sandbox``); ``SandboxResult`` per program, in order.

    ``pool``: a warm ``SandboxPool`` to reuse (the score stage keeps one for its lifetime); without one, a pool of
    ``workers`` zygotes is started for this batch. Each program gets ``timeout_s`` of wall and CPU time and the
    sandbox's other default limits (1 GiB, no network, private /tmp).
    """
    from spogw.runtime.sandbox import SandboxPool

    if not sources:
        return []
    limits = check_limits(timeout_s)
    if pool is not None:
        return pool.map(sources, limits=limits)
    with SandboxPool(workers=max(1, min(workers, len(sources))), limits=limits) as own:
        return own.map(sources)


def interpret(program: CheckProgram, outcome: Any) -> ScoreResult:
    """Turn a ``SandboxResult`` into a score and a reason; only the harness's nonce line counts as a pass."""
    marks = [line[len(program.nonce) + 1 :] for line in outcome.stdout.splitlines() if line.startswith(program.nonce)]
    passed_all = "PASS" in marks and outcome.status == "ok"
    fail_info: dict[str, Any] = {}
    for m in marks:
        if m.startswith("FAIL "):
            try:
                fail_info = json.loads(m[5:])
            except ValueError:
                fail_info = {"error": "unreadable failure report"}
    details: dict[str, Any] = {"status": outcome.status, "duration_s": round(float(outcome.duration_s or 0.0), 3)}
    if program.dropped:
        details["dropped_statements"] = list(program.dropped)
    if outcome.status == "sandbox_error":
        details["infrastructure_error"] = True  # not the program's fault: the score stage may retry it
    if passed_all:
        reason = ""
    elif fail_info:
        reason = _describe_failure(fail_info)
        details["failure"] = fail_info
    elif outcome.status in ("ok", "exit"):  # ended without the harness's verdict: the solution exited itself
        reason = f"program exited (code {outcome.returncode}) before the tests finished"
    else:
        reason = f"{outcome.status}: {outcome.reason}" if outcome.reason else outcome.status
    if not passed_all:
        details["stderr_tail"] = outcome.stderr[-500:]
    if not program.partial:
        return ScoreResult(1.0 if passed_all else 0.0, reason, program.solution, details)
    passed = sum(1 for m in marks if m.startswith("P "))
    failed = sum(1 for m in marks if m.startswith("F "))
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
        """Source run before the solution in the same namespace."""
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
        program = build_check_program(self.preamble(record), code, record.tests, partial=partial)
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
        return interpret(program, run_programs([program.source], timeout_s=timeout_s, workers=1, pool=pool)[0])

    def public_tests_for(self, record: Record, rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
        """This record's public tests among the rows of ``<stem>_public_test.jsonl``."""
        raise NotImplementedError
