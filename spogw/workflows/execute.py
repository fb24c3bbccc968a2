"""Executing a validated workflow: in the sandboxed child, or in-process for trusted workflows.

This module is the child's entry point (``child_main``). It imports only the standard library and
``spogw.workflows.operators``: the child starts fast and holds no executor, cache or API code. The
prompts arrive in the payload, and every executor call or program run goes back to the parent
through ``rpc`` (see ``spogw.runtime.runner``).
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Awaitable, Sequence
from types import SimpleNamespace
from typing import Any

from spogw.workflows.operators import OPERATORS, ExecutorCallError


class HandleBase:
    """What operators see (``spogw.workflows.operators.OperatorLLM``), minus how calls travel."""

    def __init__(self, family: str, prompts: dict, public_tests: Sequence[str] = (), entry_point: str | None = None):
        self.family, self.prompts = family, prompts
        self._tests, self._entry_point = list(public_tests), entry_point
        self.warnings: list[str] = []

    def public_tests(self, entry_point: str) -> list[str]:
        # Public tests belong to the problem's own function; a workflow asking about another name gets none.
        return list(self._tests) if entry_point == self._entry_point or self._entry_point is None else []

    def warn(self, message: str) -> None:
        self.warnings.append(message)




class RpcLLM(HandleBase):
    """Operators' handle inside the sandboxed child: every call is an RPC request to the parent."""

    def __init__(self, rpc, family: str, prompts: dict, public_tests: Sequence[str] = (),
                 entry_point: str | None = None):
        super().__init__(family, prompts, public_tests, entry_point)
        self.rpc = rpc

    async def ask(self, prompt: str) -> str:
        reply = await self.rpc.acall({"kind": "chat", "messages": [{"role": "user", "content": prompt}]})
        if "error" in reply:
            raise ExecutorCallError(reply["error"])
        return reply["text"]

    async def run_code(self, code: str, *, timeout_s: float = 10.0) -> dict:
        return await self.rpc.acall({"kind": "run_code", "code": code, "timeout_s": timeout_s})


# -- executing a validated workflow (in the child, or in-process) ----------------------------------


def instantiate(code: str, offered: Sequence[str], llm) -> Any:
    """Execute the workflow module with ``operator`` bound to the offered operators; return ``Workflow(llm)``."""
    ops = {name: OPERATORS[name] for name in offered}
    namespace: dict[str, Any] = {"__name__": "spogw_workflow", "operator": SimpleNamespace(**ops), **ops}
    exec(_compiled(code), namespace)
    return namespace["Workflow"](llm)


@functools.lru_cache(maxsize=1024)
def _compiled(code: str):
    return compile(code, "<workflow>", "exec")


def normalize_output(value: Any) -> str:
    """The workflow's answer as text: AFlow workflows return ``(answer, cost)``, some return operator dicts."""
    if isinstance(value, tuple) and value:
        value = value[0]
    if isinstance(value, dict):
        for key in ("response", "answer", "solution", "code", "output"):
            if key in value:
                value = value[key]
                break
    return "" if value is None else str(value)


async def call_workflow(code: str, offered: Sequence[str], llm, question: str, entry_point: str | None) -> dict:
    """Run one workflow and describe the outcome as a JSON-ready dict (never raises for the workflow's faults)."""
    try:
        workflow = instantiate(code, offered, llm)
        value = await (workflow(question, entry_point) if entry_point is not None else workflow(question))
        return {"status": "ok", "output": normalize_output(value), "warnings": llm.warnings}
    except ExecutorCallError as exc:
        return {"status": "executor_error", "reason": str(exc), "warnings": llm.warnings}
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f" (workflow line {f.lineno})" for f in reversed(tb) if f.filename == "<workflow>"), "")
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}{where}"[:1000], "warnings": llm.warnings}


def child_main(payload: dict, rpc) -> Awaitable[dict]:
    """The sandboxed entry point (``run_entry`` awaits the coroutine)."""
    llm = RpcLLM(rpc, payload["family"], payload["prompts"], payload.get("public_tests") or (),
                 payload.get("entry_point"))
    return call_workflow(payload["code"], payload["offered"], llm, payload["question"], payload.get("entry_point"))


