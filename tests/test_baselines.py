"""The six static baselines: valid workflows in every family, run end to end through the real runner and sandbox,
on the real loopback OpenAI stub (canned replies, so outputs and call counts are checkable) and on a tiny local
model (gibberish replies: statuses and tokens are what can be checked)."""

from __future__ import annotations

import asyncio
import re

import pytest
from openai_stub import OpenAIStub, StubConfig

from spogw.baselines import BASELINES, baseline_workflow, canonical_baseline
from spogw.runtime.executor import LocalExecutor, OpenAIExecutor
from spogw.runtime.runner import WorkflowJob, run_many, run_workflow
from spogw.workflows.families import FAMILIES
from spogw.workflows.parsing import parse_workflow

ADD = "def add(a, b):\n    return a + b"
PROBLEMS = {
    "code": {"id": "t/add", "question": 'def add(a, b):\n    """Return a + b."""\n', "entry_point": "add",
             "public_tests": ["assert candidate(1, 2) == 3"]},
    "math": {"id": "t/math", "question": "What is 1 + 1?"},
    "qa": {"id": "t/qa", "question": "Passage: Ann has two cats.\nQuestion: How many cats does Ann have?\nAnswer:"},
}


def responder(messages: list[dict]) -> str:
    """Canned replies per operator prompt; a correct answer to every problem above, in the form each asks for."""
    prompt = str(messages[-1]["content"])
    if "<solution_letter>" in prompt:
        letters = re.findall(r"^([A-Z]): $", prompt, re.M)
        return f"<thought>All agree.</thought><solution_letter>{letters[-1]}</solution_letter>"
    if "<review_result>" in prompt:
        return "<review_result>false</review_result><feedback>Check it again.</feedback>"
    if "reviewed as incorrect" in prompt:
        body = f"```python\n{ADD}\n```" if "def add" in prompt else "The answer is \\boxed{2}."
        return f"<solution>{body}</solution>"
    if "extract a short" in prompt:
        return "<solution>2</solution>"
    if "defines the function `add`" in prompt:
        return f"```python\n{ADD}\n```"
    if "<answer>" in prompt:
        return "<thought>Two cats.</thought><answer>2</answer>"
    return "1 + 1 = 2, so the answer is \\boxed{2}."


# calls each baseline makes with the responder above (Self-Refine: the review always asks for a revision)
EXPECTED_CALLS = {
    "io": {"code": 1, "math": 1, "qa": 1},
    "cot": {"code": 1, "math": 1, "qa": 1},
    "cot_sc": {"code": 6, "math": 6, "qa": 7},  # 5 samples + ensemble (+ format)
    "medprompt": {"code": 3, "math": 3, "qa": 4},  # 3 identical responses: the vote is skipped (+ format)
    "multipersona": {"code": 5, "math": 5, "qa": 6},  # 2 openings + 2 rebuttals + judge (+ format)
    "self_refine": {"code": 5, "math": 5, "qa": 6},  # answer + 2 x (review + revise) (+ format)
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_is_a_valid_workflow_with_the_familys_signature(method, family):
    parsed = parse_workflow(baseline_workflow(method, family), family=family)
    assert ("entry_point" in parsed.code.split("async def __call__")[1].splitlines()[0]) == (family == "code")
    if family == "qa" and method not in ("io", "cot"):
        assert "Format" in parsed.operators_used  # QA answers are shortened before F1


def test_names_are_forgiving_and_unknown_ones_are_listed():
    assert canonical_baseline("CoT SC") == canonical_baseline("cot-sc") == "cot_sc"
    with pytest.raises(ValueError, match="unknown baseline 'tot'.*io, cot, cot_sc"):
        canonical_baseline("tot")
    with pytest.raises(ValueError, match="unknown workflow family"):
        baseline_workflow("io", "vision")


def _executor(stub: OpenAIStub) -> OpenAIExecutor:
    return OpenAIExecutor(stub.base_url, "stub", api_key_env="SPOGW_TEST_NO_KEY", max_retries=1, timeout_s=10,
                          price_in_per_m=1.0, price_out_per_m=2.0)


def test_every_baseline_runs_end_to_end_in_the_sandbox_on_the_stub():
    jobs = [WorkflowJob(baseline_workflow(m, f), PROBLEMS[f], f) for m in BASELINES for f in FAMILIES]
    with OpenAIStub(StubConfig(responder=responder)) as stub:
        ex = _executor(stub)

        async def go():
            try:
                return await run_many(jobs, ex, concurrency=8)
            finally:
                await ex.aclose()

        results, usage = asyncio.run(go())
        assert usage.calls == stub.requests
    expected = {"code": ADD, "math": "\\boxed{2}", "qa": "2"}
    for job, res in zip(jobs, results, strict=True):
        method = next(m for m in BASELINES if baseline_workflow(m, job.family) == job.code)
        assert res.status == "ok", (method, job.family, res.reason)
        assert expected[job.family] in res.output, (method, job.family, res.output)
        assert res.usage.calls == EXPECTED_CALLS[method][job.family], (method, job.family)
        assert res.usage.prompt_tokens > 0 and res.usage.cost_usd > 0


def test_medprompt_votes_five_times_over_shuffled_candidates_when_they_differ():
    seen_orders = []

    def differing(messages):
        prompt = str(messages[-1]["content"])
        if "<solution_letter>" in prompt:
            # the candidates in the order shown; always vote for the one that says 7
            shown = re.findall(r"^[A-Z]: \n(.*?)$", prompt, re.M)
            seen_orders.append(tuple(shown))
            return f"<solution_letter>{chr(65 + shown.index(next(s for s in shown if '7' in s)))}</solution_letter>"
        for i, phrase in enumerate(("Let's think", "Break the problem", "explaining the reasoning")):
            if phrase in prompt:
                return f"Candidate {i}: \\boxed{{{5 + i}}}"
        return "\\boxed{0}"

    with OpenAIStub(StubConfig(responder=differing)) as stub:
        ex = _executor(stub)

        async def go():
            try:
                return await run_workflow(baseline_workflow("medprompt", "math"), PROBLEMS["math"], "math", ex)
            finally:
                await ex.aclose()

        res = asyncio.run(go())
    assert res.status == "ok", res.reason
    assert res.output == "Candidate 2: \\boxed{7}"
    assert res.usage.calls == 3 + 5
    assert len(seen_orders) == 5 and len(set(seen_orders)) > 1  # shuffled differently across votes


def test_every_baseline_runs_on_a_tiny_local_model(tiny_model):
    """Gibberish replies from a random 2-layer model: every baseline still completes, tokens are counted."""
    jobs = [WorkflowJob(baseline_workflow(m, f), PROBLEMS[f], f) for m in BASELINES for f in FAMILIES]
    ex = LocalExecutor(tiny_model, max_batch=8)

    async def go():
        try:
            return await run_many(jobs, ex, concurrency=18, max_tokens=8)
        finally:
            await ex.aclose()

    results, usage = asyncio.run(go())
    assert [r.status for r in results] == ["ok"] * len(jobs), [r.reason for r in results if not r.ok]
    assert all(r.usage.calls >= 1 and r.usage.completion_tokens > 0 for r in results)
    assert usage.calls >= len(jobs) and max(ex.batch_sizes) > 1  # concurrent workflows share batches
