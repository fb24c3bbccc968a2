"""The optional LLM judge, through the real OpenAI-compatible executor against the loopback stub server."""

from __future__ import annotations

import asyncio
import re

import pytest
from openai_stub import OpenAIStub, StubConfig

from spogw.benchmarks import Record
from spogw.benchmarks.judge import judge_messages, judge_output, judge_outputs, parse_verdict

pytest.importorskip("openai")


def referee(messages: list[dict]) -> str:
    """A judge that says Yes when the candidate contains the reference, verbatim; 'Maybe' for 'unsure'."""
    text = messages[-1]["content"]
    reference = re.search(r"Reference answer:\n(.*?)\n\n", text, re.S).group(1)
    candidate = re.search(r"Candidate answer:\n(.*?)\n\nEquivalent\?$", text, re.S).group(1)
    if "unsure" in candidate:
        return "Maybe, hard to say."
    alternatives = reference.removeprefix("any of: ").split("; ")
    return "Yes." if any(a in candidate for a in alternatives) else "No, it is different."


def executor(stub: OpenAIStub):
    from spogw.runtime.executor import OpenAIExecutor

    return OpenAIExecutor(stub.base_url, "stub-judge", api_key_env="SPOGW_TEST_NO_KEY", timeout_s=5.0, max_retries=1)


DROP = Record(
    id="d1",
    benchmark="drop",
    family="qa",
    question="Passage: The Bears kicked 3 field goals.\nQuestion: How many field goals?\nAnswer:",
    answer="3|three",
)
MATH = Record(id="m1", benchmark="math", family="math", question="What is 1/2 + 1/2?", answer="1")


def test_judge_sees_the_question_without_the_passage_and_all_gold_alternatives():
    messages = judge_messages(DROP, "There were three field goals.")
    user = messages[-1]["content"]
    assert "Question:\nHow many field goals?\n" in user and "Passage" not in user
    assert "Reference answer:\nany of: 3; three\n" in user
    assert "reading-comprehension" in messages[0]["content"]


def test_judge_scores_through_a_real_endpoint():
    async def run(stub):
        ex = executor(stub)
        try:
            return await judge_outputs(
                ex,
                "drop",
                [
                    (DROP, "There were three field goals."),
                    (DROP, "Four."),
                    (DROP, "I am unsure."),
                    (DROP, "3 #fail:500*9"),  # the stub fails this request more times than the retry budget
                    (DROP, ""),
                ],
            ), await judge_output(ex, "math", MATH.to_dict(), "The answer is 1.")
        finally:
            await ex.aclose()

    with OpenAIStub(StubConfig(responder=referee)) as stub:
        drop, math_result = asyncio.run(run(stub))
        requests = stub.requests
    assert [r.score for r in drop] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert drop[1].reason == "judge: not equivalent"
    assert "unreadable judge verdict" in drop[2].reason and drop[2].details["judge_error"]
    assert "judge call failed" in drop[3].reason and drop[3].details["judge_error"]
    assert drop[4].reason == "empty output"
    assert math_result.score == 1.0
    assert requests >= 5  # the empty output never reached the judge; the failing one was retried


def test_code_is_not_judged():
    code = Record(id="c", benchmark="mbpp", family="code", question="q", answer="a", entry_point="f", tests="assert 1")
    with pytest.raises(ValueError, match="scored by its tests"):
        asyncio.run(judge_output(object(), "mbpp", code, "def f(): pass"))


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Yes", True),
        ("yes.", True),
        ("No", False),
        ("Correct", True),
        ("Not equivalent.", False),
        ("The candidate matches, so: yes", True),
        ("Hmm", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict
