"""`jaxvlm generate` on a converted tiny LLaVA checkpoint built here (tokenizer files kept beside it):
batch mode over a JSONL (a short last batch included) and single-prompt mode, against transformers'
greedy `generate` on the same chat-templated ids and pixels."""
import json

import numpy as np
import pytest

from data_utils import build_tokenizer, write_image

NEW = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gen_cli"), build_tokenizer())


def make_checkpoint(root, tok):
    """A converted tiny LLaVA for `tok` (tokenizer files kept beside it), three images and questions."""
    import torch
    import transformers

    from jaxvlm.conversion.api import llava_from_torch
    from jaxvlm.conversion.converted import save_converted

    tok_dir = root / "tok"
    tok.save_pretrained(tok_dir)
    img_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=img_id, image_seq_length=16,
        vision_feature_layer=-2, vision_feature_select_strategy="default")).eval()
    with torch.no_grad():   # sharper next-token distributions than a random init
        hf.lm_head.weight.mul_(30.0)
    cfg, _, params = llava_from_torch(hf)
    ckpt = save_converted(root / "ckpt", cfg, params, hf_files=sorted(tok_dir.iterdir()))
    for i in range(3):
        write_image(root / f"im{i}.png", 40 + 8 * i, 32, seed=i)
    qs = [{"question_id": 7, "image": "im0.png", "text": "What colour is the square?", "category": "a"},
          {"question_id": 8, "image": "im1.png", "text": "What shape is left of the circle?"},
          {"question_id": 9, "image": "im2.png", "text": "Describe the image."}]
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    return dict(root=root, ckpt=ckpt, hf=hf, cfg=cfg, tok=tok, qs=qs, torch=torch)


def hf_answer(c, q):
    from jaxvlm.data.image_processing import load_image
    return hf_greedy(c, [{"role": "user", "content": "<image>\n" + q["text"]}], [load_image(c["root"] / q["image"])])


def test_batch_mode_writes_answers_jsonl(checkpoint, capsys):
    from jaxvlm.cli import main
    c = checkpoint
    out = c["root"] / "answers.jsonl"
    rc = main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
               "--image-folder", str(c["root"]), "--output", str(out), "--max-new-tokens", str(NEW),
               "--batch-size", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [7, 8, 9]
    assert rows[0]["category"] == "a" and rows[0]["prompt"] == c["qs"][0]["text"]
    assert rows[0]["model_id"] == "ckpt"
    for q, r in zip(c["qs"], rows):
        assert r["answer"] == hf_answer(c, q)
    assert any(r["answer"] for r in rows)

    rc = main(["generate", "--checkpoint", str(c["ckpt"]), "--image", str(c["root"] / "im1.png"),
               "--prompt", c["qs"][1]["text"], "--max-new-tokens", str(NEW), "--batch-size", "2"])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == rows[1]["answer"]

    # Sampled: question i draws from its own key, so --batch-size 1 and 3 write the same answers; the seed matters.
    sampled = {}
    for bs, seed in (("1", "0"), ("3", "0"), ("3", "1")):
        f = c["root"] / f"sampled_{bs}_{seed}.jsonl"
        assert main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
                     "--image-folder", str(c["root"]), "--output", str(f), "--max-new-tokens", str(NEW),
                     "--batch-size", bs, "--temperature", "1.0", "--seed", seed]) == 0
        sampled[bs, seed] = [json.loads(line)["answer"] for line in f.read_text().splitlines()]
    assert sampled["1", "0"] == sampled["3", "0"] != [r["answer"] for r in rows]
    assert sampled["3", "1"] != sampled["3", "0"]


def test_shards_and_resume_write_the_whole_runs_answers(checkpoint, tmp_path):
    """Sampled answers: shards 0/2 and 1/2 together, and a killed run continued with --resume (its cut-off
    last line dropped), write exactly what one whole run writes."""
    from jaxvlm.cli import main
    c = checkpoint
    base = ["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
            "--image-folder", str(c["root"]), "--max-new-tokens", str(NEW), "--batch-size", "2",
            "--temperature", "1.0", "--seed", "3"]

    def rows(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    whole = tmp_path / "whole.jsonl"
    assert main([*base, "--output", str(whole)]) == 0
    want = rows(whole)
    assert [r["question_id"] for r in want] == [7, 8, 9] and len({r["answer"] for r in want}) == 3
    shards = []
    for k in range(2):
        f = tmp_path / f"shard{k}.jsonl"
        assert main([*base, "--shard", f"{k}/2", "--output", str(f)]) == 0
        shards.append(rows(f))
    assert shards == [[want[0], want[2]], [want[1]]]

    killed = tmp_path / "killed.jsonl"     # one answer written, the next cut off mid-line
    killed.write_text(json.dumps(want[0]) + "\n" + json.dumps(want[1])[:25])
    assert main([*base, "--resume", "--output", str(killed)]) == 0
    assert rows(killed) == want
    mtime = killed.stat().st_mtime_ns
    assert main([*base, "--resume", "--output", str(killed)]) == 0      # nothing left: the file is untouched
    assert rows(killed) == want and killed.stat().st_mtime_ns == mtime
    fresh = tmp_path / "fresh.jsonl"       # --resume on a file not there yet starts it
    assert main([*base, "--resume", "--shard", "1/2", "--output", str(fresh)]) == 0
    assert rows(fresh) == [want[1]]

    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps(dict(want[0], question_id=99)) + "\n")
    with pytest.raises(SystemExit, match="answer to 99, which is not among the questions"):
        main([*base, "--resume", "--output", str(foreign)])
    assert rows(foreign)[0]["question_id"] == 99                        # and it is left as it was
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(SystemExit, match="--shard"):
            main([*base, "--shard", bad, "--output", str(tmp_path / "bad.jsonl")])
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    with pytest.raises(SystemExit, match="questions 0 and 1 share 1"):
        main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(dup), "--resume",
              "--output", str(tmp_path / "d.jsonl")])


def test_bad_input_is_one_clear_message(checkpoint, tmp_path):
    """An image that cannot be decoded names its question; the console command prints the message alone
    (exit 2, no traceback); a --max-len the longest question does not fit in is refused before decoding."""
    import os
    import subprocess
    import sys

    from jaxvlm.cli import main
    from jaxvlm.data.conversation import BadRecordError
    c = checkpoint
    (tmp_path / "bad.png").write_bytes(b"not a png")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 41, "image": "bad.png", "text": "What is this?"}) + "\n")
    args = ["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(q), "--image-folder", str(tmp_path),
            "--output", str(tmp_path / "a.jsonl")]
    with pytest.raises(BadRecordError, match=r"record '41': image file .*bad\.png cannot be decoded"):
        main(args)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "jaxvlm.cli", *args], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "jaxvlm generate: record '41': image file" in r.stderr and "cannot be decoded" in r.stderr
    with pytest.raises(SystemExit, match=r"--max-len 16 is too small: the longest question's prompt takes \d+ tokens"):
        main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
              "--image-folder", str(c["root"]), "--output", str(tmp_path / "b.jsonl"), "--max-len", "16"])


def test_bad_invocations(checkpoint, tmp_path):
    from jaxvlm.cli import main
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(checkpoint["ckpt"])])
    with pytest.raises(FileNotFoundError, match="not a jaxvlm checkpoint"):
        main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi"])
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "image": "x.png"}\n')
    with pytest.raises(ValueError, match="neither 'text' nor 'prompt'"):
        main(["generate", "--checkpoint", str(checkpoint["ckpt"]), "--questions", str(bad)])
    bad.write_text('{"question_id": 1, "text": "hi"}\n{"question_id": 2, "text": \n')
    with pytest.raises(ValueError, match=r"q\.jsonl:2: malformed JSON line"):
        main(["generate", "--checkpoint", str(checkpoint["ckpt"]), "--questions", str(bad)])
    with pytest.raises(ValueError, match="questions file not found"):
        main(["generate", "--checkpoint", str(checkpoint["ckpt"]), "--questions", str(tmp_path / "nope.jsonl")])


def hf_ue_answer(c, q, layers):
    """UE decoding done by hand on the transformers model: a full forward per step, the candidate layers'
    un-normed lens through HF's lm_head, UE's step in torch (test_ue.torch_reference), argmax."""
    from test_ue import torch_reference

    from jaxvlm.data.chat_templates import encode_prompt
    from jaxvlm.data.image_processing import LlavaImageProcessor, load_image
    img = LlavaImageProcessor.for_llava(c["cfg"])(load_image(c["root"] / q["image"]))
    ids = encode_prompt("vicuna_v1", [{"role": "user", "content": "<image>\n" + q["text"]}], c["tok"],
                        image_token_id=c["cfg"].image_token_id, image_token_counts=[img.num_tokens])
    torch, hf = c["torch"], c["hf"]
    seq, new = list(ids), []
    for _ in range(NEW):
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([seq]), pixel_values=torch.tensor(img.pixel_values[None]),
                     output_hidden_states=True)
            lens = torch.stack([hf.lm_head(out.hidden_states[k][:, -1]) for k in layers])
        scores, _ = torch_reference(out.logits[:, -1].numpy(), lens.numpy())
        tok = int(np.argmax(scores[0]))
        if tok == c["tok"].eos_token_id:
            break
        seq.append(tok)
        new.append(tok)
    return c["tok"].decode(new, skip_special_tokens=True).strip()


def test_ue_flags_decode_with_the_layer_contrast(checkpoint, tmp_path):
    from jaxvlm.cli import main
    c = checkpoint
    base = ["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
            "--image-folder", str(c["root"]), "--max-new-tokens", str(NEW), "--batch-size", "2"]
    out = tmp_path / "ue.jsonl"
    assert main([*base, "--output", str(out), "--ue-layers", "0,1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ue_answers = [hf_ue_answer(c, q, (0, 1)) for q in c["qs"]]
    assert [r["answer"] for r in rows] == ue_answers
    assert ue_answers != [hf_answer(c, q) for q in c["qs"]]         # the contrast changed something
    for flags, msg in ((["--ue-prior", "0.5,0.5"], "needs --ue-layers"),
                       (["--ue-layers", "0,1", "--temperature", "0.7"], "greedily"),
                       (["--ue-layers", "0,x"], "comma-separated numbers"),
                       (["--ue-layers", "0,1", "--ue-prior", "1"], "1 weights for 2"),
                       (["--ue-layers", "0,9"], "--ue-layers 9 is outside this checkpoint's hidden states")):
        with pytest.raises(SystemExit, match=msg):
            main([*base, "--output", str(tmp_path / "bad.jsonl"), *flags])


def hf_greedy(c, messages, images):
    """transformers' greedy answer to a conversation with these PIL images (in order)."""
    from jaxvlm.data.chat_templates import encode_prompt
    from jaxvlm.data.image_processing import LlavaImageProcessor
    proc = LlavaImageProcessor.for_llava(c["cfg"])
    imgs = [proc(im) for im in images]
    ids = encode_prompt("vicuna_v1", messages, c["tok"], image_token_id=c["cfg"].image_token_id,
                        image_token_counts=[im.num_tokens for im in imgs])
    torch = c["torch"]
    with torch.no_grad():
        out = c["hf"].generate(input_ids=torch.tensor(ids[None].astype(np.int64)),
                               pixel_values=torch.tensor(np.stack([im.pixel_values for im in imgs])),
                               do_sample=False, max_new_tokens=NEW, eos_token_id=c["tok"].eos_token_id,
                               pad_token_id=c["tok"].pad_token_id)
    return c["tok"].decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_chain_of_spot_two_turns_match_transformers(checkpoint, tmp_path, monkeypatch):
    from jaxvlm.cli import main
    from jaxvlm.data.image_processing import LlavaImageProcessor, expand_to_square, load_image
    from jaxvlm.methods import chain_of_spot as cos
    c = checkpoint
    # A random model's ROI never parses as a box; read every ROI as this one so that the crop path runs.
    box = (0.1, 0.2, 0.7, 0.9)
    monkeypatch.setattr(cos, "parse_roi", lambda text: box)
    out = tmp_path / "cos.jsonl"
    base = ["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
            "--image-folder", str(c["root"]), "--max-new-tokens", str(NEW), "--batch-size", "2", "--chain-of-spot"]
    assert main([*base, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [7, 8, 9]
    fill = LlavaImageProcessor.for_llava(c["cfg"]).fill
    for q, r in zip(c["qs"], rows):
        img = load_image(c["root"] / q["image"])
        roi = hf_greedy(c, cos.roi_messages(q["text"]), [img])
        assert r["roi"] == roi and r["roi_cropped"] is True
        square = expand_to_square(img, fill)
        side = square.size[0]
        crop = square.crop(tuple(side * v for v in box))
        assert r["answer"] == hf_greedy(c, cos.answer_messages(q["text"], roi), [img, crop])
    assert any(r["answer"] for r in rows)

    # a question's own ROI (an oracle's) stands for turn 1, and the others still ask for theirs
    given = "[0.20, 0.10, 0.60, 0.50]"
    qs = [dict(q, roi=given) if k == 1 else q for k, q in enumerate(c["qs"])]
    (tmp_path / "q_roi.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    base[base.index("--questions") + 1] = str(tmp_path / "q_roi.jsonl")
    assert main([*base, "--output", str(tmp_path / "given.jsonl")]) == 0
    with_roi = [json.loads(line) for line in (tmp_path / "given.jsonl").read_text().splitlines()]
    assert [with_roi[0], with_roi[2]] == [rows[0], rows[2]] and with_roi[1]["roi"] == given
    img = load_image(c["root"] / qs[1]["image"])
    square = expand_to_square(img, fill)
    crop = square.crop(tuple(square.size[0] * v for v in box))
    assert with_roi[1]["answer"] == hf_greedy(c, cos.answer_messages(qs[1]["text"], given), [img, crop])
    (tmp_path / "q_bad_roi.jsonl").write_text(json.dumps(dict(c["qs"][0], roi=[0.2, 0.1, 0.6, 0.5])) + "\n")
    base[base.index("--questions") + 1] = str(tmp_path / "q_bad_roi.jsonl")
    with pytest.raises(SystemExit, match="'roi' must be the ROI answer's text"):
        main([*base, "--output", str(tmp_path / "bad_roi.jsonl")])

    bad = tmp_path / "noimage.jsonl"
    bad.write_text('{"question_id": 1, "text": "hi"}\n')
    base[base.index("--questions") + 1] = str(bad)
    with pytest.raises(SystemExit, match="needs an image for every question; record 0"):
        main([*base, "--output", str(tmp_path / "x.jsonl")])



@pytest.fixture(scope="module")
def tagged_checkpoint(tmp_path_factory):
    from jaxvlm.methods.reverse import TAGS
    tok = build_tokenizer()
    tok.add_tokens(list(TAGS))
    return make_checkpoint(tmp_path_factory.mktemp("gen_cli_tags"), tok)


def test_reverse_flag_runs_the_resampling_loop_on_the_engine(checkpoint, tagged_checkpoint, tmp_path):
    """--reverse against the same loop driven by transformers' greedy generate (threshold 1: no phrase is
    flagged, so decoding stays greedy and both sides are deterministic)."""
    from jaxvlm.cli import main
    from jaxvlm.data.chat_templates import encode_prompt
    from jaxvlm.data.image_processing import LlavaImageProcessor, load_image
    from types import SimpleNamespace

    from jaxvlm.data.chat_templates import get_template
    from jaxvlm.generate.cli import assistant_header_tokens
    from jaxvlm.methods import reverse
    c = tagged_checkpoint
    torch, hf, tok = c["torch"], c["hf"], c["tok"]
    un = reverse.tag_ids(tok)[2]
    base = ["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
            "--image-folder", str(c["root"]), "--max-new-tokens", str(NEW), "--batch-size", "2", "--reverse",
            "--temperature", "0", "--reverse-threshold", "1.0"]
    out = tmp_path / "rev.jsonl"
    assert main([*base, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    proc = LlavaImageProcessor.for_llava(c["cfg"])
    for q, r in zip(c["qs"], rows):
        img = proc(load_image(c["root"] / q["image"]))
        ids = encode_prompt("vicuna_v1", [{"role": "user", "content": "<image>\n" + q["text"]}], tok,
                            image_token_id=c["cfg"].image_token_id, image_token_counts=[img.num_tokens])

        def hf_generate(prefix, temperature):
            assert temperature == 0.0
            with torch.no_grad():
                o = hf.generate(input_ids=torch.tensor(prefix[None]), pixel_values=torch.tensor(img.pixel_values[None]),
                                do_sample=False, max_new_tokens=NEW, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
            new = o.sequences[0, len(prefix):].numpy()
            p_un = torch.softmax(torch.stack(o.logits, 1)[0], -1)[:, un].numpy()
            return new, p_un

        want = reverse.reverse_answer(hf_generate, ids, tok, threshold=1.0, temperature=0.0)
        assert r["answer"] == want.text and r["reverse_success"] == want.success
        # the hints go before ' ASSISTANT:', however many tokens this tokenizer makes of it (LLaVA's: 5)
        k = assistant_header_tokens(SimpleNamespace(template=get_template("vicuna_v1"), tok=tok), ids)
        assert tok.decode(ids[-k:]).strip() == "ASSISTANT:" != tok.decode(ids[-k + 1:]).strip()
        assert assistant_header_tokens(SimpleNamespace(template=get_template("chatml"), tok=tok), ids) == 5
        assert r["reverse_attempts"] == len(want.history)
    assert any(r["answer"] for r in rows)
    # Sampled: each question draws from keys of its own, so its answer does not depend on the batch size.
    sampled = [a for a in base if a not in ("--temperature", "0", "--reverse-threshold", "1.0")]
    assert "--batch-size" in sampled and len(sampled) == len(base) - 4
    got = {}
    for bs in ("1", "3"):
        args = [*sampled, "--temperature", "1.0", "--output", str(tmp_path / f"s{bs}.jsonl")]
        args[args.index("--batch-size") + 1] = bs
        assert main(args) == 0
        got[bs] = [json.loads(line) for line in (tmp_path / f"s{bs}.jsonl").read_text().splitlines()]
    assert got["1"] == got["3"] and len(got["1"]) == len(rows)
    assert [r["answer"] for r in got["1"]] != [r["answer"] for r in rows]       # sampled, not greedy
    # --shard: question 1 alone samples what it samples among the others (its key is its position's)
    args = [*sampled, "--temperature", "1.0", "--shard", "1/2", "--output", str(tmp_path / "shard.jsonl")]
    assert main(args) == 0
    assert [json.loads(line) for line in (tmp_path / "shard.jsonl").read_text().splitlines()] == got["1"][1:2]
    plain = [checkpoint["root"] / "q.jsonl", checkpoint["ckpt"]]
    with pytest.raises(SystemExit, match=r"--reverse: the tokenizer has no <SPAN>"):
        main(["generate", "--checkpoint", str(plain[1]), "--questions", str(plain[0]), "--image-folder",
              str(checkpoint["root"]), "--reverse", "--output", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit, match="pick one"):
        main([*base, "--chain-of-spot", "--output", str(tmp_path / "y.jsonl")])


def test_judger_flag_matches_transformers_eager_attention_and_generate(checkpoint, tmp_path):
    from jaxvlm.cli import main
    from jaxvlm.data.chat_templates import encode_prompt
    from jaxvlm.data.image_processing import LlavaImageProcessor, load_image
    from jaxvlm.methods import judger
    c = checkpoint
    torch, hf, tok, cfg = c["torch"], c["hf"], c["tok"], c["cfg"]
    layer = 1
    out = tmp_path / "judger.jsonl"
    assert main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
                 "--image-folder", str(c["root"]), "--max-new-tokens", str(NEW), "--batch-size", "2", "--judger",
                 "--judger-layer", str(layer - cfg.text.num_layers),      # negative: counted from the last layer
                 "--template", "llava_v1", "--output", str(out),
                 "--judger-png", str(tmp_path / "maps")]) == 0
    pngs = sorted((tmp_path / "maps").iterdir())
    assert [p.name for p in pngs] == ["7.png", "8.png", "9.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pad_proc = LlavaImageProcessor.for_llava(cfg)
    crop_proc = LlavaImageProcessor.for_llava(cfg, aspect="crop")
    img_id = cfg.image_token_id
    hf.set_attn_implementation("eager")
    try:
        cropped, rel_maps = 0, []
        for q, r in zip(c["qs"], rows):
            image = load_image(c["root"] / q["image"])
            full = pad_proc(image).pixel_values[None]
            maps = []
            for text in (q["text"], "Write a general description of the image."):
                ids = np.array([img_id] * 16 + tok("\n" + text)["input_ids"])   # this tokenizer adds no BOS
                with torch.no_grad():
                    att = hf(input_ids=torch.tensor(ids[None]), pixel_values=torch.tensor(full),
                             output_attentions=True).attentions[layer][0, :, -1].numpy()
                maps.append(att[:, ids == img_id].astype(np.float64).mean(0).reshape(4, 4))
            box = judger.crop_box(maps[0] / maps[1], image.size, cfg.vision.image_size)
            assert r["crop_box"] == pytest.approx(list(box))
            rel_maps.append((maps[0] / maps[1], image.size))
            cropped += tuple(box) != (0, 0, *image.size)
            crop = image.crop(box)
            ids = encode_prompt("llava_v1", judger.answer_messages(q["text"]), tok, image_token_id=img_id,
                                image_token_counts=[16, 16])
            pix = np.stack([full[0], crop_proc(crop).pixel_values])
            with torch.no_grad():
                o = hf.generate(input_ids=torch.tensor(ids[None].astype(np.int64)), pixel_values=torch.tensor(pix),
                                do_sample=False, max_new_tokens=NEW, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
            assert r["answer"] == tok.decode(o[0, len(ids):], skip_special_tokens=True).strip()
        assert cropped >= 2
    finally:
        hf.set_attn_implementation("sdpa")
    # --judger-crop-size: the windows are 1-2x that many pixels instead of the model's input resolution
    half = cfg.vision.image_size // 2
    assert main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
                 "--image-folder", str(c["root"]), "--max-new-tokens", "1", "--batch-size", "2", "--judger",
                 "--judger-layer", str(layer), "--judger-crop-size", str(half), "--output", str(tmp_path / "half.jsonl")]) == 0
    smaller = [json.loads(line)["crop_box"] for line in (tmp_path / "half.jsonl").read_text().splitlines()]
    assert smaller == [pytest.approx(list(judger.crop_box(a, size, half))) for a, size in rel_maps]
    assert smaller != [r["crop_box"] for r in rows]
    with pytest.raises(SystemExit, match="--judger-crop-size must be a positive number of pixels, got -3"):
        main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
              "--image-folder", str(c["root"]), "--judger", "--judger-layer", "1", "--judger-crop-size", "-3",
              "--output", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="--judger-layer 5 is outside the LM's 2 layers"):
        main(["generate", "--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"),
              "--image-folder", str(c["root"]), "--judger", "--judger-layer", "5", "--output", str(tmp_path / "x")])


def test_answers_are_written_in_order_and_counted_as_they_finish():
    from jaxvlm.generate.cli import _in_order

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar, seen = Bar(), []
    finished = [(2, "c"), (0, "a"), (3, "d"), (1, "b")]      # REVERSE's loops end out of order
    for i, got in _in_order(iter(finished), bar):
        seen.append((i, got, bar.n))
    # question 0 is released when it finishes (2 done), 1 only when 1 does (all 4 done), then 2 and 3
    assert seen == [(0, "a", 2), (1, "b", 4), (2, "c", 4), (3, "d", 4)]


GCLOUD = """
if [[ "$*" == *" describe "* ]]; then echo '10.0.0.1;10.0.0.2'; exit; fi
for a in "$@"; do case "$a" in --worker=*) worker="${a#--worker=}";; esac; done
while [[ $# -gt 0 ]]; do if [[ "$1" == --command ]]; then bash -c "$2"; exit; fi; shift; done
"""
LAUNCHERS = {   # script, stand-ins for the cluster's commands (two nodes / workers), environment
    "gpu_slurm.sh": ({"scontrol": "echo node0; echo node1",
                      "srun": 'shift; for i in 0 1; do SLURM_PROCID=$i "$@" & done; wait'},
                     {"SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2"}, []),
    "tpu_pod.sh": ({"gcloud": GCLOUD}, {}, ["my-tpu", "zone-a", "--"]),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launchers_split_a_decode_over_nodes(launcher, checkpoint, tmp_path):
    """launch/gpu_slurm.sh and launch/tpu_pod.sh with JAXVLM_COMMAND=generate, under stand-ins for SLURM's
    scontrol/srun or gcloud (two nodes): each node writes its shard's file, and together they are the whole
    run's answers."""
    import os
    import stat
    import subprocess

    from jaxvlm.cli import main
    from jaxvlm.generate.cli import auto_shard
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(repo, ".venv", "bin", "activate")):
        pytest.skip("the launchers source $REPO/.venv (the README's set-up command makes it)")
    assert auto_shard({"SLURM_PROCID": "1", "SLURM_NTASKS": "3"}, "a/b.jsonl") == ("1/3", "a/b.shard1-of-3.jsonl")
    with pytest.raises(SystemExit, match="cannot tell this process's shard"):
        auto_shard({}, "b.jsonl")
    c = checkpoint
    args = ["--checkpoint", str(c["ckpt"]), "--questions", str(c["root"] / "q.jsonl"), "--image-folder",
            str(c["root"]), "--max-new-tokens", str(NEW), "--batch-size", "2", "--temperature", "1.0"]
    assert main(["generate", *args, "--output", str(tmp_path / "whole.jsonl")]) == 0
    stand_ins, env_extra, head = LAUNCHERS[launcher]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", REPO=repo, LOG_DIR=str(tmp_path),
               JAXVLM_COMMAND="generate", JAX_PLATFORMS="cpu",
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
    extra = ["--shard", "auto"] if launcher == "gpu_slurm.sh" else []      # tpu_pod.sh adds it per worker
    r = subprocess.run(["bash", os.path.join(repo, "launch", launcher), *head, *args, *extra,
                        "--output", str(tmp_path / "answers.jsonl")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = (tmp_path / "whole.jsonl").read_text().splitlines()
    shards = [(tmp_path / f"answers.shard{k}-of-2.jsonl").read_text().splitlines() for k in range(2)]
    assert shards == [[whole[0], whole[2]], [whole[1]]]
