"""AMBER generative metrics on hand-built responses, counts worked out by hand."""
from __future__ import annotations

import json

import pytest

from jaxvlm.eval.nltk_data import MissingNLTKDataError, require_nltk_data


@pytest.fixture(scope="module")
def nouns():
    try:
        require_nltk_data()
    except MissingNLTKDataError as e:
        pytest.skip(f"nltk data is not installed (set NLTK_DATA, e.g. ../shared/nltk_data): {e}")
    from jaxvlm.eval.amber import NounExtractor

    return NounExtractor()


ANNOTATIONS = [  # AMBER's annotations.json layout: question_id k is item k - 1
    {"id": 1, "image": "AMBER_1.jpg", "type": "generative", "truth": ["dog", "grass", "frisbee"], "hallu": ["cat", "ball"]},
    {"id": 2, "image": "AMBER_2.jpg", "type": "generative", "truth": ["car", "road"], "hallu": ["person", "bus"]},
    {"id": 3, "image": "AMBER_3.jpg", "type": "generative", "truth": ["bench", "tree"], "hallu": ["bird"]},
    {"id": 4, "image": "AMBER_1.jpg", "type": "discriminative-hallucination", "query": "Is there a cat?", "truth": "no"},
]
RELATION = {"dog": ["puppy"], "cat": ["kitten"], "person": ["man", "woman"], "road": ["street"],
            "car": [], "grass": [], "frisbee": [], "ball": [], "bus": [], "bench": [], "tree": [], "bird": [],
            "sky": []}
PREDS = [
    # nouns in vocabulary: dog (truth), frisbee (truth), grass (truth), kitten (-> hallu cat)
    {"question_id": 1, "text": "A dog with a frisbee on the grass next to two kittens."},
    # man (-> hallu person), car (truth), street (-> truth road), sky (global safe word: counted, not judged)
    {"question_id": 2, "text": "A man stands next to a car on the street under the sky."},
    # "Bench" keeps its capital (AMBER does not lower-case) -> not in the vocabulary; tree (truth)
    {"question_id": 3, "text": "A Bench under a tree."},
]


def test_amber_generative_by_hand(nouns, tmp_path):
    from jaxvlm.eval import evaluate

    (tmp_path / "relation.json").write_text(json.dumps(RELATION))
    (tmp_path / "safe_words.txt").write_text("sky\n")
    r = evaluate("amber", PREDS, ANNOTATIONS, association=str(tmp_path / "relation.json"),
                 safe_words=str(tmp_path / "safe_words.txt"), extractor=nouns, per_sample=True)
    mentions = [4, 4, 1]
    hallucinated = [1, 1, 0]          # kitten; man
    cog = [1, 1, 0]                   # kitten -> cat, man -> person are both hallu-list objects
    truth_cov, truth_n = [3, 2, 1], [3, 2, 2]
    hallu_cov, hallu_n = [1, 1, 0], [2, 2, 1]
    s = r["scores"]
    assert s["CHAIR"] == pytest.approx(sum(hallucinated) / sum(mentions))            # 2/9
    assert s["Cover"] == pytest.approx(sum(truth_cov) / sum(truth_n))                # 6/7
    assert s["Hal"] == pytest.approx(2 / 3)
    assert s["Cog"] == pytest.approx(sum(cog) / sum(mentions))                       # 2/9
    assert s["Cog_hallu_cover"] == pytest.approx(sum(hallu_cov) / sum(hallu_n))      # 2/5
    assert [x["hallucinated"] for x in r["per_sample"]] == [["kitten"], ["man"], []]


def test_amber_without_association_table(nouns):
    from jaxvlm.eval import evaluate

    # Vocabulary = all truth/hallu words; "kitten", "man", "street" are now unknown words.
    r = evaluate("amber", PREDS, ANNOTATIONS, extractor=nouns, per_sample=True)
    assert [x["mentions"] for x in r["per_sample"]] == [["dog", "frisbee", "grass"], ["car"], ["tree"]]
    assert r["scores"]["CHAIR"] == 0.0 and r["scores"]["Hal"] == 0.0
    assert r["scores"]["Cover"] == pytest.approx(5 / 7)
    assert any("no association table" in n for n in r["notes"])
