"""CHAIR against hand-derived values of the original algorithm (REVERSE / UE chair.py).

Every expected mention list, hallucination list and token count below was written from the
algorithm's definition (lower-case, nltk tokenise, POS-aware WordNet lemma, double words, toilet
seat rule, COCO-80 synonym table), not from our output.
"""
from __future__ import annotations

import json

import pytest

from jaxvlm.eval.io import load_predictions
from jaxvlm.eval.nltk_data import MissingNLTKDataError, require_nltk_data


@pytest.fixture(scope="module")
def extractor():
    try:
        require_nltk_data()
    except MissingNLTKDataError as e:
        pytest.skip(f"nltk data for CHAIR is not installed (set NLTK_DATA, e.g. ../shared/nltk_data): {e}")
    from jaxvlm.eval.chair import ChairExtractor

    return ChairExtractor()


# (caption, instance categories, GT captions, mentions [(word, node)], hallucinated nodes, #tokens)
CASES = [
    # "men" stays "men" in WordNet -> never a person; "motor bike" merges, then matches nothing.
    ("Two men are riding motor bikes.", ["person", "motorcycle"], [], [], [], 6),
    ("A man on a motor bike.", ["person"], [], [("man", "person")], [], 6),
    # "skiing" (VBG) -> "ski" -> skis.
    ("A woman is skiing down the hill.", ["person"], [], [("woman", "person"), ("ski", "skis")], ["skis"], 8),
    # "baby elephant" -> elephant (not a person); plural "children" -> child.
    ("People and children with a baby elephant.", ["person", "elephant"], [],
     [("people", "person"), ("child", "person"), ("elephant", "elephant")], [], 7),
    ("A hot dog on a plate next to wine glasses.", ["hot dog", "cup"], [],
     [("hot dog", "hot dog"), ("wine glass", "wine glass")], ["wine glass"], 9),
    # "toilet seat" -> toilet; "seat" with "toilet" elsewhere is dropped.
    ("A toilet seat in the bathroom.", ["toilet"], [], [("toilet", "toilet")], [], 6),
    ("A seat next to a toilet.", ["sink"], [], [("toilet", "toilet")], ["toilet"], 7),
    ("A parking meter and a stop sign.", ["parking meter"], [],
     [("parking meter", "parking meter"), ("stop sign", "stop sign")], ["stop sign"], 6),
    ("A potted plant near the fire hydrant.", ["potted plant", "fire hydrant"], [],
     [("potted plant", "potted plant"), ("fire hydrant", "fire hydrant")], [], 6),
    # "passenger train" -> train (not a person); "train track" is a non-object double word.
    ("A passenger train on the train tracks.", ["train"], [], [("train", "train")], [], 6),
    # "bow tie" -> tie.
    ("A man with a bow tie.", ["person"], [], [("man", "person"), ("tie", "tie")], ["tie"], 6),
    ("a mobile phone and a laptop computer", ["cell phone", "laptop"], [],
     [("mobile phone", "cell phone"), ("laptop computer", "laptop")], [], 5),
    # "sports" lemmatises to "sport", so "sports ball" does not merge; "ball" alone is sports ball.
    ("a tennis racket and a sports ball", ["tennis racket", "person"], [],
     [("tennis racket", "tennis racket"), ("ball", "sports ball")], ["sports ball"], 6),
    ("an adult giraffe", ["giraffe"], [], [("giraffe", "giraffe")], [], 2),
    ("a suit case and a hair drier", ["suitcase"], [],
     [("suit case", "suitcase"), ("hair drier", "hair drier")], ["hair drier"], 5),
    ("the kids eat donuts and a doughnut", ["person", "donut"], [],
     [("kid", "person"), ("donut", "donut"), ("doughnut", "donut")], [], 7),
    # Two mentions of one hallucinated object count twice for CHAIR-i.
    ("a motorcycle and a motor cycle", ["bicycle"], [],
     [("motorcycle", "motorcycle"), ("motor cycle", "motorcycle")], ["motorcycle", "motorcycle"], 5),
    ("an air plane", ["airplane"], [], [("air plane", "airplane")], [], 2),
    ("a glass of wine", ["wine glass", "dining table"], [], [], [], 4),
    ("A dog is lying on a couch while people are watching tv.", ["dog", "couch"], [],
     [("dog", "dog"), ("couch", "couch"), ("people", "person"), ("tv", "tv")], ["person", "tv"], 13),
    ("the skis", ["skis"], [], [("ski", "skis")], [], 2),
    # "cheesecake" never matches (its table entry has a leading space); "table" is dining table.
    ("A dining table with a cheesecake.", ["dining table", "cake"], [], [("table", "dining table")], [], 7),
    # "dining" (VBG) -> "din".
    ("A family is dining at a table.", ["dining table"], [], [("table", "dining table")], [], 8),
    ("A group of men playing frisbee.", ["frisbee"], [], [("frisbee", "frisbee")], [], 7),
    ("a cheesecake and a cupcake", ["donut"], [], [("cupcake", "cake")], ["cake"], 5),
    ("a traffic light and street lights", ["traffic light"], [],
     [("traffic light", "traffic light"), ("street light", "traffic light")], [], 4),
    ("A puppy and a kitten sleep on a sofa.", ["dog", "cat", "bed"], [],
     [("puppy", "dog"), ("kitten", "cat"), ("sofa", "couch")], ["couch"], 10),
    # "stove top oven" has three words: never merged.
    ("A stove top oven", ["oven"], [], [("stove", "oven"), ("oven", "oven")], [], 4),
    ("A baby bird and a baby.", ["bird"], [], [("bird", "bird"), ("baby", "person")], ["person"], 6),
    ("The teddy bear sits in a chair.", ["teddy bear"], [],
     [("teddy bear", "teddy bear"), ("chair", "chair")], ["chair"], 7),
    ("A cow and a bull near the sheep and goats.", ["cow", "sheep"], [],
     [("cow", "cow"), ("bull", "cow"), ("sheep", "sheep"), ("goat", "sheep")], [], 11),
    ("A television and a monitor on the desk.", ["tv", "laptop"], [],
     [("television", "tv"), ("monitor", "tv"), ("desk", "dining table")], ["dining table"], 9),
    ("A cab and a van drive past a bus.", ["car", "bus"], [], [("cab", "car"), ("van", "car"), ("bus", "bus")], [], 10),
    ("", ["person"], [], [], [], 0),
    # "home plate" is a non-object double word.
    ("A baseball player swings a baseball bat at home plate.", ["person", "baseball bat"], [],
     [("player", "person"), ("baseball bat", "baseball bat")], [], 9),
    # Ground truth from a COCO caption as well as instances.
    ("A man holding an umbrella and a dog.", ["person"], ["A man with an umbrella in the rain."],
     [("man", "person"), ("umbrella", "umbrella"), ("dog", "dog")], ["dog"], 9),
    ("Two giraffes and a zebra.", [], ["A herd of zebras and giraffes grazing."],
     [("giraffe", "giraffe"), ("zebra", "zebra")], [], 6),
    ("A knife and forks on a table.", ["knife", "fork", "dining table", "scissors"], [],
     [("knife", "knife"), ("fork", "fork"), ("table", "dining table")], [], 8),
]
# Ground-truth object sets, by hand (instances U caption objects).
GT = {i: set(c[1]) for i, c in enumerate(CASES)}
GT[35] = {"person", "umbrella"}
GT[36] = {"zebra", "giraffe"}


def _coco(cases):
    names = sorted({n for c in cases for n in c[1]})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    instances = {
        "images": [{"id": i} for i in range(len(cases))],
        "categories": [{"id": v, "name": k} for k, v in cat_id.items()],
        "annotations": [{"image_id": i, "category_id": cat_id[n]} for i, c in enumerate(cases) for n in c[1]],
    }
    captions = {"images": [{"id": i} for i in range(len(cases))],
                "annotations": [{"image_id": i, "caption": t} for i, c in enumerate(cases) for t in c[2]]}
    return instances, captions


def test_case_table_is_consistent():
    assert len(CASES) >= 30
    for i, (_, _, _, mentions, halluc, _) in enumerate(CASES):
        assert halluc == [n for _, n in mentions if n not in GT[i]], i


def test_caption_objects_match_hand_derivation(extractor):
    for cap, _, _, mentions, _, n_tokens in CASES:
        got = extractor(cap)
        assert list(zip(got.words, got.nodes)) == mentions, cap
        assert len(got.tokens) == n_tokens, (cap, got.tokens)


def test_chair_coco_mode_agrees_with_reference_definition(extractor, tmp_path):
    from jaxvlm.eval import evaluate

    instances, captions = _coco(CASES)
    # REVERSE keys predictions by COCO file name.
    preds = [{"image_id": f"COCO_val2014_{i:012d}.jpg", "question_id": 100 + i, "text": c[0]}
             for i, c in enumerate(CASES)]
    report = evaluate("chair", preds, [instances, captions], mode="coco", extractor=extractor, per_sample=True)

    n = len(CASES)
    n_halluc_caps = sum(bool(c[4]) for c in CASES)
    n_halluc = sum(len(c[4]) for c in CASES)
    n_mentions = sum(len(c[3]) for c in CASES)
    n_recalled = sum(len({node for _, node in c[3]} & GT[i]) for i, c in enumerate(CASES))
    n_gt = sum(len(GT[i]) for i in range(n))
    s = report["scores"]
    assert s["CHAIRs"] == pytest.approx(n_halluc_caps / n, abs=1e-12)
    assert s["CHAIRi"] == pytest.approx(n_halluc / n_mentions, abs=1e-12)
    assert s["Recall"] == pytest.approx(n_recalled / n_gt, abs=1e-12)
    assert s["Len"] == pytest.approx(0.01 * sum(c[5] for c in CASES) / n, abs=1e-12)
    # Counted by hand for this table: 15 of 38 captions hallucinate; 17 of 70 mentions.
    assert (n_halluc_caps, n, n_halluc, n_mentions) == (15, 38, 17, 70)
    for i, rec in enumerate(report["per_sample"]):
        assert set(rec["gt_objects"]) == GT[i]
        assert [h[1] for h in rec["hallucinated"]] == CASES[i][4]


def test_chair_refexp_mode(extractor, tmp_path):
    from jaxvlm.eval import evaluate

    refs = {"annotations": [
        {"id": "342919", "image_id": "342919", "caption": "the woman holding a cup"},
        {"id": "342920", "image_id": "342920", "caption": "two men on a bench"},
        {"id": "342921", "image_id": "342921", "caption": "a brown horse"},
    ]}
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(refs))
    preds = [
        {"image_id": "342919", "text": "a lady with a mug and a cup"},     # lady->person, cup: no hallucination
        {"image_id": "342920", "text": "a man sitting on a bench"},        # GT has no person ("men")
        {"image_id": 342921, "text": "a man riding a horse"},              # int id matches "342921"
    ]
    s = evaluate("chair", preds, str(path), mode="refexp", extractor=extractor)["scores"]
    # mentions: [person, cup], [person, bench], [person, horse]; hallucinated: -, person, person
    assert s["CHAIRs"] == pytest.approx(2 / 3)
    assert s["CHAIRi"] == pytest.approx(2 / 6)
    # GT sizes 2 ({person, cup}), 1 ({bench}), 1 ({horse}); all recalled.
    assert s["Recall"] == pytest.approx(4 / 4)
    # tokens: 7, 6, 5
    assert s["Len"] == pytest.approx(0.01 * 19 / 3)


def test_chair_unknown_image_id_is_an_error(extractor):
    from jaxvlm.eval import EvalInputError, evaluate

    instances, captions = _coco(CASES[:2])
    preds = load_predictions([{"image_id": 0, "text": "a man"}, {"image_id": 999, "text": "a dog"}],
                             id_key="image_id")
    with pytest.raises(EvalInputError, match=r"1 of 2 prediction image ids have no ground truth.*'999'"):
        evaluate("chair", preds, [instances, captions], extractor=extractor)


def test_missing_nltk_resource_is_named(tmp_path, monkeypatch, shared_dir):
    import nltk

    # Only wordnet and punkt_tab: the tagger is missing.
    for sub in ("corpora/wordnet", "tokenizers/punkt_tab"):
        (tmp_path / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub).symlink_to(shared_dir / "nltk_data" / sub)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(MissingNLTKDataError) as e:
        require_nltk_data()
    msg = str(e.value)
    assert "averaged_perceptron_tagger_eng" in msg
    assert "nltk.download('averaged_perceptron_tagger_eng')" in msg
    assert "python -m nltk.downloader averaged_perceptron_tagger_eng" in msg
