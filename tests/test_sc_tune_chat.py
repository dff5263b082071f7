"""SC-Tune's phase loop with `ChatRoles` (jaxvlm.methods.sc_tune_roles) on a converted tiny LLaVA
(test_generate_cli's checkpoint, non-square images): prompts and box text as LLaVA-1.5 writes them on
the padded square, teacher-forced log-probs equal to what the engine sampled, the locator's SFT targets
and loss, and a describer step that trains the projector and the LM with the vision tower frozen.

A random model never writes a box, so the describer test replaces the locator's answers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.data.image_processing import load_image
from jaxvlm.methods import sc_tune_loop as L
from jaxvlm.methods.sc_tune import box_iou
from jaxvlm.methods.sc_tune_roles import LLAVA_DESCRIBE, LLAVA_LOCATE, ChatRoles
from jaxvlm.train import mesh as M
from jaxvlm.train.step import next_token_loss
from data_utils import CORPUS, build_tokenizer
from test_generate_cli import make_checkpoint

FAST = {"xla_backend_optimization_level": 0}   # compile time; numerics are unaffected
BASE = dict(caption_new_tokens=8, box_new_tokens=8, caption_lr=1e-3, bbox_lr=1e-3)
BOXES = [[0.1, 0.2, 0.5, 0.6], [0.05, 0.0, 0.9, 0.45]]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from jaxvlm.generate.cli import load_model
    # box 0's text is in the BPE corpus, so its prompt is shorter than box 1's (left padding)
    tok = build_tokenizer(corpus=CORPUS + ["[0.10, 0.26, 0.50, 0.58]"] * 8)
    c = make_checkpoint(tmp_path_factory.mktemp("sc_tune_chat"), tok)
    cfg, model, params, tok, proc, _ = load_model(str(c["ckpt"]))
    roles = ChatRoles(model, tok, proc, "vicuna_v1")
    tuner = L.SCTune(model, params, tok, L.SCTuneConfig(**BASE), roles=roles, batch_size=2,
                     mesh=M.make_mesh((1, 1, 1), jax.devices()[:1]), max_len=192, compiler_options=FAST)
    images = [load_image(c["root"] / f"im{i}.png") for i in (0, 1)]      # 40 x 32 and 48 x 32
    records = [dict(image_id=f"im{i}.png", bbox=b) for i, b in enumerate(BOXES)]
    return dict(c, model=model, params=params, tok=tok, roles=roles, tuner=tuner, images=images, records=records)


def flat(tree):
    from flax.traverse_util import flatten_dict
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(tree)).items()}


def test_prompts_and_boxes_are_llava_15s_on_the_padded_square(chat):
    roles, tok, images = chat["roles"], chat["tok"], chat["images"]
    # 40 x 32 is padded to a 40-px square with 4 px above: y -> (32 y + 4) / 40
    assert roles.box_text(BOXES[0], images[0]) == "[0.10, 0.26, 0.50, 0.58]"
    batch = roles.describe_batch(images, BOXES)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0] > 0].tolist())
    assert text.endswith("USER: " + "<image>" * 16 + "\n" + LLAVA_DESCRIBE.format(box="[0.10, 0.26, 0.50, 0.58]")
                         + " ASSISTANT:")
    assert batch["attention_mask"][:, 0].tolist() == [0, 1]           # left-padded: box 0's text is shorter
    loc = roles.locate_batch(images, ["the red square", "it"])
    text = tok.decode(loc["input_ids"][1][loc["attention_mask"][1] > 0].tolist())
    assert text.endswith(LLAVA_LOCATE.format(caption="it") + " ASSISTANT:")
    # answers: the first [a, b, c, d] (anything after it ignored), else IoU 0; the EOS ends an answer
    answers = ["[0.10, 0.26, 0.50, 0.58] and [0, 0, 1, 1]</s>[0.9, 0.9, 1, 1]", "a box: [0.1, 0.2]"]
    rows = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    width = max(map(len, rows))
    toks = np.array([r + [roles.pad_id] * (width - len(r)) for r in rows])
    found = roles.found_boxes(loc, toks)
    assert found == [[0.10, 0.26, 0.50, 0.58], [0.0, 0.0, 0.0, 0.0]]
    iou = roles.iou(found, BOXES, images)
    assert iou[0] == pytest.approx(1.0, abs=1e-6) and iou[1] == 0.0
    # IoU on the square equals IoU on the image (padding shifts and scales both boxes alike)
    shifted = [[0.1, 0.3, 0.5, 0.7]]
    on_image = box_iou(np.array(shifted), np.array(BOXES[:1]))[0, 0]
    assert roles.iou([roles.square_box(shifted[0], images[0])], BOXES[:1], images[:1])[0] == pytest.approx(on_image)
    assert roles.caption(toks[0]) == "[0.10, 0.26, 0.50, 0.58] and [0, 0, 1, 1]"
    np.testing.assert_array_equal(roles.gen_mask(toks)[0], np.arange(width) <= rows[0].index(tok.eos_token_id))
    with pytest.raises(ValueError, match=r"has no \{box\}"):
        ChatRoles(chat["model"], tok, roles.proc, "vicuna_v1", describe="Describe it.")
    with pytest.raises(ValueError, match=r"can only have \{caption\}"):
        ChatRoles(chat["model"], tok, roles.proc, "vicuna_v1", locate="Find {caption} in {image}.")


def test_teacher_forcing_lines_up_with_the_sampled_tokens(chat):
    tuner = chat["tuner"]
    tuner.cfg = L.SCTuneConfig(**BASE)
    tuner.restart(chat["params"])
    prompt, gen, caps = tuner.describe(tuner.state.params, chat["images"], BOXES, sample=True, rng=5)
    assert (prompt["attention_mask"] == 0).any()                  # one prompt is left-padded
    tf, width = tuner.rollout_batch(prompt, gen.tokens)
    w = gen.tokens.shape[1]
    lp = np.asarray(tuner._logprobs(tuner.state.params, tuner._shard(tf), jnp.asarray(width)))
    start = int(gen.state.gen_start)
    engine_lp = np.asarray(gen.state.token_logprobs)[:2, start:start + w]
    valid = tf["gen_mask"][:, :w] > 0
    assert valid.sum(axis=1).min() >= 3                          # min_new_tokens=3 held on every row
    np.testing.assert_allclose(lp[:, :w][valid], engine_lp[valid], atol=2e-5, rtol=1e-5)
    assert caps == [chat["roles"].caption(row) for row in gen.tokens]


def test_locator_and_describer_steps(chat, monkeypatch):
    tuner, tok, roles = chat["tuner"], chat["tok"], chat["roles"]
    tuner.cfg = L.SCTuneConfig(**BASE)
    tuner.restart(chat["params"], phase="bbox")
    images = chat["images"]
    batch = tuner.locator_batch(["the red square", "the blue circle at the top"], BOXES, images)
    for r in range(2):
        labels = batch["labels"][r]
        assert tok.decode(labels[labels >= 0].tolist()) == " " + roles.box_text(BOXES[r], images[r]) + "</s>"
    before = jax.device_get(tuner.state.params)
    _, m = tuner.steps["bbox"](tuner.state, tuner._shard(batch))
    logits = chat["model"].apply({"params": before}, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]),
                                 attention_mask=jnp.asarray(batch["attention_mask"])).logits
    assert float(m["loss"]) == pytest.approx(float(next_token_loss(logits, jnp.asarray(batch["labels"]))[0]), rel=1e-5)

    # a describer step: the policy's caption of box 0 is located exactly, the snapshot's of neither
    tuner.restart(chat["params"])
    exact = [roles.square_box(BOXES[0], images[0]), [0.0, 0.0, 0.0, 0.0]]
    calls = iter([exact, [[0.0] * 4] * 2])
    monkeypatch.setattr(tuner, "locate", lambda params, ims, caps: next(calls))
    before = flat(tuner.state.params)
    out = tuner.step(chat["records"], chat["root"])
    assert out["phase"] == "caption" and out["reward"] == pytest.approx(0.5) and out["baseline"] == 0.0
    after = flat(tuner.state.params)
    assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith("vision_tower/"))
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert any(k.startswith("multi_modal_projector/") for k in moved) and any(k.startswith("language_model/") for k in moved)


def test_cli_tunes_a_converted_llava(chat, tmp_path, capsys):
    import argparse
    import json

    from jaxvlm.conversion.converted import load_converted
    from jaxvlm.methods import sc_tune_cli
    data = tmp_path / "boxes.json"
    data.write_text(json.dumps(chat["records"] * 4))
    parser = argparse.ArgumentParser()
    sc_tune_cli.add_arguments(parser)

    def run(*extra):
        argv = ["--checkpoint", str(chat["ckpt"]), "--data", str(data), "--image-root", str(chat["root"]),
                "--out", str(tmp_path / "out"), "--batch-size", "8", "--max-steps", "1", "--caption-steps", "1",
                "--caption-new-tokens", "8", "--box-new-tokens", "8", "--save-every", "1", "--dtype", "float32",
                "--no-progress", *extra]
        return sc_tune_cli.main(parser.parse_args(argv))

    assert run("--describe-prompt", "Describe the region {box}.") == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in lines] == ["caption", "bbox"]           # one describer step, then the locator's
    cfg, tuned = load_converted(tmp_path / "out" / "step_2")
    _, source = load_converted(chat["ckpt"])
    assert cfg == chat["model"].cfg
    assert {x.dtype for x in jax.tree.leaves(tuned)} == {x.dtype for x in jax.tree.leaves(source)}
    a, b = flat(tuned), flat(source)
    assert all(np.array_equal(a[k], b[k]) for k in b if k.startswith("vision_tower/"))
    assert not np.array_equal(a["language_model/lm_head/kernel"], b["language_model/lm_head/kernel"])
    assert (tmp_path / "out" / "step_2" / "hf_files" / "tokenizer.json").is_file()
    capsys.readouterr()
    # a resume that would overwrite a later step is refused; from the locator phase's start it continues
    assert run("--resume", str(tmp_path / "out" / "step_1")) == 2
    assert "already holds step_2 beyond --resume" in capsys.readouterr().err
    import shutil
    shutil.rmtree(tmp_path / "out" / "step_2")
    assert run("--resume", str(tmp_path / "out" / "step_1")) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["phase"]) for x in lines] == [(1, "caption"), (2, "bbox"), (2, "bbox")]
    _, again = load_converted(tmp_path / "out" / "step_2")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(tuned)))
    capsys.readouterr()
    assert run("--out", str(tmp_path / "out2"), "--describe-prompt", "no field") == 2
    assert "no {box} to fill in" in capsys.readouterr().err
