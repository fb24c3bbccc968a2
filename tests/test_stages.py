"""`spogw sample` and `spogw score` as commands: artifacts, and a generator that writes no valid workflow."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA

from spogw.cli import cli_main
from spogw.sampling import read_jsonl_tolerant

AFLOW = SHARED_DATA / "aflow"
pytestmark = pytest.mark.skipif(not (AFLOW / "humaneval_validate.jsonl").is_file(), reason="needs ../shared/data/aflow")


def test_a_generator_without_valid_workflows_is_a_clear_error_and_nothing_is_lost(tmp_path, tiny_model, capsys,
                                                                                   monkeypatch):
    samples = tmp_path / "samples.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sample", "--benchmark", "humaneval", "--out", str(samples), "--generator", tiny_model,
                  "--data_dir", str(AFLOW), "--limit", "2", "--sampling.m", "3", "--sampling.max_new_tokens", "8",
                  "--sampling.backend", "transformers",
                  "--sampling.max_resample", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "wrote no valid workflow for any of the 2 queries" in err and "Traceback" not in err
    lines = read_jsonl_tolerant(samples)  # every sample is kept, marked invalid with its reason
    assert len(lines) == 6 and not any(s["valid"] for s in lines) and all(s["invalid_reason"] for s in lines)
    assert all(s["attempts"] == 2 for s in lines)

    # the score stage records them as failed, with the reason, and calls no executor
    monkeypatch.setenv("UNUSED_KEY", "x")
    scored = tmp_path / "scored.jsonl"
    cli_main(["score", "--benchmark", "humaneval", "--samples", str(samples), "--out", str(scored),
              "--data_dir", str(AFLOW), "--executor.kind", "openai", "--executor.base_url", "http://127.0.0.1:9/v1",
              "--executor.api_key_env", "UNUSED_KEY", "--runs", "1"])
    out = read_jsonl_tolerant(scored)
    assert [(s["query_id"], s["sample"]) for s in out] == [(s["query_id"], s["sample"]) for s in lines]
    assert all(s["score"] is None and s["score_reason"].startswith("invalid workflow: ") for s in out)


def test_an_unreachable_executor_is_a_clear_error_and_a_rerun_redoes_only_those(tmp_path, tiny_model, capsys,
                                                                               monkeypatch):
    """Guided samples of a tiny model are valid workflows; with no executor listening they cannot be scored: exit 2
    with the endpoint named, every line kept and marked for retry, and a rerun retries exactly those."""
    samples = tmp_path / "samples.jsonl"
    cli_main(["sample", "--benchmark", "humaneval", "--out", str(samples), "--generator", tiny_model,
              "--data_dir", str(AFLOW), "--limit", "1", "--sampling.m", "2", "--sampling.guided", "true",
              "--sampling.backend", "transformers",
              "--sampling.max_new_tokens", "600"])
    assert all(s["valid"] for s in read_jsonl_tolerant(samples))
    capsys.readouterr()
    monkeypatch.setenv("UNUSED_KEY", "x")
    scored = tmp_path / "scored.jsonl"
    args = ["score", "--benchmark", "humaneval", "--samples", str(samples), "--out", str(scored),
            "--data_dir", str(AFLOW), "--executor.kind", "openai", "--executor.base_url", "http://127.0.0.1:9/v1",
            "--executor.api_key_env", "UNUSED_KEY", "--runs", "1"]
    for attempt in (1, 2):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "2 of 2 workflows could not be scored" in err and "127.0.0.1:9" in err and "Traceback" not in err
        lines = read_jsonl_tolerant(scored)
        assert len(lines) == 2 * attempt and all(line["retry"] and line["score"] is None for line in lines)
