"""Chain-of-Spot (jaxvlm.methods.chain_of_spot): prompts, ROI parsing and cropping, and the training-data
rewrite, against the original code's rules (../shared/specs/cos_sctune_judger.md §1). The two-turn
decode through `jaxvlm generate --chain-of-spot` is checked against transformers in test_generate_cli.py."""
import numpy as np
import pytest
from PIL import Image

from jaxvlm.data.chat_templates import render_prompt
from jaxvlm.methods import chain_of_spot as cos

# "<s>": the BOS the original's tokenizer_image_token adds.
SYSTEM = ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def test_inference_prompts_render_as_the_original():
    q = "What colour is the car?"
    roi = "[0.212, 0.35, 0.634, 0.771]"
    assert render_prompt("vicuna_v1", cos.roi_messages(q)) == (
        SYSTEM + ' USER: <image>\nTo answer the question: "What colour is the car?", what is the region of '
        "interest in the image? ASSISTANT:")
    assert render_prompt("vicuna_v1", cos.answer_messages(q, roi)) == (
        SYSTEM + ' USER: <image>\nTo answer the question: "What colour is the car?", what is the region of '
        'interest in the image? ASSISTANT: [0.212, 0.35, 0.634, 0.771]</s>USER: The region of interest in the '
        'image is <image>\n. Answer the question: "What colour is the car?" ASSISTANT:')


@pytest.mark.parametrize("text,box", [
    ("[0.212, 0.35, 0.634, 0.771]", (0.212, 0.35, 0.634, 0.771)),
    ("[0.1, 0.2, 0.3, 0.4, 0.5]", (0.1, 0.2, 0.3, 0.4)),       # the first four
    ("0.1, 0.2, 0.3, 0.4", (0.1, 0.2, 0.3, 0.0)),              # no brackets: the original drops "0" and "4"
    ("[0.1, 0.2, 0.3]", None),
    ("[0.1,0.2,0.3,0.4]", None),                              # the separator is ", "
    ("the red car", None),
    ("", None),
])
def test_parse_roi_reads_as_the_original(text, box):
    got = cos.parse_roi(text)
    assert got == (None if box is None else pytest.approx(box))


def test_crop_is_taken_in_the_padded_square():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))     # 40 wide, 20 high
    fill = (122, 116, 104)
    square = np.full((40, 40, 3), fill, np.uint8)
    square[10:30] = np.asarray(img)
    crop, ok = cos.crop_to_roi(img, "[0.25, 0.1, 0.75, 0.6]", fill)
    assert ok and crop.size == (20, 20)
    np.testing.assert_array_equal(np.asarray(crop), square[4:24, 10:30])
    # PIL rounds a fractional box: 40 * 0.113 = 4.52 -> 5
    crop, ok = cos.crop_to_roi(img, "[0.113, 0.0, 0.5, 0.5]", fill)
    assert ok and crop.size == (15, 20)
    for bad in ("[0.75, 0.1, 0.25, 0.6]", "nowhere"):              # reversed box, no box: the whole image
        crop, ok = cos.crop_to_roi(img, bad, fill)
        assert not ok
        np.testing.assert_array_equal(np.asarray(crop), square)


def test_roi_label_in_padded_square_coordinates():
    # wide: 200 x 100, padded 50 px above and below
    assert cos.roi_label(top=10, left=20, size=60, width=200, height=100) == [0.1, 0.3, 0.4, 0.6]
    assert cos.roi_label(top=0, left=180, size=60, width=200, height=100) == [0.9, 0.25, 1.0, 0.55]   # clipped right
    assert cos.roi_label(top=80, left=0, size=60, width=200, height=100) == [0.0, 0.65, 0.3, 0.75]    # clipped below
    # tall: 100 x 200, padded 50 px left and right
    assert cos.roi_label(top=150, left=10, size=80, width=100, height=200) == [0.3, 0.75, 0.7, 1.0]
    assert cos.roi_label(top=0, left=0, size=30, width=90, height=90) == [0.0, 0.0, 0.333, 0.333]
    assert str(cos.roi_label(top=10, left=20, size=60, width=200, height=100)) == "[0.1, 0.3, 0.4, 0.6]"


def test_training_conversation_rewrite():
    turns = [{"from": "human", "value": "Q1\n<image>"}, {"from": "gpt", "value": "A1"},
             {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"},
             {"from": "human", "value": "Q3"}, {"from": "gpt", "value": "A3"}]
    before = [dict(t) for t in turns]
    out = cos.cos_conversation(turns, 1, [0.1, 0.3, 0.4, 0.6])
    assert [t["value"] for t in out] == [
        '<image>\nTo answer the question: "Q2", where is the region of interest in the image?',
        "[0.1, 0.3, 0.4, 0.6]",
        'The region of interest in the image is <image>\n. Answer the question: "Q2"',
        "A2",
        "Now answer the following questions based on the raw image: Q1",   # the image tag moved out
        "A1", "Q3", "A3"]
    assert [t["from"] for t in out] == ["human", "gpt"] * 4
    assert turns == before                                          # the record is not modified
    first = cos.cos_conversation(turns[:2], 0, None)                  # no ROI: the whole image
    assert [t["value"] for t in first] == [
        '<image>\nTo answer the question: "Q1", where is the region of interest in the image?',
        "[0.0, 0.0, 1.0, 1.0]", 'The region of interest in the image is <image>\n. Answer the question: "Q1"', "A1"]
    with pytest.raises(ValueError, match="outside the record's 3 QA pairs"):
        cos.cos_conversation(turns, 3, None)
