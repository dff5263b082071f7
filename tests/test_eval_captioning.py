"""Caption metrics: our pipeline against pycocoevalcap's own scorers run directly.

One Java METEOR process serves the whole session (JVM start + paraphrase table take ~9 s).
"""
from __future__ import annotations

import shutil

import pytest

from jaxvlm.eval.captioning import JavaNotFoundError, caption_scores

REFS = {
    "1": ["A man is riding a horse on the beach.", "A person rides a brown horse near the ocean."],
    "2": ["Two dogs play with a red frisbee in the park.", "Dogs playing frisbee on the grass."],
    "3": ["A plate of pasta with tomato sauce.", "Spaghetti with red sauce on a white plate."],
    "4": ["a black and white cat sleeping on a sofa", "A cat is asleep on the couch."],
}
CANDS = {
    "1": "A man riding a horse on a beach.",
    "2": "Two dogs are playing with a frisbee.",
    "3": "A bowl of soup on a table.",
    "4": "A black cat sleeps on the couch.",
}


@pytest.fixture(scope="session")
def meteor():
    if shutil.which("java") is None:
        pytest.skip("Java is not installed (METEOR 1.5 and PTBTokenizer need it)")
    from jaxvlm.eval.captioning import MeteorScorer

    with MeteorScorer() as m:
        yield m


@pytest.fixture(scope="module")
def ours(meteor):
    return caption_scores(CANDS, REFS, meteor=meteor)


def test_caption_metrics_equal_pycocoevalcap_direct(meteor, ours):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # COCOEvalCap.evaluate: tokenise gts and res separately, then each scorer.
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in CANDS.items()})
    m_corpus, m_each = meteor.compute_score(gts, res)
    assert ours["scores"]["METEOR"] == m_corpus
    assert [r["METEOR"] for r in ours["per_sample"]] == m_each
    assert 0.0 < m_corpus < 1.0
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours["scores"][f"BLEU_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=0)
    assert ours["scores"]["ROUGE_L"] == Rouge().compute_score(gts, res)[0]
    assert ours["scores"]["CIDEr"] == Cider().compute_score(gts, res)[0]


def test_caption_metric_through_harness(meteor, ours):
    from jaxvlm.eval import evaluate

    preds = [{"image_id": int(k), "question_id": 100 + int(k), "text": v} for k, v in CANDS.items()]
    refs = {"annotations": [{"image_id": int(k), "caption": c} for k, v in REFS.items() for c in v]}
    r = evaluate("meteor", preds, refs, meteor=meteor, metrics=("METEOR",))
    assert r["scores"] == {"METEOR": ours["scores"]["METEOR"]}
    assert any("SPICE" in n for n in r["notes"])


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(JavaNotFoundError, match=r"no `java` executable is on PATH.*Install a Java runtime"):
        caption_scores({"1": "a dog"}, {"1": ["a dog runs"]}, metrics=("BLEU",))
