"""The sweep stage: a W&B sweep YAML run on one machine, without a W&B server.

A sweep file in ``configs/sweeps/`` is a plain W&B sweep config, so ``wandb sweep configs/sweeps/beta.yaml``
then ``wandb agent <id>`` runs it online unchanged. ``spogw sweep configs/sweeps/beta.yaml`` runs the same
points here: W&B's own sweep engine (the ``sweeps`` package, ``sweeps.next_run``) proposes them, and each
point runs the YAML's ``command`` with the macros W&B's agent fills in (``${env}``, ``${interpreter}``,
``${program}``, ``${args}`` as ``--name=value``) as a subprocess, in its own run directory:

    <sweep_dir>/
      sweep.yaml           the sweep file as run
      results.jsonl        one line per finished or failed point: params, run dir, exit status, seconds, metric
      <point>/             a `spogw fit` run directory per point, named after its parameters (beta=0.05)

Resuming: a point whose run directory holds an adapter and whose line in ``results.jsonl`` says
``finished`` is skipped; a failed or interrupted point runs again. Parameter names are ``spogw fit``
flags without the dashes (``model.beta``, ``data.curation.t``); an unknown name or an empty grid stops
the sweep before anything runs, naming the file and the parameter.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_METHODS = ("grid", "random")
ARGS_MACROS = ("${args}", "${args_no_hyphens}", "${args_no_boolean_flags}")


class SweepError(ValueError):
    """A sweep file that cannot be run; the message names the file and the parameter."""


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a sweep YAML: method, parameters (each a ``spogw fit`` flag with a non-empty grid)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path}: expected a mapping (a W&B sweep config), got {type(config).__name__}")
    method = config.get("method")
    if method not in SUPPORTED_METHODS:
        raise SweepError(f"{path}: `method` must be one of {', '.join(SUPPORTED_METHODS)} to run locally, "
                         f"got {method!r} (bayes needs a W&B server: use `wandb sweep` + `wandb agent`)")
    params = config.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: `parameters` is empty: nothing to sweep")
    for name, spec in params.items():
        if not isinstance(spec, dict):
            raise SweepError(f"{path}: parameter {name!r} must be a mapping with `values` or `value`, got {spec!r}")
        if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            raise SweepError(f"{path}: parameter {name!r} has an empty grid (`values: {spec['values']!r}`)")
        if method == "random" and not config.get("run_cap"):
            raise SweepError(f"{path}: a random sweep needs `run_cap` to end when run locally")
    try:
        import sweeps
    except ImportError:
        raise SweepError("`spogw sweep` needs W&B's sweep engine: pip install --no-deps sweeps==0.3.0 jsonref "
                         "scikit-learn (--no-deps: it pins numpy<2, which breaks pyarrow)") from None

    problems = sweeps.schema_violations_from_proposed_config(config)
    if problems:
        raise SweepError(f"{path}: not a valid W&B sweep config: " + "; ".join(problems))
    command = config.get("command")
    if command is not None and (not isinstance(command, list) or not any(m in command for m in ARGS_MACROS)):
        raise SweepError(f"{path}: `command` must be a list holding `${{args}}` (where the point's flags go)")
    return config


def expand(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's points in W&B's order, from W&B's own engine (``sweeps.next_run``)."""
    import sweeps
    from sweeps import RunState

    runs: list = []
    cap = config.get("run_cap")
    while cap is None or len(runs) < cap:
        run = sweeps.next_run(config, runs)
        if run is None:
            break
        run.state = RunState.finished  # as if it had run: the engine then proposes the next point
        runs.append(run)
    return [{name: spec["value"] for name, spec in sorted(run.config.items())} for run in runs]


def format_value(value: Any) -> str:
    """A value as W&B's agent writes it into ``${args}`` (Python's str: True, 0.1, [1, 2])."""
    return str(value)


def point_args(point: dict[str, Any]) -> list[str]:
    """``${args}`` of a point: ``--name=value`` per parameter, as W&B's agent passes them."""
    return [f"--{name}={format_value(value)}" for name, value in point.items()]


def point_name(point: dict[str, Any]) -> str:
    """A directory name from the parameters' last components: ``beta=0.05``, ``kl_reference=none,kl_mask=False``."""
    parts = [f"{name.rsplit('.', 1)[-1]}={format_value(value)}" for name, value in point.items()]
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "_", ",".join(parts))


def point_command(config: dict[str, Any], point: dict[str, Any], *, overlay: str | None = None) -> list[str]:
    """The argv W&B's agent would run for this point (``${args}`` preceded by ``--config <overlay>`` if given)."""
    command = config.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    argv: list[str] = []
    for part in command:
        if part == "${env}":
            continue  # the environment is passed to the subprocess as a whole
        if part == "${interpreter}":
            argv.append(sys.executable)
        elif part == "${program}":
            argv.append(str(config.get("program", "")))
        elif part in ARGS_MACROS:
            argv += ["--config", overlay] if overlay else []
            args = point_args(point)
            argv += [a[2:] for a in args] if part == "${args_no_hyphens}" else args
        else:
            argv.append(str(part))
    return argv


def fit_flags(base_args: list[str]) -> set[str]:
    """Every dotted option name ``spogw fit`` accepts on top of ``base_args`` (from its printed config)."""
    from spogw.cli import run_fit

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningCLI warns that args= and sys.argv (`spogw sweep ...`) differ
            run_fit(["fit", *base_args, "--print_config"])
    except SystemExit as e:
        if e.code not in (0, None):
            raise SweepError(f"the base config does not parse: `spogw fit {' '.join(base_args)}`") from None
    names: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}{k}"
                names.add(key)
                walk(v, key + ".")

    walk(yaml.safe_load(out.getvalue()), "")
    return names


def _base_args(command: list[str]) -> list[str]:
    """The ``--config X`` pairs of a fit command (what the points' flags are checked against)."""
    out = []
    for i, part in enumerate(command[:-1]):
        if part == "--config":
            out += ["--config", command[i + 1]]
    return out


def check_parameters(path: str | os.PathLike, config: dict[str, Any], *, overlay: str | None = None) -> None:
    """Every parameter must be a ``spogw fit`` option: else a :class:`SweepError` naming it and the nearest."""
    command = [str(c) for c in config.get("command") or []]
    if "fit" not in command:
        return  # not a `spogw fit` sweep: the program checks its own flags
    base = _base_args(command)
    for config_file in base[1::2]:
        if not Path(config_file).is_file():
            raise SweepError(f"{path}: the command's `--config {config_file}` is not found from {Path.cwd()}; run the "
                             "sweep from the directory `wandb agent` would run it in (the repository root)")
    flags = fit_flags(base + (["--config", overlay] if overlay else []))
    for name in config["parameters"]:
        if name not in flags:
            near = difflib.get_close_matches(name, sorted(flags), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SweepError(f"{path}: unknown parameter {name!r}: not a `spogw fit` option{hint}")


def point_config(config: dict[str, Any], point: dict[str, Any], *, overlay: str | None = None) -> dict[str, Any]:
    """The fit config a point runs with, as far as its YAML files and parameters say: the command's ``--config``
    files merged in order (then the overlay), then each dotted parameter set."""
    command = [str(c) for c in config.get("command") or []]
    files = _base_args(command)[1::2] + ([overlay] if overlay else [])
    merged: dict[str, Any] = {}

    def merge(into: dict, new: dict) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    for f in files:
        merge(merged, yaml.safe_load(Path(f).read_text()) or {})
    for name, value in point.items():
        node = merged
        *parents, last = name.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[last] = value
    return merged


DATA_HINT = ("make it first: `spogw iterate --config configs/learn.yaml --iterations 1` for the CPU sweeps "
             "(`make sweep-data`), or an iteration of your own run (`iter-k/scored.jsonl`), or `spogw sample` then "
             "`spogw score`")


def check_points(path: str | os.PathLike, config: dict[str, Any], points: list[dict[str, Any]], *,
                 overlay: str | None = None) -> dict[str, dict]:
    """Refuse, before anything runs, a point that cannot be built from the shared scored data: curation settings
    that contradict each other (2t > n, n > m) or a dataset size d (``top_n``) above the distinct groups the data
    holds. Returns per point name {"groups_available", "source"}. Not a `spogw fit` sweep: nothing to check."""
    from spogw.data import Curation, read_scored_samples
    from spogw.groups import build_groups

    command = [str(c) for c in config.get("command") or []]
    if "fit" not in command:
        return {}
    records_of: dict[str, list] = {}
    out = {}
    for point in points:
        name = point_name(point)
        data = point_config(config, point, overlay=overlay).get("data") or {}
        fields = {k: v for k, v in (data.get("curation") or {}).items() if k in Curation.__dataclass_fields__}
        try:
            curation = Curation(**fields)
        except (TypeError, ValueError) as exc:
            raise SweepError(f"{path}: point {name} cannot be built: {exc}") from None
        source = data.get("scored_samples")
        if not source:
            raise SweepError(f"{path}: point {name}: `data.scored_samples` is not set: a sweep point trains on the "
                             f"shared scored data of one iteration; {DATA_HINT}")
        if not Path(source).is_file():
            raise SweepError(f"{path}: point {name}: the shared scored data {source} (`data.scored_samples`) does not "
                             f"exist; {DATA_HINT}")
        if source not in records_of:
            try:
                records_of[source], _ = read_scored_samples(source,
                                                            on_bad_record=data.get("on_bad_record") or "error")
            except ValueError as exc:
                raise SweepError(f"{path}: point {name}: the shared scored data is unusable: {exc}") from None
        groups, _ = build_groups(records_of[source], n=curation.n, t=curation.t, top_n=10**9, seed=curation.seed,
                                 mode=curation.mode, scope=curation.scope, dedup=curation.dedup,
                                 failed_score=curation.failed_score)
        if curation.scope == "per_query":
            per: dict[str, int] = {}
            for g in groups:
                per[str(g["query_id"])] = per.get(str(g["query_id"]), 0) + 1
            available, what = max(per.values(), default=0), "distinct groups of any one query (scope per_query)"
        else:
            available, what = len(groups), "distinct groups"
        if curation.top_n > available:
            raise SweepError(
                f"{path}: point {name}: `data.curation.top_n` (the dataset size d) = {curation.top_n} exceeds the "
                f"{available} {what} that {source} holds with n = {curation.n}, t = {curation.t}, mode "
                f"{curation.mode}; lower d to at most {available}, or sample more workflows or queries")
        out[name] = {"groups_available": available, "source": source}
    return out


def _command_root(config: dict[str, Any]) -> str | None:
    """The ``--trainer.default_root_dir`` the sweep's command names (where `wandb agent` would put its points)."""
    command = [str(c) for c in config.get("command") or []]
    for i, part in enumerate(command[:-1]):
        if part == "--trainer.default_root_dir":
            return command[i + 1]
    return None


def read_results(sweep_dir: Path) -> dict[str, dict]:
    """The last line per point of ``results.jsonl``."""
    out: dict[str, dict] = {}
    path = sweep_dir / "results.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                out[rec["name"]] = rec
    return out


def _finished(rec: dict | None, run_dir: Path, held_out: bool = False) -> bool:
    """Finished earlier: recorded so, the adapter in place and, for a held-out sweep, the point's eval.json."""
    return (bool(rec) and rec.get("state") == "finished" and (run_dir / "adapter" / "adapter_config.json").is_file()
            and (not held_out or (run_dir / "eval.json").is_file()))


def held_out_sweep(config: dict[str, Any]) -> bool:
    """The sweep ranks by the held-out score (``metric.name`` eval/score...): a point needs its evaluation."""
    return str((config.get("metric") or {}).get("name", "")).startswith("eval/")


def sweep(
    sweep_file: str,
    sweep_dir: str | None = None,
    config_overlay: str | None = None,
    dry_run: bool = False,
    max_runs: int | None = None,
    stop_on_failure: bool = False,
    only: dict[str, Any] | None = None,
) -> list[dict]:
    """Run a W&B sweep YAML here: every point a ``spogw fit`` subprocess in its own run directory; resumable.

    Args:
        sweep_file: a W&B sweep config (``configs/sweeps/*.yaml``): ``method: grid`` (or random with ``run_cap``),
            ``parameters`` named after ``spogw fit`` flags, and the ``command`` ``wandb agent`` runs.
        sweep_dir: where the points' run directories and ``results.jsonl`` go (default: the command's
            ``--trainer.default_root_dir``, else ``runs/sweeps/<name>``).
        config_overlay: a YAML passed as a further ``--config`` before each point's flags (e.g. a smaller model).
        dry_run: print the points and their commands; run nothing.
        max_runs: run at most this many points now (finished ones are skipped and not counted).
        stop_on_failure: stop at the first point that fails (default: record it and go on).
        only: run only the points whose parameters take these values, e.g. ``--only '{seed_everything: 0}'`` (one
            seed of every setting first); the others are listed as pending.

    Returns:
        One record per point: name, params, run_dir, state (finished | failed | pending | planned), metric.
    """
    if max_runs is not None and max_runs < 1:
        raise ValueError(f"`--max_runs` must be >= 1, got {max_runs}")
    if config_overlay is not None and not Path(config_overlay).is_file():
        raise FileNotFoundError(f"`--config_overlay`: file not found: {config_overlay}")
    config = load_sweep(sweep_file)
    check_parameters(sweep_file, config, overlay=config_overlay)
    points = expand(config)
    if not points:
        raise SweepError(f"{sweep_file}: the sweep engine proposed no point")
    if only:
        unknown = sorted(set(only) - set(config["parameters"]))
        if unknown:
            raise SweepError(f"`--only`: {', '.join(unknown)} is not a parameter of {sweep_file} "
                             f"({', '.join(config['parameters'])})")
    check_points(sweep_file, config, points, overlay=config_overlay)
    name = str(config.get("name") or Path(sweep_file).stem)
    out = Path(sweep_dir or _command_root(config) or Path("runs") / "sweeps" / name)
    done = read_results(out)
    from spogw.report import run_metric

    records, ran = [], 0
    for i, point in enumerate(points):
        pname = point_name(point)
        run_dir = out / pname
        argv = point_command(config, point, overlay=config_overlay) + ["--trainer.default_root_dir", str(run_dir)]
        rec = {"name": pname, "index": i, "params": point, "run_dir": str(run_dir), "command": shlex.join(argv)}
        if _finished(done.get(pname), run_dir, held_out_sweep(config)):
            records.append({**done[pname], "state": "finished"})
            print(f"[{i + 1}/{len(points)}] {pname}: finished earlier, skipped")
            continue
        if only and any(point.get(k) != v for k, v in only.items()):
            records.append({**rec, "state": "pending"})
            continue
        if dry_run:
            print(f"[{i + 1}/{len(points)}] {pname}: {rec['command']}")
            records.append({**rec, "state": "planned"})
            continue
        if max_runs is not None and ran >= max_runs:
            records.append({**rec, "state": "pending"})
            continue
        records.append(_run_point(rec, argv, out, name, i, len(points), held_out=held_out_sweep(config)))
        ran += 1
        if records[-1]["state"] == "failed" and stop_on_failure:
            break
    if not dry_run:
        (out / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        states = [r["state"] for r in records]
        print(f"sweep {name}: {states.count('finished')} finished, {states.count('failed')} failed, "
              f"{states.count('pending')} pending -> {out}")
        for r in records:
            if r["state"] == "finished" and r.get("metric") is None:
                r["metric"] = run_metric(Path(r["run_dir"]))
    return records


def _run_point(rec: dict, argv: list[str], out: Path, sweep_name: str, i: int, total: int,
               held_out: bool = False) -> dict:
    from spogw.report import run_metric

    run_dir = Path(rec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{i + 1}/{total}] {rec['name']}: running -> {run_dir}", flush=True)
    env = {**os.environ, "WANDB_RUN_GROUP": sweep_name, "WANDB_JOB_TYPE": "sweep"}
    env.pop("WANDB_SWEEP_ID", None)  # not a `wandb agent` run: the run dir is the one given here
    env.pop("WANDB_SERVICE", None)  # each point starts its own W&B service, never this process's
    start = time.monotonic()
    with (run_dir / "fit.log").open("w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = round(time.monotonic() - start, 1)
    state = "finished" if proc.returncode == 0 and (run_dir / "adapter" / "adapter_config.json").is_file() else "failed"
    if state == "finished" and held_out and not (run_dir / "eval.json").is_file():
        state = "failed"  # trained, but its held-out evaluation did not finish: the point has no metric
    result = {**rec, "state": state, "returncode": proc.returncode, "seconds": seconds,
              "metric": run_metric(run_dir) if state == "finished" else None}
    if state == "failed":
        tail = (run_dir / "fit.log").read_text(errors="replace").strip().splitlines()[-3:]
        print(f"    failed (exit {proc.returncode}); see {run_dir / 'fit.log'}:\n      " + "\n      ".join(tail))
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    return result
