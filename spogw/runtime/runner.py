"""Run generated workflows on problems: sandboxed, concurrent, and never losing a result.

``run_workflow`` validates the generated text (``spogw.workflows.parsing``), then runs the
``Workflow`` class in a sandboxed child (``spogw.runtime.sandbox.run_entry``). Inside the child the
operators' handle (``spogw.workflows.execute.RpcLLM``) turns every executor call and every program run into an RPC
request; the parent answers them (:class:`CallContext`) with the real executor and the sandbox. So
the executor, its response cache and its concurrency bound live in one place, the API key never
enters the child, and the child needs no network. The gold answer and hidden tests never enter the
child either: only the question, the entry point and the public tests do. Its filesystem is the sandbox's
minimal root plus spogw's package directory (not the checkout: no run directories, executor cache, samples or
scores of other workflows). A workflow can influence its score only through its answer, which the parent
scores in a separate check sandbox. Many runs share warm zygotes through :func:`workflow_pool`.

Outcome of a run (``WorkflowResult.status``):

* ``ok`` — the workflow returned; ``output`` is its answer as a string.
* ``invalid`` — the generated text is not a valid workflow (``reason`` says why); nothing ran.
* ``error`` — the workflow raised, crashed, ran out of memory or broke the RPC protocol.
* ``timeout`` — it exceeded ``limits.wall_s`` of its own time (its clock stands still while an executor call or a
  program run is being answered: those have limits of their own, and a busy machine is not the workflow's fault)
  or its CPU time.
* ``executor_error`` — an executor call failed for good (after retries). This wins over any other
  outcome, even when the workflow caught the exception: the score would measure the API, not the
  workflow, so the score stage can retry or drop it instead of training on it.
* ``sandbox_error`` — the sandbox itself failed; not the workflow's fault.

``run_many`` runs many (workflow, problem, run index) jobs with bounded concurrency; a failing job
records its reason and never cancels the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from spogw.runtime.executor import ChatResult, Executor, Usage
from spogw.runtime.sandbox_rpc import WaitClock
from spogw.workflows.execute import HandleBase, call_workflow
from spogw.workflows.operators import ExecutorCallError

STATUSES = ("ok", "invalid", "error", "timeout", "executor_error", "sandbox_error")
INFRA_STATUSES = ("executor_error", "sandbox_error")
"""Outcomes that are no verdict on the workflow (the API or the sandbox failed): stages retry them on resume."""
ENTRY = "spogw.workflows.execute:child_main"

CodeRunner = Callable[[str, float], Awaitable[dict]]
"""Runs a program for an operator: ``(code, timeout_s) -> {"status", "stdout", "stderr", "reason"}``."""


@dataclass
class WorkflowResult:
    output: str | None
    status: str
    reason: str = ""
    usage: Usage = field(default_factory=Usage)
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    """Operator replies that had to be parsed by a fallback (see ``spogw.workflows.operators``)."""
    operators_used: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkflowResult:
        """Inverse of :meth:`to_dict` (a resumed score stage reads its artifact back)."""
        return cls(**{**d, "usage": Usage(**d.get("usage", {}))})


MAX_WAIT_S = 1800.0
"""At most this many seconds of a run's executor calls and program runs stand its wall clock still (each call has
its own time-out and retries, a run at most ``max_calls`` of them): beyond it they count against ``wall_s`` too."""


def default_workflow_limits():
    """Workflows wait on many executor calls: wall time is generous, CPU time is not."""
    from spogw.runtime.sandbox import SandboxLimits

    return SandboxLimits(wall_s=300.0, cpu_s=60.0, memory_mb=1024)


def workflow_pool(workers: int):
    """Warm sandboxes for generated workflows (``SandboxPool.for_entry``: the workflow child's package bound in,
    its module preloaded, zygotes started as concurrency asks for them): a workflow run costs a fork instead of a
    fresh zygote (~0.1-0.2 s). None where the pool cannot start; runs then use one-shot sandboxes."""
    from spogw.runtime.sandbox_pool import SandboxPool

    try:
        return SandboxPool.for_entry(ENTRY, max(1, workers), limits=default_workflow_limits())
    except RuntimeError as exc:
        logging.getLogger(__name__).warning("no workflow sandbox pool (%s); one-shot sandboxes instead", exc)
        return None


def sandbox_code_runner(pool=None, limits=None) -> CodeRunner:
    """Operators' programs run in the sandbox: in ``pool`` when given (~5 ms each), else one-shot."""
    from spogw.runtime.sandbox import SandboxLimits, run_program

    base = limits or SandboxLimits(wall_s=10.0, cpu_s=10.0, memory_mb=512)

    async def run(code: str, timeout_s: float) -> dict:
        lim = SandboxLimits(**{**asdict(base), "wall_s": min(base.wall_s, timeout_s),
                               "cpu_s": min(base.cpu_s, timeout_s)})
        if pool is not None:
            res = await pool.arun(code, limits=lim)
        else:
            res = await asyncio.to_thread(run_program, code, limits=lim)
        return {"status": res.status, "stdout": res.stdout, "stderr": res.stderr[-4000:], "reason": res.reason}

    return run


class BudgetExceeded(RuntimeError):
    """A workflow asked for more executor calls or program runs than one run may make."""


class CallContext:
    """The parent's side of one workflow run: executor calls (with repeat counting) and program runs.

    Budgets cap what one run may spend (a generated loop must not buy 10,000 API calls); exceeding
    one fails that run as the workflow's own ``error``, even if it catches the exception.
    """

    def __init__(self, executor: Executor, *, run_index: int = 0, temperature: float = 0.0, max_tokens: int = 1024,
                 code_runner: CodeRunner | None = None, max_calls: int = 64, max_code_runs: int = 32):
        self.executor, self.run_index = executor, run_index
        self.temperature, self.max_tokens = temperature, max_tokens
        self.code_runner = code_runner
        self.max_calls, self.max_code_runs = max_calls, max_code_runs
        self.usage = Usage()
        self.code_runs = 0
        self.over_budget: str | None = None
        self._requested = 0
        self._repeats: Counter = Counter()

    def _spend(self, what: str, used: int, budget: int) -> None:
        if used > budget:
            self.over_budget = f"workflow exceeded its budget of {budget} {what} per run"
            raise BudgetExceeded(self.over_budget)

    async def chat(self, messages: list[dict]) -> ChatResult:
        self._requested += 1
        self._spend("executor calls", self._requested, self.max_calls)
        # The n-th identical request of this run is its own sample (and cache entry): an ensemble of three
        # identical prompts stays three calls at temperature > 0, and stays reproducible when cached.
        key = json.dumps(messages, sort_keys=True)
        repeat = self._repeats[key]
        self._repeats[key] += 1
        try:
            result = await self.executor.chat(messages, temperature=self.temperature, max_tokens=self.max_tokens,
                                              run_index=self.run_index, repeat=repeat)
        except Exception as exc:  # a backend that raises still yields a recorded failure
            result = ChatResult("", error=f"{type(exc).__name__}: {exc}")
        self.usage.add(result)
        return result

    async def run_code(self, code: str, timeout_s: float) -> dict:
        if self.code_runner is None:
            self.code_runner = sandbox_code_runner()
        self.code_runs += 1
        self._spend("program runs", self.code_runs, self.max_code_runs)
        try:
            return await self.code_runner(code, timeout_s)
        except Exception as exc:
            return {"status": "sandbox_error", "stdout": "", "stderr": "", "reason": f"{type(exc).__name__}: {exc}"}

    async def handle(self, request: dict) -> dict:
        """The RPC handler for the sandboxed child."""
        kind = request.get("kind")
        if kind == "chat":
            result = await self.chat(request["messages"])
            return {"text": result.text} if result.ok else {"error": result.error}
        if kind == "run_code":
            return await self.run_code(str(request["code"]), float(request.get("timeout_s", 10.0)))
        raise ValueError(f"unknown rpc request kind {kind!r}")


class DirectLLM(HandleBase):
    """Operators' handle in this process (trusted code: templates, benchmarks, operator tests)."""

    def __init__(self, context: CallContext, family: str, *, public_tests: Sequence[str] = (),
                 entry_point: str | None = None):
        from spogw.workflows.families import load_family

        super().__init__(family, load_family(family).prompts, public_tests, entry_point)
        self.context = context
        self.clock = WaitClock()  # the workflow's wall limit does not count its executor calls and program runs

    async def ask(self, prompt: str) -> str:
        self.clock.begin()
        try:
            result = await self.context.chat([{"role": "user", "content": prompt}])
        finally:
            self.clock.end()
        if not result.ok:
            raise ExecutorCallError(result.error)
        return result.text

    async def run_code(self, code: str, *, timeout_s: float = 10.0) -> dict:
        self.clock.begin()
        try:
            return await self.context.run_code(code, timeout_s)
        finally:
            self.clock.end()


# -- the parent side --------------------------------------------------------------------------------


def problem_inputs(problem: dict, needs_entry_point: bool) -> tuple[str, str | None, list[str]]:
    """(question, entry point, public tests) from a benchmark record dict (``Record.to_dict()``).

    ``question`` falls back to ``problem`` / ``prompt`` so AFlow-format rows work too."""
    question = next((problem[k] for k in ("question", "problem", "prompt") if problem.get(k)), None)
    if question is None:
        raise ValueError(f"problem {problem.get('id', '?')!r} has no `question` field")
    entry_point = problem.get("entry_point") if needs_entry_point else None
    if needs_entry_point and not entry_point:
        raise ValueError(f"problem {problem.get('id', '?')!r} of the code family has no `entry_point`")
    return str(question), entry_point, list(problem.get("public_tests") or [])


async def run_workflow(code: str, problem: dict, family: str, executor: Executor, *, limits=None,
                       run_index: int = 0, temperature: float = 0.0, max_tokens: int = 1024,
                       code_runner: CodeRunner | None = None, sandbox: bool = True, max_calls: int = 64,
                       max_code_runs: int = 32, entry_pool=None, max_wait_s: float = MAX_WAIT_S) -> WorkflowResult:
    """Validate and run one generated workflow on one problem; every outcome is a :class:`WorkflowResult`.

    ``max_calls`` / ``max_code_runs`` cap one run's executor calls and program runs (see :class:`CallContext`).
    ``entry_pool``: a :func:`workflow_pool` to run the workflow in (else a one-shot sandbox). ``limits.wall_s``
    bounds the workflow's own time: up to ``max_wait_s`` of its executor calls and program runs is not counted.
    ``sandbox=False`` runs the workflow class in this process (for trusted, hand-written workflows:
    templates and benchmarks); the programs its operators write still run in the sandbox.
    """
    from spogw.workflows.families import load_family
    from spogw.workflows.parsing import InvalidWorkflow, parse_workflow

    start = time.perf_counter()
    try:
        parsed = parse_workflow(code, family=family)
    except InvalidWorkflow as exc:
        return WorkflowResult(None, "invalid", exc.reason, duration_s=time.perf_counter() - start)
    spec = load_family(family)
    question, entry_point, public_tests = problem_inputs(problem, spec.needs_entry_point)
    context = CallContext(executor, run_index=run_index, temperature=temperature, max_tokens=max_tokens,
                          code_runner=code_runner, max_calls=max_calls, max_code_runs=max_code_runs)
    limits = limits or default_workflow_limits()
    if sandbox:
        outcome = await _run_sandboxed(parsed.code, spec, question, entry_point, public_tests, context, limits,
                                       entry_pool, max_wait_s)
    else:
        llm = DirectLLM(context, family, public_tests=public_tests, entry_point=entry_point)
        try:
            outcome = await _within(call_workflow(parsed.code, spec.offered, llm, question, entry_point),
                                    limits.wall_s, llm.clock, max_wait_s)
        except asyncio.TimeoutError:
            waited = min(llm.clock.stood_s(), max_wait_s)
            outcome = {"status": "timeout", "warnings": llm.warnings,
                       "reason": f"workflow exceeded {limits.wall_s:g} s (not counting {waited:.1f} s waiting on the "
                                 "executor)"}
    status, reason = outcome["status"], outcome.get("reason", "")
    if context.over_budget:
        status, reason = "error", context.over_budget
    elif context.usage.failed_calls and status != "executor_error":
        status, reason = "executor_error", f"{context.usage.errors[0]} (workflow outcome: {status} {reason})".strip()
    return WorkflowResult(outcome.get("output") if status == "ok" else None, status, reason, context.usage,
                          time.perf_counter() - start, list(outcome.get("warnings") or []), list(parsed.operators_used))


async def _within(coro, wall_s: float, clock, max_wait_s: float) -> dict:
    """``coro``'s result, or ``asyncio.TimeoutError`` once it has run ``wall_s`` seconds of its own: up to
    ``max_wait_s`` of the time ``clock`` stood still (its executor calls and program runs) is not counted."""
    task = asyncio.ensure_future(coro)
    start = time.monotonic()
    try:
        while not task.done():
            left = start + wall_s + min(clock.stood_s(), max_wait_s) - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait({task}, timeout=min(left, 5.0))
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _run_sandboxed(code, spec, question, entry_point, public_tests, context: CallContext, limits,
                         entry_pool=None, max_wait_s: float = MAX_WAIT_S) -> dict:
    from spogw.runtime.sandbox_rpc import run_entry

    payload = {"code": code, "family": spec.name, "offered": list(spec.offered), "prompts": spec.prompts,
               "question": question, "entry_point": entry_point, "public_tests": public_tests}
    if entry_pool is not None:
        res = await entry_pool.arun_entry(ENTRY, payload, handler=context.handle, limits=limits, max_wait_s=max_wait_s)
    else:
        res = await run_entry(ENTRY, payload, handler=context.handle, limits=limits, max_wait_s=max_wait_s)
    if res.status == "ok" and isinstance(res.value, dict) and res.value.get("status") in STATUSES:
        return res.value
    if res.status == "ok":
        return {"status": "error", "reason": f"sandboxed entry returned {type(res.value).__name__}, not an outcome"}
    if res.status == "timeout":
        return {"status": "timeout", "reason": res.reason}
    if res.status == "sandbox_error":
        return {"status": "sandbox_error", "reason": res.reason}
    tail = res.stderr.strip().splitlines()[-1:] if res.stderr else []
    return {"status": "error", "reason": f"{res.status}: {res.reason}" + (f" ({tail[0][:200]})" if tail else "")}


@dataclass
class WorkflowJob:
    code: str
    problem: dict
    family: str
    run_index: int = 0


async def run_many(jobs: Sequence[WorkflowJob], executor: Executor, *, concurrency: int = 16,
                   on_progress: Callable[[int, int, WorkflowResult], None] | None = None,
                   **run_kwargs: Any) -> tuple[list[WorkflowResult], Usage]:
    """Run every job, at most ``concurrency`` at a time; results in job order, plus the stage's total usage.

    A job that fails in any way, even in the runner itself, yields a result with its reason; the others go on.
    """
    if concurrency < 1:
        raise ValueError(f"`concurrency` must be >= 1, got {concurrency}")
    limit = asyncio.Semaphore(concurrency)
    results: list[WorkflowResult | None] = [None] * len(jobs)
    done = 0

    async def one(i: int, job: WorkflowJob) -> None:
        nonlocal done
        async with limit:
            start = time.perf_counter()
            try:
                result = await run_workflow(job.code, job.problem, job.family, executor, run_index=job.run_index,
                                            **run_kwargs)
            except Exception as exc:  # the runner's own failure is still this job's recorded outcome
                result = WorkflowResult(None, "error", f"runner: {type(exc).__name__}: {exc}",
                                        duration_s=time.perf_counter() - start)
        results[i] = result
        done += 1
        if on_progress is not None:
            try:
                on_progress(done, len(jobs), result)
            except Exception:  # a broken progress bar must not lose results
                logging.getLogger(__name__).exception("on_progress callback failed")

    await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    total = Usage()
    for r in results:
        total.merge(r.usage)
    return results, total  # type: ignore[return-value]
