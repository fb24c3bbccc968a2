"""Group-wise curation: exactness against brute force, properties, and bad input."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest

from spogw.groups import SCALE, advantages, build_groups, ranked_subsets, variance


def _v(vals, k):
    return k * sum(x * x for x in vals) - sum(vals) ** 2


def _key(group, m, bottom, top):
    """The decision sequence `ranked_subsets` uses to break ties (0 = take, 1 = skip)."""
    bset, tset = set(group[:bottom]), set(group[bottom:])
    key, taken, p = [], 0, 0
    while taken < bottom:
        key.append(0 if p in bset else 1)
        taken += p in bset
        p += 1
    taken, p = 0, m - 1
    while taken < top:
        key.append(0 if p in tset else 1)
        taken += p in tset
        p -= 1
    return tuple(key)


def _brute(values, k, bottom, top):
    """Every k-subset, mapped to its candidate (bottom slots + top slots), best value per candidate."""
    best: dict[tuple, int] = {}
    for sub in itertools.combinations(range(len(values)), k):
        cand = sub[:bottom] + (sub[len(sub) - top:] if top else ())
        v = _v([values[p] for p in sub], k)
        if v > 0 and v > best.get(cand, -1):
            best[cand] = v
    return sorted(((v, _key(c, len(values), bottom, top), c) for c, v in best.items()), key=lambda x: (-x[0], x[1]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m,k,t", [(8, 6, 2), (9, 6, 3), (10, 6, 1), (7, 4, 2), (10, 10, 4)])
def test_ranked_subsets_equal_brute_force(seed, m, k, t):
    rng = random.Random(seed)
    levels = rng.choice([[0, 1], [0, 1, 2, 3], list(range(1000))])  # heavy ties .. no ties
    values = sorted(rng.choice(levels) for _ in range(m))
    for bottom, top in [(k, 0), (t, t)]:
        expected = _brute(values, k, bottom, top)
        got = [(leaf.v, leaf.key, leaf.group) for leaf in ranked_subsets(values, k, bottom=bottom, top=top)]
        assert got == expected


def test_ranked_subsets_is_lazy_on_huge_instance_spaces():
    rng = random.Random(1)
    values = sorted(rng.randrange(SCALE) for _ in range(64))
    start = time.perf_counter()
    leaves = list(itertools.islice(ranked_subsets(values, 32, bottom=32), 500))
    assert time.perf_counter() - start < 30  # C(64, 32) ≈ 1.8e18 subsets are never listed
    vs = [leaf.v for leaf in leaves]
    assert vs == sorted(vs, reverse=True) and len(set(leaf.group for leaf in leaves)) == 500
    # the best 32-subset of distinct values is a prefix + suffix of the sorted list
    best = max(_v(values[:j] + values[64 - (32 - j):], 32) for j in range(33))
    assert vs[0] == best


def _records(rng, queries, m, levels, fail_rate=0.0):
    recs = []
    for q in range(queries):
        for i in range(m):
            score = None if rng.random() < fail_rate else rng.choice(levels)
            recs.append({"query_id": f"q{q}", "score": score, "sample": i, "completion": f"workflow {q}-{i}"})
    return recs


def _brute_top_values(records, *, n, t, top_n, scope, dedup):
    """Top instance variances by full enumeration (values are independent of tie-breaking); a failed workflow
    scores 0.0 (the default ``failed_score``)."""
    per_query: dict[str, list[float]] = {}
    for r in records:
        per_query.setdefault(r["query_id"], []).append(0.0 if r["score"] is None else r["score"])
    pools = []
    for scores in per_query.values():
        ints = sorted(round(s * SCALE) for s in scores)
        if len(ints) < n:
            continue
        bottom, top = (t, t) if dedup else (n, 0)
        pools.append([v for v, _, _ in _brute(ints, n, bottom, top)])
    if scope == "per_query":
        vals = [v for pool in pools for v in pool[:top_n]]
    else:
        vals = sorted((v for pool in pools for v in pool), reverse=True)[:top_n]
    return sorted((v / (n * n * SCALE * SCALE) for v in vals), reverse=True)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["global", "per_query"])
@pytest.mark.parametrize("dedup", [True, False])
def test_screen_sharpen_keeps_exactly_the_top_n(seed, scope, dedup):
    rng = random.Random(seed)
    records = _records(rng, queries=5, m=9, levels=rng.choice([[0.0, 1.0], [0, 0.25, 0.5, 0.75, 1.0]]), fail_rate=0.1)
    groups, stats = build_groups(records, n=7, t=2, top_n=6, seed=seed, scope=scope, dedup=dedup)
    got = sorted((g["instance_variance"] for g in groups), reverse=True)
    assert got == _brute_top_values(records, n=7, t=2, top_n=6, scope=scope, dedup=dedup)
    if scope == "global":
        assert [g["instance_variance"] for g in groups] == got  # emitted in descending variance


def test_group_properties():
    rng = random.Random(7)
    records = _records(rng, queries=30, m=16, levels=[0, 1 / 3, 2 / 3, 1.0], fail_rate=0.05)
    groups, stats = build_groups(records, n=14, t=4, top_n=50, seed=3)
    assert len(groups) == 50 == stats["groups"]
    ids = {id(r) for r in records}
    for g in groups:
        assert len(g["members"]) == len(g["scores"]) == len(g["advantages"]) == 8
        assert all(id(m) in ids and m["query_id"] == g["query_id"] for m in g["members"])  # input records, as given
        assert g["scores"] == [m["score"] or 0.0 for m in g["members"]] == sorted(g["scores"])  # failed: 0.0
        assert abs(sum(g["advantages"])) < 1e-9 and g["variance"] > 0
        assert g["variance"] >= g["instance_variance"] - 1e-12  # sharpening keeps the extremes: never less spread
        assert g["advantages"] == advantages(g["scores"])
        assert len({m["sample"] for m in g["members"]}) == 8
    keys = [(g["query_id"], tuple(m["sample"] for m in g["members"])) for g in groups]
    assert len(set(keys)) == len(keys)  # dedup: every group is distinct
    # nothing is dropped uncounted
    assert stats["instances"] == (stats["instances_constant"] + stats["instances_kept"] + stats["duplicate_subsets"]
                                  + stats["instances_screened_out"])
    assert stats["failed"] == sum(r["score"] is None for r in records)


def test_sharpened_groups_are_the_extremes_of_their_instance():
    # Distinct scores: the kept instance of a single query is unique, so its extremes are known.
    scores = [0.05 * i for i in range(12)]
    records = [{"query_id": "q", "score": s, "i": i} for i, s in enumerate(scores)]
    (g,), _ = build_groups(records, n=8, t=2, top_n=1, dedup=False)
    # the max-variance 8-subset of distinct sorted values is a prefix + suffix: here 4 + 4
    assert [m["i"] for m in g["members"]] == [0, 1, 10, 11]
    assert g["instance_variance"] == pytest.approx(variance(scores[:4] + scores[8:]))


def test_same_seed_same_output_and_seed_breaks_ties():
    rng = random.Random(0)
    records = _records(rng, queries=20, m=16, levels=[0.0, 1.0])

    def run(seed):
        groups, _ = build_groups(records, n=14, t=4, top_n=30, seed=seed)
        return [(g["query_id"], tuple(m["sample"] for m in g["members"])) for g in groups]

    assert run(1) == run(1)
    assert run(1) != run(2)  # binary scores tie everywhere: the seed decides which ties are kept


def test_ties_are_shared_across_queries():
    records = [{"query_id": f"q{q}", "score": float(i % 2), "i": i} for q in range(10) for i in range(16)]
    groups, stats = build_groups(records, n=14, t=4, top_n=20)
    assert len({g["query_id"] for g in groups}) == 10  # round robin over equally good queries
    assert max(stats["groups_per_query"].values()) == 2


def test_large_instance_space_finishes_quickly():
    rng = random.Random(2)
    records = [{"query_id": f"q{q}", "score": rng.random()} for q in range(4) for _ in range(64)]
    start = time.perf_counter()
    groups, stats = build_groups(records, n=32, t=4, top_n=100)
    assert time.perf_counter() - start < 30
    assert len(groups) == 100 and stats["instances"] == 4 * math.comb(64, 32)


@pytest.mark.parametrize("mode", ["random", "random_filter", "screen"])
def test_ablation_modes(mode):
    rng = random.Random(5)
    records = _records(rng, queries=10, m=12, levels=[0.0, 1.0])
    records += [{"query_id": "flat", "score": 1.0, "sample": i} for i in range(12)]  # no variance at all
    groups, stats = build_groups(records, n=10, t=3, top_n=40, seed=1, mode=mode)
    assert len(groups) == 40 and all(len(g["members"]) == 6 for g in groups)
    if mode != "random":
        assert all(g["variance"] > 0 for g in groups) and "flat" in stats["constant_queries"]
    if mode == "screen":
        vs = [g["instance_variance"] for g in groups]
        assert vs == sorted(vs, reverse=True) and vs[0] == pytest.approx(0.25)
    assert build_groups(records, n=10, t=3, top_n=40, seed=1, mode=mode).groups == groups


def test_failed_workflows_are_counted_or_rescored():
    records = [{"query_id": "a", "score": s} for s in [None, None, 0.0, 1.0, 0.5, 1.0]]
    _, stats = build_groups(records, n=4, t=2, top_n=5, failed_score=None)  # the paper's literal reading
    assert stats["failed"] == 2 and stats["failed_rescored"] == 0 and stats["groups"] == 1
    groups, stats = build_groups(records, n=6, t=2, top_n=5)  # the default: a failed workflow is a bad one
    assert stats["failed_rescored"] == 2 and groups[0]["scores"][:2] == [0.0, 0.0]
    assert groups[0]["advantages"][0] < 0  # it is pushed down, not silently left out of its group


def test_failures_are_counted_by_reason_and_infrastructure_failures_never_scored():
    records = [{"query_id": "a", "score": None, "score_reason": "invalid workflow: no Workflow class"},
               {"query_id": "a", "score": None, "score_reason": "every run failed: timeout: wall time 300 s"},
               {"query_id": "a", "score": None, "retry": True, "score_reason": "infrastructure failure: ..."},
               *({"query_id": "a", "score": s} for s in (0.5, 1.0, 0.25))]
    groups, stats = build_groups(records, n=5, t=2, top_n=1)
    assert stats["failed"] == 2 and stats["infrastructure_dropped"] == 1
    assert stats["failed_reasons"] == {"invalid workflow": 1, "every run failed: timeout": 1}
    assert len(groups[0]["members"]) == 4 and not any(m.get("retry") for m in groups[0]["members"])


def test_queries_with_too_few_samples_are_reported():
    records = [{"query_id": "short", "score": 1.0}] * 3 + [{"query_id": "ok", "score": float(i % 2)} for i in range(6)]
    groups, stats = build_groups(records, n=5, t=2, top_n=3)
    assert "short" in stats["skipped_queries"] and "fewer than the n = 5" in stats["skipped_queries"]["short"]
    assert {g["query_id"] for g in groups} == {"ok"}


@pytest.mark.parametrize("bad,message", [
    ({"query_id": "q", "score": 1.5}, r"records\[1\] \(query_id='q'\): score 1.5 is outside \[0, 1\]"),
    ({"query_id": "q", "score": float("nan")}, r"records\[1\].*nan"),
    ({"query_id": "q"}, r"records\[1\].*missing field 'score'"),
    ({"score": 0.5}, r"records\[1\]: missing field 'query_id'"),
    ({"query_id": "q", "score": "high"}, r"records\[1\].*must be a number"),
])
def test_bad_records_name_the_record(bad, message):
    with pytest.raises(ValueError, match=message):
        build_groups([{"query_id": "q", "score": 0.0}, bad], n=2, t=1, top_n=1)


@pytest.mark.parametrize("kwargs,flag", [
    ({"n": 6, "t": 4}, "`t`"), ({"n": 1, "t": 1}, "`n`"), ({"top_n": 0}, "`top_n`"),
    ({"mode": "sharpest"}, "`mode`"), ({"scope": "local"}, "`scope`"), ({"t": 0}, "`t`"),
])
def test_bad_options_name_the_option(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        build_groups([], **{"n": 14, "t": 4, "top_n": 10, **kwargs})
