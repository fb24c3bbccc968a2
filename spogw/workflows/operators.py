"""The workflow operators: each an executor-LLM prompt plus forgiving parsing of the reply.

As in AFlow, an operator is built with an LLM handle and awaited with keyword arguments, and it
returns a dict: ``await Custom(llm)(input=..., instruction=...) -> {"response": ...}``. The handle
(:class:`OperatorLLM`) is the only way out: it asks the executor, runs code in the sandbox and knows
the current problem's public tests. In the sandbox child the handle forwards all three to the
parent over RPC, so the child needs no network and the executor's cache and concurrency bound are
shared by every workflow (``spogw/runtime/runner.py``).

Parsing is forgiving on purpose: tags, then fenced code, then the whole reply. A reply that still
cannot be parsed does not crash the workflow and does not fail it either (that would drop it from
training as "did not run"); the operator falls back to a documented default and records a warning
through ``llm.warn``, which ends up in the workflow result. Prompts are data
(``prompts/operators.yaml``, overridable per family).
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from typing import Any, Protocol

RESULT_MARK = "<<SPOGW_RESULT>>"
"""Programs run for operators print this before their result, so stray prints cannot mislead us."""


class ExecutorCallError(RuntimeError):
    """The executor failed for good on one call (after its retries); the message is the cause."""


class OperatorLLM(Protocol):
    """What an operator may use. Implementations: ``runtime.runner.DirectLLM`` and ``runtime.runner.RpcLLM``."""

    family: str
    prompts: dict[str, dict[str, Any]]

    async def ask(self, prompt: str) -> str:
        """One executor call with a single user message; raises :class:`ExecutorCallError`."""
        ...

    async def run_code(self, code: str, *, timeout_s: float = 10.0) -> dict:
        """Run ``code`` as a program in the sandbox: ``{"status", "stdout", "stderr", "reason"}``."""
        ...

    def public_tests(self, entry_point: str) -> list[str]:
        """The current problem's public asserts on ``candidate`` (empty when the problem has none)."""
        ...

    def warn(self, message: str) -> None: ...


# -- reply parsing (pure) -------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_tag(text: str, tag: str) -> str | None:
    """Content of ``<tag>...</tag>`` (last complete one), or of an unclosed ``<tag>`` up to the next tag."""
    closed = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL | re.IGNORECASE)
    if closed:
        return closed[-1].strip()
    opened = re.search(rf"<{tag}>(.*?)(?:<[A-Za-z_/][^>]*>|$)", text, re.DOTALL | re.IGNORECASE)
    return opened.group(1).strip() if opened else None


def extract_code(text: str, entry_point: str | None = None) -> str | None:
    """The Python code in a reply: the fenced block defining ``entry_point`` (else the longest python
    block), else the whole reply if it parses as Python with a definition; None when there is none."""
    blocks = [(lang.lower(), body.strip("\n")) for lang, body in _FENCE.findall(text or "")]
    blocks = [(lang, body) for lang, body in blocks if lang in ("", "python", "py", "python3") and body.strip()]
    if entry_point:
        defining = [b for _, b in blocks if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        if defining:
            return defining[-1]
    if blocks:
        return max((b for _, b in blocks), key=len)
    stripped = (text or "").strip()
    try:
        tree = ast.parse(stripped)
    except (SyntaxError, ValueError):
        return None
    has_def = any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for n in tree.body)
    return stripped if has_def else None


def parse_bool(text: str | None) -> bool | None:
    if text is None:
        return None
    word = re.search(r"\b(true|false|yes|no|correct|incorrect)\b", text, re.IGNORECASE)
    if not word:
        return None
    return word.group(1).lower() in ("true", "yes", "correct")


def result_after_mark(stdout: str) -> str | None:
    """What a program printed after the last :data:`RESULT_MARK`, or None."""
    idx = (stdout or "").rfind(RESULT_MARK)
    return None if idx < 0 else stdout[idx + len(RESULT_MARK):].strip()


# -- operators ------------------------------------------------------------------------------------


class Operator:
    """Base: holds the handle and formats this operator's prompt from the family's prompt data."""

    def __init__(self, llm: OperatorLLM, name: str | None = None):
        self.llm = llm
        self.name = name or type(self).__name__

    def _prompt(self, key: str = "prompt", **fields: Any) -> str:
        template = self.llm.prompts[type(self).__name__][key]
        return template.format(**{k: "" if v is None else v for k, v in fields.items()})

    async def _ask(self, **fields: Any) -> str:
        return await self.llm.ask(self._prompt(**fields))

    def _warn(self, message: str) -> None:
        self.llm.warn(f"{self.name}: {message}")


class Custom(Operator):
    async def __call__(self, input: str, instruction: str = "") -> dict:
        return {"response": (await self._ask(input=input, instruction=instruction)).strip()}


class AnswerGenerate(Operator):
    async def __call__(self, input: str, mode: str | None = None) -> dict:
        reply = await self._ask(input=input)
        thought, answer = extract_tag(reply, "thought"), extract_tag(reply, "answer")
        if answer is None:
            lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
            answer = lines[-1].strip() if lines else ""
            self._warn("no <answer> tag in the reply; took its last line")
        return {"thought": thought if thought is not None else reply.strip(), "answer": answer}


class CustomCodeGenerate(Operator):
    async def __call__(self, problem: str, entry_point: str = "", instruction: str = "") -> dict:
        reply = await self._ask(problem=problem, entry_point=entry_point, instruction=instruction)
        code = extract_code(reply, entry_point)
        if code is None:
            self._warn("no Python code in the reply; returned the reply as is")
            code = reply.strip()
        return {"response": code}


class ScEnsemble(Operator):
    """Self-consistency: the executor names the most consistent candidate by letter."""

    async def __call__(self, solutions: list[str], problem: str = "") -> dict:
        solutions = [str(s) for s in solutions]
        if not solutions:
            self._warn("called with no solutions")
            return {"response": ""}
        if len(solutions) == 1:
            return {"response": solutions[0]}
        letters = [chr(65 + i) for i in range(len(solutions))]
        listing = "".join(f"{letter}: \n{sol}\n\n\n" for letter, sol in zip(letters, solutions, strict=True))
        reply = await self._ask(problem=problem, solutions=listing)
        picked = extract_tag(reply, "solution_letter")
        match = re.search(r"\b([A-Z])\b", (picked or "").upper())
        if match and match.group(1) in letters:
            return {"response": solutions[letters.index(match.group(1))]}
        # fall back to a plain vote over identical candidates (first one on ties)
        counts = Counter(s.strip() for s in solutions)
        best = max(solutions, key=lambda s: counts[s.strip()])
        self._warn(f"no valid solution letter in the reply ({(picked or reply)[:60]!r}); took the most frequent")
        return {"response": best}


class Programmer(Operator):
    """Writes a ``solve()`` program, runs it in the sandbox, and retries with the error as feedback."""

    attempts = 3
    timeout_s = 10.0

    async def __call__(self, problem: str, analysis: str = "None") -> dict:
        code, output, feedback = "", "No code generated", ""
        for _ in range(self.attempts):
            reply = await self._ask(problem=problem, analysis=analysis, feedback=feedback)
            code = extract_code(reply, "solve") or ""
            if not code:
                self._warn("no Python code in the reply")
                return {"code": "", "output": "No code generated"}
            status, output = await self._run(code)
            if status == "ok":
                return {"code": code, "output": output}
            feedback = self._prompt("feedback", code=code, status=status, output=output)
        return {"code": code, "output": output}

    async def _run(self, code: str) -> tuple[str, str]:
        program = (f"{code}\n\n\nif 'solve' not in globals() or not callable(solve):\n"
                   f"    raise SystemExit(\"Function 'solve' not found\")\n"
                   f"print({RESULT_MARK!r} + str(solve()))\n")
        run = await self.llm.run_code(program, timeout_s=self.timeout_s)
        value = result_after_mark(run.get("stdout", ""))
        if run.get("status") == "ok" and value is not None:
            return "ok", value
        detail = run.get("reason") or ""
        stderr = (run.get("stderr") or "").strip()
        return "error", (f"{detail}\n{stderr[-1500:]}" if stderr else detail).strip() or "no output"


class Test(Operator):
    """Runs the public tests of the current problem in the sandbox; on failure, reflects and rewrites."""

    timeout_s = 10.0

    async def __call__(self, problem: str, solution: str, entry_point: str, test_loop: int = 3) -> dict:
        tests = self.llm.public_tests(entry_point)
        solution = extract_code(solution, entry_point) or solution
        if not tests:
            self._warn(f"no public tests for {entry_point!r}; solution returned untested")
            return {"result": True, "solution": solution}
        for _ in range(test_loop):
            verdict = await self._check(solution, entry_point, tests)
            if verdict is None:
                return {"result": True, "solution": solution}
            exec_pass, test_fail = verdict
            reply = await self._ask(problem=problem, solution=solution, exec_pass=exec_pass, test_fail=test_fail,
                                    entry_point=entry_point)
            revised = extract_code(reply, entry_point)
            if revised is None:
                self._warn("no code in the reflection reply; kept the previous solution")
            else:
                solution = revised
        return {"result": await self._check(solution, entry_point, tests) is None, "solution": solution}

    async def _check(self, solution: str, entry_point: str, tests: list[str]) -> tuple[str, str] | None:
        """None when every public test passes, else (execution summary, failed cases)."""
        program = (f"{solution}\n\n\nimport json as _spogw_json\n"
                   f"_spogw_failed = []\n"
                   f"for _spogw_test in {tests!r}:\n"
                   f"    try:\n"
                   f"        exec(_spogw_test, {{**globals(), 'candidate': {entry_point}}})\n"
                   f"    except AssertionError:\n"
                   f"        _spogw_failed.append({{'test': _spogw_test, 'error': 'AssertionError'}})\n"
                   f"    except Exception as _spogw_exc:\n"
                   f"        _spogw_failed.append({{'test': _spogw_test, 'error': repr(_spogw_exc)[:300]}})\n"
                   f"print({RESULT_MARK!r} + _spogw_json.dumps(_spogw_failed))\n")
        run = await self.llm.run_code(program, timeout_s=self.timeout_s)
        value = result_after_mark(run.get("stdout", ""))
        if run.get("status") != "ok" or value is None:
            stderr = (run.get("stderr") or "").strip()[-1500:]
            summary = f"executed unsuccessfully, error:\n{run.get('reason') or ''}\n{stderr}".strip()
            return summary, "executed unsuccessfully"
        failed = json.loads(value)
        if not failed:
            return None
        return "executed successfully", "\n".join(f"{f['test']}  -> {f['error']}" for f in failed)


class Review(Operator):
    async def __call__(self, problem: str, solution: str, mode: str | None = None) -> dict:
        reply = await self._ask(problem=problem, solution=solution)
        verdict = parse_bool(extract_tag(reply, "review_result"))
        feedback = extract_tag(reply, "feedback")
        if verdict is None:
            self._warn("no true/false <review_result> in the reply; counted as true (no revision)")
            verdict = True
        return {"review_result": verdict, "feedback": feedback if feedback is not None else reply.strip()}


class Revise(Operator):
    async def __call__(self, problem: str, solution: str, feedback: str, mode: str | None = None) -> dict:
        reply = await self._ask(problem=problem, solution=solution, feedback=feedback)
        revised = extract_tag(reply, "solution")
        if revised is None:
            revised = reply.strip()
        return {"solution": revised}


class Format(Operator):
    async def __call__(self, problem: str, solution: str, mode: str | None = None) -> dict:
        reply = await self._ask(problem=problem, solution=solution)
        formatted = extract_tag(reply, "solution")
        if formatted is None:
            self._warn("no <solution> tag in the reply; took the whole reply")
            formatted = reply.strip()
        return {"solution": formatted}


OPERATORS: dict[str, type[Operator]] = {cls.__name__: cls for cls in (
    Custom, AnswerGenerate, CustomCodeGenerate, ScEnsemble, Programmer, Test, Review, Revise, Format)}
