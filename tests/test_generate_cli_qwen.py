"""`jaxvlm generate` on a converted tiny Qwen2.5-VL checkpoint (tokenizer with the Qwen special tokens
and the image processor's config kept beside it): batch mode over a JSONL of 3 image questions with
--batch-size 2 (a short last batch: padded patches and grids), against transformers' greedy `generate`
on ids/pixels from `QwenVLPreprocessor` (the independent chatml path), one prompt at a time."""
import json

import numpy as np
import pytest

from data_utils import QWEN_NAMED, QWEN_SPECIALS, build_tokenizer, write_image

NEW = 12
def qwen_tokenizer():
    return build_tokenizer(QWEN_SPECIALS, vocab_size=400, **QWEN_NAMED)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gen_cli_qwen"), qwen_tokenizer())


def make_checkpoint(root, tok):
    """A converted tiny Qwen2.5-VL for `tok` (tokenizer and image-processor files beside it), three images
    of different grids and their questions."""
    import torch
    import transformers

    from jaxvlm.conversion.converted import save_converted
    from jaxvlm.conversion.qwen2_vl import qwen2_vl_from_torch
    from jaxvlm.data.qwen2_vl_processing import make_image_processor

    files = root / "hf"
    tok.save_pretrained(files)
    proc = make_image_processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    proc.save_pretrained(files)
    tid = tok.convert_tokens_to_ids
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tid("<|endoftext|>"),
                eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1])
    hf = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"))).eval()
    with torch.no_grad():   # sharper next-token distributions than a random init
        hf.lm_head.weight.mul_(30.0)
    cfg, _, params = qwen2_vl_from_torch(hf)
    ckpt = save_converted(root / "ckpt", cfg, params, hf_files=sorted(files.iterdir()))
    sizes = [(84, 56), (56, 84), (56, 56)]           # (w, h): grids (1,4,6), (1,6,4), (1,4,4)
    for i, (w, h) in enumerate(sizes):
        write_image(root / f"im{i}.png", w, h, seed=i)
    qs = [{"question_id": 1, "image": "im0.png", "text": "What colour is the square?"},
          {"question_id": 2, "image": "im1.png", "text": "What shape is left of the circle?"},
          {"question_id": 3, "image": "im2.png", "text": "Describe the image."}]
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    return dict(root=root, ckpt=ckpt, hf=hf, tok=tok, proc=proc, qs=qs, torch=torch)


def hf_answer(c, q):
    from PIL import Image

    from jaxvlm.data.qwen2_vl_processing import QwenVLPreprocessor
    pre = QwenVLPreprocessor(c["tok"], c["proc"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]}]
    s = pre(msgs, images=[Image.open(c["root"] / q["image"]).convert("RGB")])
    torch, tok = c["torch"], c["tok"]
    with torch.no_grad():
        out = c["hf"].generate(input_ids=torch.tensor(s["input_ids"][None]),
                               pixel_values=torch.tensor(s["pixel_values"]),
                               image_grid_thw=torch.tensor(s["image_grid_thw"]),
                               mm_token_type_ids=torch.tensor(s["mm_token_type_ids"][None]), do_sample=False,
                               max_new_tokens=NEW, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, len(s["input_ids"]):].numpy()
    return new, tok.decode(new, skip_special_tokens=True).strip()


def test_batch_mode_matches_hf_greedy(checkpoint):
    from jaxvlm.cli import main
    c = checkpoint
    out = c["root"] / "answers.jsonl"
    rc = main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
               "--image-folder", str(c["root"]), "--output", str(out), "--max-new-tokens", str(NEW),
               "--batch-size", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3]
    for q, row in zip(c["qs"], rows):
        new, ref = hf_answer(c, q)
        assert len(new) >= 3, "the reference answer is too short to tell models apart"
        assert row["answer"] == ref, f"question {q['question_id']}"
    assert len({r["answer"] for r in rows}) > 1      # answers depend on the image / prompt


def test_cli_encoding_is_the_preprocessors(checkpoint):
    """Token-identical prompts: the CLI's chatml + image expansion == `QwenVLPreprocessor`'s."""
    import argparse

    from PIL import Image

    from jaxvlm.data.qwen2_vl_processing import QwenVLPreprocessor
    from jaxvlm.generate.cli import Answerer, add_arguments
    c = checkpoint
    p = argparse.ArgumentParser()
    add_arguments(p)
    ans = Answerer(str(c["ckpt"]), p.parse_args(["--checkpoint", str(c["ckpt"])]))
    pre = QwenVLPreprocessor(c["tok"], c["proc"])
    for q in c["qs"]:
        ids, (pix, grid) = ans.encode(q["text"], str(c["root"] / q["image"]))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]}]
        s = pre(msgs, images=[Image.open(c["root"] / q["image"]).convert("RGB")])
        np.testing.assert_array_equal(ids, s["input_ids"])
        np.testing.assert_array_equal(pix, s["pixel_values"])
        np.testing.assert_array_equal(grid, s["image_grid_thw"][0])



def test_reverse_flag_on_qwen2_5_vl(tmp_path_factory, tmp_path):
    """--reverse on a Qwen2.5-VL checkpoint (M-RoPE positions rebuilt for every prefix) against the same loop
    over transformers' greedy generate (threshold 1: nothing is flagged, decoding stays greedy)."""
    from PIL import Image

    from jaxvlm.cli import main
    from jaxvlm.data.qwen2_vl_processing import QwenVLPreprocessor
    from jaxvlm.methods import reverse
    tok = qwen_tokenizer()
    tok.add_tokens(list(reverse.TAGS))
    c = make_checkpoint(tmp_path_factory.mktemp("gen_cli_qwen_tags"), tok)
    torch, hf = c["torch"], c["hf"]
    un, pad_img = reverse.tag_ids(tok)[2], tok.convert_tokens_to_ids("<|image_pad|>")
    out = tmp_path / "rev.jsonl"
    assert main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
                 "--image-folder", str(c["root"]), "--output", str(out), "--max-new-tokens", str(NEW),
                 "--batch-size", "2", "--reverse", "--temperature", "0", "--reverse-threshold", "1.0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pre = QwenVLPreprocessor(tok, c["proc"])
    for q, r in zip(c["qs"], rows):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]}]
        s = pre(msgs, images=[Image.open(c["root"] / q["image"]).convert("RGB")])

        def hf_generate(prefix, temperature):
            with torch.no_grad():
                o = hf.generate(input_ids=torch.tensor(prefix[None]), pixel_values=torch.tensor(s["pixel_values"]),
                                image_grid_thw=torch.tensor(s["image_grid_thw"]),
                                mm_token_type_ids=torch.tensor((prefix == pad_img).astype(np.int64)[None]),
                                do_sample=False, max_new_tokens=NEW, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
            return o.sequences[0, len(prefix):].numpy(), torch.softmax(torch.stack(o.logits, 1)[0], -1)[:, un].numpy()

        want = reverse.reverse_answer(hf_generate, np.asarray(s["input_ids"]), tok, threshold=1.0, temperature=0.0,
                                      style="qwen")
        assert (r["answer"], r["reverse_success"], r["reverse_attempts"]) == (want.text, want.success, len(want.history))
    assert len({r["answer"] for r in rows}) > 1
