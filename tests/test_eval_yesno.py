"""POPE and PhD: the no/not parsing rule and metrics computed by hand."""
from __future__ import annotations

import pytest

from jaxvlm.eval import EvalInputError, evaluate
from jaxvlm.eval.pope import parse_yes_no


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("No.", "no"),
    ("no", "no"),
    ("There is not a dog.", "no"),
    ("The dog is not visible, yes.", "no"),
    ("Yes. There is no cat though.", "yes"),      # only the first sentence counts
    ("Not at all", "yes"),                        # "Not" (capital) is not in the list
    ("NO", "yes"),
    ("Nope", "yes"),
    ("No, there is none", "no"),
    ("No,there is none", "yes"),                  # commas are deleted, not spaced: "Nothere"
    ("There's nothing", "yes"),
    ("", "yes"),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


# Answers chosen so that TP=3, FP=1, TN=2, FN=2 (ids out of order on purpose).
POPE_LABELS = [
    {"question_id": 1, "label": "yes", "category": "random"},
    {"question_id": 2, "label": "yes", "category": "random"},
    {"question_id": 3, "label": "yes", "category": "random"},
    {"question_id": 4, "label": "yes", "category": "adversarial"},
    {"question_id": 5, "label": "yes", "category": "adversarial"},
    {"question_id": 6, "label": "no", "category": "adversarial"},
    {"question_id": 7, "label": "no", "category": "random"},
    {"question_id": 8, "label": "no", "category": "adversarial"},
]
POPE_PREDS = [
    {"question_id": 8, "text": "There is not a cup."},          # TN
    {"question_id": 1, "answer": "Yes, there is a car."},        # TP (answer key)
    {"question_id": 2, "text": "Yes"},                           # TP
    {"question_id": 3, "text": "I think so."},                   # TP
    {"question_id": 4, "text": "No, there isn't."},              # FN
    {"question_id": 5, "text": "no"},                            # FN
    {"question_id": 6, "text": "Yes. No dog is visible"},        # FP (first sentence only)
    {"question_id": 7, "text": "No"},                            # TN
]


def test_pope_metrics_by_hand():
    r = evaluate("pope", POPE_PREDS, POPE_LABELS)
    s = r["scores"]
    tp, fp, tn, fn = 3, 1, 2, 2
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert s["accuracy"] == pytest.approx((tp + tn) / 8)
    assert s["precision"] == pytest.approx(precision)
    assert s["recall"] == pytest.approx(recall)
    assert s["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert s["yes_ratio"] == pytest.approx((tp + fp) / 8)
    # random: ids 1,2,3 TP, 7 TN; adversarial: 4,5 FN, 6 FP, 8 TN
    assert r["by_category"]["random"]["accuracy"] == 1.0
    assert r["by_category"]["adversarial"]["accuracy"] == pytest.approx(1 / 4)
    assert r["by_category"]["adversarial"]["f1"] == 0.0
    assert r["by_category"]["mean_over_categories"]["accuracy"] == pytest.approx((1.0 + 1 / 4) / 2)


def test_pope_pairs_by_id_and_rejects_unknown_ids():
    with pytest.raises(EvalInputError, match=r"1 of 2 prediction ids are not in the POPE labels.*'99'"):
        evaluate("pope", [{"question_id": 1, "text": "yes"}, {"question_id": 99, "text": "no"}], POPE_LABELS,
                 allow_missing=True)
    with pytest.raises(EvalInputError, match=r"7 of 8 POPE labels ids have no prediction"):
        evaluate("pope", [{"question_id": 1, "text": "yes"}], POPE_LABELS)
    r = evaluate("pope", [{"question_id": "1", "text": "yes"}], POPE_LABELS, allow_missing=True)
    assert r["n"] == 1 and r["scores"]["accuracy"] == 1.0


def test_pope_duplicate_prediction_ids():
    with pytest.raises(EvalInputError, match=r"duplicate prediction id '1' \(lines 1 and 2\)"):
        evaluate("pope", [{"question_id": 1, "text": "yes"}, {"question_id": 1, "text": "no"}], POPE_LABELS,
                 allow_missing=True)


def test_phd_accuracy_per_task_and_mode():
    # PhD data.jsonl has no id: the id is the 0-based line index.
    data = [
        {"answer": "yes", "task": "object_recognition", "mode": "neutral"},            # 0
        {"answer": "no", "task": "object_recognition", "mode": "neutral"},             # 1
        {"answer": "no", "task": "object_recognition", "mode": "misleading_hitem"},    # 2
        {"answer": "yes", "task": "counting", "mode": "misleading_hitem"},             # 3
        {"answer": "no", "task": "counting", "mode": "misleading_hitem"},              # 4
        {"answer": "yes", "task": "sentiment_analysis", "mode": "neutral"},            # 5
    ]
    preds = [  # shuffled, as multi-process decoding writes them
        {"question_id": 4, "text": "There are not three."},   # no  == no   correct
        {"question_id": 0, "text": "Yes."},                   # yes == yes  correct
        {"question_id": 5, "text": "No, it is sad."},         # no  != yes
        {"question_id": 2, "text": "Yes, it is a cat"},       # yes != no
        {"question_id": 1, "text": "no"},                     # correct
        {"question_id": 3, "text": "Not sure"},               # "Not" -> yes == yes correct
    ]
    s = evaluate("phd", preds, data)["scores"]
    assert s == {"accuracy": pytest.approx(4 / 6), "ON": 1.0, "SN": 0.0, "OM": 0.0, "CM": 1.0}
