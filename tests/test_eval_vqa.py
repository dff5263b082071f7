"""VQA accuracy (official normalisation, leave-one-out) and multiple-choice parsing, by hand."""
from __future__ import annotations

import pytest

from jaxvlm.eval import evaluate
from jaxvlm.eval.vqa import normalize_answer, parse_choice, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                      # number words -> digits
    ("two dogs", "2 dogs"),
    ("none", "0"),
    ("The red one.", "red 1"),         # articles dropped, trailing period stripped
    ("an apple", "apple"),
    ("a", ""),
    ("Yes!", "yes"),                   # "!" not touching a space -> replaced by a space, then stripped
    ("dont", "don't"),                 # contractions get their apostrophe back
    ("isnt it", "isn't it"),
    ("1,000", "1000"),                 # digit,digit -> punctuation deleted, not spaced
    ("black/white", "black white"),    # no space around "/" -> replaced by a space
    ("black / white", "black white"),  # space-touching -> deleted; split() drops the double space
    ("3.5", "3.5"),                    # a period before a digit stays
    ("  Left\tside\n", "left side"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_leave_one_out_by_hand():
    # 10 humans; k of them say the predicted answer. Leave-one-out over the 10 subsets:
    # k >= 4: every subset has >= 3 matches -> 1.0
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    # k = 3: 3 subsets drop a matching human (2/3), 7 keep all three (1) -> (3*2/3 + 7) / 10
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # k = 1: 1 subset has 0 matches, 9 have 1 -> 9 * (1/3) / 10 = 0.3
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    # normalisation of the prediction: "Two." -> "2"; articles: "the dog" -> "dog"
    assert vqa_accuracy("Two.", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("The dog", ["dog"] * 10) == 1.0
    # human answers are NOT digit/article-normalised (official behaviour): "two" never matches "2"
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    # ...but they get punctuation processing when they disagree: "1,000" -> "1000"
    assert vqa_accuracy("1000", ["1,000"] * 3 + ["10"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # and that step is not followed by a strip: "yes!" -> "yes " never equals "yes" (official quirk)
    assert vqa_accuracy("yes", ["yes!"] * 3 + ["no"] * 7) == 0.0


def test_vqa_metric_with_answer_types():
    anns = {"annotations": [
        {"question_id": 10, "answer_type": "number", "answers": [{"answer": "2", "answer_id": i} for i in range(10)]},
        {"question_id": 11, "answer_type": "other", "answers": ["red"] * 2 + ["blue"] * 8},
    ]}
    preds = [{"question_id": 11, "text": "Red."}, {"question_id": 10, "text": "two"}]
    s = evaluate("vqa", preds, anns)["scores"]
    red = (2 * 1 / 3 + 8 * 2 / 3) / 10
    assert s["accuracy"] == pytest.approx((1.0 + red) / 2)
    assert s["accuracy/number"] == 1.0 and s["accuracy/other"] == pytest.approx(red)


@pytest.mark.parametrize("text, options, expected", [
    ("B", None, "B"),
    ("(C)", None, "C"),
    ("C. A red car", None, "C"),
    ("(A) yes", None, "A"),
    ("The answer is D.", None, "D"),
    ("I choose option b", None, "B"),
    ("A cat sits on the mat", None, None),      # the article "A" is not a choice
    ("dog", ["cat", "dog", "bird"], "B"),       # option text match
    ("E", ["cat", "dog"], None),                # out of range
    ("", None, None),
])
def test_parse_choice(text, options, expected):
    assert parse_choice(text, options) == expected


def test_multiple_choice_accuracy():
    anns = [{"question_id": 1, "answer": "A"}, {"question_id": 2, "answer": 1, "options": ["x", "y"]},
            {"question_id": 3, "answer": "C"}]
    preds = [{"question_id": 1, "text": "A"}, {"question_id": 2, "text": "y"}, {"question_id": 3, "text": "hmm"}]
    s = evaluate("mc", preds, anns)["scores"]
    assert s == {"accuracy": pytest.approx(2 / 3), "unparsed": pytest.approx(1 / 3)}
