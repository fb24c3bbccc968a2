"""The workflow runner: generated workflows in the real sandbox, executor calls over RPC to the real
loopback OpenAI-compatible stub, failures recorded with their cause, nothing lost, warm cache free."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubConfig, operator_responder

from spogw.runtime.cache import CachedExecutor
from spogw.runtime.executor import OpenAIExecutor
from spogw.runtime.runner import WorkflowJob, WorkflowResult, run_many, run_workflow
from spogw.runtime.sandbox import SandboxLimits
from spogw.workflows.families import FAMILIES, load_family

pytest.importorskip("openai")
ADD = "def add(a, b):\n    return a + b"
RESPONDER = partial(operator_responder, solutions={"add": ADD})


def problem(family: str) -> dict:
    if family == "code":
        return {"id": "t/add", "question": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
                "public_tests": ["assert candidate(1, 2) == 3"], "answer": "SECRET-GOLD", "tests": "SECRET"}
    return {"id": f"t/{family}", "question": "What is 1 + 1?", "answer": "SECRET-GOLD"}


def executor(stub: OpenAIStub, **kw) -> OpenAIExecutor:
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout_s", 5.0)
    return OpenAIExecutor(stub.base_url, "stub", api_key_env="SPOGW_TEST_NO_KEY", price_in_per_m=1.0,
                          price_out_per_m=2.0, **kw)


def run(stub_or_executor, code: str, family: str = "math", **kw):
    ex = stub_or_executor if not isinstance(stub_or_executor, OpenAIStub) else executor(stub_or_executor)

    async def go():
        try:
            return await run_workflow(code, problem(family), family, ex, **kw)
        finally:
            await ex.aclose()

    return asyncio.run(go())


def workflow(body: str, *, ops: str = "Custom", args: str = "problem") -> str:
    inits = "\n".join(f"        self.{o.lower()} = operator.{o}(llm)" for o in ops.split(","))
    lines = "\n".join("        " + ln for ln in body.strip("\n").splitlines())
    return f"class Workflow:\n    def __init__(self, llm):\n{inits}\n\n    async def __call__(self, {args}):\n{lines}\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_template_runs_in_the_sandbox(family):
    expected = {"math": "Step by step: 1 + 1 = 2. The answer is \\boxed{2}.", "qa": "2", "code": ADD}
    with OpenAIStub(StubConfig(responder=RESPONDER)) as stub:
        result = run(stub, load_family(family).template, family)
        assert result.status == "ok", result.reason
        assert result.output == expected[family]
        assert result.usage.calls == stub.requests > 0
        assert result.usage.prompt_tokens > 0 and result.usage.cost_usd > 0
        assert result.operators_used == sorted(result.operators_used) and result.duration_s > 0
        assert WorkflowResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_the_child_has_no_network_but_its_executor_calls_get_through():
    with OpenAIStub(StubConfig(responder=RESPONDER)) as stub:
        code = workflow(f"""
import asyncio
r = await self.custom(input=problem, instruction="Solve.")
try:
    await asyncio.wait_for(asyncio.open_connection("127.0.0.1", {stub.port}), 2)
    return "reached the stub directly"
except Exception as exc:
    return r["response"] + " | " + type(exc).__name__
""")
        result = run(stub, code)
        assert stub.requests == 1  # the RPC-forwarded call; the direct connection never arrived
    assert result.status == "ok", result.reason
    assert result.output.startswith("Step by step") and "reached" not in result.output


def test_invalid_workflow_is_recorded_and_nothing_runs():
    with OpenAIStub() as stub:
        result = run(stub, "import os\n" + load_family("math").template)
        assert stub.requests == 0
    assert result.status == "invalid" and "import of `os`" in result.reason and result.output is None


def test_a_raising_workflow_is_an_error_with_its_line():
    code = workflow('r = await self.custom(input=problem, instruction="Solve.")\nreturn r["no_such_key"]')
    with OpenAIStub(StubConfig(responder=RESPONDER)) as stub:
        result = run(stub, code)
    assert result.status == "error" and "KeyError" in result.reason and "workflow line 7" in result.reason
    assert result.usage.calls == 1  # the call it made is still accounted


def test_a_hanging_workflow_times_out():
    code = workflow("while True:\n    pass")
    with OpenAIStub() as stub:
        result = run(stub, code, limits=SandboxLimits(wall_s=1.5, cpu_s=1.0))
    assert result.status == "timeout" and result.output is None


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "in_process"])
def test_a_slow_executor_is_not_the_workflows_timeout(sandbox):
    """Four calls to an executor that takes 0.6 s each outlast a 1.5 s wall limit: a queue or a busy machine is not
    the workflow's fault (its clock stands still while a call is answered). With max_wait_s=0 it counts, as before."""
    code = workflow("out = ''\nfor i in range(4):\n"
                    "    out = (await self.custom(input=problem + str(i), instruction='Solve.'))['response']\n"
                    "return out")
    limits = SandboxLimits(wall_s=1.5, cpu_s=1.0)
    with OpenAIStub(StubConfig(responder=RESPONDER, latency=0.6)) as stub:
        result = run(stub, code, limits=limits, sandbox=sandbox)
        assert result.status == "ok", result.reason
        assert result.usage.calls == 4 and result.duration_s > 2.4
        result = run(stub, code, limits=limits, sandbox=sandbox, max_wait_s=0.0)
    assert result.status == "timeout"


def test_executor_failure_wins_even_when_the_workflow_swallows_it():
    code = workflow("""
try:
    r = await self.custom(input=problem, instruction="Solve. #fail:500*9")
    return r["response"]
except Exception:
    return "swallowed"
""")
    with OpenAIStub(StubConfig(responder=RESPONDER)) as stub:
        result = run(executor(stub, max_retries=1), code)
        assert stub.requests == 2
    assert result.status == "executor_error" and "HTTP 500" in result.reason and result.output is None
    assert result.usage.failed_calls == 1


def test_a_runaway_loop_is_stopped_by_the_call_budget_even_if_it_swallows_the_error():
    code = workflow("""
n = 0
while True:
    try:
        await self.custom(input=problem, instruction=f"Attempt {n}.")
    except Exception:
        n += 1
        if n > 3:
            return "gave up politely"
    n += 1
""")
    with OpenAIStub(StubConfig(responder=RESPONDER)) as stub:
        result = run(stub, code, max_calls=5)
        assert stub.requests == 5
    assert result.status == "error" and "budget of 5 executor calls" in result.reason


def test_concurrent_operator_calls_inside_one_workflow_and_repeats_stay_distinct(tmp_path):
    code = workflow("""
import asyncio
calls = [self.custom(input=problem, instruction="Solve.") for _ in range(3)]
answers = [r["response"] for r in await asyncio.gather(*calls)]
best = await self.scensemble(solutions=answers, problem=problem)
return best["response"]
""", ops="Custom,ScEnsemble")
    with OpenAIStub(StubConfig(responder=RESPONDER, latency=0.3)) as stub:
        cached = CachedExecutor(executor(stub), tmp_path / "c.sqlite")
        result = run(cached, code)
        assert result.status == "ok", result.reason
        # three identical prompts are three samples (repeat index in the cache key), asked concurrently
        assert stub.requests == 4 and stub.stats.max_in_flight == 3 and len(cached.cache) == 4
        stub.reset_counts()
        again = run(CachedExecutor(executor(stub), tmp_path / "c.sqlite"), code)
        assert stub.requests == 0 and again.output == result.output and again.usage.cached_calls == 4


# kind -> (workflow, directive in the question, expected status, expected words in the reason)
MIXED = {
    "ok": ("template", "", "ok", ""),
    "invalid": ("class Workflow:\n    pass\n", "", "invalid", "__call__"),
    "error": ("raises", "", "error", "KeyError"),
    "429 then ok": ("template", " #fail:429*1", "ok", ""),
    "500 forever": ("template", " #fail:500*99", "executor_error", "HTTP 500"),
    "hang": ("template", " #hang*99", "executor_error", "Timeout"),
    "malformed": ("template", " #malformed*99", "executor_error", "malformed reply body"),
}


def mixed_jobs(n: int) -> tuple[list[WorkflowJob], list[str]]:
    codes = {"template": load_family("math").template,
             "raises": workflow('return (await self.custom(input=problem, instruction="x"))["nope"]')}
    jobs, kinds = [], []
    for i in range(n):
        kind = list(MIXED)[i % len(MIXED)]
        code, directive, _, _ = MIXED[kind]
        jobs.append(WorkflowJob(codes.get(code, code), {"id": str(i), "question": f"What is {i} + 1?{directive}"},
                                "math", run_index=i % 3))
        kinds.append(kind)
    return jobs, kinds


def test_run_many_loses_nothing_and_a_warm_cache_rerun_makes_zero_requests(tmp_path):
    jobs, kinds = mixed_jobs(21)
    progress: list[int] = []
    with OpenAIStub(StubConfig(responder=RESPONDER, latency=0.05)) as stub:

        async def stage(ex):
            try:
                return await run_many(jobs, ex, concurrency=8, on_progress=lambda d, t, r: progress.append(d))
            finally:
                await ex.aclose()

        def cached():
            # 1.5 s: a hanging call must time out, but a 0.05 s reply on busy cores must not (a malformed
            # reply that timed out would be retried and asked twice)
            return CachedExecutor(executor(stub, max_retries=1, timeout_s=1.5), tmp_path / "s.sqlite")

        cold, total = asyncio.run(stage(cached()))
        assert [r.status for r in cold] == [MIXED[k][2] for k in kinds]
        assert progress == list(range(1, 22))
        for r, k in zip(cold, kinds, strict=True):
            assert MIXED[k][3] in r.reason, (k, r.reason)
            assert (r.output or "").startswith("Step by step") == (r.status == "ok")
        assert total.calls == sum(r.usage.calls for r in cold)
        assert total.cost_usd == pytest.approx(sum(r.usage.cost_usd for r in cold)) and total.cost_usd > 0
        assert total.failed_calls == 9

        stub.reset_counts()
        warm_ex = cached()
        warm, _ = asyncio.run(stage(warm_ex))
        # successes are free; only the permanent executor failures are asked again (failures are never cached):
        # 500 and hang with one retry each (2 attempts), malformed once (not retried)
        assert stub.requests == 3 * (2 + 2 + 1)
        assert [r.status for r in warm] == [r.status for r in cold]
        assert [r.output for r in warm] == [r.output for r in cold]
        assert warm_ex.misses == 9 and warm_ex.hits == 9  # ok, error and 429-then-ok jobs: one call each


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from spogw.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_embedded_local_executor_batches_calls_from_concurrent_sandboxed_workflows(tiny_model, tmp_path):
    from spogw.runtime.executor import LocalExecutor

    local = LocalExecutor(tiny_model, max_batch=8, gather_ms=200)
    cached = CachedExecutor(local, tmp_path / "local.sqlite")
    template = load_family("qa").template  # two dependent calls per workflow: AnswerGenerate, then Format
    jobs = [WorkflowJob(template, {"id": str(i), "question": f"Who wrote book number {i}?"}, "qa") for i in range(6)]

    async def stage():
        try:
            return await run_many(jobs, cached, concurrency=6, max_tokens=8)
        finally:
            await local.aclose()

    results, total = asyncio.run(stage())
    assert [r.status for r in results] == ["ok"] * 6, [r.reason for r in results]
    assert total.calls == 12 and total.completion_tokens > 0 and total.cost_usd == 0
    # twelve calls from six separate sandboxed children, answered by far fewer batched generate calls
    assert local.generate_calls < 12 and max(local.batch_sizes) > 1
    assert sum(local.batch_sizes) == 12


@pytest.mark.slow
@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "aflow").is_dir(),
                    reason="needs ../shared/data beside the checkout")
def test_embedded_smollm2_executor_runs_each_family_template_on_real_problems(tmp_path):
    """The CPU/CI default end to end: real SmolLM2-135M-Instruct, real benchmark rows, sandboxed templates."""
    from spogw.runtime.executor import LocalExecutor

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "aflow"
    math_row = json.loads((data / "math_validate.jsonl").read_text().splitlines()[0])
    qa_row = json.loads((data / "hotpotqa_validate.jsonl").read_text().splitlines()[0])
    code_row = json.loads((data / "humaneval_validate.jsonl").read_text().splitlines()[0])
    problems = {
        "math": {"id": "math/0", "question": math_row["problem"]},
        "qa": {"id": "hotpotqa/0", "question": qa_row["question"]},
        "code": {"id": code_row["task_id"], "question": code_row["prompt"], "entry_point": code_row["entry_point"],
                 "public_tests": []},
    }
    local = LocalExecutor("embedded", max_batch=8)
    jobs = [WorkflowJob(load_family(f).template, problems[f], f) for f in FAMILIES]

    async def stage():
        try:
            return await run_many(jobs, CachedExecutor(local, tmp_path / "c.sqlite"), concurrency=3, max_tokens=48)
        finally:
            await local.aclose()

    results, total = asyncio.run(stage())
    assert [r.status for r in results] == ["ok"] * 3, [r.reason for r in results]
    assert all(r.output for r in results) and total.completion_tokens > 0
    assert local.generate_calls < total.calls  # the three families' first calls shared a batch
