"""The embedded default, reduced: a small shapes world, a tiny LLaVA trained for a few hundred
steps through the real train loop, decoded with `jaxvlm generate` and scored with `jaxvlm eval`."""
import json
import pathlib
import re
from collections import Counter

import jax
import numpy as np
import pytest

from jaxvlm import demo as D
from jaxvlm import demo_tuners
from jaxvlm.demo_tuners import reverse_records

TINY = ("model.text.hidden_size=64", "model.text.intermediate_size=128", "model.text.num_layers=2",
        "model.text.num_heads=4", "model.text.num_kv_heads=2", "model.vision.hidden_size=64",
        "model.vision.intermediate_size=128", "model.vision.num_layers=2", "model.vision.num_heads=4",
        "data.batch_size=8", "optim.warmup_steps=10", "optim.default_lr=3e-3", "train.log_every=10",
        "checkpoint.every=10000", "checkpoint.async_save=False",
        "data.curriculum=[[20,1],[40,2]]")   # the recipe's box tokens start Fourier-coded (model.number_init)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    world, tok, tok_dir = D.build_world(out, n_train=40, n_test=4)
    ckpt, summary = D.train_model(out, world, tok_dir, steps=200, overrides=TINY, vision=dict(steps=40, images=24))
    return out, world, tok, ckpt, summary


def supervised_majority_rate(world, tok, template="vicuna_v1", image_token="<image>") -> float:
    """Accuracy of always predicting the most frequent supervised token (the chance level)."""
    from jaxvlm.data.chat_templates import encode
    from jaxvlm.data.conversation import load_records
    counts = Counter()
    for r in load_records(world.llava["train"]):
        e = encode(template, r.messages, tok, image_token_id=tok.convert_tokens_to_ids(image_token),
                   image_token_counts=(49,))
        counts.update(int(t) for t in e.labels if t >= 0)
    return counts.most_common(1)[0][1] / sum(counts.values())


def test_tiny_model_learns(trained):
    out, world, tok, ckpt, summary = trained
    logs = [json.loads(line) for line in open(out / "train" / "metrics.jsonl") if '"loss"' in line]
    losses = [r["loss"] for r in logs]
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    chance = supervised_majority_rate(world, tok)
    assert np.mean([r["accuracy"] for r in logs[-3:]]) > 2 * chance, (logs[-3:], chance)
    # every record of the world fits the recipe's seq_len: none lost answer tokens to truncation
    assert [r["data_truncated"] for r in logs] == [0] * len(logs)
    assert (ckpt / "jaxvlm_config.json").is_file()
    # stage 0 ran and seeded the tower (jaxvlm.train.dense_vision; tested on its own in test_dense_vision)
    assert summary["vision"][-1]["step"] == 40 and (out / "vision_pretrain" / "vision_tower.msgpack").is_file()
    # ... on a world of its own (the next seed), not on the LM's train images
    stage0_world = json.loads((out / "vision_world" / "world.json").read_text())["params"]
    assert (stage0_world["seed"], stage0_world["n_train"]) == (D.WORLD["seed"] + 1, 24)
    # ... and the recipe kept it frozen: the exported tower is stage 0's, bit for bit, while the LM moved
    from jaxvlm.conversion.converted import load_converted
    from jaxvlm.train.dense_vision import load_vision_params
    _, params = load_converted(ckpt)
    stage0 = load_vision_params(out / "vision_pretrain" / "vision_tower.msgpack", params["vision_tower"])
    for a, b in zip(jax.tree.leaves(params["vision_tower"]), jax.tree.leaves(stage0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "layers_0" in params["language_model"]          # the recipe's unrolled LM layers


def test_recipe_drops_the_tower_freeze_only_when_stage_0_is_skipped(trained):
    out, world, _, _, _ = trained
    tok_dir = out / "tokenizer"
    frozen = lambda cfg: [g for g in cfg.optim.groups if g["lr"] is None]  # noqa: E731
    cfg, vp = D.recipe(out, world, tok_dir)
    assert vp["images"] > 0                # the recipe's stage 0 has a world of its own
    assert vp["steps"] > 0 and [g["pattern"] for g in frozen(cfg)] == [r"vision_tower/.*"]
    cfg, vp = D.recipe(out, world, tok_dir, vision=dict(steps=0))
    assert vp["steps"] == 0 and frozen(cfg) == []
    cfg, _ = D.recipe(out, world, tok_dir, vision=dict(steps=0), overrides=("model.vision_init=tower.msgpack",))
    assert len(frozen(cfg)) == 1          # a given pretrained tower stays frozen
    # the command line's stage-0 flags replace only the keys they name
    import argparse
    parser = argparse.ArgumentParser()
    D.add_arguments(parser)
    assert D.stage0_settings(parser.parse_args(["--vision-images", "0"])) == {"images": 0}
    _, vp = D.recipe(out, world, tok_dir, vision=D.stage0_settings(parser.parse_args(["--vision-steps", "7"])))
    assert vp["steps"] == 7 and vp["images"] > 0


def test_train_loop_hands_the_curriculum_to_the_pipeline(trained, monkeypatch):
    import jaxvlm.data.pipeline as P
    from jaxvlm.train import loop
    out, world, tok, *_ = trained
    seen, real = {}, P.make_dataset
    monkeypatch.setattr(P, "make_dataset", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    cfg, _ = D.recipe(out, world, out / "tokenizer", overrides=("data.curriculum=[[3,1],[5,2]]",))
    first = next(iter(loop.make_data(cfg, loop.model_config(cfg), 8)))
    assert [list(x) for x in seen["curriculum"]] == [[3, 1], [5, 2]] and seen["curriculum_key"] == "num_objects"
    assert first["input_ids"].shape == (8, cfg.data.seq_len) and seen["label_transform"] is None
    # data.reverse_labels hands REVERSE's span masking, with the shapes tokenizer's tag ids, to the pipeline
    from jaxvlm.methods.reverse import tag_ids
    cfg, _ = D.recipe(out, world, out / "tokenizer", overrides=("data.reverse_labels=True",))
    loop.make_data(cfg, loop.model_config(cfg), 8)
    s, c, u = tag_ids(tok)
    np.testing.assert_array_equal(seen["label_transform"](np.array([7, s, 8, 9, u, 10, s, 11, c])),
                                  [7, s, -100, -100, u, 10, s, 11, c])


def test_reverse_records_tag_every_caption_phrase(trained, tmp_path):
    """REVERSE's data for the shapes world: positives tag every object phrase </CN> and keep the caption;
    negatives keep the phrases before a swapped one, whose shape the image lacks, tagged </UN> at the end."""
    import re

    from jaxvlm.data.shapes_world.vocab import CATEGORIES
    _, world, *_ = trained
    src = json.loads(world.llava["train"].read_text())
    got, n_neg = reverse_records(src, seed=1)
    caps = [(a, b) for a, b in zip(src, got) if a["id"].endswith("_caption")]
    assert [a["id"] for a in src] == [b["id"] for b in got] and 0 < n_neg < len(caps)
    assert all(a == b for a, b in zip(src, got) if not a["id"].endswith("_caption"))
    negatives = 0
    for a, b in caps:
        plain, tagged = a["conversations"][1]["value"], b["conversations"][1]["value"]
        spans = re.findall(r"<SPAN>(.*?)</(CN|UN)>", tagged)
        assert spans and all(t == "CN" for _, t in spans[:-1])
        if spans[-1][1] == "UN":
            negatives += 1
            assert tagged.endswith("</UN>")
            fake = next(c for c in CATEGORIES if re.search(rf"\b{c}\b", spans[-1][0]))
            assert not re.search(rf"\b{fake}\b", plain)               # a shape the image does not have
            assert all(p in plain for p, _ in spans[:-1])
        else:
            assert re.sub(r"</?SPAN>|</CN>", "", tagged) == plain
    assert negatives == n_neg


def test_added_tokens_reach_the_data_and_the_exported_tokenizer(trained, tmp_path, monkeypatch):
    """tokens.add grows the tokenizer the data is encoded with (data.tokenizer by default), and the exported
    checkpoint carries that grown tokenizer (it once copied data.tokenizer, without the new tokens)."""
    import jaxvlm.data.pipeline as P
    from jaxvlm.conversion.converted import load_converted
    from jaxvlm.train import loop
    out, world, tok, ckpt, _ = trained
    seen, real = {}, P.make_dataset
    monkeypatch.setattr(P, "make_dataset", lambda *a, **kw: seen.update(tok=a[2]) or real(*a, **kw))
    cfg, _ = D.recipe(out, world, out / "tokenizer", overrides=(
        'tokens.add=["<probe_tag>"]', f"train.workdir={tmp_path / 'work'}", f"train.export={tmp_path / 'ckpt'}"))
    assert cfg.tokens.tokenizer is None          # defaults to data.tokenizer
    loop.make_data(cfg, loop.model_config(cfg), 8)
    grown = loop.run_tokenizer(cfg)
    assert len(grown) == len(tok) + 1 and seen["tok"].convert_tokens_to_ids("<probe_tag>") == len(tok)
    grown.save_pretrained(tmp_path / "work" / "tokenizer")      # what train() saves before it grows the rows
    lc, params = load_converted(ckpt)
    loop.export_converted(cfg, lc, params, None)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "hf_files").convert_tokens_to_ids("<probe_tag>") == len(tok)
    cfg.data.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer to load: set data.tokenizer"):
        loop.run_tokenizer(cfg)


def test_decode_evaluate_and_pictures(trained):
    out, world, tok, ckpt, _ = trained
    tasks = {}
    for k, (qs, ann) in D.questions(world, "test").items():
        qs = qs[:4]
        if isinstance(ann, list) and ann and isinstance(ann[0], dict):   # per-question annotations
            ids = {q["question_id"] for q in qs}
            ann = [a for a in ann if a.get("question_id", a.get("image_id")) in ids]
        tasks[k] = (qs, ann)
    preds = D.decode_all(ckpt, world, tasks, out, batch_size=4)
    for task, path in preds.items():
        rows = [json.loads(line) for line in open(path)]
        assert [r["question_id"] for r in rows] == [q["question_id"] for q in tasks[task][0]]
        assert all(isinstance(r["answer"], str) for r in rows)
    metrics = D.evaluate_all(preds, tasks, world, out)
    assert 0.0 <= metrics["vqa"]["accuracy"] <= 1.0
    assert 0.0 <= metrics["pope_adversarial"]["accuracy"] <= 1.0
    base = D.baselines(world, tasks)
    # the random captioner names absent shapes, so its CHAIR-i is high; ground-truth-like text has none
    assert base["chair_random_objects"]["CHAIRi"] > 0.3
    pngs = D.pictures(ckpt, world, tasks, preds, out)
    assert len(pngs) == 3
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
    table = D.format_table(metrics, base)
    assert "REC Acc@0.5" in table and "POPE adv. accuracy" in table

    # Decoding methods: each decodes its own tasks into predictions_<name>/ and gets a column.
    # REVERSE decodes a copy fine-tuned on span-tagged captions (a few steps here).
    methods = D.run_methods(list(D.METHODS), ckpt, world, tasks, out, batch_size=4, tune_steps=6,
                            overrides=("checkpoint.every=10000",))
    for name, (_, method_tasks) in D.METHODS.items():
        for task in method_tasks:
            rows = [json.loads(line) for line in open(out / f"predictions_{name.lower()}" / f"{task}.jsonl")]
            assert [r["question_id"] for r in rows] == [q["question_id"] for q in tasks[task][0]]
    assert 0.0 <= methods["UE"]["chair"]["CHAIRi"] <= 1.0 and "vqa" not in methods["UE"]
    assert set(methods["REVERSE"]) == {"chair", "reverse_attempts"} and methods["REVERSE"]["reverse_attempts"] >= 1
    # Chain-of-Spot and JUDGER decode VQA and POPE with models tuned on two images a sample
    for name, key in (("CoS", "roi"), ("CoS-ROI", "roi"), ("JUDGER", "crop_box")):
        assert set(methods[name]) == {"vqa", "pope_adversarial", "crop"} and methods[name]["crop"]["questions"] > 0
        rows = [json.loads(line) for line in open(out / f"predictions_{name.lower()}" / "vqa.jsonl")]
        assert all(key in r for r in rows)
        tuned = D.TUNED_AS.get(name, name).lower()
        logs = [json.loads(line) for line in open(out / tuned / "train" / "metrics.jsonl") if '"loss"' in line]
        assert logs and logs[-1]["step"] == 6
    assert len(json.loads((out / "judger" / "train.json").read_text())) == 6 * 8      # steps x batch questions
    # CoS-ROI: the CoS model (tuned once) given each question's true ROI, so its crops hold what is asked about
    assert not (out / "cos-roi").exists() and methods["CoS-ROI"]["crop"]["hit"] == 1.0
    given = {q["question_id"]: q["roi"] for q in map(json.loads, open(out / "questions_cos-roi" / "vqa.jsonl"))}
    assert [r["roi"] for r in map(json.loads, open(out / "predictions_cos-roi" / "vqa.jsonl"))] == list(given.values())
    assert "<SPAN>" not in (out / "predictions_reverse" / "caption.jsonl").read_text()
    logs = [json.loads(line) for line in open(out / "reverse" / "train" / "metrics.jsonl") if '"loss"' in line]
    assert logs and logs[-1]["step"] == 6
    # SC-Tune: one cycle of its own loop, 4 describer then 2 locator steps, decoding the object- and image-level tasks
    assert set(methods["SC-Tune"]) == {"rec", "reg_meteor", "vqa", "chair"}
    logs = [json.loads(line) for line in open(out / "sc-tune" / "run" / "metrics.jsonl")]
    assert [r["phase"] for r in logs] == ["caption"] * 4 + ["bbox"] * 2
    assert all(0.0 <= r["reward"] <= 1.0 for r in logs) and all(np.isfinite(r["loss"]) for r in logs)
    written = (out / "sc-tune" / "checkpoint").stat().st_mtime_ns
    assert demo_tuners.sc_tune_tune(ckpt, world, None, out / "sc-tune", 6) == out / "sc-tune" / "checkpoint"
    assert (out / "sc-tune" / "checkpoint").stat().st_mtime_ns == written          # reused, not tuned again
    lines = D.format_table(metrics, base, methods).splitlines()
    assert lines[0].split()[:8] == ["metric", "model", "UE", "REVERSE", "CoS", "CoS-ROI", "JUDGER", "SC-Tune"]
    vqa_row = next(ln for ln in lines if ln.startswith("VQA accuracy")).split()
    assert vqa_row[3] == "-" and float(vqa_row[2]) == pytest.approx(metrics["vqa"]["accuracy"], abs=5e-4)
    chair_row = next(ln for ln in lines if ln.startswith("CHAIR-i")).split()
    assert float(chair_row[3]) == pytest.approx(methods["UE"]["chair"]["CHAIRi"], abs=5e-4)


def test_cos_rois_frame_what_each_question_is_about(trained):
    """Chain-of-Spot's ROIs on the shapes world: a square inside the image, at least ROI_MIN_SIDE, around every
    object the question is about, or around one of the scene's objects when it asks about an absent one (so
    the ROI does not give a "no" away); cos_records finds them under its own keys and writes them 2-decimal."""
    from jaxvlm.data.shapes_world.tasks import question_objects
    from jaxvlm.data.shapes_world.world import object_infos
    from jaxvlm.demo_tuners import ROI_MIN_SIDE, cos_rois
    from jaxvlm.methods.chain_of_spot import cos_records, roi_label, roi_text
    _, world, *_ = trained
    instances = json.loads(world.instances["train"].read_text())
    objects = object_infos(instances)
    records = [r for r in json.loads(world.llava["train"].read_text()) if r["id"].endswith(("_vqa", "_exist"))]
    rois = cos_rois(records, instances)
    n_absent = 0
    for i, rec in enumerate(records):
        scene = objects[int(rec["id"].split("_")[0])]
        for k in range(len(rec["conversations"]) // 2):
            top, left, side = rois[f"{i:06d}_{rec['id']}_q{k}"]["params"]
            assert ROI_MIN_SIDE <= side <= 112 and 0 <= top <= 112 - side and 0 <= left <= 112 - side
            inside = [o for o in scene if left <= o.bbox[0] and o.bbox[0] + o.bbox[2] <= left + side
                      and top <= o.bbox[1] and o.bbox[1] + o.bbox[3] <= top + side]
            about = question_objects(rec["conversations"][2 * k]["value"], scene, 112)
            assert set(about) <= set(inside) and inside
            n_absent += not about
    assert n_absent > 0
    out = cos_records(records, rois, str(world.image_root), str(world.root / "cos_crops"), decimals=2)
    for i, r in enumerate(out):                 # each record's drawn question, found under cos_records' key
        key = pathlib.Path(r["image"][1]).stem
        assert key.startswith(f"{i:06d}_{r['id']}_q")
        label = r["conversations"][1]["value"]
        assert label == roi_text(roi_label(*rois[key]["params"], 112, 112), decimals=2)
        assert re.fullmatch(r"\[(\d\.\d\d, ){3}\d\.\d\d\]", label)


def test_tuned_copies_are_reused_only_for_the_same_base_and_data(tmp_path, monkeypatch):
    """A demo run again in the same --out resumes its tuning runs only when base checkpoint, records and config
    are the same; otherwise the old run is removed before training (it would be decoded in its place)."""
    import jaxvlm.train.loop as loop
    from jaxvlm.demo_tuners import _train
    from jaxvlm.train.config import Config
    base = tmp_path / "base"
    (base / "params").mkdir(parents=True)
    (base / "params" / "w").write_bytes(b"one")
    cfg = Config(model={"init_from": str(base)}, data={"path": str(tmp_path / "m" / "train.json")},
                 train={"workdir": str(tmp_path / "m" / "train"), "export": str(tmp_path / "m" / "checkpoint")})
    seen = []

    def fake_train(c):        # what a finished run leaves: a checkpoint in the workdir and the export
        seen.append(sorted(p.name for p in (tmp_path / "m" / "train").glob("*")))
        for d in (c.train.workdir, c.train.export):
            pathlib.Path(d).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(c.train.workdir) / f"step{len(seen)}").touch()
    monkeypatch.setattr(loop, "train", fake_train)
    assert _train(cfg, [{"id": 1}]) == tmp_path / "m" / "checkpoint"
    _train(cfg, [{"id": 1}])
    assert seen == [[], ["step1"]]                      # same base, records, config: resumed
    (base / "params" / "w").write_bytes(b"two")
    _train(cfg, [{"id": 1}])
    assert seen[-1] == []                               # another base checkpoint: started over
    _train(cfg, [{"id": 2}])
    assert seen[-1] == []                               # other records
    _train(Config(cfg.to_dict(), optim={"lr": 1}), [{"id": 2}])
    assert seen[-1] == []                               # another config
    _train(Config(cfg.to_dict(), optim={"lr": 1}), [{"id": 2}])
    assert seen[-1] == ["step5"]


def test_crop_hits_count_crops_on_the_asked_about_objects(trained, tmp_path):
    """The crop row of CoS's and JUDGER's columns: a crop around the question's objects counts, one beside
    them does not; the whole image (an unparsable ROI) always does; `random` is the exact chance."""
    from jaxvlm.data.shapes_world.tasks import question_objects
    from jaxvlm.data.shapes_world.world import object_infos
    _, world, *_ = trained
    assert D._placed_at_random(56, 30, 40, 112) == pytest.approx(30 / 56)
    assert D._placed_at_random(112, 30, 40, 112) == 1.0 and D._placed_at_random(20, 30, 60, 112) == 0.0
    tasks = {"vqa": D.questions(world, "test")["vqa"]}
    insts = json.loads(world.instances["test"].read_text())
    objects, ids = object_infos(insts), {f"test/{im['file_name']}": im["id"] for im in insts["images"]}
    about = {q["question_id"]: question_objects(q["text"], objects[ids[q["image"]]], 112) for q in tasks["vqa"][0]}
    qs = [q for q in tasks["vqa"][0] if about[q["question_id"]] and len(about[q["question_id"]]) == 1]
    assert qs
    tasks = {"vqa": (qs, None)}

    def score(row_of):
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps({"question_id": q["question_id"], **row_of(q)}) + "\n" for q in qs))
        return D.crop_hits({"vqa": path}, tasks, world)

    def around(q, shift=0.0):
        (o,) = about[q["question_id"]]
        return {"crop_box": [o.cx - 4 + shift, o.cy - 4, o.cx + 4 + shift, o.cy + 4]}
    on = score(around)
    assert on["hit"] == 1.0 and on["questions"] == len(qs) and 0 < on["random"] < 0.1
    assert score(lambda q: around(q, shift=10))["hit"] == 0.0
    whole = score(lambda q: {"roi": "I cannot tell"})
    assert whole["hit"] == 1.0 and whole["random"] == 1.0


def test_rec_picture_draws_swapped_corners_and_skips_garbage():
    from PIL import Image
    img = Image.new("RGB", (100, 100), (0, 0, 0))
    red = np.all(np.asarray(D.draw_rec_boxes(img, [10, 10, 30, 30], "[0.80, 0.70, 0.20, 0.10]")) == (255, 0, 0), -1)
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (20, 10, 80, 70)     # the corners' box, sorted
    green = np.all(np.asarray(D.draw_rec_boxes(img, [10, 10, 30, 30], "no box here")) == (0, 255, 0), -1)
    ys, xs = np.nonzero(green)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (10, 10, 30, 30)
    assert not np.all(np.asarray(D.draw_rec_boxes(img, [10, 10, 30, 30], "no box here")) == (255, 0, 0), -1).any()
    assert not np.asarray(img).any()                                           # the input is not drawn on


def test_plain_chair_extractor_matches_vocabulary():
    from jaxvlm.data.shapes_world.vocab import CATEGORIES
    ex = D._PlainShapesExtractor(CATEGORIES)
    got = ex("Two red crosses, a star and three small circles on a striped background.")
    assert got.nodes == ("cross", "star", "circle")


def test_set_without_training_is_refused_before_any_work(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    D.add_arguments(p)
    for argv in (["--set", "model.number_init=True"], ["--train", "--checkpoint", "x", "--set", "a=1"]):
        with pytest.raises(SystemExit, match="--set overrides the training recipe"):
            D.main(p.parse_args(["--out", str(tmp_path / "d"), *argv]))
        assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit, match="--family qwen2_5_vl has no shipped asset"):
        D.main(p.parse_args(["--out", str(tmp_path / "d"), "--family", "qwen2_5_vl", "--save-asset"]))
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit, match="unknown method.*DoLa.*known: UE"):
        D.main(p.parse_args(["--out", str(tmp_path / "d"), "--methods", "UE,DoLa"]))
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit, match="REVERSE fine-tunes the LLaVA recipe's model; --family qwen2_5_vl serves UE$"):
        D.main(p.parse_args(["--out", str(tmp_path / "d"), "--family", "qwen2_5_vl", "--methods", "UE,REVERSE"]))
    assert not (tmp_path / "d").exists()


# The Qwen2.5-VL recipe (configs/shapes_qwen2_vl.py), reduced the same way: 8 px patches merged 2 x 2
# into the same 7 x 7 image tokens, 64 px windows (a full and a partial one per side), full attention
# in the last block.
TINY_QWEN = ("model.text.hidden_size=64", "model.text.intermediate_size=128", "model.text.num_layers=2",
             "model.text.num_heads=4", "model.text.num_kv_heads=2", "model.text.mrope_section=[2,3,3]",
             "model.vision.hidden_size=32", "model.vision.intermediate_size=64", "model.vision.num_layers=2",
             "model.vision.num_heads=4", "model.vision.fullatt_block_indexes=[1]", "model.vision.out_hidden_size=64",
             "data.batch_size=8", "optim.warmup_steps=10", "optim.default_lr=3e-3", "train.log_every=10",
             "checkpoint.every=10000", "checkpoint.async_save=False")


@pytest.fixture(scope="module")
def trained_qwen(trained, tmp_path_factory):
    _, world, tok, _, _ = trained                 # the same small world and tokenizer
    out = tmp_path_factory.mktemp("demo_qwen")
    ckpt, summary = D.train_model(out, world, trained[0] / "tokenizer", steps=200, overrides=TINY_QWEN,
                                  vision=dict(steps=30, images=24), family="qwen2_5_vl")
    return out, world, tok, ckpt, summary


def test_tiny_qwen_learns_with_its_stage0_tower_frozen(trained_qwen):
    out, world, tok, ckpt, summary = trained_qwen
    logs = [json.loads(line) for line in open(out / "train" / "metrics.jsonl") if '"loss"' in line]
    losses = [r["loss"] for r in logs]
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    chance = supervised_majority_rate(world, tok, "chatml", "<|image_pad|>")
    assert np.mean([r["accuracy"] for r in logs[-3:]]) > 2 * chance, (logs[-3:], chance)
    # every record of the world fits the recipe's seq_len: none lost answer tokens to truncation
    assert [r["data_truncated"] for r in logs] == [0] * len(logs)
    assert summary["vision"][-1]["step"] == 30
    from jaxvlm.conversion.converted import load_converted
    from jaxvlm.models.qwen2_vl import Qwen2VLConfig
    from jaxvlm.train.dense_vision import load_vision_params
    cfg, params = load_converted(ckpt)
    assert isinstance(cfg, Qwen2VLConfig) and cfg.vision.window_units == 4 and cfg.vision.spatial_merge_size == 2
    stage0 = load_vision_params(out / "vision_pretrain" / "vision_tower.msgpack", params["visual"])
    for part in ("patch_embed", "blocks"):        # frozen after stage 0, bit for bit
        for a, b in zip(jax.tree.leaves(params["visual"][part]), jax.tree.leaves(stage0[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))     # the merger (Qwen's projector) trained
             for a, b in zip(jax.tree.leaves(params["visual"]["merger"]), jax.tree.leaves(stage0["merger"]))]
    assert all(moved)
    assert (ckpt / "hf_files" / "preprocessor_config.json").is_file()   # generate resizes as training did


def test_tiny_qwen_decodes_evaluates_and_draws(trained_qwen):
    out, world, tok, ckpt, _ = trained_qwen
    tasks = {}
    for k, (qs, ann) in D.questions(world, "test").items():
        qs = qs[:2]
        if isinstance(ann, list) and ann and isinstance(ann[0], dict):
            ids = {q["question_id"] for q in qs}
            ann = [a for a in ann if a.get("question_id", a.get("image_id")) in ids]
        tasks[k] = (qs, ann)
    preds = D.decode_all(ckpt, world, tasks, out, batch_size=2)
    captions = [json.loads(line)["answer"] for line in open(preds["caption"])]
    assert all(c.strip() for c in captions) and "<|im_end|>" not in "".join(captions)
    metrics = D.evaluate_all(preds, tasks, world, out)
    assert 0.0 <= metrics["vqa"]["accuracy"] <= 1.0
    pngs = D.pictures(ckpt, world, tasks, preds, out)
    assert [p.rsplit("/", 1)[-1] for p in pngs] == ["rec_boxes.png", "attention_over_image.png", "logit_lens.png"]
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", p


def test_recipe_token_ids_are_checked_against_the_tokenizer(trained, tmp_path):
    out, world, _, _, _ = trained
    with pytest.raises(ValueError, match="model.image_token_id=4 is not the tokenizer's id"):
        D.recipe(tmp_path, world, out / "tokenizer", family="qwen2_5_vl", overrides=("model.image_token_id=4",))
    with pytest.raises(ValueError, match="unknown demo family"):
        D.recipe(tmp_path, world, out / "tokenizer", family="qwen3")
