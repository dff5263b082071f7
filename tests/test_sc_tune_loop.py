"""SC-Tune's phase loop (`jaxvlm.methods.sc_tune_loop`) on a tiny random Qwen-VL-Chat with the real
tokenizer (../shared's qwen.tiktoken): the teacher-forced log-probs line up with what the engine
sampled, the describer's PPO update and the locator's SFT targets are the original's, phases switch
with a fresh snapshot and optimizer state, the sharded loop equals the single-device one, and bad
input fails clearly.

A random model never writes a box, so tests that need a reward replace the locator's answers.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.data.image_processing import load_image
from jaxvlm.methods import sc_tune_loop as L
from jaxvlm.methods.sc_tune import box_to_qwen, caption_advantages, locator_prompt
from jaxvlm.train import mesh as M
from jaxvlm.train.step import next_token_loss
from qwen_vl_utils import random_images, tiny_qwen_vl_chat, write_original_folder

FAST = {"xla_backend_optimization_level": 0}   # compile time; numerics are unaffected
BASE = dict(caption_new_tokens=8, box_new_tokens=8, caption_lr=1e-3, bbox_lr=1e-3)


@pytest.fixture(scope="module")
def world(shared_dir, tmp_path_factory):
    tok, model, params = tiny_qwen_vl_chat(shared_dir)
    root = tmp_path_factory.mktemp("sc_tune_images")
    records = []
    for i, name in enumerate(random_images(root, 8)):
        # boxes with 1-3 digit corners, so the describer prompts differ in length (left padding)
        x1, y1 = [0.005, 0.05, 0.3, 0.6][i % 4], [0.002, 0.2, 0.1, 0.5][i % 4]
        records.append(dict(image_id=name, bbox=[x1, y1, x1 + 0.3, y1 + 0.4]))
    return dict(tok=tok, model=model, params=params, root=root, records=records)


def make(world, shape=(1, 1, 1), **cfg):
    mesh = M.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    return L.SCTune(world["model"], world["params"], world["tok"], L.SCTuneConfig(**{**BASE, **cfg}), batch_size=4,
                    mesh=mesh, compiler_options=FAST)


@pytest.fixture(scope="module")
def shared_tuner(world):
    return make(world)


@pytest.fixture
def tuner(world, shared_tuner):
    """The module's tuner, restarted from the initial params (compiles are shared between tests)."""
    def fresh(**cfg):
        shared_tuner.cfg = L.SCTuneConfig(**{**BASE, **cfg})   # settings read at run time (rates are compiled in)
        shared_tuner.restart(world["params"])
        return shared_tuner
    yield fresh
    shared_tuner.cfg = L.SCTuneConfig(**BASE)


def inputs(world, rows=slice(0, 4)):
    recs = world["records"][rows]
    return [load_image(world["root"] / r["image_id"]) for r in recs], [r["bbox"] for r in recs]


def scripted_locator(monkeypatch, tuner, answers):
    """Replace `locate` by the given answers, call after call (each a list of Qwen boxes)."""
    calls = iter(answers)
    monkeypatch.setattr(tuner, "locate", lambda params, images, captions: next(calls))


def recording(monkeypatch, tuner, phase):
    """Wrap a phase's update step (for this test) to record (batch, metrics) of every call."""
    seen, step = [], tuner.steps[phase]

    def run(state, batch):
        state, m = step(state, batch)
        seen.append((jax.device_get(batch), jax.device_get(m)))
        return state, m
    monkeypatch.setitem(tuner.steps, phase, run)
    return seen


def flat(tree):
    from flax.traverse_util import flatten_dict
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(tree)).items()}


@pytest.mark.parametrize("attend_left_pads", [False, True])
def test_teacher_forcing_lines_up_with_the_sampled_tokens(world, tuner, attend_left_pads):
    tuner = tuner(attend_left_pads=attend_left_pads)
    images, boxes = inputs(world)
    prompt, gen, _ = tuner.describe(tuner.state.params, images, boxes, sample=True, rng=3)
    tf, width = tuner.rollout_batch(prompt, gen.tokens)
    w = gen.tokens.shape[1]
    assert width == prompt["input_ids"].shape[1] + w
    lp = np.asarray(tuner._logprobs(tuner.state.params, tuner._shard(tf), jnp.asarray(width)))
    start = int(gen.state.gen_start)
    engine_lp = np.asarray(gen.state.token_logprobs)[:4, start:start + w]
    valid = tf["gen_mask"][:, :w] > 0
    assert valid.sum(axis=1).min() >= 3                          # min_new_tokens=3 held on every row
    padded = (prompt["attention_mask"] == 0).any(axis=1)
    assert padded.any() and not padded.all()                     # the prompts differ in length
    for r in range(4):
        close = np.allclose(lp[r, :w][valid[r]], engine_lp[r][valid[r]], atol=2e-5, rtol=1e-5)
        # generation masks the left pads; the original's teacher forcing attends to them
        assert close == (not (attend_left_pads and padded[r])), r


def test_describer_step_rewards_the_located_captions(world, tuner, monkeypatch):
    tuner = tuner()
    images, boxes = inputs(world)
    gt = [box_to_qwen(b) for b in boxes]
    # the policy's captions: rows 0 and 2 located exactly; the snapshot's baseline: row 2 only
    scripted_locator(monkeypatch, tuner, [[gt[0], [0, 0, 0, 0], gt[2], [0, 0, 0, 0]],
                                          [[0, 0, 0, 0], [0, 0, 0, 0], gt[2], [0, 0, 0, 0]]])
    seen = recording(monkeypatch, tuner, "caption")
    before = flat(tuner.state.params)
    out = tuner.step(world["records"][:4], world["root"])
    assert out["phase"] == "caption" and out["reward"] == pytest.approx(0.5) and out["baseline"] == pytest.approx(0.25)
    assert out["ppo_updates"] == 2 and len(seen) == 2
    batch, m0 = seen[0]
    mask = batch["gen_mask"]
    # first phase step: policy == snapshot, so no KL penalty and A = (R - b) on every caption token
    assert out["caption_kl"] == 0.0
    want = np.asarray(caption_advantages(jnp.zeros(mask.shape), jnp.asarray(mask), jnp.asarray([1., 0, 1, 0]),
                                         jnp.asarray([0., 0, 1, 0])))
    np.testing.assert_allclose(batch["advantages"], want, atol=1e-7)
    assert (batch["advantages"][0][mask[0] > 0] == 1.0).all() and not batch["advantages"][1:].any()
    # the first PPO epoch starts on-policy (ratio 1); the second sees the moved policy
    assert m0["ratio"] == pytest.approx(1.0, abs=1e-6) and abs(m0["policy_kl"]) < 1e-6
    assert abs(seen[1][1]["ratio"] - 1.0) > 1e-6
    # the rewarded caption became more likely, the ViT stayed fixed, its resampler and the LM moved
    lp_after = np.asarray(tuner._logprobs(tuner.state.params, tuner._shard(batch), jnp.asarray(batch["input_ids"].shape[1])))
    gain = ((lp_after - batch["logprob_old"]) * mask).sum(1)
    assert gain[0] > 0.05, gain
    after = flat(tuner.state.params)
    assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith("visual/")
               and not k.startswith("visual/attn_pool/"))
    assert not np.array_equal(before["visual/attn_pool/query"], after["visual/attn_pool/query"])
    assert not np.array_equal(before["language_model/lm_head/kernel"], after["language_model/lm_head/kernel"])


def test_ppo_epochs_stop_early_on_a_large_policy_kl(world, tuner, monkeypatch):
    tuner = tuner(early_stop_kl=-1.0)      # any KL stops after the first update
    images, boxes = inputs(world)
    scripted_locator(monkeypatch, tuner, [[[0, 0, 0, 0]] * 4] * 2)
    assert tuner.step(world["records"][:4], world["root"])["ppo_updates"] == 1


def test_locator_step_trains_the_ground_truth_box_of_the_snapshots_caption(world, tuner, monkeypatch):
    tuner = tuner()
    tuner.switch_phase()
    assert tuner.phase == "bbox"
    images, boxes = inputs(world, slice(4, 8))
    _, _, caps = tuner.describe(tuner.snapshot, images, boxes, sample=False)
    seen = recording(monkeypatch, tuner, "bbox")
    before = jax.device_get(tuner.state.params)
    out = tuner.step(world["records"][4:8], world["root"])
    batch, m = seen[0]
    tok = world["tok"]
    for r in range(4):
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        x1, y1, x2, y2 = box_to_qwen(boxes[r])
        assert tok.decode(labels[labels >= 0].tolist()) == f"({x1},{y1}),({x2},{y2})</box><|endoftext|>"
        text = tok.decode(ids[batch["attention_mask"][r] > 0].tolist())
        assert text == tok.decode(tok.raw_prompt(locator_prompt(caps[r], box_to_qwen(boxes[r]))))
    # the step's loss is the cross-entropy of those labels under the pre-update model
    logits = world["model"].apply({"params": before}, jnp.asarray(batch["input_ids"]),
                                  jnp.asarray(batch["pixel_values"]), attention_mask=jnp.asarray(batch["attention_mask"]),
                                  train=True).logits
    assert float(m["loss"]) == pytest.approx(float(next_token_loss(logits, jnp.asarray(batch["labels"]))[0]), rel=1e-5)
    assert out["loss"] == pytest.approx(float(m["loss"]))
    again = tuner.steps["bbox"](tuner.state, tuner._shard(batch))[1]
    assert float(again["loss"]) < float(m["loss"])


def test_phases_alternate_with_a_fresh_snapshot_and_optimizer(world, tuner, tmp_path):
    fresh = tuner
    tuner = fresh(caption_steps=1, bbox_steps=1, max_steps=2)
    exported = []
    summary = tuner.train(world["records"], world["root"], out_dir=tmp_path, save_every=2, progress=True,
                          export=lambda params, step: exported.append(step))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # max_steps=2 runs 3 batches, as the original's `global_step > max_steps` check
    assert [x["phase"] for x in lines] == ["caption", "bbox", "caption"] and summary["steps"] == 3
    assert exported == [2, 3] and summary["phase"] == "bbox"
    # after the last switch: the snapshot is the policy, and AdamW starts again from zero moments
    p, s = flat(tuner.state.params), flat(tuner.snapshot)
    assert p.keys() == s.keys() and all(np.array_equal(p[k], s[k]) for k in p)
    moments = [x for x in jax.tree.leaves(tuner.state.opt_state) if np.ndim(x) > 0]
    assert moments and all(not np.any(np.asarray(x)) for x in moments)

    # stopped after step 1 (a phase start) and resumed: the same run, bit for bit
    tuner = fresh(caption_steps=1, bbox_steps=1, max_steps=0)
    saved = []
    tuner.train(world["records"], world["root"], progress=False, export=lambda params, step: saved.append(params))
    tuner.cfg = L.SCTuneConfig(**{**BASE, "caption_steps": 1, "bbox_steps": 1, "max_steps": 2})
    tuner.resume(saved[-1], 1)
    assert tuner.phase == "bbox"
    tuner.train(world["records"], world["root"], progress=False)
    resumed = flat(tuner.state.params)
    assert all(np.array_equal(resumed[k], p[k]) for k in p)
    tuner.cfg = L.SCTuneConfig(**{**BASE, "caption_steps": 2, "bbox_steps": 1})
    with pytest.raises(ValueError, match="step 1 is inside a phase; resume from a phase start: a multiple of 3"):
        tuner.resume(saved[-1], 1)


def test_sharded_loop_equals_one_device(world, tuner, monkeypatch):
    gt = [box_to_qwen(r["bbox"]) for r in world["records"][0:4]]
    runs = []
    one_device = tuner(caption_steps=1)
    for shape in ((1, 1, 1), (2, 2, 1)):       # data x fsdp: rows over 4 devices, params over 2
        tuner = one_device if shape == (1, 1, 1) else make(world, shape=shape, caption_steps=1)
        scripted_locator(monkeypatch, tuner, [[gt[0], [0, 0, 0, 0], [0, 0, 0, 0], gt[3]], [[0, 0, 0, 0]] * 4])
        caps = tuner.step(world["records"][:4], world["root"])["captions"]
        monkeypatch.undo()
        tuner.step(world["records"][4:8], world["root"])          # a locator step, real greedy locating
        runs.append((caps, flat(tuner.state.params)))
        if shape[1] > 1:
            assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(tuner.state.params))
    (caps1, p1), (caps4, p4) = runs
    assert caps1 == caps4
    # Adam moves each weight by ~lr (1e-3) a step, whatever its gradient's size, so a weight whose
    # gradient is round-off (a key bias's is exactly 0 in exact arithmetic) may step differently
    # under another layout: atol is 5% of one step. A wrong row or advantage would move most weights.
    start = flat(world["params"])
    assert np.mean(np.abs(p1["language_model/lm_head/kernel"] - start["language_model/lm_head/kernel"]) > 5e-4) > 0.5
    for k in p1:
        np.testing.assert_allclose(p4[k], p1[k], atol=5e-5, rtol=1e-5, err_msg=k)


def test_bad_input(world, shared_tuner, tmp_path):
    with pytest.raises(ValueError, match="SC-Tune data file not found"):
        L.read_box_records(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": "0.png", "bbox": [0.5, 0.1, 0.2, 0.3]}]))
    with pytest.raises(ValueError, match=r"record 0 \(0.png\) has bbox"):
        L.read_box_records(bad)
    bad.write_text(json.dumps([{"image": "0.png"}]))
    with pytest.raises(ValueError, match="needs 'image_id' and 'bbox'"):
        L.read_box_records(bad)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in world["records"]))
    assert L.read_box_records(good) == world["records"]
    # a step names the record whose image is missing or broken, before any work
    (world["root"] / "broken.png").write_bytes(b"not a png")
    for name, why in (("broken.png", "cannot be decoded"), ("nope.png", "does not exist")):
        recs = world["records"][:3] + [dict(image_id=name, bbox=[0.1, 0.1, 0.5, 0.5])]
        with pytest.raises(ValueError, match=f"record '{name}': image file .*{name} {why}"):
            shared_tuner.step(recs, world["root"])
    mesh = M.make_mesh((4, 1, 1), jax.devices()[:4])
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the mesh's data-parallel size 4"):
        L.SCTune(world["model"], world["params"], world["tok"], batch_size=6, mesh=mesh)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        next(L.batches(world["records"][:3], 4, 0))
    with pytest.raises(ValueError, match="caption_steps must be >= 1"):
        L.SCTuneConfig(caption_steps=0)


def test_cli_tunes_a_converted_checkpoint(world, shared_dir, tmp_path, capsys):
    import argparse

    from jaxvlm.conversion import qwen_vl as conv
    from jaxvlm.methods import sc_tune_cli
    ckpt = write_original_folder(tmp_path / "Qwen-VL-Chat", world["model"], world["params"], shared_dir)
    data = tmp_path / "boxes.json"
    data.write_text(json.dumps(world["records"]))
    parser = argparse.ArgumentParser()
    sc_tune_cli.add_arguments(parser)

    def run(*extra):
        argv = ["--checkpoint", str(ckpt), "--data", str(data), "--image-root", str(world["root"]),
                "--out", str(tmp_path / "out"), "--batch-size", "8", "--max-steps", "0", "--caption-lr", "1e-2", "--caption-new-tokens", "6", "--box-new-tokens", "6", "--dtype", "float32",
                "--no-progress", *extra]
        return sc_tune_cli.main(parser.parse_args(argv))

    assert run() == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in lines] == ["caption"]        # max_steps 0: one batch
    cfg, tuned = conv.load_original(tmp_path / "out" / "step_1", show_progress=False)
    assert cfg == world["model"].cfg
    assert {x.dtype for x in jax.tree.leaves(tuned)} == {np.dtype(np.float32)}   # the source's dtype
    assert (tmp_path / "out" / "step_1" / "qwen.tiktoken").is_file()
    assert (tmp_path / "out" / "step_1" / "config.json").read_text() == (ckpt / "config.json").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.jsonl", "step_1"]
    a, b = flat(tuned), flat(world["params"])
    # no reward, so this step's update is AdamW's weight decay: the LM moves, the frozen ViT does not
    assert not np.array_equal(a["language_model/lm_head/kernel"], b["language_model/lm_head/kernel"])
    assert np.array_equal(a["visual/conv1/kernel"], b["visual/conv1/kernel"])
    capsys.readouterr()
    # a second run into the same folder is refused before anything is touched
    before = (tmp_path / "out" / "metrics.jsonl").read_bytes()
    assert run() == 2 and "already holds an SC-Tune run" in capsys.readouterr().err
    assert (tmp_path / "out" / "metrics.jsonl").read_bytes() == before
    assert run("--resume", str(tmp_path / "out" / "step_9")) == 2
    assert "expected a step_N folder" in capsys.readouterr().err
    data.write_text("[]")
    assert run("--out", str(tmp_path / "out2")) == 2 and "non-empty list" in capsys.readouterr().err
