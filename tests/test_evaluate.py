"""`spogw evaluate` end to end: the real generator (tiny model), the real runner and scoring, the loopback OpenAI stub
as the executor (replies that know the gold answers, so every baseline should score 100 %), the files written,
resuming without redoing work, and bad input reported clearly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubConfig

from spogw.benchmarks import load_benchmark
from spogw.cli import cli_main
from spogw.evaluate import ExecutorOptions, GenerationOptions, evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "aflow"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"offline AFlow data not found at {DATA}")
BENCHES = ["humaneval", "math", "drop"]


def gold_responder(records):
    """An executor that answers every operator prompt with the gold answer of the record it is about."""

    def respond(messages: list[dict]) -> str:
        prompt = str(messages[-1]["content"])
        if "<solution_letter>" in prompt:
            return "<solution_letter>A</solution_letter>"
        if "<review_result>" in prompt:
            return "<review_result>true</review_result><feedback>Correct.</feedback>"
        rec = next((r for r in records if r.question in prompt), None)
        if rec is None:
            return "I do not know."
        gold = rec.answer.split("|")[0]
        if rec.family == "code":
            return f"```python\n{rec.answer}\n```"
        if rec.family == "math":
            return f"The answer is \\boxed{{{gold}}}."
        if "<answer>" in prompt:
            return f"<thought>From the passage.</thought><answer>{gold}</answer>"
        return f"<solution>{gold}</solution>" if "<solution>" in prompt else gold

    return respond


@pytest.fixture(scope="module")
def records():
    return [r for b in BENCHES for r in load_benchmark(b, "test", data_dir=DATA, limit=2)]


def options(stub: OpenAIStub, tmp_path: Path, **kw) -> dict:
    kw.setdefault("generator", None)
    return {"executor": ExecutorOptions(kind="openai", model="stub", base_url=stub.base_url,
                                        api_key_env="SPOGW_TEST_NO_KEY", price_in_per_m=1.0, price_out_per_m=2.0),
            "data_dir": str(DATA), "limit": 2, "out_dir": str(tmp_path / "eval"), "sandbox_baselines": False, **kw}


def test_writes_table_one_and_resumes_without_redoing_work(tiny_model, records, tmp_path):
    out = tmp_path / "eval"
    with OpenAIStub(StubConfig(responder=gold_responder(records))) as stub:
        kw = options(stub, tmp_path, generator=tiny_model, runs=2,
                     generation=GenerationOptions(backend="transformers", max_new_tokens=8, batch_size=4))
        results = evaluate(BENCHES, **kw)
        calls = stub.requests
        lines = (out / "records.jsonl").read_text().splitlines()
        assert len(lines) == 7 * 3 * 2 * 2  # (6 baselines + generator) x benchmarks x records x runs
        assert len((out / "workflows.jsonl").read_text().splitlines()) == 3 * 2

        # every baseline solves every record: the whole path (workflow -> executor -> output -> score) works
        table = results["table"]
        for method in ("io", "cot", "cot_sc", "medprompt", "multipersona", "self_refine"):
            row = table[method]
            assert row["avg"] == 100.0, (method, {b: c.get("mean") for b, c in row["benchmarks"].items()})
            assert all(c["n"] == 2 and c["runs"] == 2 and c["std"] == 0 for c in row["benchmarks"].values())
            assert row["executor_tokens"] > 0 and row["cost_usd"] > 0 and row["failures"] == {}
        assert table["cot_sc"]["executor_tokens"] > table["io"]["executor_tokens"]
        # a random tiny generator writes no valid workflow: score 0, the reason kept, counted as failures
        gen = table["generator"]
        assert gen["avg"] == 0.0 and gen["failures"] == {"invalid": 3 * 2 * 2}
        line = next(json.loads(x) for x in lines if json.loads(x)["method"] == "generator")
        assert line["status"] == "invalid" and line["score_reason"].startswith("invalid: ")

        md = (out / "table.md").read_text().splitlines()
        assert md[2].split(" | ")[1:5] == ["MATH", "HumanEval", "DROP", "AVG"]
        assert [r.split(" | ")[0] for r in md[4:]] == ["| IO", "| CoT", "| CoT SC", "| MedPrompt", "| MultiPersona",
                                                      "| Self Refine", "| Generator"]
        assert "100.0 ± 0.0" in md[4]
        rows = list(csv.DictReader((out / "table.csv").open()))
        assert len(rows) == 7 and rows[0]["humaneval"] == "100.00" and rows[-1]["avg"] == "0.00"
        assert json.loads((out / "results.json").read_text())["settings"]["runs"] == 2

        # a rerun reuses everything: no executor call, no generation, no new record
        again = evaluate(BENCHES, **kw)
        assert stub.requests == calls
        assert (out / "records.jsonl").read_text().splitlines() == lines
        assert len((out / "workflows.jsonl").read_text().splitlines()) == 3 * 2
        assert again["table"] == results["table"]

        # an interrupted run (last lines lost, one torn) redoes only what is missing; the cache answers it
        (out / "records.jsonl").write_text("\n".join(lines[:-5]) + "\n" + lines[-5][:30])
        evaluate(BENCHES, **kw)
        assert stub.requests == calls
        assert len(read_lines(out)) == len(lines) - 5 + 5
        # the same directory with a smaller --limit reports only its own queries, from the records already there
        smaller = evaluate(BENCHES, **{**kw, "limit": 1})
        assert stub.requests == calls
        assert smaller["table"]["io"]["benchmarks"]["math"]["records"] == 1 * 2
        # changing a setting that matters (the executor's max tokens) runs everything again
        kw["executor"].max_tokens = 300
        evaluate(BENCHES, **{**kw, "generator": None})
        assert stub.requests > calls


def read_lines(out: Path) -> list[dict]:
    """Every line must be JSON: a torn line left by an interrupted run is cut before appending."""
    return [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]


def test_executor_failures_count_and_rerun_on_resume(records, tmp_path):
    with OpenAIStub(StubConfig(fail_rate=1.0, fail_kinds=("500",))) as stub:
        results = evaluate(["math"], **options(stub, tmp_path, baselines=["io", "cot"], runs=1))
    assert results["table"]["io"]["failures"] == {"executor_error": 2}
    assert all(x["retry"] and "HTTP 500" in x["reason"] for x in read_lines(tmp_path / "eval"))
    with OpenAIStub(StubConfig(responder=gold_responder(records))) as stub:
        results = evaluate(["math"], **options(stub, tmp_path, baselines=["io", "cot"], runs=1))
        assert stub.requests == 4
    assert results["table"]["io"]["avg"] == 100.0 and results["table"]["cot"]["failures"] == {}


def test_bad_output_scores_zero_with_the_reason(records, tmp_path):
    replies = {"": "empty output", "x" * 1_100_000: "too large", "\\boxed{2} \ud800": "not valid UTF-8"}
    for reply, reason in replies.items():
        with OpenAIStub(StubConfig(responder=lambda m, r=reply: r)) as stub:
            kw = options(stub, tmp_path, baselines=["io"], runs=1, out_dir=str(tmp_path / reason))
            kw["executor"].cache = None  # the sqlite response cache cannot store lone surrogates (notes/evaluate.md)
            results = evaluate(["math"], **kw)
        (line, *_) = read_lines(tmp_path / reason)
        assert line["score"] == 0 and reason in line["score_reason"], line["score_reason"]
        assert results["table"]["io"]["avg"] == 0.0


def test_unknown_names_and_bad_data_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"`--benchmarks`: unknown benchmark 'gsm8k'; known: humaneval"):
        evaluate(["gsm8k"], generator=None)
    with pytest.raises(ValueError, match=r"`--baselines`: unknown baseline 'tot'"):
        evaluate(["math"], baselines=["tot"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(["math"], generator=None, baselines=[])
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "math_test.jsonl").write_text('{"problem": "1+1?", "solution": "\\\\boxed{2}"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"math_test.jsonl:2"):
        evaluate(["math"], generator=None, data_dir=str(bad), out_dir=str(tmp_path / "o"))
    (bad / "math_test.jsonl").write_text('{"problem": "1+1?"}\n')
    with pytest.raises(ValueError, match=r"math_test.jsonl:1.*solution"):
        evaluate(["math"], generator=None, data_dir=str(bad), out_dir=str(tmp_path / "o"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "--benchmarks", "[nope]", "--generator", "null"])
    assert exit_info.value.code == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_quickstart_config_parses():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(evaluate)
    cfg = parser.parse_path(str(Path(__file__).resolve().parents[1] / "configs" / "evaluate_quickstart.yaml"))
    assert cfg.benchmarks == ["humaneval"] and cfg.runs == 1 and len(cfg.baselines) == 6
    assert cfg.executor.kind == "engine" and cfg.generator == "embedded"


def test_the_cli_runs_the_stage_from_flags(records, tmp_path):
    with OpenAIStub(StubConfig(responder=gold_responder(records))) as stub:
        cli_main(["evaluate", "--benchmarks", "[math]", "--generator", "null", "--baselines", "[io]", "--runs", "1",
                  "--limit", "2", "--data_dir", str(DATA), "--out_dir", str(tmp_path / "cli"),
                  "--executor.kind", "openai", "--executor.model", "stub", "--executor.base_url", stub.base_url,
                  "--executor.api_key_env", "SPOGW_TEST_NO_KEY", "--executor.cache", str(tmp_path / "c.sqlite")])
        assert stub.requests == 2
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert results["table"]["io"]["avg"] == 100.0 and (tmp_path / "c.sqlite").is_file()
