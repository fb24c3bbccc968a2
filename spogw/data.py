"""The LightningDataModule over the offline group-wise dataset (DESIGN §3).

``prepare_data`` builds the dataset when the run directory lacks it: scored samples (a JSONL file,
until the sample and score stages feed it directly) → :func:`spogw.groups.build_groups` → an HF
``datasets`` Arrow dataset under ``<run_dir>/data/groups-<fingerprint>/`` with ``stats.json``
beside it. The fingerprint covers the scored file's bytes and every curation option, so a sweep
over ``t`` or ``top_n`` in one run directory never reuses the wrong groups, and a rerun with the
same settings skips the build.

One dataset row is one group; a batch holds ``groups_per_batch`` whole groups, flattened to their
2t responses, so a group is never split across batches or (with DDP's sampler over rows) ranks.
Each response is tokenised as ``chat_template(prompt, add_generation_prompt=True) + completion +
EOS``, right-padded; ``completion_mask`` marks the completion tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from spogw.groups import Mode, Scope, build_groups, check_options

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("query_id", "prompt", "completion", "score")
DATASET_VERSION = 1  # bump when the row layout changes: old datasets are then rebuilt, not misread


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line, record or query and what to do."""


class BadRecord(DataError):
    """A scored-samples line that cannot be used; the message names the file and line."""


def _check_record(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        raise BadRecord(f"{where}: missing field(s) {', '.join(repr(f) for f in missing)}")
    score = rec["score"]
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise BadRecord(f"{where}: 'score' must be a number in [0, 1] or null, got {score!r}")
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            raise BadRecord(f"{where}: 'score' {score!r} is outside [0, 1]")
    prompt = rec["prompt"]
    ok_prompt = isinstance(prompt, str) or (
        isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt))
    if not ok_prompt:
        raise BadRecord(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
    if not isinstance(rec["completion"], str):
        raise BadRecord(f"{where}: 'completion' must be a string, got {type(rec['completion']).__name__}")
    if not isinstance(rec["query_id"], (str, int)) or isinstance(rec["query_id"], bool):
        raise BadRecord(f"{where}: 'query_id' must be a string or an integer, got {rec['query_id']!r}")


def read_scored_samples(path: str | os.PathLike, *, on_bad_record: Literal["error", "skip"] = "error"
                        ) -> tuple[list[dict], list[str]]:
    """Read a scored-samples JSONL file; return ``(records, skipped)``.

    Each line: ``{"query_id", "prompt" (text or chat messages), "completion" (the workflow the
    generator wrote), "score" (in [0, 1], null for a workflow that failed), ...}``; other fields
    are carried through. A bad line raises :class:`BadRecord` naming ``file:line``, or with
    ``on_bad_record="skip"`` is left out and reported in ``skipped`` (one message per line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scored samples file not found: {path}")
    records, skipped = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BadRecord(f"{where}: not valid JSON ({e})") from None
                _check_record(rec, where)
            except BadRecord as e:
                if on_bad_record == "error":
                    raise
                skipped.append(str(e))
                continue
            rec.setdefault("_line", lineno)
            records.append(rec)
    if not records:
        raise BadRecord(f"{path}: no usable records" + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
    return records, skipped


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Curation:
    """The build stage's options (paper §3.1); see :func:`spogw.groups.build_groups`."""

    n: int = 14
    """Instance size before sharpening: every n-subset of a query's m workflows is one instance (paper: 14)."""
    t: int = 4
    """Sharpening keeps the bottom t and the top t workflows, so groups have 2t members (paper: 4)."""
    top_n: int = 100
    """Dataset size d: how many groups screening keeps (paper: best at 100)."""
    m: int | None = None
    """Workflows sampled per query (paper: 16); when set, n <= m is checked and queries with other counts reported."""
    seed: int = 0
    """Seed that breaks variance ties and drives the random ablation modes."""
    mode: Mode = "screen_sharpen"
    """Data processing (paper Table 4): screen_sharpen | screen | random_filter | random."""
    scope: Scope = "global"
    """Rank instances over all queries together (global) or keep top_n per query (per_query)."""
    dedup: bool = True
    """Rank distinct sharpened groups (True) or literal n-subsets, keeping repeated groups (False)."""
    failed_score: float | None = 0.0
    """Score of a workflow that failed (score null: invalid, or every run crashed, timed out or returned nothing):
    0.0, a bad workflow; null drops them instead (the paper's literal reading). Counted in stats either way;
    infrastructure failures (retry) are never scored."""

    def __post_init__(self) -> None:
        check_options(n=self.n, t=self.t, top_n=self.top_n, mode=self.mode, scope=self.scope, prefix="--data.curation.")
        if self.m is not None and self.n > self.m:
            raise ValueError(f"`--data.curation.n` = {self.n} must not exceed `--data.curation.m` = {self.m} "
                             "(an instance is an n-subset of the m sampled workflows)")
        if self.failed_score is not None and not 0.0 <= self.failed_score <= 1.0:
            raise ValueError(f"`--data.curation.failed_score` must be within [0, 1], got {self.failed_score}")


def build_dataset(scored_samples: str | os.PathLike, out_dir: str | os.PathLike, curation: Curation, *,
                  on_bad_record: Literal["error", "skip"] = "error") -> dict:
    """The build stage as a plain function: scored samples → Arrow dataset + ``stats.json`` in ``out_dir``.

    Writes into a temporary sibling and renames it into place, so an interrupted build never leaves
    a partial dataset that a later run would take for a finished one. Returns the stats.
    """
    from datasets import Dataset as HFDataset

    start = time.perf_counter()
    records, skipped = read_scored_samples(scored_samples, on_bad_record=on_bad_record)
    if curation.m is not None:
        counts: dict[Any, int] = {}
        for r in records:
            counts[r["query_id"]] = counts.get(r["query_id"], 0) + 1
        off = {str(q): c for q, c in counts.items() if c != curation.m}
    else:
        off = {}
    groups, stats = build_groups(records, n=curation.n, t=curation.t, top_n=curation.top_n, seed=curation.seed,
                                 mode=curation.mode, scope=curation.scope, dedup=curation.dedup,
                                 failed_score=curation.failed_score)
    stats.update(source=str(scored_samples), bad_lines_skipped=skipped, queries_with_other_m=off,
                 version=DATASET_VERSION)
    if not groups:
        raise DataError(f"{scored_samples}: curation kept no group (queries: {stats['queries']}, skipped for too few "
                         f"samples: {len(stats['skipped_queries'])}, without score variance: "
                         f"{len(stats['constant_queries'])}); check --data.curation.n/t or the scores")
    rows = []
    for g in groups:
        members = g["members"]
        rows.append({
            "group_id": g["group_id"],
            "query_id": str(g["query_id"]),
            "prompts": [json.dumps(_as_messages(m["prompt"]), ensure_ascii=False) for m in members],
            "completions": [m["completion"] for m in members],
            "scores": g["scores"],
            "advantages": g["advantages"],
            "variance": g["variance"],
            "instance_variance": g["instance_variance"],
            "meta": [json.dumps({k: v for k, v in m.items() if k not in ("prompt", "completion")},
                                ensure_ascii=False, default=str) for m in members],
        })
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        HFDataset.from_list(rows).save_to_disk(str(tmp / "dataset"))
        stats["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, default=str))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class GroupDataset(Dataset):
    """Tokenised groups: item i is a list of ``(ids, prompt_len)`` responses plus their advantages."""

    def __init__(self, groups: list[dict]):
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        return self.groups[i]


def collate_groups(groups: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Flatten whole groups into one right-padded batch of responses."""
    seqs = [(g["group_id"], j, r) for g in groups for j, r in enumerate(g["responses"])]
    length = max(len(r[0]) for _, _, r in seqs)
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    completion = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, (_, _, (ids, p, *trained)) in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        mask = trained[0] if trained else None  # the completion tokens the loss sees (None: all of them)
        completion[row, p: len(ids)] = 1 if mask is None else torch.tensor(mask, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "advantages": torch.tensor([a for g in groups for a in g["advantages"]], dtype=torch.float32),
        "scores": torch.tensor([s for g in groups for s in g["scores"]], dtype=torch.float32),
        "group_id": torch.tensor([gid for gid, _, _ in seqs], dtype=torch.long),
        "member": torch.tensor([j for _, j, _ in seqs], dtype=torch.long),
    }


class GroupDataModule(L.LightningDataModule):
    """Wraps the offline group-wise dataset; builds it in ``prepare_data`` when missing.

    Args:
        scored_samples: JSONL of scored samples (query_id, prompt, completion, score, ...) to build from.
        tokenizer: tokenizer name or path (linked to ``--model.model`` by ``spogw fit``).
        curation: how groups are built (n, t, top_n, mode, ...).
        run_dir: where the dataset lives; defaults to ``--trainer.default_root_dir``.
        groups_per_batch: whole groups per batch (and per rank under DDP); 2t responses each.
        max_prompt_tokens: longer prompts keep their last tokens (counted in ``truncated_prompts``).
        max_completion_tokens: longer completions keep their first tokens (counted in ``truncated_completions``).
        shuffle: shuffle groups every epoch (seeded by ``seed_everything``).
        num_workers: DataLoader workers.
        on_bad_record: ``error`` stops at the first bad line of the scored file; ``skip`` leaves it out and reports it.
        train_on: which completion tokens enter the loss: ``decisions`` (default) takes, for guided samples, only
            the tokens of the generator's own choices (which operator step, each instruction's text;
            ``spogw.workflows.guide.Guide.decisions``) and the whole completion of free samples; ``completion``
            takes every completion token of every sample.
    """

    def __init__(
        self,
        scored_samples: str | None = None,
        tokenizer: str = "embedded",
        curation: Curation = Curation(),  # noqa: B008 - shown in --help and config.yaml
        run_dir: str | None = None,
        groups_per_batch: int = 1,
        max_prompt_tokens: int = 1024,
        max_completion_tokens: int = 1024,
        shuffle: bool = True,
        num_workers: int = 0,
        on_bad_record: Literal["error", "skip"] = "error",
        train_on: Literal["decisions", "completion"] = "decisions",
    ):
        super().__init__()
        if train_on not in ("decisions", "completion"):
            raise ValueError(f"`--data.train_on` must be decisions or completion, got {train_on!r}")
        if groups_per_batch < 1:
            raise ValueError(f"`--data.groups_per_batch` must be >= 1, got {groups_per_batch}")
        if max_prompt_tokens < 1 or max_completion_tokens < 1:
            raise ValueError("`--data.max_prompt_tokens` and `--data.max_completion_tokens` must be >= 1")
        if scored_samples is not None and not Path(scored_samples).is_file():
            raise FileNotFoundError(f"`--data.scored_samples`: file not found: {scored_samples}")
        self.scored_samples = scored_samples
        self.tokenizer_name = tokenizer
        self.curation = curation
        self.run_dir = run_dir
        self.groups_per_batch = groups_per_batch
        self.max_prompt_tokens = max_prompt_tokens
        self.max_completion_tokens = max_completion_tokens
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.on_bad_record = on_bad_record
        self.train_on = train_on
        self.train_set: GroupDataset | None = None
        self.stats: dict = {}
        self.pad_token_id = 0

    # -- where things live -------------------------------------------------------------------

    def _run_dir(self) -> Path:
        if self.run_dir is not None:
            return Path(self.run_dir)
        if self.trainer is not None:
            return Path(self.trainer.default_root_dir)
        raise ValueError("`--data.run_dir` is not set and the datamodule is not attached to a Trainer")

    def dataset_dir(self) -> Path:
        """``<run_dir>/data/groups-<fingerprint>``: one directory per (scored file, curation options)."""
        if self.scored_samples is None:
            raise ValueError("`--data.scored_samples` is required: the JSONL of scored samples to build groups from")
        src = Path(self.scored_samples)
        if not src.is_file():
            raise FileNotFoundError(f"`--data.scored_samples`: file not found: {src}")
        key = json.dumps({"file": _file_digest(src), "curation": vars(self.curation), "version": DATASET_VERSION,
                          "on_bad_record": self.on_bad_record}, sort_keys=True)
        return self._run_dir() / "data" / f"groups-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    # -- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        out = self.dataset_dir()
        if (out / "stats.json").is_file() and (out / "dataset").is_dir():
            log.info("group-wise dataset found: %s (build skipped)", out)
            return
        stats = build_dataset(self.scored_samples, out, self.curation, on_bad_record=self.on_bad_record)
        log.info("built %d groups from %d records (%d queries; %d skipped, %d without variance, %d failed) -> %s",
                 stats["groups"], stats["records"], stats["queries"], len(stats["skipped_queries"]),
                 len(stats["constant_queries"]), stats["failed"], out)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from datasets import load_from_disk

        from spogw.models import load_tokenizer

        out = self.dataset_dir()
        if not (out / "stats.json").is_file():  # e.g. used without a Trainer: build now
            self.prepare_data()
        self.stats = json.loads((out / "stats.json").read_text())
        rows = load_from_disk(str(out / "dataset"))
        tok = load_tokenizer(self.tokenizer_name)
        self.pad_token_id = tok.pad_token_id
        groups, truncated_p, truncated_c, on_decisions, as_sampled = [], 0, 0, 0, 0
        for row in rows:
            responses = []
            for prompt_json, completion, meta_json in zip(row["prompts"], row["completions"], row["meta"],
                                                          strict=True):
                meta = json.loads(meta_json)
                p_ids, c_ids = tokenize_response(tok, json.loads(prompt_json), completion)
                pieces = sampled_pieces(tok, completion, meta.get("completion_ids"))
                if pieces is not None:  # train on the tokens the generator sampled, not on a re-tokenisation
                    c_ids, as_sampled = [*meta["completion_ids"], tok.eos_token_id], as_sampled + 1
                mask = self._decision_mask(tok, completion, meta, pieces)
                on_decisions += mask is not None
                if len(p_ids) > self.max_prompt_tokens:
                    p_ids, truncated_p = p_ids[-self.max_prompt_tokens:], truncated_p + 1
                if len(c_ids) > self.max_completion_tokens:
                    c_ids, truncated_c = c_ids[: self.max_completion_tokens], truncated_c + 1
                responses.append((p_ids + c_ids, len(p_ids), None if mask is None else mask[: len(c_ids)]))
            groups.append({"group_id": row["group_id"], "responses": responses, "advantages": row["advantages"],
                           "scores": row["scores"]})
        self.stats.update(truncated_prompts=truncated_p, truncated_completions=truncated_c,
                          trained_on_decisions=on_decisions, trained_as_sampled=as_sampled)
        if truncated_p or truncated_c:
            log.warning("truncated %d prompts (> --data.max_prompt_tokens=%d) and %d completions "
                        "(> --data.max_completion_tokens=%d)", truncated_p, self.max_prompt_tokens, truncated_c,
                        self.max_completion_tokens)
        self.train_set = GroupDataset(groups)

    def _decision_mask(self, tok, completion: str, meta: dict, pieces: list[str] | None) -> list[int] | None:
        """1 for the completion tokens of a guided sample's decisions (0 for the forced text and the EOS); None
        when the whole completion is trained on (free samples, ``--data.train_on completion``). ``pieces``: the
        text of each sampled token, when the sample is trained as sampled."""
        if self.train_on != "decisions" or not meta.get("guided") or not meta.get("family"):
            return None
        from spogw.workflows.guide import load_guide

        spans = load_guide(meta["family"]).decisions(completion)
        if not spans:
            return None
        if pieces is None:
            offsets = tok(completion, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        else:
            ends = list(itertools.accumulate(len(piece) for piece in pieces))
            offsets = list(zip([0, *ends[:-1]], ends, strict=True))
        return [int(any(a < e and b > s for s, e in spans)) for a, b in offsets] + [0]

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Lightning's own distributed sampler always shuffles training data; ours honours
            # --data.shuffle. Rows are whole groups, so a group never straddles two ranks.
            sampler = DistributedSampler(self.train_set, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                         shuffle=self.shuffle, seed=self.curation.seed)
            return DataLoader(self.train_set, batch_size=self.groups_per_batch, sampler=sampler,
                              num_workers=self.num_workers, collate_fn=self._collate)
        return DataLoader(self.train_set, batch_size=self.groups_per_batch, shuffle=self.shuffle,
                          num_workers=self.num_workers, collate_fn=self._collate)

    def _collate(self, groups: list[dict]) -> dict[str, torch.Tensor]:
        return collate_groups(groups, self.pad_token_id)


def sampled_pieces(tokenizer, completion: str, ids: list[int] | None) -> list[str] | None:
    """The text of each sampled token, when the recorded ids spell exactly ``completion`` under ``tokenizer``
    (None when there are no ids, or they belong to another tokenizer, or the text was edited)."""
    if not ids or not all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids):
        return None
    pieces = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    return pieces if "".join(pieces) == completion else None


def tokenize_response(tokenizer, messages: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template with the generation prompt) and completion ids ending in EOS."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:  # a base model without a template: plain concatenation of the turns
        prompt_ids = tokenizer("\n\n".join(m["content"] for m in messages) + "\n\n")["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids
