"""Qwen-VL tokenizer against the original `QWenTokenizer`'s outputs on the real vocabulary (all 32
cases of ../shared/fixtures/qwen_vl_chat/tokenizer_cases.json), plus the image transform and the
left-padded raw-prompt batch SC-Tune uses."""
import json

import numpy as np
import pytest
from PIL import Image

from jaxvlm.data.qwen_vl_processing import CLIP_MEAN, CLIP_STD, pad_batch, preprocess_image, raw_prompt_batch
from jaxvlm.data.qwen_vl_tokenizer import QwenTokenizer

# the list that case "from_list_format" was built from (its `via` field spells it out)
FROM_LIST = [{"image": "demo.jpeg"}, {"text": "Generate the caption in English with grounding:"}]


@pytest.fixture(scope="module")
def fixture(shared_dir):
    d = shared_dir / "fixtures" / "qwen_vl_chat"
    return QwenTokenizer.from_dir(str(d)), json.loads((d / "tokenizer_cases.json").read_text())


def _encode_case(tok, case):
    if "make_context" in case["via"]:
        raw, ids = tok.make_context(case["query"], history=[tuple(h) for h in case.get("history", [])])
        assert raw == case["text"]
        return ids
    if "from_list_format" in case["via"]:
        text = tok.from_list_format(FROM_LIST)
        assert text == case["text"]
        return tok.encode(text)
    return tok.encode(case["text"])


def test_all_cases(fixture):
    tok, data = fixture
    assert len(tok) == data["len_tokenizer"]
    assert {k.split("(")[0]: getattr(tok, k.split("(")[0]) for k in data["ids"]} == \
        {k.split("(")[0]: v for k, v in data["ids"].items()}
    assert tok.special_tokens == data["special_tokens"]
    cases = data["cases"]
    assert len(cases) == 32
    for case in cases:
        if "error" in case:
            with pytest.raises(ValueError, match=case["error"].split(": ", 1)[1].replace(".", r"\.")):
                _encode_case(tok, case)
            continue
        ids = _encode_case(tok, case)
        assert ids == case["ids"], case["name"]
        assert tok.decode(ids) == case["decoded"], case["name"]
        assert tok.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"], case["name"]
        assert (tok.decode(ids) == case["text"]) == case["round_trip_exact"], case["name"]
        spans = [(s["start"], s["end"]) for s in case.get("image_spans", [])]
        assert tok.image_spans(ids) == spans, case["name"]


def test_special_handling(fixture):
    tok, _ = fixture
    # keep_image_special keeps only the grounding tags
    ids = tok.encode("<img>a.jpg</img><ref>cat</ref><box>(1,2),(3,4)</box><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True, keep_image_special=True) == \
        "a.jpg<ref>cat</ref><box>(1,2),(3,4)</box>"
    # ChatML markers typed inside a message stay text in make_context
    _, ids = tok.make_context("say <|im_start|>")
    assert ids.count(tok.im_start_id) == 3
    assert tok.raw_prompt("<img>x.jpg</img><ref>a</ref><box>") == tok.encode("<img>x.jpg</img><ref>a</ref><box>")
    assert len(tok.encode("<img>" + "p" * 256 + "</img>")) == 258       # the tokenizer allows 256 bytes ...
    with pytest.raises(ValueError, match="too long"):                   # ... but not 257
        tok.encode("<img>" + "p" * 257 + "</img>")


def test_image_transform():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    x = preprocess_image(arr, size=28)
    assert x.shape == (3, 28, 28) and x.dtype == np.float32
    resized = np.asarray(Image.fromarray(arr).resize((28, 28), Image.BICUBIC), np.float32) / np.float32(255)
    np.testing.assert_array_equal(x, ((resized - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    flat = preprocess_image(Image.new("RGB", (10, 20), (255, 0, 128)), size=14)
    np.testing.assert_allclose(flat[:, 3, 5], (np.array([255, 0, 128]) / 255 - CLIP_MEAN) / CLIP_STD, rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(arr.astype(np.float32))


def test_raw_prompt_batch(fixture):
    tok, _ = fixture
    img = Image.new("RGB", (30, 40), (10, 20, 30))
    prompts = ["<img>VG_100K_2/4.jpg</img><ref>This</ref><box>(99,199),(499,599)</box> is",
               "<img>a.jpg</img><ref>a red car</ref><box>"]
    batch = raw_prompt_batch(tok, prompts, [[img], [img]], size=28)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, 280) and batch["pixel_values"].shape == (2, 3, 28, 28)
    n = mask.sum(1)
    assert list(n) == [280, len(tok.encode(prompts[1]))]
    assert (ids[1, : 280 - n[1]] == tok.eod_id).all() and mask[1, : 280 - n[1]].sum() == 0   # left padding
    assert list(ids[1, 280 - n[1]:]) == tok.encode(prompts[1])
    with pytest.raises(ValueError, match="1 <img> span"):
        raw_prompt_batch(tok, prompts[:1], [[img, img]])
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch([[1, 2, 3]], 0, length=2)
