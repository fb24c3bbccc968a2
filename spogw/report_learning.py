"""Does it learn? The learning report of one or more `spogw iterate` runs (one per seed).

``spogw report <dir>`` on a directory holding `spogw iterate` run directories (each with its ``iterate.json``;
for example ``runs/learn`` with ``seed-0/``, ``seed-1/``, ``seed-2/``) writes into ``<dir>/report/``:

* ``learning.png`` — left: the RL curve, the mean training score of each iteration's samples (the same
  training queries every iteration; a failed workflow counts 0, as it does in training), per seed and their
  mean; right: the held-out test score of the base generator (iteration 0) and of each iteration's adapter,
  mean ± std over seeds, with the static baselines run on the same executor as horizontal lines;
* ``learning.md`` / ``learning.json`` — the same numbers as tables, and what changed in the generator: the
  distribution of workflow structures (operator sequences) and the most common instructions, before training
  (π_0's samples, the base generator's test workflows) and after it (the final adapter's test workflows and the
  last iteration's samples).

Held-out scores come from the evaluations the runs made: ``eval-base/`` (iteration 0), ``eval-iter-<k>/`` and
``eval/`` (the final adapter); see ``--evaluation.each_iteration``. Nothing is estimated: a missing evaluation is
shown as missing.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from spogw.evaluate import GENERATOR_METHOD, display_name


def iterate_runs(root: Path) -> list[Path]:
    """``root`` itself when it is a `spogw iterate` run directory, else every such directory below it."""
    if (root / "iterate.json").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("iterate.json") if "report" not in p.relative_to(root).parts)


def _read_jsonl(path: Path) -> list[dict]:
    from spogw.sampling import read_jsonl_tolerant

    return read_jsonl_tolerant(path) if path.is_file() else []


def _latest(lines: list[dict]) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for line in lines:
        latest[(line["query_id"], line["sample"])] = line
    return list(latest.values())


def training_curve(run: Path) -> list[dict[str, Any]]:
    """Per iteration: the mean training score of its samples (failed = 0; samples awaiting a retry left out)."""
    out = []
    k = 1
    while (run / f"iter-{k}" / "scored.jsonl").is_file():
        lines = [ln for ln in _latest(_read_jsonl(run / f"iter-{k}" / "scored.jsonl")) if not ln.get("retry")]
        scores = [0.0 if ln.get("score") is None else float(ln["score"]) for ln in lines]
        by_query: dict[str, set] = {}
        for ln, s in zip(lines, scores, strict=True):
            by_query.setdefault(ln["query_id"], set()).add(round(s, 9))
        out.append({"iteration": k, "mean": statistics.fmean(scores) if scores else None, "samples": len(scores),
                    "failed": sum(ln.get("score") is None for ln in lines),
                    "queries_with_variance": sum(len(v) > 1 for v in by_query.values()), "queries": len(by_query)})
        k += 1
    return out


def eval_dirs(run: Path, iterations: int) -> dict[int, Path]:
    """Held-out evaluations by iteration: 0 = the base generator, k = the adapter of iteration k."""
    found = {}
    if (run / "eval-base" / "results.json").is_file():
        found[0] = run / "eval-base"
    for k in range(1, iterations):
        if (run / f"eval-iter-{k}" / "results.json").is_file():
            found[k] = run / f"eval-iter-{k}"
    if (run / "eval" / "results.json").is_file():
        found[iterations] = run / "eval"
    return found


def _scores(results_dir: Path) -> dict[str, float]:
    """Method -> mean score (%) over the benchmarks of an evaluation's results.json."""
    data = json.loads((results_dir / "results.json").read_text())
    out = {}
    for method, row in data["table"].items():
        means = [c["mean"] for c in row["benchmarks"].values() if "mean" in c]
        if means and len(means) == len(row["benchmarks"]):
            out[method] = statistics.fmean(means)
    return out


def structures(texts: list[str], family: str) -> tuple[Counter, Counter, int]:
    """(structure counts, instruction counts, texts that are no guided workflow) of workflow texts."""
    from spogw.workflows.guide import load_guide

    guide = load_guide(family)
    shapes, instructions, other = Counter(), Counter(), 0
    for text in texts:
        parsed = guide.parse(text if text.startswith("<graph>") else f"<graph>\n{text}</graph>")
        if parsed is None:
            other += 1
            continue
        shapes[guide.structure(parsed.choices)] += 1
        instructions.update(i.strip() for i in parsed.instructions)
    return shapes, instructions, other


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def learning_summary(root: Path) -> dict[str, Any]:
    """Everything the learning report shows, from the run directories alone."""
    from spogw.benchmarks.registry import get_benchmark

    runs = iterate_runs(root)
    if not runs:
        raise ValueError(f"{root}: no `spogw iterate` run directory (iterate.json) here or below")
    per_run, baselines = [], {}
    family = None
    for run in runs:
        settings = json.loads((run / "iterate.json").read_text())
        family = family or get_benchmark(settings["benchmark"]).family
        curve = training_curve(run)
        held = {}
        for k, d in eval_dirs(run, len(curve)).items():
            scores = _scores(d)
            if GENERATOR_METHOD in scores:
                held[k] = scores[GENERATOR_METHOD]
            for method, value in scores.items():
                if method != GENERATOR_METHOD:
                    baselines.setdefault(method, []).append(value)
        per_run.append({"run": str(run), "seed": settings.get("seed"), "benchmark": settings["benchmark"],
                        "training": curve, "held_out": held})
    iterations = max(len(r["training"]) for r in per_run)
    training = {}
    for k in range(1, iterations + 1):
        vals = [c["mean"] for r in per_run for c in r["training"] if c["iteration"] == k and c["mean"] is not None]
        if vals:
            training[k] = _mean_std([100 * v for v in vals])
    held_out = {}
    for k in range(0, iterations + 1):
        vals = [r["held_out"][k] for r in per_run if k in r["held_out"]]
        if vals:
            held_out[k] = _mean_std(vals)
    summary = {"root": str(root), "runs": per_run, "iterations": iterations, "family": family,
               "training": training, "held_out": held_out,
               "baselines": {m: _mean_std(v) for m, v in baselines.items()}}
    summary["generator_change"] = _changes(runs, family, iterations)
    summary["goal"] = goal(summary)
    return summary


def goal(s: dict[str, Any]) -> dict[str, Any] | None:
    """Issue 11's goal, answered from the numbers: does the final adapter beat the base generator by more than
    the spread over seeds, and does it reach the best static workflow?

    The spread is the larger of the two std's over seeds (base, final). The stricter reading, that the two
    mean ± std bands do not touch, and the per-seed (paired) gains are reported next to it."""
    k = s["iterations"]
    base, final = s["held_out"].get(0), s["held_out"].get(k)
    if not base or not final:
        return None
    paired = [r["held_out"][k] - r["held_out"][0] for r in s["runs"] if {0, k} <= set(r["held_out"])]
    gain, spread = final["mean"] - base["mean"], max(base["std"], final["std"])
    out = {"iteration": k, "seeds": min(base["n"], final["n"]), "gain": gain, "spread": spread,
           "beats_base_by_more_than_spread": gain > spread,
           "bands_apart": final["mean"] - final["std"] > base["mean"] + base["std"],
           "paired_gains": paired, "every_seed_gains": bool(paired) and min(paired) > 0}
    if s["baselines"]:
        name, best = max(s["baselines"].items(), key=lambda kv: kv[1]["mean"])
        out |= {"best_static": name, "best_static_mean": best["mean"],
                "reaches_best_static": final["mean"] >= best["mean"]}
    return out


def _changes(runs: list[Path], family: str, iterations: int) -> dict[str, Any]:
    """Structures and instructions before training (π_0's samples) and after it (the last samples, and the final
    adapter's held-out workflows)."""
    def texts(name: str) -> list[str]:
        if name in ("base_test", "final_test"):
            folder = "eval-base" if name == "base_test" else "eval"
            return [w["workflow"] for run in runs for w in _read_jsonl(run / folder / "workflows.jsonl")]
        k = 1 if name == "first_samples" else iterations
        return [s["completion"] for run in runs for s in _latest(_read_jsonl(run / f"iter-{k}" / "samples.jsonl"))]

    out = {}
    for name in ("first_samples", "last_samples", "base_test", "final_test"):
        found = texts(name)
        if not found:
            continue
        shapes, instructions, other = structures(found, family)
        firsts = Counter()
        for shape, count in shapes.items():
            firsts[shape.split(" > ")[0]] += count
        out[name] = {"workflows": len(found), "not_guided": other,
                     "first_steps": {s: c / len(found) for s, c in firsts.most_common()},
                     "structures": {s: c / len(found) for s, c in shapes.most_common()},
                     "instructions": instructions.most_common(8)}
    return out


def learning_markdown(s: dict[str, Any], figure: str | None) -> str:
    lines = [f"# Does it learn? ({len(s['runs'])} run(s): seeds {', '.join(str(r['seed']) for r in s['runs'])};"
             f" benchmark {s['runs'][0]['benchmark']})", ""]
    if figure:
        lines += [f"![learning curve]({figure})", ""]
    lines += ["## Training score of each iteration's samples (same training queries), %", "",
              "| iteration | mean | std over seeds | min | max |", "|---|---|---|---|---|"]
    for k, v in s["training"].items():
        lines.append(f"| {k} | {v['mean']:.1f} | {v['std']:.1f} | {v['min']:.1f} | {v['max']:.1f} |")
    lines += ["", "## Held-out test score, %", "", "| generator | mean | std over seeds | min | max | seeds |",
              "|---|---|---|---|---|---|"]
    for k in range(0, s["iterations"] + 1):
        name = "base (no adapter)" if k == 0 else f"adapter of iteration {k}"
        v = s["held_out"].get(k)
        lines.append(f"| {name} | " + (f"{v['mean']:.1f} | {v['std']:.1f} | {v['min']:.1f} | {v['max']:.1f} | "
                                        f"{v['n']} |" if v else "missing | | | | |"))
    for method, v in sorted(s["baselines"].items(), key=lambda kv: -kv[1]["mean"]):
        lines.append(f"| static: {display_name(method)} | {v['mean']:.1f} | {v['std']:.1f} | {v['min']:.1f} | "
                     f"{v['max']:.1f} | {v['n']} |")
    g = s.get("goal")
    if g:
        yes = {True: "yes", False: "**no**"}
        lines += ["", f"## The goal (adapter of iteration {g['iteration']} against the base, {g['seeds']} seed(s))", "",
                  f"- gain over the base: {g['gain']:+.1f} points; spread (larger std over seeds): {g['spread']:.1f}"
                  f" -> beats the base by more than the spread: {yes[g['beats_base_by_more_than_spread']]}",
                  f"- mean ± std bands apart: {yes[g['bands_apart']]}; per-seed gains: "
                  + ", ".join(f"{x:+.1f}" for x in g["paired_gains"])
                  + f" (every seed gains: {yes[g['every_seed_gains']]})"]
        if "best_static" in g:
            lines.append(f"- best static workflow: {display_name(g['best_static'])} {g['best_static_mean']:.1f}"
                         f" -> reached: {yes[g['reaches_best_static']]}")
    titles = {"first_samples": "before training: the base generator's samples (iteration 1)",
              "last_samples": f"the last iteration's samples (iteration {s['iterations']})",
              "base_test": "before training: the base generator's held-out workflows (greedy, as evaluated)",
              "final_test": "after training: the final adapter's held-out workflows (greedy, as evaluated)"}
    lines += ["", "## What changed in the generator", ""]
    for name, c in s["generator_change"].items():
        lines += [f"**{titles[name]}** ({c['workflows']} workflows)", "", "| first step | share |", "|---|---|"]
        lines += [f"| {shape} | {share:.0%} |" for shape, share in c["first_steps"].items()]
        lines += ["", "| whole structure | share |", "|---|---|"]
        lines += [f"| {shape} | {share:.0%} |" for shape, share in list(c["structures"].items())[:8]]
        lines += ["", "most common instructions: " + "; ".join(f"`{i}` ({n})" for i, n in c["instructions"]), ""]
    return "\n".join(lines) + "\n"


def learning_figure(s: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in s["runs"]:
        xs = [c["iteration"] for c in r["training"] if c["mean"] is not None]
        left.plot(xs, [100 * c["mean"] for c in r["training"] if c["mean"] is not None], "o-", alpha=0.35,
                  label=f"seed {r['seed']}")
    ks = sorted(s["training"])
    left.plot(ks, [s["training"][k]["mean"] for k in ks], "o-", color="black", lw=2, label="mean")
    left.set(xlabel="iteration (samples of π_{k-1})", ylabel="mean training score (%)", title="RL curve")
    left.set_xticks(ks)
    left.legend(fontsize=8)
    ks = sorted(s["held_out"])
    right.errorbar(ks, [s["held_out"][k]["mean"] for k in ks], yerr=[s["held_out"][k]["std"] for k in ks],
                   fmt="o-", color="black", capsize=4, label="generator (mean ± std over seeds)")
    for i, (method, v) in enumerate(sorted(s["baselines"].items(), key=lambda kv: -kv[1]["mean"])):
        right.axhline(v["mean"], ls="--", lw=1, color=f"C{i}", label=f"static: {display_name(method)}")
    right.set(xlabel="adapter of iteration k (0 = base)", ylabel="held-out score (%)", title="held-out test score")
    right.set_xticks(list(range(0, s["iterations"] + 1)))
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_report(root: str | Path, out_dir: str | Path | None = None, wandb: bool = True) -> dict[str, Any]:
    """Write the learning report of the `spogw iterate` runs under ``root`` (see the module docstring)."""
    root = Path(root)
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    s = learning_summary(root)
    figure = learning_figure(s, out / "learning.png") if s["training"] else None
    (out / "learning.json").write_text(json.dumps(s, indent=2, default=str) + "\n")
    (out / "learning.md").write_text(learning_markdown(s, figure.name if figure else None))
    if wandb:
        _log(root, out, s)
    return s


def _log(root: Path, out: Path, s: dict[str, Any]) -> None:
    """The figure and the tables to W&B (offline without a key), as `spogw report` does for sweeps; never fatal."""
    from spogw.report import _log_report

    rows = [{"iteration": k, "training_score": s["training"].get(k, {}).get("mean"),
             "held_out": s["held_out"].get(k, {}).get("mean"), "held_out_std": s["held_out"].get(k, {}).get("std"),
             "seeds": s["held_out"].get(k, {}).get("n")} for k in range(0, s["iterations"] + 1)]
    figures = {"curve": out / "learning.png"} if (out / "learning.png").is_file() else {}
    _log_report(root, figures, rows, ("iteration", "training_score", "held_out", "held_out_std", "seeds"),
                kind="learning")
