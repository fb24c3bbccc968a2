"""The report stage: the paper's Figure 2, Figure 3 and a Table-1-style summary from run directories.

``spogw report <dir>`` takes a run directory (``spogw fit``'s ``--trainer.default_root_dir``) or any
directory above several (a sweep's ``runs/sweeps/beta``, or ``runs/sweeps`` with all of them) and writes
into ``<dir>/report/``:

* ``figure2.png`` — paper Fig. 2: the distributions of group variance and of the median interval
  length (MIL: the gap between the t-th and (t+1)-th highest score of a group of 2t) for each data
  processing method (random, random_filter, screen, screen_sharpen), each dataset built with
  :func:`spogw.data.build_dataset` from the same scored samples and curation options as the run
  (into ``report/datasets/<mode>``);
* ``figure3.png``, ``table3.md``, ``table4.md`` — paper Fig. 3 and Tables 3-4: the held-out score against β,
  group size 2t and dataset size d, per KL configuration and per data processing method, mean ± std over the
  seeds, with the base generator and the baselines as reference lines (:mod:`spogw.report_sweep`);
* ``summary.md`` / ``summary.csv`` — one row per run: its settings, dataset, training and score.

**The score.** A run's score is its generator's held-out score from ``<run_dir>/eval/results.json`` (a sweep
point's :class:`spogw.heldout.HeldOutEvaluation`, or ``spogw evaluate --out_dir <run_dir>/eval``). A run
without an evaluation has no score: it is shown as missing, never estimated from a training signal.

A directory without any run, or a run missing its ``config.yaml``, is an error naming the path; a
run missing its metrics or scored-samples file is reported in the summary and skipped where needed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

MODES = ("random", "random_filter", "screen", "screen_sharpen")
MODE_LABELS = {"random": "random sampling", "random_filter": "random + filtering", "screen": "screening",
               "screen_sharpen": "screening + sharpening"}


class ReportError(ValueError):
    """A directory the report cannot use; the message names it and what is missing."""


# -- reading runs ------------------------------------------------------------------------------


def find_runs(path: Path) -> list[Path]:
    """``path`` itself when it is a run directory (holds config.yaml), else every run directory below it."""
    if (path / "config.yaml").is_file():
        return [path]
    skip = {"lightning_logs", "wandb", "report"}  # their config.yaml files are copies, not runs
    runs = sorted(p.parent for p in path.rglob("config.yaml") if not skip & set(p.relative_to(path).parts[:-1]))
    return runs


def metrics_file(run_dir: Path) -> Path | None:
    files = sorted((run_dir / "lightning_logs").glob("version_*/metrics.csv"),
                   key=lambda p: int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else -1)
    return files[-1] if files else None


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of the run's latest metrics.csv that carry ``train/loss``, as floats."""
    path = metrics_file(run_dir)
    if path is None:
        return []
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def run_metric(run_dir: Path) -> dict[str, Any] | None:
    """``{"value", "source", "label"}``: the held-out score of the run's evaluation (eval/results.json), or None.

    No training signal stands in for a missing evaluation, and an incomplete one (runs awaiting a retry) has no
    score either: such a run is shown as missing."""
    from spogw.report_sweep import point_score

    results = run_dir / "eval" / "results.json"
    if results.is_file():
        try:
            value, _ = point_score(json.loads(results.read_text()))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            value = None
        if value is not None:
            return {"value": float(value), "source": "eval", "label": "held-out score (%) from eval/results.json"}
    return None


def run_summary(run_dir: Path) -> dict[str, Any]:
    """One row of the summary: settings, dataset counts, training and score of a run directory."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    model, data = config.get("model") or {}, config.get("data") or {}
    cur = data.get("curation") or {}
    row: dict[str, Any] = {"run": str(run_dir), "seed": config.get("seed_everything"), "beta": model.get("beta"),
                           "kl_reference": model.get("kl_reference"),
                           "kl_mask": model.get("kl_mask"), "group_size": 2 * cur["t"] if "t" in cur else None,
                           "top_n": cur.get("top_n"), "mode": cur.get("mode"), "scope": cur.get("scope"), "notes": []}
    stats_files = sorted((run_dir / "data").glob("groups-*/stats.json"), key=lambda p: p.stat().st_mtime)
    if stats_files:
        stats = json.loads(stats_files[-1].read_text())
        row.update(groups=stats.get("groups"), records=stats.get("records"), queries=stats.get("queries"))
    else:
        row["notes"].append("no dataset (data/groups-*/stats.json)")
    rows = read_metrics(run_dir)
    if rows:
        row.update(steps=len(rows), final_loss=rows[-1].get("train/loss"), final_kl=rows[-1].get("train/kl"))
    else:
        row["notes"].append("no metrics (lightning_logs/version_*/metrics.csv)")
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        row["notes"].append("no adapter: unfinished?")
    metric = run_metric(run_dir)
    row["score"] = None if metric is None else metric["value"]
    row["config"] = config
    return row


# -- Figure 2 ----------------------------------------------------------------------------------


def mode_datasets(run_dir: Path, out: Path) -> dict[str, list[dict]]:
    """Groups of each data processing mode, built from the run's scored samples with its curation options."""
    import yaml
    from datasets import disable_progress_bars, load_from_disk

    from spogw.data import Curation, build_dataset

    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    data = config.get("data") or {}
    source = data.get("scored_samples")
    if not source or not Path(source).is_file():
        raise ReportError(f"{run_dir}: its scored samples ({source!r}, `data.scored_samples` of config.yaml) are not "
                          "readable from here; Figure 2 rebuilds each mode's dataset from them")
    cur = {k: v for k, v in (data.get("curation") or {}).items() if k in Curation.__dataclass_fields__}
    disable_progress_bars()
    groups = {}
    for mode in MODES:
        target = out / "datasets" / mode
        curation = Curation(**{**cur, "mode": mode})
        key = json.dumps({"source": str(Path(source).resolve()), "mtime": Path(source).stat().st_mtime,
                          "curation": vars(curation)}, sort_keys=True, default=str)
        stamp = target / "key.json"
        if not (stamp.is_file() and stamp.read_text() == key and (target / "dataset").is_dir()):
            build_dataset(source, target, curation, on_bad_record=data.get("on_bad_record") or "error")
            stamp.write_text(key)
        groups[mode] = load_from_disk(str(target / "dataset")).to_list()
    return groups


def figure2(groups_by_mode: dict[str, list[dict]], path: Path) -> Path:
    """Variance and MIL distributions per data processing method (paper Fig. 2), as box plots over groups."""
    import matplotlib.pyplot as plt

    from spogw.tracking import median_interval_length

    modes = [m for m in MODES if groups_by_mode.get(m)]
    variances = [[float(g["variance"]) for g in groups_by_mode[m]] for m in modes]
    mils = [[median_interval_length(g["scores"]) for g in groups_by_mode[m]] for m in modes]
    sizes = sorted({len(g["scores"]) for m in modes for g in groups_by_mode[m]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{MODE_LABELS[m]}\n({len(groups_by_mode[m])} groups)" for m in modes]
    for ax, values, title in ((axes[0], variances, "(a) variance of group scores"),
                              (axes[1], mils, "(b) median interval length (t-th minus (t+1)-th highest)")):
        ax.boxplot(values, showmeans=True)
        ax.set_xticks(range(1, len(modes) + 1), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Dataset characteristics per data processing method (group size {'/'.join(map(str, sizes))})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- summary -----------------------------------------------------------------------------------

SUMMARY_COLUMNS = ("run", "seed", "beta", "kl_reference", "kl_mask", "group_size", "top_n", "mode", "groups",
                   "steps", "final_loss", "final_kl", "score", "notes")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list):
        return "; ".join(value) or ""
    return str(value)


def summary_markdown(rows: list[dict], root: Path, figures: dict[str, Path | None], notes: list[str]) -> str:
    lines = [f"# spogw report: {root}", ""]
    if any(r.get("score") is None for r in rows):
        lines += ["`score` is the held-out score of the run's evaluation (eval/results.json); `–` = not evaluated "
                  "(a sweep point evaluates itself; for a plain fit run `spogw evaluate --adapter <run>/adapter "
                  "--out_dir <run>/eval`).", ""]
    lines += ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|"]
    for r in rows:
        cells = [Path(r["run"]).relative_to(root).as_posix()]
        cells += [_fmt(r.get(c)) for c in SUMMARY_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, fig in figures.items():
        if fig is not None:
            lines += [f"![{name}]({fig.name})", ""]
    lines += [f"* {n}" for n in notes]
    for r in rows:  # Table-1-shaped tables of the runs that were evaluated
        table = Path(r["run"]) / "eval" / "table.md"
        if table.is_file():
            lines += ["", f"## {Path(r['run']).relative_to(root).as_posix()}: evaluation", "", table.read_text()]
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(SUMMARY_COLUMNS)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else ("; ".join(r[c]) if c == "notes" else r[c])
                         for c in SUMMARY_COLUMNS])
    return buf.getvalue()


# -- the stage ---------------------------------------------------------------------------------


def report(run_dir: str, out_dir: str | None = None, figure2_from: str | None = None, wandb: bool = True) -> dict:
    """Write Figure 2, Figure 3 and a summary table (PNG + Markdown + CSV) for a run or a sweep; log them to W&B.

    Args:
        run_dir: a `spogw fit` run directory, or a directory above several (a sweep directory).
        out_dir: where the report goes (default ``<run_dir>/report``).
        figure2_from: the run whose scored samples and curation Figure 2 rebuilds per mode (default: the first run).
        wandb: also log the figures and the table to W&B (offline without an API key; skipped when wandb is missing).

    Returns:
        ``{"figures": {name: path}, "summary": path, "rows": [...], "notes": [...]}``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    from spogw.report_learning import iterate_runs, learning_report

    if iterate_runs(root):  # `spogw iterate` runs (one per seed): the learning report
        summary = learning_report(root, out_dir, wandb=wandb)
        out = Path(out_dir) if out_dir else root / "report"
        print(f"-> {out / 'learning.md'}, {out / 'learning.png'}, {out / 'learning.json'}")
        return {"figures": {"learning": out / "learning.png"}, "summary": out / "learning.md", "learning": summary}
    runs = find_runs(root)
    if not runs:
        raise ReportError(f"{root}: no run directory here (a run directory holds config.yaml, written by `spogw fit`)")
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_summary(r) for r in runs]
    notes = [f"{Path(r['run']).name}: " + "; ".join(r["notes"]) for r in rows if r["notes"]]
    figures: dict[str, Path | None] = {}
    source_run = Path(figure2_from) if figure2_from else runs[0]
    if not (source_run / "config.yaml").is_file():
        raise ReportError(f"`--figure2_from` {source_run}: not a run directory (no config.yaml)")
    try:
        figures["figure2"] = figure2(mode_datasets(source_run, out), out / "figure2.png")
        notes.append(f"Figure 2: datasets rebuilt per mode from {source_run}'s scored samples into {out / 'datasets'}")
    except (ReportError, ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        figures["figure2"] = None
        notes.append(f"Figure 2 not drawn: {e}")
    from spogw.report_sweep import figure3, reference_lines, table3, table4

    references = reference_lines(root)
    figures["figure3"] = figure3(rows, out / "figure3.png", references)
    if figures["figure3"] is None:
        notes.append("Figure 3 not drawn: needs evaluated runs that differ in β, group size or dataset size "
                     f"({sum(r['score'] is not None for r in rows)} evaluated run(s) found)")
    missing = [Path(r["run"]).name for r in rows if r["score"] is None]
    if missing:
        notes.append(f"{len(missing)} run(s) without a held-out evaluation, shown as missing: {', '.join(missing)}")
    tables = {name: t for name, t in (("table3", table3(rows, references)), ("table4", table4(rows, references)))
              if t is not None}
    for name, table in tables.items():
        (out / f"{name}.md").write_text(table)
    for n in notes:
        print(f"note: {n}")
    (out / "summary.md").write_text(summary_markdown(rows, root, figures, notes)
                                    + "".join(f"\n{t}" for t in tables.values()))
    (out / "summary.csv").write_text(summary_csv(rows))
    written = {k: v for k, v in figures.items() if v is not None}
    written_tables = [out / f"{name}.md" for name in tables]
    paths = [*written.values(), *written_tables, out / "summary.md", out / "summary.csv"]
    print(f"-> {', '.join(str(p) for p in paths)}")
    if wandb:
        _log_report(root, written, rows)
    return {"figures": written, "tables": written_tables, "summary": out / "summary.md", "rows": rows,
            "notes": notes, "references": references}


def _log_report(root: Path, figures: dict[str, Path], rows: list[dict], columns: tuple[str, ...] | None = None,
                kind: str = "report") -> None:
    columns = columns or SUMMARY_COLUMNS
    from spogw.tracking import DEFAULT_PROJECT, say, wandb_mode

    try:
        import wandb
    except ImportError:
        say("wandb is not installed: the report is not logged to W&B")
        return
    mode, why = wandb_mode()
    if mode == "disabled":
        return
    if mode == "offline":
        say(f"W&B offline for the report ({why})")
    import os

    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), dir=str(root), job_type="report",
                         name=f"{kind}-{root.resolve().name}", mode=mode, reinit="create_new")
        table = wandb.Table(columns=list(columns), data=[[_fmt(r.get(c)) for c in columns] for r in rows])
        run.log({**{f"{kind}/{k}": wandb.Image(str(p)) for k, p in figures.items()}, f"{kind}/summary": table})
        run.finish()
    except Exception as e:  # noqa: BLE001 - the files are written; W&B is a copy
        say(f"W&B failed while logging the report ({type(e).__name__}: {e}); the files are in place")
