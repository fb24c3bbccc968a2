"""Token F1 for DROP and HotpotQA, following each benchmark's official evaluation script.

The two scripts differ in ways that change scores, so both are kept:

* **HotpotQA** (``hotpot_evaluate_v1.py``): lowercase, drop punctuation, drop the articles a/an/the, squeeze
  whitespace; F1 over token *multisets*. A prediction or gold of ``yes``/``no``/``noanswer`` scores 0 unless
  the two are identical.
* **DROP** (``drop_eval.py``): tokens are split on spaces *and hyphens*; each token is lowercased, stripped of
  punctuation unless it is a number, numbers are rewritten as floats (``"2"`` -> ``"2.0"``, ``"1,000"`` ->
  ``"1000.0"``), articles removed. F1 is over token *sets*, and is 0 when the gold contains numbers none of
  which the prediction contains. Multi-span answers are aligned span to span (Hungarian matching) and the
  per-span F1s averaged. The script rounds the F1 to two decimals; so do we, to reproduce its numbers.

Each script takes the maximum over the gold alternatives; :func:`max_over_golds` does that.
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


# ---------------------------------------------------------------- HotpotQA


def normalize_hotpot(text: str) -> str:
    """HotpotQA's answer normalisation: lower, remove punctuation, remove articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def hotpot_f1(prediction: str, gold: str) -> float:
    """HotpotQA's token F1 of one prediction against one gold answer."""
    pred, ref = normalize_hotpot(prediction), normalize_hotpot(gold)
    special = ("yes", "no", "noanswer")
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- DROP


def _is_number(text: str) -> bool:
    # The official script asks float() - so "nan", "inf" and "1e3" count as numbers too.
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalize_drop_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCT)
    if _is_number(token):
        token = str(float(token))
    return " ".join(_ARTICLES.sub(" ", token).split())


def normalize_drop(text: str) -> str:
    """DROP's answer normalisation (per token, tokens split on spaces and hyphens)."""
    parts = (_normalize_drop_token(t) for t in re.split(" |-", text))
    return " ".join(p for p in parts if p.strip()).strip()


def _bag(text: str) -> set[str]:
    return set(normalize_drop(text).split())


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    common = len(pred & gold)
    precision = 1.0 if not pred else common / len(pred)
    recall = 1.0 if not gold else common / len(gold)
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _numbers_match(gold: set[str], pred: set[str]) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in pred if _is_number(w)})


def drop_f1(prediction: str | Sequence[str], gold: str | Sequence[str]) -> float:
    """DROP's F1 of one prediction against one gold answer; either may be a list of spans."""
    pred_spans = [prediction] if isinstance(prediction, str) else list(prediction)
    gold_spans = [gold] if isinstance(gold, str) else list(gold)
    pred_bags, gold_bags = [_bag(s) for s in pred_spans], [_bag(s) for s in gold_spans]
    scores = [[_bag_f1(p, g) if _numbers_match(g, p) else 0.0 for p in pred_bags] for g in gold_bags]
    best = _best_assignment(scores)
    f1 = sum(best) / max(len(gold_bags), len(pred_bags))
    return round(f1, 2)


def _best_assignment(scores: list[list[float]]) -> list[float]:
    """The F1s of the one-to-one gold/predicted span matching with the largest total (what the official script gets
    from the Hungarian algorithm). Exhaustive for the handful of spans DROP answers have; scipy beyond that."""
    if not scores or not scores[0]:
        return []
    n_gold, n_pred = len(scores), len(scores[0])
    if max(n_gold, n_pred) > 7:
        import numpy as np
        from scipy.optimize import linear_sum_assignment

        matrix = np.asarray(scores, dtype=float)
        rows, cols = linear_sum_assignment(-matrix)
        return [float(matrix[r, c]) for r, c in zip(rows, cols, strict=True)]
    if n_gold <= n_pred:
        pairs = ([scores[g][p] for g, p in enumerate(perm)] for perm in itertools.permutations(range(n_pred), n_gold))
    else:
        pairs = ([scores[g][p] for p, g in enumerate(perm)] for perm in itertools.permutations(range(n_gold), n_pred))
    return max(pairs, key=sum)


def max_over_golds(metric: Callable[[str, str], float], prediction: str, golds: Iterable[str]) -> tuple[float, str]:
    """The best score over gold alternatives, and the gold that gave it."""
    best, best_gold = 0.0, ""
    for gold in golds:
        score = metric(prediction, gold)
        if score > best or not best_gold:
            best, best_gold = score, gold
    return best, best_gold
