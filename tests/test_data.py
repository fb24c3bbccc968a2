"""The data module: reading scored samples, building the Arrow dataset, batching whole groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_scored

from spogw.data import BadRecord, Curation, DataError, GroupDataModule, build_dataset, read_scored_samples


def test_read_scored_samples_carries_fields(scored_file):
    records, skipped = read_scored_samples(scored_file)
    assert len(records) == 48 and skipped == []
    assert records[0]["sample"] == 0 and records[0]["_line"] == 1


@pytest.mark.parametrize("line,message", [
    ("{not json", r"scored.jsonl:3: not valid JSON"),
    ('{"query_id": "q", "prompt": "p", "completion": "c"}', r"scored.jsonl:3: missing field\(s\) 'score'"),
    ('{"query_id": "q", "prompt": "p", "completion": "c", "score": 1.5}', r"scored.jsonl:3: 'score' 1.5 is outside"),
    ('{"query_id": "q", "prompt": "p", "completion": "c", "score": NaN}', r"scored.jsonl:3: 'score' nan is outside"),
    ('{"query_id": "q", "prompt": 3, "completion": "c", "score": 0.5}', r"scored.jsonl:3: 'prompt' must be"),
    ('[1, 2]', r"scored.jsonl:3: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"query_id": "q", "prompt": "p", "completion": "c", "score": 0.5})
    path = tmp_path / "scored.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(BadRecord, match=message):
        read_scored_samples(path)
    records, skipped = read_scored_samples(path, on_bad_record="skip")
    assert len(records) == 3 and len(skipped) == 1 and "scored.jsonl:3" in skipped[0]


def test_invalid_utf8_is_a_bad_line(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_bytes(b'{"query_id": "q", "prompt": "p", "completion": "\xff", "score": 0.5}\n')
    with pytest.raises(BadRecord, match="scored.jsonl:1"):
        read_scored_samples(path)


def test_build_dataset_writes_arrow_and_stats(tmp_path, scored_file):
    stats = build_dataset(scored_file, tmp_path / "groups", Curation(n=6, t=2, top_n=5))
    from datasets import load_from_disk

    rows = load_from_disk(str(tmp_path / "groups" / "dataset"))
    assert len(rows) == stats["groups"] == 5
    row = rows[0]
    assert len(row["completions"]) == len(row["scores"]) == len(row["advantages"]) == 4
    assert row["scores"] == sorted(row["scores"])
    assert json.loads(row["prompts"][0])[0]["role"] == "user"
    assert json.loads(row["meta"][0])["query_id"] == row["query_id"]
    assert json.loads((tmp_path / "groups" / "stats.json").read_text())["groups"] == 5


def test_build_reports_queries_without_enough_samples(tmp_path):
    path = write_scored(tmp_path / "s.jsonl", queries=3, m=5)
    with pytest.raises(DataError, match="curation kept no group"):
        build_dataset(path, tmp_path / "g", Curation(n=6, t=2, top_n=5))


def test_datamodule_batches_whole_groups(tmp_path, tiny_model, scored_file):
    dm = GroupDataModule(str(scored_file), tokenizer=tiny_model, curation=Curation(n=6, t=2, top_n=6),
                         run_dir=str(tmp_path), groups_per_batch=2, shuffle=False)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    from spogw.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    for b in batches:
        assert b["input_ids"].shape[0] == 8 and b["group_id"].tolist().count(b["group_id"][0].item()) == 4
        for row in range(8):
            ids, comp = b["input_ids"][row], b["completion_mask"][row].bool()
            text = tok.decode(ids[b["attention_mask"][row].bool()])
            assert text.startswith("<|im_start|>") and "<|im_start|>assistant\n" in text  # the chat template
            assert tok.decode(ids[comp]).startswith("class Workflow")
            assert ids[comp][-1].item() == tok.eos_token_id
            assert not comp[: comp.nonzero()[0].item()].any() and comp.sum() > 0
        # advantages are group-normalised: they sum to zero within each group
        for gid in b["group_id"].unique():
            assert abs(b["advantages"][b["group_id"] == gid].sum().item()) < 1e-5


def test_dataset_dir_depends_on_file_and_options(tmp_path, scored_file):
    a = GroupDataModule(str(scored_file), curation=Curation(n=6, t=2, top_n=5), run_dir=str(tmp_path))
    b = GroupDataModule(str(scored_file), curation=Curation(n=6, t=2, top_n=6), run_dir=str(tmp_path))
    assert a.dataset_dir() != b.dataset_dir()
    a2 = GroupDataModule(str(scored_file), curation=Curation(n=6, t=2, top_n=5), run_dir=str(tmp_path))
    assert a.dataset_dir() == a2.dataset_dir()
    a.prepare_data()
    stamp = (a.dataset_dir() / "stats.json").stat().st_mtime_ns
    a2.prepare_data()  # found: not rebuilt
    assert (a.dataset_dir() / "stats.json").stat().st_mtime_ns == stamp
    before = a.dataset_dir()
    with scored_file.open("a") as f:
        f.write(json.dumps({"query_id": "new", "prompt": "p", "completion": "c", "score": 1.0}) + "\n")
    assert a.dataset_dir() != before  # the scored file's bytes are part of the fingerprint


def test_truncation_is_counted(tmp_path, tiny_model, scored_file):
    dm = GroupDataModule(str(scored_file), tokenizer=tiny_model, curation=Curation(n=6, t=2, top_n=3),
                         run_dir=str(tmp_path), max_prompt_tokens=8, max_completion_tokens=5)
    dm.setup()
    assert dm.stats["truncated_prompts"] == 12 and dm.stats["truncated_completions"] == 12
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] == 13 and torch.all(batch["completion_mask"].sum(1) == 5)


@pytest.mark.parametrize("kwargs,flag", [
    ({"n": 6, "t": 4}, "--data.curation.t"), ({"n": 20, "m": 16}, "--data.curation.n"),
    ({"top_n": 0}, "--data.curation.top_n"), ({"failed_score": 2.0}, "--data.curation.failed_score"),
])
def test_curation_options_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        Curation(**kwargs)


def test_missing_scored_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data.scored_samples"):
        GroupDataModule(str(tmp_path / "missing.jsonl"))


def test_a_failed_workflow_scores_zero_by_default_in_the_code_and_every_shipped_fit_config():
    import yaml

    assert Curation().failed_score == 0.0
    root = Path(__file__).resolve().parents[1] / "configs" / "fit"
    for path in sorted(root.glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["data"]["curation"]["failed_score"] == 0.0, path
    assert Curation(failed_score=None).failed_score is None  # the paper's literal reading stays available
