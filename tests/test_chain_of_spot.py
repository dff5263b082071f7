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
    # a fixed width for tokenizers that read two-decimal coordinates as one token each (the shapes world's)
    assert cos.cos_conversation(turns, 1, [0.1, 0.3, 0.4, 0.625], decimals=2)[1]["value"] == "[0.10, 0.30, 0.40, 0.62]"
    assert turns == before                                          # the record is not modified
    first = cos.cos_conversation(turns[:2], 0, None)                  # no ROI: the whole image
    assert [t["value"] for t in first] == [
        '<image>\nTo answer the question: "Q1", where is the region of interest in the image?',
        "[0.0, 0.0, 1.0, 1.0]", 'The region of interest in the image is <image>\n. Answer the question: "Q1"', "A1"]
    with pytest.raises(ValueError, match="outside the record's 3 QA pairs"):
        cos.cos_conversation(turns, 3, None)


def test_training_records_with_crops_feed_the_pipeline(tmp_path):
    import random

    from data_utils import build_tokenizer, write_image
    from jaxvlm.data.conversation import record_from_llava
    from jaxvlm.data.image_processing import LlavaImageProcessor, expand_to_square
    from jaxvlm.data.pipeline import SampleBuilder
    write_image(tmp_path / "im.png", 60, 40, seed=0)
    turns = [{"from": "human", "value": "<image>\nWhat is red?"}, {"from": "gpt", "value": "the ball"},
             {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]
    records = [{"id": "a/1", "image": "im.png", "conversations": turns},
               {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
               {"id": "b", "image": "im.png", "conversations": turns[:2]}]
    rois = {f"000000_a_1_q{k}": {"params": [4, 10, 30]} for k in (0, 1)}     # record 2 has none
    out = cos.cos_records(records, rois, str(tmp_path), str(tmp_path / "crops"), seed=3)
    pair = random.Random(3).randrange(2)
    label = cos.roi_label(4, 10, 30, 60, 40)                      # 60 x 40: 10 px of padding above
    assert label == [round(10 / 60, 3), round(14 / 60, 3), round(40 / 60, 3), round(44 / 60, 3)]
    assert out[0]["conversations"] == cos.cos_conversation(turns, pair, label)
    full, crop_path = out[0]["image"]
    assert full == "im.png" and crop_path.endswith(f"000000_a_1_q{pair}.png")
    square = expand_to_square(Image.open(tmp_path / "im.png").convert("RGB"), (122, 116, 104))
    np.testing.assert_array_equal(np.asarray(Image.open(crop_path)), np.asarray(square)[14:44, 10:40])
    assert out[1] == records[1]
    assert out[2]["image"] == ["im.png", "im.png"] and out[2]["conversations"][1]["value"] == "[0.0, 0.0, 1.0, 1.0]"
    assert records[0]["image"] == "im.png"                               # the input is not modified
    with pytest.raises(ValueError, match=r"record 0 \('e'\) has no question-answer pair"):
        cos.cos_records([{"id": "e", "image": "im.png", "conversations": []}], {}, str(tmp_path), str(tmp_path / "c"))

    tok = build_tokenizer()
    proc = LlavaImageProcessor(image_size=32, tokens_per_image=4)
    builder = SampleBuilder(tok, "vicuna_v1", proc, 256, 2, image_root=tmp_path, image_token_id=tok.convert_tokens_to_ids("<image>"))
    sample = builder.build(record_from_llava(out[0], "cos"))
    assert int(sample["num_images"]) == 2 and sample["image_valid"].all()
    np.testing.assert_array_equal(sample["pixel_values"][1], proc(Image.open(crop_path).convert("RGB")).pixel_values)


def test_records_command_writes_and_refuses_bad_paths(tmp_path):
    import json

    from data_utils import write_image
    write_image(tmp_path / "im.png", 30, 30, seed=1)
    (tmp_path / "r.json").write_text(json.dumps([{"id": "x", "image": "im.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]))
    (tmp_path / "rois.json").write_text(json.dumps({"000000_x_q0": {"params": [0, 0, 15]}}))
    args = ["--records", str(tmp_path / "r.json"), "--rois", str(tmp_path / "rois.json"), "--image-root", str(tmp_path),
            "--crops", str(tmp_path / "c"), "--out", str(tmp_path / "cos.json")]
    assert cos.main(args) == 0
    rec = json.loads((tmp_path / "cos.json").read_text())[0]
    assert rec["conversations"][1]["value"] == "[0.0, 0.0, 0.5, 0.5]" and len(rec["image"]) == 2
    with pytest.raises(SystemExit, match="exists; not overwriting"):
        cos.main(args)
    with pytest.raises(SystemExit, match="--rois: no such file"):
        cos.main([*args[:2], "--rois", str(tmp_path / "nope.json"), *args[4:]])
