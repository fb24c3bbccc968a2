"""DROP and HotpotQA F1: values worked out by hand with the rules of the official scripts
(``drop_eval.py``, ``hotpot_evaluate_v1.py``), and every gold answer scoring 1.0 against itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from spogw.benchmarks import Record, load_benchmark, score_output, score_output_detailed
from spogw.benchmarks.f1 import drop_f1, hotpot_f1, normalize_drop, normalize_hotpot

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "aflow"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"offline benchmark data not found at {DATA}")


@pytest.mark.parametrize(
    ("prediction", "gold", "f1"),
    [
        ("The Eiffel Tower", "Eiffel Tower", 1.0),  # article and case
        ("Paris, France", "Paris", 2 / 3),  # P = 1/2, R = 1
        ("the the cat cat", "cat", 2 / 3),  # multiset: "cat cat" vs "cat": overlap 1, P = 1/2
        ("cat cat dog", "cat", 0.5),  # P = 1/3, R = 1
        ("1,000 people", "1000", 2 / 3),  # punctuation goes, no number handling
        ("22-yard", "22 yard", 0.0),  # "22yard" is one token
        ("yes", "no", 0.0),
        ("yes it is", "yes", 0.0),  # a yes/no gold needs an exact yes/no
        ("No.", "no", 1.0),
        ("", "Paris", 0.0),
    ],
)
def test_hotpot_f1_matches_hand_computed_values(prediction, gold, f1):
    assert hotpot_f1(prediction, gold) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("prediction", "gold", "f1"),
    [
        ("83", "83", 1.0),
        ("83 years", "83", 0.67),  # {83.0, years} vs {83.0}: P = 1/2, R = 1, rounded to 2 decimals
        ("84", "83", 0.0),  # the gold's number is missing: 0 whatever else overlaps
        ("84 years", "83 years", 0.0),
        ("The Bulgarian", "Bulgarian", 1.0),
        ("2.0", "2", 1.0),  # numbers compare as floats
        ("1,000", "1000", 1.0),  # "1,000" -> "1000" -> 1000.0
        ("22-yard", "22 yard", 1.0),  # hyphens split tokens
        ("cat cat dog", "cat", 0.67),  # sets: {cat, dog} vs {cat}
        ("x y z", "y z w", 0.67),  # P = R = 2/3
        ("", "83", 0.0),
        (["Smith", "Jones"], ["Jones", "Smith"], 1.0),  # spans aligned one to one
        ("Smith", ["Smith", "Jones"], 0.5),  # one of two gold spans found
        (["Jones", "Smith", "Brown"], ["Smith", "Jones"], 0.67),  # 2 matched of max(3, 2) spans
        (["John Smith", "Jones"], ["Jones", "Smith"], 0.83),  # (2/3 + 1) / 2, rounded
    ],
)
def test_drop_f1_matches_hand_computed_values(prediction, gold, f1):
    assert drop_f1(prediction, gold) == f1


def test_normalisations_differ_as_the_official_scripts_do():
    assert normalize_drop("The 22-yard Field-goal, 3") == "22.0 yard field goal 3.0"
    assert normalize_hotpot("The 22-yard Field-goal, 3") == "22yard fieldgoal 3"


def drop_record(gold: str) -> Record:
    return Record(id="d", benchmark="drop", family="qa", question="Passage: p\nQuestion: q?\nAnswer:", answer=gold)


def test_drop_takes_the_best_gold_alternative():
    assert score_output("drop", drop_record("7|14"), "14") == 1.0
    assert score_output("drop", drop_record("7|14"), "7 and 14") == 0.5
    result = score_output_detailed("drop", drop_record("Derek Stanley|WR Derek Stanley"), "wide receiver Derek Stanley")
    # vs "Derek Stanley": P = 2/4, R = 1 -> 0.67; vs "WR Derek Stanley": P = 2/4, R = 2/3 -> 0.57
    assert result.score == 0.67
    assert result.details["best_gold"] == "Derek Stanley"


@needs_data
def test_every_drop_gold_and_reference_completion_scores_one():
    recs = load_benchmark("drop", "train", data_dir=DATA) + load_benchmark("drop", "test", data_dir=DATA)
    assert len(recs) == 980
    assert [r.id for r in recs if score_output("drop", r, r.answer.split("|")[-1]) != 1.0] == []
    assert [r.id for r in recs if score_output("drop", r, r.meta["completion"]) != 1.0] == []
    assert score_output("drop", recs[0], "") == 0.0


@needs_data
def test_every_hotpotqa_gold_scores_one_and_a_wrong_answer_less():
    recs = load_benchmark("hotpotqa", "train", data_dir=DATA)
    assert [r.id for r in recs if score_output("hotpotqa", r, f"  {r.answer}. ") != 1.0] == []
    assert all(score_output("hotpotqa", r, "Zanzibar Xylophone Quartet") < 1.0 for r in recs)
    first = recs[0]
    assert first.question.startswith("Context: ")
    assert first.question.endswith(f"Question: {first.meta['raw_question']}\n\nAnswer:")
