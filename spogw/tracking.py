"""Experiment tracking: W&B by default, a CSV copy of every metric always, and what each stage logs.

``spogw fit`` logs to two places unless ``--trainer.logger`` says otherwise:

* ``<run_dir>/lightning_logs/version_N/metrics.csv`` (Lightning's CSVLogger), always first, so the
  checkpoints, the notebook and the tests find the same files with or without W&B;
* W&B (Lightning's WandbLogger), online when an API key is known and the server answers, otherwise
  offline into ``<run_dir>/wandb/`` (``wandb sync`` uploads it later); the choice is printed once.

If W&B fails in the middle of a run (its service dies, the network goes), :class:`SafeWandbLogger`
prints what happened and stops calling W&B; training goes on and the CSV copy keeps every metric.

:class:`Tracking` (a Lightning callback, ``--tracking.*``) adds what the per-step metrics do not carry:
the resolved config, the group-wise dataset's statistics (counts kept/filtered/deduplicated, the
variance and median-interval-length distributions of paper Fig. 2), a table of the dataset's
workflows with their scores, and the dataset and the adapter as W&B artifacts.

Other stages (sample, score, iterate) call :func:`log_stage` with their statistics, and
:func:`summarize_samples` turns scored samples into the valid-workflow rate, the score distribution
and the executor's tokens, cost and latency. W&B is imported inside functions only: ``spogw fit``
runs without it (CSV only, said once).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger  # imports wandb lazily

DEFAULT_PROJECT = "spogw"


def say(message: str) -> None:
    """One line on stderr, from the first process only (DDP ranks run the same code)."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"spogw: {message}", file=sys.stderr, flush=True)


# -- choosing the loggers -----------------------------------------------------------------------


def resolve_trainer_config(config: dict) -> dict:
    """The hook ``spogw fit`` calls on its Trainer arguments: default loggers, and a run dir per W&B sweep run.

    * no ``--trainer.logger`` (null or true): :func:`default_loggers` (CSV in the run dir, then W&B);
    * under ``wandb agent`` (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set): every run of the sweep would
      share the YAML's ``--trainer.default_root_dir``; each gets ``<that dir>/<run id>`` instead.
    """
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep_id and run_id:
        root = Path(config.get("default_root_dir") or ".")
        if root.name != run_id:
            config["default_root_dir"] = str(root / run_id)
            say(f"W&B sweep {sweep_id}, run {run_id}: run directory {config['default_root_dir']}")
    if config.get("logger") in (None, True):
        config["logger"] = default_loggers(config["default_root_dir"] or ".")
    return config


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> tuple[str, str]:
    """``(mode, why)``: ``online``, ``offline`` or ``disabled``, and the reason for anything but online.

    ``WANDB_MODE`` wins when set; otherwise online needs an API key (``WANDB_API_KEY`` or ``wandb login``)
    and a server that accepts a TCP connection within 3 s.
    """
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun"):
        return "offline", "WANDB_MODE=offline"
    if mode == "disabled":
        return "disabled", "WANDB_MODE=disabled"
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    if mode != "online" and not _has_api_key(host):
        return "offline", f"no W&B API key for {host} (set WANDB_API_KEY or run `wandb login`)"
    if not _reachable(host, port):
        return "offline", f"{host}:{port} is unreachable"
    return "online", ""


def default_loggers(run_dir: str | os.PathLike, *, project: str | None = None, name: str | None = None
                    ) -> list[Logger]:
    """The loggers ``spogw fit`` uses when ``--trainer.logger`` is not given: CSV in the run dir, then W&B.

    The CSV logger comes first: Lightning puts checkpoints under the first logger's directory, which
    is then ``<run_dir>/lightning_logs/version_N/checkpoints`` as without W&B.
    """
    run_dir = Path(run_dir)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="lightning_logs")]
    try:
        import wandb  # noqa: F401
    except ImportError:
        say("wandb is not installed: metrics go to CSV only (pip install 'spogw[wandb]' for W&B)")
        return loggers
    mode, why = wandb_mode()
    if mode == "disabled":
        say(f"W&B is disabled ({why}): metrics go to {run_dir}/lightning_logs only")
        return loggers
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "offline":
        say(f"W&B offline ({why}): the run is written to {run_dir}/wandb; upload it later with "
            f"`wandb sync {run_dir}/wandb/offline-run-*`")
    loggers.append(SafeWandbLogger(save_dir=str(run_dir), project=project or os.environ.get("WANDB_PROJECT",
                                   DEFAULT_PROJECT), name=name or run_dir.name, offline=mode == "offline",
                                   csv_dir=str(run_dir / "lightning_logs")))
    return loggers


class _NoRun:
    """Stands in for the W&B run once W&B has failed: every attribute, call and item is a no-op."""

    def __getattr__(self, name: str) -> _NoRun:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _NoRun:
        return self

    def __getitem__(self, key: Any) -> _NoRun:
        return self


class SafeWandbLogger(_WandbLogger):
    """Lightning's WandbLogger that survives W&B: a failure is reported once and W&B is dropped, not training.

    A run that cannot start online (server gone between the check and ``wandb.init``) starts offline
    instead. Any later W&B error (service died, disk full, ...) switches this logger off for the rest
    of the run; the CSV logger next to it keeps every metric.
    """

    def __init__(self, *args: Any, csv_dir: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.failed: str | None = None
        self._csv_dir = csv_dir

    def _fail(self, what: str, error: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{what}: {type(error).__name__}: {error}"
            where = f"; every metric is still in {self._csv_dir}" if self._csv_dir else ""
            say(f"W&B failed ({self.failed}); W&B logging is off for the rest of this run, training goes on{where}")
            with contextlib.suppress(Exception):  # a dead service would otherwise raise again at exit
                import wandb

                wandb.teardown()

    @property
    def experiment(self):
        if self.failed is not None:
            return _NoRun()  # W&B is off for this run: every call is a no-op
        try:
            return super().experiment
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds; training must not depend on it
            if not self._offline and self._experiment is None:
                say(f"W&B could not start online ({type(e).__name__}: {e}); retrying offline")
                self._wandb_init["mode"] = "offline"
                self._offline = True
                try:
                    return super().experiment
                except Exception as e2:  # noqa: BLE001
                    e = e2
            self._fail("starting the run", e)
            return _NoRun()

    def _guarded(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._fail(what, e)
            return None

    def log_metrics(self, metrics, step=None) -> None:
        self._guarded("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params) -> None:
        self._guarded("log_hyperparams", super().log_hyperparams, params)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_table", super().log_table, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self._guarded("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)

    def finalize(self, status: str) -> None:
        self._guarded("finalize", super().finalize, status)
        if status != "success" and self._experiment is not None and self.failed is None:
            # A crashed fit: close the run now, marked failed (a successful one is closed by Tracking).
            self._guarded("finishing the run", self._experiment.finish, exit_code=1)

    def run(self):
        """The W&B run, or None once W&B has failed (for callbacks that log richer objects)."""
        if self.failed is not None:
            return None
        run = self.experiment
        return None if self.failed is not None else run


def wandb_logger(trainer: L.Trainer) -> SafeWandbLogger | None:
    """The trainer's W&B logger (ours or a plain WandbLogger given with ``--trainer.logger``), if any."""
    for logger in trainer.loggers:
        if isinstance(logger, _WandbLogger):
            return logger
    return None


def _run_of(logger) -> Any:
    if logger is None:
        return None
    if isinstance(logger, SafeWandbLogger):
        return logger.run()
    return logger.experiment


def _guard(logger, what: str, fn, *args: Any) -> None:
    """Call ``fn`` with W&B errors reported (and W&B switched off) instead of raised."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        if isinstance(logger, SafeWandbLogger):
            logger._fail(what, e)
        else:
            say(f"W&B failed ({what}: {type(e).__name__}: {e}); training goes on")


# -- what the dataset looks like ---------------------------------------------------------------


def median_interval_length(scores: list[float]) -> float:
    """Paper Fig. 2's MIL: the gap between the t-th and (t+1)-th highest score of a group of 2t."""
    s = sorted(scores, reverse=True)
    t = len(s) // 2
    return float(s[t - 1] - s[t]) if t >= 1 else 0.0


def _quantiles(values: list[float], prefix: str) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, round(p * (len(v) - 1)))]
    return {f"{prefix}_mean": statistics.fmean(v), f"{prefix}_median": statistics.median(v), f"{prefix}_min": v[0],
            f"{prefix}_p10": q(0.1), f"{prefix}_p90": q(0.9), f"{prefix}_max": v[-1]}


def dataset_summary(stats: dict, groups: list[dict]) -> dict[str, float]:
    """Flat numbers for a dashboard: what curation kept, dropped and merged, and the groups' spread.

    ``groups`` are dataset rows (``scores`` and ``variance`` per group).
    """
    out: dict[str, float] = {}
    for key in ("records", "queries", "failed", "instances", "instances_constant", "instances_kept",
                "duplicate_subsets", "duplicate_groups", "groups", "truncated_prompts", "truncated_completions"):
        if isinstance(stats.get(key), (int, float)):
            out[key] = stats[key]
    for key in ("skipped_queries", "constant_queries", "bad_lines_skipped"):
        if key in stats:
            out[key] = len(stats[key])
    out.update(_quantiles([float(g["variance"]) for g in groups], "variance"))
    out.update(_quantiles([median_interval_length(list(g["scores"])) for g in groups], "mil"))
    return out


def group_table_rows(groups: list[dict], limit: int, max_chars: int = 4000) -> list[list]:
    """One row per workflow of the first groups: group, query, member, score, advantage, workflow text."""
    rows = []
    for g in groups:
        for j, (score, adv, text) in enumerate(zip(g["scores"], g["advantages"], g["completions"], strict=True)):
            if len(rows) >= limit:
                return rows
            rows.append([int(g["group_id"]), str(g["query_id"]), j, float(score), float(adv), text[:max_chars]])
    return rows


GROUP_TABLE_COLUMNS = ["group_id", "query_id", "member", "score", "advantage", "workflow"]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not ("class_path" in v and len(v) <= 2):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool, type(None))) else json.dumps(v, default=str)
    return out


# -- the callback ------------------------------------------------------------------------------


class Tracking(L.Callback):
    """Logs the run's config, its dataset (statistics, distributions, a table) and artifacts to W&B.

    Does nothing without a W&B logger. Every W&B call is guarded: a failure is reported and training goes on.

    Args:
        log_dataset: log the group-wise dataset's statistics, distributions and a table of its workflows.
        table_rows: at most this many workflows in the table (0: no table).
        log_artifacts: upload the group-wise dataset and the adapter as W&B artifacts at the end of fit.
    """

    def __init__(self, log_dataset: bool = True, table_rows: int = 256, log_artifacts: bool = True):
        if table_rows < 0:
            raise ValueError(f"`--tracking.table_rows` must be >= 0, got {table_rows}")
        self.log_dataset = log_dataset
        self.table_rows = table_rows
        self.log_artifacts = log_artifacts

    @staticmethod
    def _logger_and_run(trainer: L.Trainer):
        """(W&B logger, its run) on the first process, else (None, None)."""
        logger = wandb_logger(trainer)
        if not trainer.is_global_zero or logger is None:
            return None, None
        return logger, _run_of(logger)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger, run = self._logger_and_run(trainer)
        if run is None:
            return
        config_file = Path(trainer.default_root_dir) / "config.yaml"
        if config_file.is_file():
            import yaml

            config = _flatten(yaml.safe_load(config_file.read_text()) or {})
            _guard(logger, "config", lambda: run.config.update(config, allow_val_change=True))
        datamodule = trainer.datamodule
        if self.log_dataset and datamodule is not None and hasattr(datamodule, "dataset_dir"):
            _guard(logger, "dataset statistics", self._log_dataset, run, datamodule)

    def _log_dataset(self, run, datamodule) -> None:
        import wandb
        from datasets import load_from_disk

        data_dir = datamodule.dataset_dir()
        stats = datamodule.stats or json.loads((data_dir / "stats.json").read_text())
        groups = load_from_disk(str(data_dir / "dataset")).to_list()
        summary = dataset_summary(stats, groups)
        run.summary.update({f"data/{k}": v for k, v in summary.items()})
        payload: dict[str, Any] = {
            "data/variance": wandb.Histogram([float(g["variance"]) for g in groups]),
            "data/median_interval_length": wandb.Histogram([median_interval_length(g["scores"]) for g in groups]),
            "data/score": wandb.Histogram([float(s) for g in groups for s in g["scores"]]),
        }
        if self.table_rows:
            payload["data/workflows"] = wandb.Table(columns=GROUP_TABLE_COLUMNS,
                                                    data=group_table_rows(groups, self.table_rows))
        run.log({**payload, "trainer/global_step": 0})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_fit_end runs after the module's on_train_end has saved the adapter.
        logger, run = self._logger_and_run(trainer)
        if run is None:
            return
        if self.log_artifacts:
            _guard(logger, "artifacts", self._log_artifacts, run, trainer)
        if isinstance(logger, SafeWandbLogger) and logger.failed:
            return
        _guard(logger, "finishing the run", run.finish)

    def _log_artifacts(self, run, trainer: L.Trainer) -> None:
        import wandb

        run_dir = Path(trainer.default_root_dir)
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "dataset_dir"):
            data_dir = datamodule.dataset_dir()
            if data_dir.is_dir():
                art = wandb.Artifact(data_dir.name, type="dataset", metadata=datamodule.stats or {},
                                     description="group-wise dataset (HF datasets, Arrow) and its stats.json")
                art.add_dir(str(data_dir))
                run.log_artifact(art)
        adapter = run_dir / "adapter"
        if (adapter / "adapter_config.json").is_file():
            art = wandb.Artifact(f"adapter-{run.id}", type="model", description="LoRA adapter (peft format)")
            art.add_dir(str(adapter))
            run.log_artifact(art)


# -- reading a run back -----------------------------------------------------------------------


def read_offline_run(path: str | os.PathLike) -> dict[str, Any]:
    """What an offline W&B run holds, read from its ``run-<id>.wandb`` file (no server, no ``wandb sync``).

    Returns ``{"history": [row, ...], "summary": {...}, "config": {...}, "artifacts": [(name, type), ...]}``
    with JSON-decoded values; ``path`` is the run's directory (``.../offline-run-*``) or its ``.wandb`` file.
    The file is a LevelDB-style log (32 KiB blocks of CRC'd chunks) of ``wandb_internal_pb2.Record``s.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"no run-*.wandb file in {path}")
        path = files[0]
    raw = path.read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")

    def chunks():
        block, pos, buf = 32768, 7, b""
        while pos + 7 <= len(raw):
            left = block - pos % block
            if left < 7:  # block trailer: padding
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            pos += 7
            data, pos = raw[pos:pos + length], pos + length
            if kind == 1:  # full
                yield data
            elif kind == 2:  # first
                buf = data
            elif kind == 3:  # middle
                buf += data
            elif kind == 4:  # last
                yield buf + data

    def items(updates) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for item in updates:  # nested keys (a table's or an image's fields) become nested dicts
            parts = [item.key] if item.key else list(item.nested_key)
            node = d
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = json.loads(item.value_json)
        return d

    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "artifacts": []}
    for data in chunks():
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(items(record.history.item))
        elif kind == "summary":
            out["summary"].update(items(record.summary.update))
        elif kind == "config":
            out["config"].update(items(record.config.update))
        elif kind == "artifact":
            out["artifacts"].append((record.artifact.name, record.artifact.type))
    return out


# -- other stages ------------------------------------------------------------------------------


def summarize_samples(records: list[dict]) -> dict[str, float]:
    """Sample/score statistics: valid-workflow rate, score distribution, executor tokens, cost, latency.

    Reads the score stage's record fields where present: ``score`` (null = failed), ``usage``
    (``prompt_tokens``, ``completion_tokens``, ``cost_usd``, ``cached_cost_usd``, ``latency_s``, ``calls``,
    ``failed_calls``, as :class:`spogw.runtime.executor.Usage`), ``duration_s``; ``generation_tokens``
    or ``completion_tokens`` of the generator when the sample stage records them.
    """
    n = len(records)
    scores = [float(r["score"]) for r in records if r.get("score") is not None]
    out: dict[str, float] = {"workflows": n, "valid_workflows": len(scores),
                             "valid_rate": len(scores) / n if n else 0.0}
    out.update(_quantiles(scores, "score"))
    if scores:
        out["solved_rate"] = sum(s >= 1.0 for s in scores) / len(scores)
    usage_keys = ("calls", "failed_calls", "cached_calls", "prompt_tokens", "completion_tokens", "cost_usd",
                  "cached_cost_usd", "latency_s")
    usages = [r["usage"] for r in records if isinstance(r.get("usage"), dict)]
    for key in usage_keys:
        values = [u[key] for u in usages if isinstance(u.get(key), (int, float))]
        if values:
            out[f"executor_{key}"] = float(sum(values))
    durations = [float(r["duration_s"]) for r in records if isinstance(r.get("duration_s"), (int, float))]
    out.update(_quantiles(durations, "duration_s"))
    gen = [r.get("generation_tokens") for r in records if isinstance(r.get("generation_tokens"), (int, float))]
    if gen:
        out["generator_tokens"] = float(sum(gen))
    return out


def log_stage(stage: str, stats: dict[str, Any], *, samples: list[dict] | None = None, run_dir: str | None = None,
              step: int | None = None, table_rows: int = 256) -> dict[str, Any]:
    """Log one stage's statistics (and optionally a table of its workflows) to W&B; return what was logged.

    For the sample, score and iterate stages: ``log_stage("score", usage_dict, samples=records)``
    logs ``score/<key>`` numbers, ``summarize_samples(records)`` under the same prefix, a score
    histogram and a ``score/workflows`` table (prompt, workflow, score). Uses the active W&B run when
    there is one, else opens a run for ``run_dir`` (offline without a key, as ``spogw fit``) and
    finishes it. Without wandb (or with W&B failing) it prints why and returns the numbers.
    """
    numbers = {f"{stage}/{k}": v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if samples is not None:
        numbers.update({f"{stage}/{k}": v for k, v in summarize_samples(samples).items()})
    try:
        import wandb
    except ImportError:
        say(f"wandb is not installed: {stage} statistics are not logged")
        return numbers
    run, opened = wandb.run, False
    try:
        if run is None:
            mode, why = wandb_mode()
            if mode == "disabled":
                return numbers
            if mode == "offline":
                say(f"W&B offline for the {stage} stage ({why})")
            directory = Path(run_dir or ".")
            directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), dir=str(directory),
                             group=directory.resolve().name, job_type=stage, mode=mode, reinit="create_new")
            opened = True
        payload: dict[str, Any] = dict(numbers)
        if samples:
            scores = [float(r["score"]) for r in samples if r.get("score") is not None]
            if scores:
                payload[f"{stage}/score_hist"] = wandb.Histogram(scores)
            if table_rows:
                rows = [[str(r.get("query_id")), _prompt_text(r.get("prompt")), str(r.get("completion", ""))[:4000],
                         r.get("score")] for r in samples[:table_rows]]
                payload[f"{stage}/workflows"] = wandb.Table(columns=["query_id", "prompt", "workflow", "score"],
                                                            data=rows)
        run.log(payload, **({"step": step} if step is not None else {}))
        if opened:
            run.finish()
    except Exception as e:  # noqa: BLE001 - a dashboard must never cost a stage
        say(f"W&B failed while logging the {stage} stage ({type(e).__name__}: {e}); the stage goes on")
    return numbers


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))[:2000]
    return str(prompt or "")[:2000]
