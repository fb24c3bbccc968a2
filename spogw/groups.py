"""The build stage: group-wise curation of scored workflows (paper §3.1, DESIGN §1 step 3).

Scored samples come in (``query_id``, ``score`` in [0, 1] or None for a workflow that failed, and
anything else, carried through). Groups come out, each ready for the ioGRPO objective:

* **combine**  every n-subset of a query's m scored workflows is one instance (C(m, n) of them);
* **filter**   instances whose scores are all equal give no advantage and are dropped; failed
               workflows (``score`` None: invalid, or every run crashed, timed out or returned
               nothing) are scored ``failed_score`` (default 0.0: a bad workflow, which then gets a
               negative advantage) or, with ``failed_score=None``, dropped; workflows that wait for an
               infrastructure retry (``retry: true``) are always left out; all of it is counted;
* **screen**   instances are ranked by the variance of their scores and the top ``top_n`` are kept
               (over all queries, or per query: ``scope``);
* **sharpen**  each kept instance keeps its bottom t and top t workflows, so groups have 2t members.

Different n-subsets often sharpen to the same 2t workflows (they differ only in the middle). With
``dedup=True`` (default) screening ranks *distinct sharpened groups*, each by the best variance of
the n-subsets that produce it, so the dataset holds ``top_n`` different groups; the collapsed
subsets are counted in ``stats["duplicate_subsets"]``. ``dedup=False`` screens n-subsets literally
and keeps repeated groups, counting them in ``stats["duplicate_groups"]``.

Exact top-N without enumeration
-------------------------------
C(64, 32) ≈ 1.8e18, so instances are never listed. Within a query the scores are sorted; an
instance is built by deciding, from the low end, which workflows fill the bottom slots and then,
from the high end, which fill the top slots. Whatever has been decided, the undecided workflows
form one contiguous run of the sorted scores, and the completion of highest variance takes a prefix
and a suffix of that run (variance is convex in each member, so a member with unchosen neighbours
on both sides can always be pushed outwards). That maximum is therefore exact and cheap (one pass
over the split point), and a best-first search ordered by it emits instances in exactly descending
variance. Variance is compared as the integer n·Σq² − (Σq)² over scores rounded to 1e-9, so ties
are exact and never depend on summation order.

Ties (common: scores are often 0/1) are broken deterministically from ``seed``: equal scores are
ordered by a seeded shuffle, instances of equal variance within a query by the decision sequence
above, and across queries round-robin (the first tied instance of every query, in a seeded query
order, then the second, ...), so a global ``top_n`` is not swallowed by one query.

The data-processing ablation of the paper's Table 4 is ``mode`` (groups always have 2t members,
as in its Figure 2): ``random`` (random 2t-subsets), ``random_filter`` (the same, zero-variance
ones rejected), ``screen`` (top-N 2t-subsets by variance) and ``screen_sharpen`` (the method).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

Mode = Literal["screen_sharpen", "screen", "random_filter", "random"]
Scope = Literal["global", "per_query"]
MODES: tuple[str, ...] = ("screen_sharpen", "screen", "random_filter", "random")
SCALE = 10**9  # scores are compared on a 1e-9 grid, exactly, as integers


class Curation(NamedTuple):
    """What :func:`build_groups` returns: the groups and the counts of what happened to the rest."""

    groups: list[dict[str, Any]]
    stats: dict[str, Any]


@dataclass(frozen=True)
class Leaf:
    """One ranked candidate of a query: ``positions`` index the query's sorted workflows."""

    v: int  # k·Σq² − (Σq)², the exact variance times k² (in SCALE² units)
    key: tuple[int, ...]  # the decision sequence: the tie-break among equal ``v``
    group: tuple[int, ...]  # positions of the group's members (bottom slots, then top slots)
    instance: tuple[int, ...]  # positions of the whole ranked instance (the group plus its middle)
    gap: int  # how many workflows lay between the bottom and top slots (the middle was chosen from them)


def ranked_subsets(values: Sequence[int], k: int, *, bottom: int, top: int = 0,
                   drop_constant: bool = True) -> Iterator[Leaf]:
    """Yield candidates of one query in descending variance, ties by decision sequence.

    ``values`` are integer scores sorted ascending. A candidate is a choice of ``bottom`` positions
    (the lowest members) and ``top`` positions (the highest) of a k-subset whose remaining
    ``k - bottom - top`` members are left free; its value is the best variance over those free
    members. With ``bottom == k`` a candidate is a plain k-subset; with ``bottom == top == t`` it is
    a sharpened group, and each distinct group is yielded once. ``drop_constant`` skips candidates
    whose best instance has zero variance.
    """
    m = len(values)
    if not 0 <= bottom + top <= k <= m:
        return
    p1, p2 = [0], [0]
    for x in values:
        p1.append(p1[-1] + x)
        p2.append(p2[-1] + x * x)

    def best(lo: int, hi: int, r: int, s1: int, s2: int) -> tuple[int, int]:
        """Best (value, j): add the lowest j and highest r-j of values[lo:hi] to the chosen sums."""
        best_v, best_j = -1, 0
        for j in range(r + 1):
            a1 = s1 + p1[lo + j] - p1[lo] + p1[hi] - p1[hi - (r - j)]
            a2 = s2 + p2[lo + j] - p2[lo] + p2[hi] - p2[hi - (r - j)]
            v = k * a2 - a1 * a1
            if v > best_v:
                best_v, best_j = v, j
        return best_v, best_j

    # A node: (-bound, key, lo, hi, n_bottom, n_top, s1, s2, chosen_bottom, chosen_top).
    # The undecided workflows are values[lo:hi]. Keys are tuples of decisions (0 = take, 1 = skip);
    # a prefix sorts before its extensions, so a node never sorts after any of its descendants.
    root_v, _ = best(0, m, k, 0, 0)
    heap: list[tuple] = []
    if not (drop_constant and root_v <= 0):
        heap.append((-root_v, (), 0, m, 0, 0, 0, 0, (), ()))
    while heap:
        neg_v, key, lo, hi, nb, nt, s1, s2, cb, ct = heapq.heappop(heap)
        if nb == bottom and nt == top:  # a candidate: its value is exact
            r = k - bottom - top
            _, j = best(lo, hi, r, s1, s2)
            middle = tuple(range(lo, lo + j)) + tuple(range(hi - (r - j), hi))
            yield Leaf(-neg_v, key, cb + ct, tuple(sorted(cb + ct + middle)), hi - lo)
            continue
        children = []
        if nb < bottom:  # decide values[lo] for the next bottom slot
            x = values[lo]
            children.append(((*key, 0), lo + 1, hi, nb + 1, nt, s1 + x, s2 + x * x, (*cb, lo), ct))
            children.append(((*key, 1), lo + 1, hi, nb, nt, s1, s2, cb, ct))
        else:  # decide values[hi - 1] for the next top slot
            x = values[hi - 1]
            children.append(((*key, 0), lo, hi - 1, nb, nt + 1, s1 + x, s2 + x * x, cb, (hi - 1, *ct)))
            children.append(((*key, 1), lo, hi - 1, nb, nt, s1, s2, cb, ct))
        for ckey, clo, chi, cnb, cnt, cs1, cs2, ccb, cct in children:
            r = k - len(ccb) - len(cct)
            if r > chi - clo:
                continue  # not enough workflows left to complete the subset
            v, _ = best(clo, chi, r, cs1, cs2)
            if drop_constant and v <= 0:
                continue
            heapq.heappush(heap, (-v, ckey, clo, chi, cnb, cnt, cs1, cs2, ccb, cct))


def advantages(scores: Sequence[float], eps: float = 1e-4) -> list[float]:
    """Group-relative advantages (s - mean) / (std + eps), std with Bessel's correction (as TRL)."""
    g = len(scores)
    mean = sum(scores) / g
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (g - 1)) if g > 1 else 0.0
    return [(s - mean) / (std + eps) for s in scores]


def variance(scores: Sequence[float]) -> float:
    """Population variance, as the paper's Var(s_1..s_n)."""
    mean = sum(scores) / len(scores)
    return sum((s - mean) ** 2 for s in scores) / len(scores)


def check_options(*, n: int, t: int, top_n: int, mode: str = "screen_sharpen", scope: str = "global",
                  prefix: str = "") -> None:
    """Reject impossible curation settings with a message naming the option (``prefix`` + name)."""
    if mode not in MODES:
        raise ValueError(f"`{prefix}mode` must be one of {', '.join(MODES)}, got {mode!r}")
    if scope not in ("global", "per_query"):
        raise ValueError(f"`{prefix}scope` must be 'global' or 'per_query', got {scope!r}")
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"`{prefix}t` must be an integer >= 1 (groups keep the bottom t and top t), got {t!r}")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"`{prefix}n` must be an integer >= 2, got {n!r}")
    if 2 * t > n:
        raise ValueError(f"`{prefix}t`: the sharpened group size 2t = {2 * t} must not exceed `{prefix}n` = {n}")
    if not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"`{prefix}top_n` must be an integer >= 1, got {top_n!r}")


def _failure_kind(reason: Any) -> str:
    """'invalid workflow', 'every run failed: timeout', ... (the score stage's reason without its details)."""
    text = str(reason or "unknown")
    head, _, rest = text.partition(": ")
    if head == "every run failed":
        return f"{head}: {rest.split(':', 1)[0]}"
    return head[:60]


def _validate(records: Iterable[Mapping[str, Any]]) -> dict[Any, list[tuple[int, Mapping[str, Any]]]]:
    by_query: dict[Any, list[tuple[int, Mapping[str, Any]]]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise TypeError(f"records[{i}]: expected a dict, got {type(rec).__name__}")
        if "query_id" not in rec:
            raise ValueError(f"records[{i}]: missing field 'query_id'")
        if "score" not in rec:
            raise ValueError(f"records[{i}] (query_id={rec['query_id']!r}): missing field 'score'")
        s, where = rec["score"], f"records[{i}] (query_id={rec['query_id']!r})"
        if s is not None:
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise ValueError(f"{where}: score must be a number or null, got {s!r}")
            if math.isnan(s) or not 0.0 <= s <= 1.0:
                raise ValueError(f"{where}: score {s!r} is outside [0, 1]")
        by_query.setdefault(rec["query_id"], []).append((i, rec))
    return by_query


@dataclass
class _Query:
    qid: Any
    members: list[Mapping[str, Any]]  # valid workflows, sorted by (score, seeded rank)
    scores: list[float]
    ints: list[int]


def build_groups(
    records: Iterable[Mapping[str, Any]],
    *,
    n: int = 14,
    t: int = 4,
    top_n: int = 100,
    seed: int = 0,
    mode: Mode = "screen_sharpen",
    scope: Scope = "global",
    dedup: bool = True,
    failed_score: float | None = 0.0,
    adv_eps: float = 1e-4,
) -> Curation:
    """Curate scored workflows into training groups of 2t members (see the module docstring).

    Args:
        records: scored samples; each needs ``query_id`` and ``score`` (float in [0, 1], None = failed).
        n: instance size before sharpening (paper: 14). Only ``screen_sharpen`` uses it.
        t: a group keeps its bottom t and top t workflows (paper: 4, so groups of 8).
        top_n: how many groups to keep (paper's dataset size d, best at 100): overall or per query.
        seed: breaks ties (and draws, in the random modes) deterministically.
        mode: ``screen_sharpen`` | ``screen`` | ``random_filter`` | ``random`` (paper Table 4).
        scope: ``global`` ranks instances of all queries together; ``per_query`` keeps top_n of each.
        dedup: rank distinct sharpened groups rather than n-subsets (see the module docstring).
        failed_score: the score of failed workflows (score None); None drops them instead. Workflows marked
            ``retry`` (an infrastructure failure: executor or sandbox) are never scored, whatever this is.
        adv_eps: the epsilon in (s - mean) / (std + eps).

    Returns:
        ``Curation(groups, stats)``. Each group: ``group_id``, ``query_id``, ``members`` (the input
        records, ascending score), ``scores``, ``advantages``, ``variance`` (of the group) and
        ``instance_variance`` (of the ranked instance). ``stats`` counts what was dropped and why.
    """
    check_options(n=n, t=t, top_n=top_n, mode=mode, scope=scope)
    if failed_score is not None and not 0.0 <= failed_score <= 1.0:
        raise ValueError(f"`failed_score` must be within [0, 1], got {failed_score!r}")
    by_query = _validate(records)
    k = n if mode == "screen_sharpen" else 2 * t
    stats: dict[str, Any] = {
        "mode": mode, "scope": scope, "n": n, "t": t, "top_n": top_n, "seed": seed, "dedup": dedup,
        "records": sum(len(v) for v in by_query.values()), "queries": len(by_query),
        "failed": 0, "failed_rescored": 0, "failed_reasons": {}, "infrastructure_dropped": 0,
        "skipped_queries": {}, "constant_queries": [],
        "instances": 0, "instances_constant": 0, "instances_kept": 0,
        "duplicate_subsets": 0, "duplicate_groups": 0, "groups": 0, "groups_per_query": {},
    }
    queries: list[_Query] = []
    for qid, items in by_query.items():
        valid = []
        for _, rec in items:
            if rec.get("retry"):  # not a verdict on the workflow: the score stage retries it
                stats["infrastructure_dropped"] += 1
                continue
            if rec["score"] is None:
                stats["failed"] += 1
                why = _failure_kind(rec.get("score_reason"))
                stats["failed_reasons"][why] = stats["failed_reasons"].get(why, 0) + 1
                if failed_score is None:
                    continue
                stats["failed_rescored"] += 1
            valid.append(rec)
        if len(valid) < k:
            stats["skipped_queries"][str(qid)] = (
                f"{len(valid)} usable workflows ({len(items) - len(valid)} failed of {len(items)}), "
                f"fewer than the {'n' if mode == 'screen_sharpen' else '2t'} = {k} an instance needs")
            continue
        rng = random.Random(f"{seed}:{qid}")
        ranks = list(range(len(valid)))
        rng.shuffle(ranks)
        score_of = [failed_score if r["score"] is None else float(r["score"]) for r in valid]
        order = sorted(range(len(valid)), key=lambda i: (score_of[i], ranks[i]))
        scores = [score_of[i] for i in order]
        q = _Query(qid, [valid[i] for i in order], scores, [round(s * SCALE) for s in scores])
        stats["instances"] += math.comb(len(valid), k)
        stats["instances_constant"] += sum(math.comb(q.ints.count(v), k) for v in set(q.ints))
        if q.ints[0] == q.ints[-1]:
            stats["constant_queries"].append(str(qid))
            if mode != "random":
                continue
        queries.append(q)

    if mode in ("random", "random_filter"):
        picked = _random_groups(queries, k, top_n, scope, seed, filtered=mode == "random_filter", stats=stats)
    else:
        picked = _screened_groups(queries, k, t if mode == "screen_sharpen" else k, top_n, scope, seed,
                                  sharpen=mode == "screen_sharpen", dedup=dedup, stats=stats)

    groups = []
    for q, positions, inst_var in picked:
        scores = [q.scores[p] for p in positions]
        groups.append({
            "group_id": len(groups), "query_id": q.qid, "members": [q.members[p] for p in positions],
            "scores": scores, "advantages": advantages(scores, adv_eps), "variance": variance(scores),
            "instance_variance": inst_var,
        })
        stats["groups_per_query"][str(q.qid)] = stats["groups_per_query"].get(str(q.qid), 0) + 1
    stats["groups"] = len(groups)
    stats["instances_kept"] = len(picked)
    stats["instances_screened_out"] = (stats["instances"] - stats["instances_constant"] - stats["instances_kept"]
                                       - stats["duplicate_subsets"]) if mode != "random" else None
    return Curation(groups, stats)


def _screened_groups(queries: list[_Query], k: int, t: int, top_n: int, scope: str, seed: int, *,
                     sharpen: bool, dedup: bool, stats: dict) -> list[tuple[_Query, tuple[int, ...], float]]:
    """Top-N by instance variance: a lazy k-way merge of every query's ranked stream."""
    collapse = sharpen and dedup  # rank distinct sharpened groups directly
    bottom, top = (t, t) if collapse else (k, 0)
    order = list(range(len(queries)))
    random.Random(f"{seed}:queries").shuffle(order)
    qrank = {qi: r for r, qi in enumerate(order)}
    streams = [ranked_subsets(q.ints, k, bottom=bottom, top=top) for q in queries]

    # Heap entries: (-v, tie ordinal within the query's equal-v run, seeded query rank, ...).
    heap: list[tuple] = []
    state = [(None, 0) for _ in queries]  # (last v, ordinal) per query

    def push(qi: int) -> None:
        leaf = next(streams[qi], None)
        if leaf is None:
            return
        last_v, ordinal = state[qi]
        ordinal = ordinal + 1 if leaf.v == last_v else 0
        state[qi] = (leaf.v, ordinal)
        heapq.heappush(heap, (-leaf.v, ordinal, qrank[qi], qi, leaf))

    for qi in range(len(queries)):
        push(qi)
    taken = [0] * len(queries)
    picked = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = top_n if scope == "global" else top_n * len(queries)
    while heap and len(picked) < total:
        _, _, _, qi, leaf = heapq.heappop(heap)
        if scope == "per_query" and taken[qi] >= top_n:
            continue  # this query is full; its stream is not advanced again
        q = queries[qi]
        positions = leaf.group
        if sharpen and not collapse:
            positions = leaf.instance[:t] + leaf.instance[-t:]
            if (qi, positions) in seen:
                stats["duplicate_groups"] += 1
            seen.add((qi, positions))
        if collapse:
            stats["duplicate_subsets"] += math.comb(leaf.gap, k - 2 * t) - 1
        picked.append((q, tuple(sorted(positions)), leaf.v / (k * k * SCALE * SCALE)))
        taken[qi] += 1
        push(qi)
    return picked


def _random_groups(queries: list[_Query], k: int, top_n: int, scope: str, seed: int, *, filtered: bool,
                   stats: dict) -> list[tuple[_Query, tuple[int, ...], float]]:
    """Uniformly random k-subsets (a query, then a subset), without repeats; optionally no constant ones."""
    rng = random.Random(f"{seed}:random")
    stats["random_rejected_constant"] = 0
    picked: list[tuple[_Query, tuple[int, ...], float]] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()

    def capacity(q: _Query) -> int:
        n_all = math.comb(len(q.ints), k)
        return n_all - sum(math.comb(q.ints.count(v), k) for v in set(q.ints)) if filtered else n_all

    pools = [[qi] for qi in range(len(queries))] if scope == "per_query" else [list(range(len(queries)))]
    for pool in pools:
        want = min(top_n, sum(capacity(queries[qi]) for qi in pool))
        got, attempts = 0, 0
        while got < want and attempts < 1000 * want + 1000:
            attempts += 1
            qi = rng.choice(pool)
            q = queries[qi]
            positions = tuple(sorted(rng.sample(range(len(q.ints)), k)))
            if (qi, positions) in seen:
                continue
            vals = [q.ints[p] for p in positions]
            if filtered and min(vals) == max(vals):
                stats["random_rejected_constant"] += 1
                continue
            seen.add((qi, positions))
            picked.append((q, positions, variance([q.scores[p] for p in positions])))
            got += 1
        if got < want:
            stats.setdefault("random_shortfall", 0)
            stats["random_shortfall"] += want - got
    return picked
