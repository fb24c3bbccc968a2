"""Workflow families (data), parsing/validation of generated text, and the operators end to end.

Operators run in-process against the real loopback OpenAI-compatible stub with canned replies; the
programs they write (Programmer, Test) run in the real sandbox.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubConfig, operator_responder

import spogw.workflows.operators as ops  # ops.Test: a `Test*` name in a test module would be collected
from spogw.runtime.executor import OpenAIExecutor
from spogw.runtime.runner import CallContext, DirectLLM, run_workflow
from spogw.workflows.families import ALL_OPERATORS, FAMILIES, generator_prompt, load_family
from spogw.workflows.operators import (
    AnswerGenerate,
    Custom,
    CustomCodeGenerate,
    Format,
    Programmer,
    Review,
    Revise,
    ScEnsemble,
    extract_code,
    extract_tag,
    parse_bool,
)
from spogw.workflows.parsing import ALLOWED_IMPORTS, InvalidWorkflow, parse_workflow

pytest.importorskip("openai")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "aflow"


# -- families as data ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_data_and_template_are_valid(family):
    spec = load_family(family)
    assert set(spec.offered) <= set(ALL_OPERATORS) and len(spec.offered) == len(set(spec.offered))
    parsed = parse_workflow(spec.template, family=family)
    assert parsed.class_name == "Workflow" and set(parsed.operators_used) <= set(spec.offered)
    prompt = generator_prompt(family, "QUESTION-{with braces}-123")
    assert "QUESTION-{with braces}-123" in prompt and spec.template.strip().splitlines()[0] in prompt
    assert all(f"operator.{name}(llm)" in prompt for name in spec.offered)
    assert spec.needs_entry_point == (family == "code")


def test_every_operator_is_offered_somewhere_and_has_a_prompt():
    offered = {name for family in FAMILIES for name in load_family(family).offered}
    assert offered == set(ALL_OPERATORS)
    for family in FAMILIES:
        assert set(load_family(family).prompts) >= set(ALL_OPERATORS)


def test_family_prompt_override_applies():
    assert "boxed" in load_family("math").prompts["Format"]["prompt"]
    assert "boxed" not in load_family("qa").prompts["Format"]["prompt"]


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown workflow family 'chess'"):
        load_family("chess")


# -- parsing and validation ----------------------------------------------------------------------

GOOD = """class Workflow:
    def __init__(self, llm) -> None:
        self.custom = operator.Custom(llm)
        self.sc_ensemble = operator.ScEnsemble(llm)

    async def __call__(self, problem: str):
        solutions = [(await self.custom(input=problem, instruction="Solve."))["response"] for _ in range(3)]
        best = await self.sc_ensemble(solutions=solutions, problem=problem)
        return best["response"]
"""


@pytest.mark.parametrize("wrap", [
    lambda c: c,
    lambda c: f"Here is my workflow:\n<graph>\n{c}\n</graph>\nDone.",
    lambda c: f"Sure!\n```python\n{c}```\nThis ensembles three answers.",
    lambda c: f"<graph>\n```python\n{c}```\n</graph>",
    lambda c: f"```python\nimport math\n```\nand the class:\n```python\n{c}```",
])
def test_valid_workflows_parse_in_every_wrapping(wrap):
    parsed = parse_workflow(wrap(GOOD), family="math")
    assert parsed.operators_used == ("Custom", "ScEnsemble")
    assert parsed.code.startswith("class Workflow:")


RET = 'return best["response"]'
OPS = "operator.ScEnsemble"

INVALID = {
    "prose": ("Sorry, I cannot help with that.", "no workflow code in the generated text"),
    "blank": ("<graph>\n</graph>", "no code"),
    "syntax": ("class Workflow:\n    async def __call__(self, problem)\n        return 1\n", "syntax error at line 2"),
    "no class": ("class Flow:\n    async def __call__(self, problem):\n        return 1\n", "no class `Workflow`"),
    "sync call": ("class Workflow:\n    def __call__(self, problem):\n        return 1\n", "must be `async def`"),
    "no call": ("class Workflow:\n    async def run(self, problem):\n        return 1\n", "has no `async def __call__"),
    "no problem": ("class Workflow:\n    async def __call__(self):\n        return 1\n", "must accept (self, problem)"),
    "await outside": ("class Workflow:\n    def __init__(self, llm):\n        await llm.x()\n"
                      "    async def __call__(self, problem):\n        return 1\n", "syntax error"),
    "not offered": (GOOD.replace(OPS, "operator.Test"), "operator `Test` is not offered for the math"),
    "unknown op": (GOOD.replace(OPS, "operator.MagicSolver"), "unknown operator `operator.MagicSolver`"),
    "bare not offered": (GOOD.replace(OPS, "Test"), "operator `Test` is not offered"),
    "import os": ("import os\n" + GOOD, "import of `os` is not allowed"),
    "from subprocess": ("from subprocess import run\n" + GOOD, "import of `subprocess` is not allowed"),
    "import operator": ("import operator\n" + GOOD, "do not import `operator`"),
    "exec": (GOOD.replace(RET, 'return eval("1")'), "`eval` is not allowed"),
    "open": (GOOD.replace(RET, 'return open("/etc/passwd").read()'), "`open` is not allowed"),
    "dunder": (GOOD.replace(RET, "return ().__class__.__bases__"), "attribute `__bases__` is not allowed"),
    "top-level call": (GOOD + "\nprint('hi')\n", "line 11: only imports, definitions and constants"),
    "init args": (GOOD.replace("def __init__(self, llm)", "def __init__(self, llm, config)"), "may require only"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_workflows_are_rejected_with_a_reason(name):
    text, reason = INVALID[name]
    with pytest.raises(InvalidWorkflow) as info:
        parse_workflow(text, family="math")
    assert reason in info.value.reason, info.value.reason


def test_code_family_needs_the_entry_point_parameter():
    code = GOOD.replace("operator.Custom", "operator.CustomCodeGenerate").replace("operator.ScEnsemble(llm)",
                                                                                    "operator.Test(llm)")
    with pytest.raises(InvalidWorkflow, match=r"must accept \(self, problem, entry_point\)"):
        parse_workflow(code, family="code")
    ok = code.replace("async def __call__(self, problem: str)", "async def __call__(self, problem, entry_point)")
    assert parse_workflow(ok, family="code").operators_used == ("CustomCodeGenerate", "Test")


def test_allowed_imports_pass():
    code = "import re\nimport math\nfrom typing import List\nfrom collections import Counter\n" + GOOD
    assert parse_workflow(code, family="math").operators_used == ("Custom", "ScEnsemble")
    assert "os" not in ALLOWED_IMPORTS and "asyncio" in ALLOWED_IMPORTS


# -- reply parsing helpers -----------------------------------------------------------------------


def test_reply_parsing_is_forgiving():
    assert extract_tag("<thought>a</thought><answer> 42 </answer>", "answer") == "42"
    assert extract_tag("<ANSWER>7</ANSWER>", "answer") == "7"
    assert extract_tag("<thought>x</thought><answer>unclosed 5", "answer") == "unclosed 5"
    assert extract_tag("<answer>a</answer> then <answer>b</answer>", "answer") == "b"
    assert extract_tag("no tags", "answer") is None
    two = "```python\ndef helper():\n    pass\n```\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(two, "f").startswith("def f(")
    assert extract_code("def g():\n    return 1", "g") == "def g():\n    return 1"
    assert extract_code("just words, no code") is None
    assert extract_code("```\nx = 1\ndef h(): pass\n```") == "x = 1\ndef h(): pass"
    assert extract_code("```python\ndef f():\n    return 1\n") == "def f():\n    return 1"  # unclosed fence
    assert parse_bool("True") is True and parse_bool(" false.") is False and parse_bool("maybe") is None


# -- operators end to end against the stub ------------------------------------------------------


def handle(stub: OpenAIStub, family: str, **kw) -> tuple[DirectLLM, OpenAIExecutor]:
    ex = OpenAIExecutor(stub.base_url, "stub", api_key_env="SPOGW_TEST_NO_KEY", max_retries=2, timeout_s=5)
    return DirectLLM(CallContext(ex), family, **kw), ex


def test_text_operators_parse_their_replies():
    with OpenAIStub(StubConfig(responder=operator_responder)) as stub:
        llm, ex = handle(stub, "math")

        async def go():
            out = {
                "custom": await Custom(llm)(input="1+1?", instruction="Solve."),
                "answer": await AnswerGenerate(llm)(input="1+1?"),
                "ensemble": await ScEnsemble(llm)(solutions=["1", "2", "2"], problem="1+1?"),
                "review": await Review(llm)(problem="1+1?", solution="3"),
                "revise": await Revise(llm)(problem="1+1?", solution="3", feedback="wrong"),
                "format": await Format(llm)(problem="1+1?", solution="so it is \\boxed{2}"),
            }
            await ex.aclose()
            return out

        out = asyncio.run(go())
    assert out["custom"] == {"response": "Step by step: 1 + 1 = 2. The answer is \\boxed{2}."}
    assert out["answer"] == {"thought": "One plus one is two.", "answer": "2"}
    assert out["ensemble"] == {"response": "2"}
    assert out["review"] == {"review_result": False, "feedback": "Recheck the final sum."}
    assert out["revise"] == {"solution": "The revised answer is \\boxed{2}."}
    assert out["format"] == {"solution": "2"}
    assert llm.context.usage.calls == 6 and not llm.warnings


def test_unparsable_replies_fall_back_and_are_recorded():
    with OpenAIStub(StubConfig(responder=lambda m: "I am not sure what you mean.")) as stub:
        llm, ex = handle(stub, "math")

        async def go():
            out = (await ScEnsemble(llm)(solutions=["x", "y", "y"], problem="p"),
                   await Review(llm)(problem="p", solution="s"),
                   await AnswerGenerate(llm)(input="p"),
                   await CustomCodeGenerate(llm)(problem="p", entry_point="f", instruction="Go."),
                   await Programmer(llm)(problem="p"))
            await ex.aclose()
            return out

        ens, rev, ans, code, prog = asyncio.run(go())
    assert ens == {"response": "y"}  # plain vote when no letter can be read
    assert rev["review_result"] is True
    assert ans["answer"] == "I am not sure what you mean."
    assert code == {"response": "I am not sure what you mean."}
    assert prog == {"code": "", "output": "No code generated"}
    assert len(llm.warnings) == 5 and all(":" in w for w in llm.warnings)
    assert llm.warnings[0].startswith("ScEnsemble: no valid solution letter")


def test_programmer_runs_its_code_in_the_sandbox():
    with OpenAIStub(StubConfig(responder=operator_responder)) as stub:
        llm, ex = handle(stub, "math")

        async def go():
            out = await Programmer(llm)(problem="What is 1 + 1?", analysis="add")
            await ex.aclose()
            return out

        out = asyncio.run(go())
    assert out == {"code": "def solve():\n    return 1 + 1", "output": "2"}
    assert llm.context.code_runs == 1


def test_programmer_retries_with_the_error_as_feedback():
    replies = iter(["```python\ndef solve():\n    return 1 / 0\n```", "```python\ndef solve():\n    return 7\n```"])
    seen: list[str] = []

    def responder(messages):
        seen.append(messages[-1]["content"])
        return next(replies)

    with OpenAIStub(StubConfig(responder=responder)) as stub:
        llm, ex = handle(stub, "math")

        async def go():
            out = await Programmer(llm)(problem="p")
            await ex.aclose()
            return out

        out = asyncio.run(go())
    assert out["output"] == "7"
    assert "ZeroDivisionError" in seen[1] and "failed" in seen[1]


def public_tests(entry_point: str) -> list[str]:
    for line in (DATA / "humaneval_public_test.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["entry_point"] == entry_point:
            return row["test"]
    raise LookupError(entry_point)


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data beside the checkout")
def test_code_operators_generate_test_and_repair_a_humaneval_problem():
    rows = [json.loads(x) for x in (DATA / "humaneval_validate.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["entry_point"] == "can_arrange")
    ep = row["entry_point"]
    correct = row["prompt"] + row["canonical_solution"]
    wrong = f"def {ep}(arr):\n    return 0"
    responder = partial(operator_responder, solutions={ep: correct, f"{ep}:first": wrong})
    with OpenAIStub(StubConfig(responder=responder)) as stub:
        llm, ex = handle(stub, "code", public_tests=public_tests(ep), entry_point=ep)

        async def go():
            draft = await CustomCodeGenerate(llm)(problem=row["prompt"], entry_point=ep, instruction="Think.")
            tested = await ops.Test(llm)(problem=row["prompt"], solution=draft["response"], entry_point=ep)
            await ex.aclose()
            return draft, tested

        draft, tested = asyncio.run(go())
    assert draft["response"] == wrong
    assert tested["result"] is True and tested["solution"] == correct.strip("\n")
    assert llm.context.usage.calls == 2 and llm.context.code_runs == 2  # fail, reflect, pass


def template_problem(family: str) -> dict:
    if family == "code":
        return {"id": "t/add", "question": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
                "public_tests": ["assert candidate(1, 2) == 3", "assert candidate(-1, 1) == 0"]}
    return {"id": f"t/{family}", "question": "What is 1 + 1?"}


EXPECTED = {"math": "Step by step: 1 + 1 = 2. The answer is \\boxed{2}.", "qa": "2",
            "code": "def add(a, b):\n    return a + b"}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_template_runs_end_to_end_in_process(family):
    responder = partial(operator_responder, solutions={"add": "def add(a, b):\n    return a + b"})
    with OpenAIStub(StubConfig(responder=responder)) as stub:
        ex = OpenAIExecutor(stub.base_url, "stub", api_key_env="SPOGW_TEST_NO_KEY", price_in_per_m=1.0)

        async def go():
            out = await run_workflow(load_family(family).template, template_problem(family), family, ex,
                                     sandbox=False)
            await ex.aclose()
            return out

        result = asyncio.run(go())
        assert result.status == "ok", result.reason
        assert result.output == EXPECTED[family]
        assert result.usage.calls == stub.requests > 0 and result.usage.cost_usd > 0
        assert result.warnings == []
