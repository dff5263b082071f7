"""REVERSE's training side (jaxvlm.methods.reverse): span masking of the targets, in the training
pipeline too, hint injection and answer rendering, against the original's rules
(../shared/specs/ue_and_reverse.md §2)."""
import random

import numpy as np
import pytest

from data_utils import build_tokenizer
from jaxvlm.data import chat_templates as ct
from jaxvlm.data.pipeline import SampleBuilder
from jaxvlm.data.conversation import record_from_llava
from jaxvlm.methods import reverse

S, C, U, X = 100, 101, 102, -100


def test_targets_inside_an_unconfident_span_are_not_trained():
    labels = np.array([X, X, 5, S, 6, 7, C, 8, S, 9, 10, U, 2])
    out = reverse.dehallucination_labels(labels, (S, C, U))
    np.testing.assert_array_equal(out, [X, X, 5, S, 6, 7, C, 8, S, X, X, U, 2])
    np.testing.assert_array_equal(labels, [X, X, 5, S, 6, 7, C, 8, S, 9, 10, U, 2])     # input untouched
    # two spans, only the unconfident one masked; an empty span masks nothing
    np.testing.assert_array_equal(reverse.dehallucination_labels(np.array([S, 4, U, S, U, S, 5, C]), (S, C, U)),
                                  [S, X, U, S, U, S, 5, C])
    # the original's quirk: an </UN> with no open span ignores every target before it
    np.testing.assert_array_equal(reverse.dehallucination_labels(np.array([5, 6, U, 7]), (S, C, U)), [X, X, U, 7])
    # a </CN> closes the span, so a later </UN> has none open
    np.testing.assert_array_equal(reverse.dehallucination_labels(np.array([S, 4, C, 5, U]), (S, C, U)),
                                  [X, X, X, X, U])


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.add_tokens(list(reverse.TAGS))
    return t


def test_pipeline_masks_the_hallucinated_phrase(tok):
    rec = record_from_llava({"id": "r", "conversations": [
        {"from": "human", "value": "Describe the image."},
        {"from": "gpt", "value": "There is <SPAN>a red square</CN> next to <SPAN>a blue circle</UN>"}]}, "test")
    tags = reverse.tag_ids(tok)
    plain = SampleBuilder(tok, "vicuna_v1", None, 96, 0).build(rec)
    masked = SampleBuilder(tok, "vicuna_v1", None, 96, 0,
                           label_transform=lambda x: reverse.dehallucination_labels(x, tags)).build(rec)
    ids, a, b = plain["input_ids"], plain["labels"], masked["labels"]
    span_at = np.flatnonzero(ids == tags[0])[1]
    un_at = np.flatnonzero(ids == tags[2])[0]
    assert un_at - span_at > 2                                          # the phrase is several tokens
    assert np.all(b[span_at + 1:un_at] == ct.IGNORE_INDEX) and np.all(a[span_at + 1:un_at] != ct.IGNORE_INDEX)
    keep = np.ones(len(a), bool)
    keep[span_at + 1:un_at] = False
    np.testing.assert_array_equal(a[keep], b[keep])                     # everything else trains as before
    assert b[un_at] == tags[2] and b[span_at] == tags[0]


def test_tag_ids_name_missing_tags():
    with pytest.raises(ValueError, match=r"no <SPAN>, </CN>, </UN> token"):
        reverse.tag_ids(build_tokenizer())


def test_hint_injection():
    rec = {"id": "x", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the table?"},
        {"from": "gpt", "value": "...", "A_type": "general_answer", "hint": "A Blue Cup"},
        {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "No", "A_type": "yes_no", "hint": "x"},
        {"from": "human", "value": "And the chair?"}, {"from": "gpt", "value": "...", "A_type": "general_answer"}]}
    out = reverse.inject_hints(rec, prob=1.0, rng=random.Random(0))
    assert [t["value"] for t in out["conversations"][::2]] == [
        "<image>\nWhat is on the table? (Hint: potential incorrect phrases -> a blue cup)", "Is it red?",
        "And the chair?"]
    assert rec["conversations"][0]["value"] == "<image>\nWhat is on the table?"       # the record is not modified
    assert reverse.inject_hints(rec, prob=0.0)["conversations"] == rec["conversations"]
    hits = sum("(Hint" in reverse.inject_hints(rec, 0.2, random.Random(k))["conversations"][0]["value"]
               for k in range(2000))
    assert abs(hits / 2000 - 0.2) < 0.03


def test_render_answer_drops_tags_and_reattaches_punctuation(tok):
    tags = reverse.tag_ids(tok)
    ids = tok("There is <SPAN>a red square</CN> , and <SPAN>a circle</CN> . Then", add_special_tokens=False)["input_ids"]
    assert reverse.render_answer(ids, tok, tags) == "There is a red square, and a circle. Then"
    assert reverse.render_answer(ids, tok, tags, cut_current_sentence=True) == "There is a red square, and a circle."
