"""The sweep report: held-out score against each swept setting (paper Fig. 3, Tables 3 and 4).

Every number here is a point's own held-out evaluation (``<point>/eval/results.json``, written by
:class:`spogw.heldout.HeldOutEvaluation`); a point without one is listed as missing, never estimated from a
training signal. Points that differ only in their seed (``seed_everything``) are one setting: its mean ± std
over the seeds. The reference lines are the base generator and the static baselines on the same held-out
queries, from ``<sweep dir>/reference/results.json`` when the sweep made one.

* ``figure3.png`` — score against β, the group size 2t and the dataset size d, one panel per parameter that
  takes two or more values among the evaluated settings, error bars = std over seeds;
* ``table3.md`` — the KL configurations (paper Table 3): no KL, π_ref = base, π_ref = previous, each with and
  without the mask;
* ``table4.md`` — the data processing methods (paper Table 4): random, + filtering, screening, + sharpening.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

SETTING_KEYS = ("beta", "group_size", "top_n", "kl_reference", "kl_mask", "mode")
FIG3_PARAMS = (("beta", "KL coefficient β"), ("group_size", "group size 2t"), ("top_n", "dataset size d"))
KL_LABELS = {("none", False): "no KL", ("none", True): "no KL",
             ("base", False): "KL to the base model", ("base", True): "KL to the base model + mask (mKL)",
             ("previous", False): "KL to the previous model",
             ("previous", True): "KL to the previous model + mask (mKL)"}
MODE_LABELS = {"random": "random sampling", "random_filter": "random + filtering", "screen": "screening",
               "screen_sharpen": "screening + sharpening"}


def point_score(results: dict, method: str = "generator") -> tuple[float | None, dict[str, float]]:
    """(mean over benchmarks, per benchmark) of ``method``'s score (%) in an evaluation's results.json.

    A benchmark counts only when its evaluation is complete and no run of it awaits a retry (an executor or
    sandbox failure is no verdict on the workflow); otherwise the mean is None: the point has no score yet."""
    from spogw.runtime.runner import INFRA_STATUSES

    row = results["table"].get(method) or {}
    per = {b: float(c["mean"]) for b, c in (row.get("benchmarks") or {}).items()
           if "mean" in c and c.get("complete", True) and not set(c.get("statuses") or {}) & set(INFRA_STATUSES)}
    if not per or len(per) != len(row.get("benchmarks") or {}):
        return None, per
    return sum(per.values()) / len(per), per


def seed_of(row: dict) -> Any:
    return (row.get("config") or {}).get("seed_everything")


def settings(rows: list[dict]) -> list[dict[str, Any]]:
    """The runs grouped by setting (everything in SETTING_KEYS; the seed apart): scores, mean, std, missing."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r.get(k) for k in SETTING_KEYS)
        g = groups.setdefault(key, {**{k: r.get(k) for k in SETTING_KEYS}, "scores": [], "seeds": [], "missing": []})
        if r.get("score") is None:
            g["missing"].append(Path(r["run"]).name)
        else:
            g["scores"].append(float(r["score"]))
            g["seeds"].append(seed_of(r))
    return [{**g, **_spread(g["scores"])} for g in groups.values()]


def _spread(scores: list[float]) -> dict[str, float | None]:
    """Mean and std over seeds (std 0 for one seed, both None for none)."""
    return {"mean": statistics.fmean(scores) if scores else None,
            "std": statistics.stdev(scores) if len(scores) > 1 else (0.0 if scores else None)}


def reference_lines(root: Path) -> dict[str, float]:
    """Method -> held-out score of the base generator and the baselines in ``<root>/reference`` (if any)."""
    from spogw.evaluate import display_name

    path = root / "reference" / "results.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    out = {}
    for method in data["table"]:
        score, _ = point_score(data, method)
        if score is not None:
            out["base generator" if method == "generator" else f"static: {display_name(method)}"] = score
    return out


def _fmt_x(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def figure3(rows: list[dict], path: Path, references: dict[str, float] | None = None) -> Path | None:
    """Held-out score against β, 2t and d (paper Fig. 3), mean ± std over seeds; None with no varied parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [s for s in settings(rows) if s["mean"] is not None]
    panels = [(key, label) for key, label in FIG3_PARAMS
              if len({s[key] for s in evaluated if s.get(key) is not None}) >= 2]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        others = [k for k in SETTING_KEYS if k != key]
        common = statistics.mode([tuple(s.get(k) for k in others) for s in evaluated])
        mine = sorted((s for s in evaluated if tuple(s.get(k) for k in others) == common and s.get(key) is not None),
                      key=lambda s: s[key])
        xs = list(range(len(mine)))
        ax.errorbar(xs, [s["mean"] for s in mine], yerr=[s["std"] for s in mine], fmt="o-", capsize=4,
                    color="black", label="adapter (mean ± std over seeds)")
        for x, s in zip(xs, mine, strict=True):
            ax.scatter([x] * len(s["scores"]), s["scores"], color="gray", s=12, alpha=0.6, zorder=3)
        for i, (name, value) in enumerate(sorted((references or {}).items())):
            ax.axhline(value, ls="--", lw=1, color=f"C{i}", label=name)
        ax.set_xticks(xs, [_fmt_x(s[key]) for s in mine])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out score (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("held-out score of each point's adapter\n(eval/results.json; points without one left out)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _table(title: str, header: str, entries: list[tuple[str, dict | None]], references: dict[str, float]) -> str:
    lines = [f"# {title}", "", f"| {header} | held-out score (%) | std over seeds | seeds | missing |",
             "|---|---|---|---|---|"]
    for label, s in entries:
        if s is None:
            lines.append(f"| {label} | not swept | | | |")
            continue
        score = "missing" if s["mean"] is None else f"{s['mean']:.2f}"
        std = "" if s["std"] is None else f"{s['std']:.2f}"
        lines.append(f"| {label} | {score} | {std} | {len(s['scores'])} | {', '.join(s['missing'])} |")
    lines += [f"| reference: {name} | {value:.2f} | | | |" for name, value in sorted(references.items())]
    return "\n".join(lines) + "\n"


def table3(rows: list[dict], references: dict[str, float]) -> str | None:
    """The KL configurations of the sweep (paper Table 3); None when the sweep did not vary them."""
    found = [s for s in settings(rows) if s.get("kl_reference") is not None]
    configs = {(s["kl_reference"], bool(s["kl_mask"])) for s in found}
    if len(configs) < 2:
        return None
    entries = []
    for ref, mask in (("none", False), ("base", False), ("base", True), ("previous", False), ("previous", True)):
        match = [s for s in found if s["kl_reference"] == ref and (ref == "none" or bool(s["kl_mask"]) == mask)]
        entries.append((KL_LABELS[(ref, mask)], _merge(match)))
    return _table("Table 3: KL configuration", "KL", entries, references)


def table4(rows: list[dict], references: dict[str, float]) -> str | None:
    """The data processing methods of the sweep (paper Table 4); None when the sweep did not vary them."""
    found = [s for s in settings(rows) if s.get("mode") is not None]
    if len({s["mode"] for s in found}) < 2:
        return None
    entries = [(MODE_LABELS[m], _merge([s for s in found if s["mode"] == m])) for m in MODE_LABELS]
    return _table("Table 4: data processing", "data processing", entries, references)


def _merge(found: list[dict]) -> dict | None:
    """One setting from several that share the tables' key (e.g. no KL with and without the mask)."""
    if not found:
        return None
    scores = [x for s in found for x in s["scores"]]
    return {"scores": scores, "missing": [m for s in found for m in s["missing"]], **_spread(scores)}
