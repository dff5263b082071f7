"""Qwen-VL-Chat through the generation engine reproduces the original code's greedy decoding
(../shared tiny_public fixture: 24 greedy ids and the per-step logits).

The original positions tokens by slot (padding included) and keeps the prefill's NTK alpha while
decoding: `Engine(..., positions="slots")` and the engine's fixed `ntk_seq_len` do the same. The
prompt (300 tokens) is left-padded by the engine to a 320 bucket, which must not change anything.

Tolerance: atol = rtol = 1e-4, as tests/test_qwen_vl.py (the original's own summation orders).
"""
import numpy as np
import pytest

from jaxvlm.conversion import qwen_vl as conv
from jaxvlm.generate import Engine, SamplerConfig
from jaxvlm.models.qwen_vl import QwenVL

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def public(shared_dir):
    from safetensors.numpy import load_file
    d = shared_dir / "fixtures" / "qwen_vl_chat" / "tiny_public"
    cfg, params = conv.load_original(d, show_progress=False)
    return dict(cfg=cfg, params=params, inp=load_file(d / "inputs.safetensors"),
                exp=load_file(d / "expected.safetensors"))


def test_engine_reproduces_original_greedy_decode(public):
    cfg, params, inp, exp = public["cfg"], public["params"], public["inp"], public["exp"]
    n_new = exp["greedy_ids"].shape[1]
    t = inp["input_ids"].shape[1]
    # batch_size 2: row 1 is an inactive filler row; bucket 320 pads the 300-token prompt by 20 slots
    engine = Engine(QwenVL(cfg), batch_size=2, max_len=352, buckets=(320,), sampler=SamplerConfig(),
                    positions="slots")
    state = engine.prefill(params, dict(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                                        pixel_values=inp["pixel_values"]), reserve=n_new)
    assert int(state.length) == 320 and int(state.ntk_seq_len) == t
    logits = []
    for _ in range(n_new):
        logits.append(np.asarray(state.logits[0]))
        state = engine.step(params, state)
    toks, mask = state.generated()
    assert mask[0].all() and int(state.ntk_seq_len) == t     # the prefill's alpha throughout
    np.testing.assert_array_equal(toks[:1], exp["greedy_ids"])
    np.testing.assert_allclose(np.stack(logits)[None], exp["decode_logits"], **TOL)
    # the positions written are the original's (slot index in the unpadded prompt, then t, t+1, ...)
    np.testing.assert_array_equal(np.asarray(state.positions[0, 20:320 + n_new]), np.arange(t + n_new))

    # the compiled loop (`decode`) gives the same tokens as the host-stepped one
    again = engine.decode(params, engine.prefill(params, dict(input_ids=inp["input_ids"],
                                                              pixel_values=inp["pixel_values"]), reserve=n_new), n_new)
    np.testing.assert_array_equal(again.generated()[0][:1], exp["greedy_ids"])


def test_unknown_positions_mode_is_rejected(public):
    cfg = public["cfg"]
    with pytest.raises(ValueError, match="positions must be"):
        Engine(QwenVL(cfg), batch_size=1, max_len=64, positions="cumsum")


def test_engine_checks_image_spans_before_jit(public):
    """Under jit the model's span checks cannot run; the engine runs them on the concrete prompt."""
    cfg, params, inp = public["cfg"], public["params"], public["inp"]
    (_, s, e), = inp["image_spans"]
    short = np.delete(inp["input_ids"], e - 1, axis=1)       # one <imgpad> fewer
    engine = Engine(QwenVL(cfg), batch_size=1, max_len=352, buckets=(320,), positions="slots")
    with pytest.raises(ValueError, match="holds 255 positions"):
        engine.prefill(params, dict(input_ids=short, pixel_values=inp["pixel_values"]))


def test_generate_cli_serves_an_original_qwen_vl_chat_folder(shared_dir, tmp_path):
    """`jaxvlm generate --checkpoint Qwen-VL-Chat/`: the original chat() prompt (make_context with the image
    path in its span and the default system), decoded in batches of 2, gives each question the answer the
    engine gives it alone (batch 1, no padding: what chat() runs)."""
    import json
    import os

    from jaxvlm.cli import main
    from jaxvlm.data.qwen_vl_processing import preprocess_image
    from qwen_vl_utils import random_images, tiny_qwen_vl_chat, write_original_folder
    from PIL import Image
    tok, model, params = tiny_qwen_vl_chat(shared_dir)
    ckpt = write_original_folder(tmp_path / "Qwen-VL-Chat", model, params, shared_dir)
    names = random_images(tmp_path, 3)
    qs = [{"question_id": i, "image": n, "text": t} for i, (n, t) in
          enumerate(zip(names, ["What is this?", "Describe the image in detail.", "Where?"]))]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in qs))
    out = tmp_path / "a.jsonl"
    assert main(["generate", "--checkpoint", str(ckpt), "--questions", str(tmp_path / "q.jsonl"), "--image-folder",
                 str(tmp_path), "--output", str(out), "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    stops = (tok.eod_id, tok.im_end_id, tok.im_start_id)
    engine = Engine(QwenVL(model.cfg), batch_size=1, max_len=512,
                    sampler=SamplerConfig(eos_token_ids=stops, pad_token_id=tok.eod_id))
    for q, row in zip(qs, rows):
        path = os.path.join(str(tmp_path), q["image"])
        raw, ids = tok.make_context(tok.from_list_format([{"image": path}, {"text": q["text"]}]))
        assert raw.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>") and path in raw
        pix = preprocess_image(Image.open(path), model.cfg.visual.image_size)[None]
        want = engine.generate(params, dict(input_ids=np.asarray([ids]), pixel_values=pix), max_new_tokens=6,
                               tokenizer=tok).texts[0].strip()
        assert row["answer"] and row["answer"] == want and row["question_id"] == q["question_id"]
    with pytest.raises(SystemExit, match="not served for Qwen-VL-Chat"):
        main(["generate", "--checkpoint", str(ckpt), "--image", path, "--prompt", "Hi", "--chain-of-spot"])
