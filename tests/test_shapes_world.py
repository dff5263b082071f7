"""The synthetic shapes world: determinism, exact annotations, task labels, tokenizer, caching."""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jaxvlm.data import shapes_world
from jaxvlm.data.shapes_tokenizer import (SPECIAL_TOKENS, VICUNA_V1_SYSTEM, build_tokenizer,
                                          load_tokenizer)
from jaxvlm.data.shapes_world import (ObjectInfo, WorldPaths, format_box, generate_world,
                                      iter_world_text, object_infos,
                                      resolve_referring_expression, vocab)
from jaxvlm.data.shapes_world.language import RELATIONS, relation_holds

# pycocotools 2.0.11 trips numpy 2's __array__ copy deprecation inside annToMask.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY = dict(n_train=12, n_val=4, n_test=4, image_size=64)
SIZE = TINY["image_size"]
CAT_RE = "|".join(sorted(vocab.CATEGORIES, key=len, reverse=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldPaths:
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, **TINY)


def _load(path: Path):
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _objects(world: WorldPaths) -> dict[int, tuple[ObjectInfo, ...]]:
    out: dict[int, tuple[ObjectInfo, ...]] = {}
    for split in shapes_world.SPLITS:
        out.update(object_infos(_load(world.instances[split])))
    return out


def _by_file(world: WorldPaths, split: str) -> dict[str, tuple[ObjectInfo, ...]]:
    inst = _load(world.instances[split])
    objs = object_infos(inst)
    return {img["file_name"]: objs[img["id"]] for img in inst["images"]}


def _manifest(world: WorldPaths) -> dict:
    return _load(world.manifest)


# --------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_bytes(world, tmp_path):
    again = generate_world(tmp_path / "again", seed=0, **TINY)
    files_a, files_b = _manifest(world)["files"], _manifest(again)["files"]
    assert files_a == files_b
    for rel in files_a:
        assert (world.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    assert world.manifest.read_bytes() == again.manifest.read_bytes()


def test_different_seed_differs(world, tmp_path):
    other = generate_world(tmp_path / "other", seed=1, **TINY)
    assert _manifest(other)["content_hash"] != _manifest(world)["content_hash"]
    a = (world.image_dir("train") / "shapes_train_1000001.png").read_bytes()
    b = (other.image_dir("train") / "shapes_train_1000001.png").read_bytes()
    assert a != b


# ------------------------------------------------------------------------------ COCO instances
def test_coco_instances_are_exact(world):
    for split in shapes_world.SPLITS:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(world.instances[split]))
        assert len(coco.getImgIds()) == TINY[f"n_{split}"]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(vocab.CATEGORIES)
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            pixels = np.asarray(Image.open(world.image_dir(split) / info["file_name"]))
            assert pixels.shape == (SIZE, SIZE, 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert 1 <= len(anns) <= 8
            union = np.zeros((SIZE, SIZE), dtype=np.int32)
            for a in anns:
                x, y, w, h = a["bbox"]
                assert a["iscrowd"] == 0 and w > 0 and h > 0
                assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
                m = coco.annToMask(a).astype(bool)
                ys, xs = np.nonzero(m)
                assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] \
                    == a["bbox"]
                assert int(m.sum()) == a["area"] == int(mask_utils.area(a["segmentation"]))
                union += m
                # Visible pixels show exactly one colour, near the named one (jitter <= 12).
                colours = np.unique(pixels[m], axis=0)
                assert len(colours) == 1
                ref = np.array(vocab.COLOURS[a["attributes"]["colour"]])
                assert np.abs(colours[0].astype(int) - ref).max() <= 12
            assert union.max() == 1  # visible masks never overlap


# ------------------------------------------------------------------------------------ language
def test_referring_expressions_pick_exactly_their_object(world):
    objects = _objects(world)
    refs = _load(world.refs_json)
    assert refs and {r["split"] for r in refs} == set(shapes_world.SPLITS)
    ann_by_id = {o.ann_id: o for objs in objects.values() for o in objs}
    for ref in refs:
        target = ann_by_id[ref["ann_id"]]
        assert ref["bbox"] == list(target.bbox)
        assert ref["category_id"] == vocab.CATEGORY_IDS[target.category]
        assert (world.image_root / ref["file_name"]).is_file()
        for sent in ref["sentences"]:
            hits = resolve_referring_expression(sent["raw"], objects[ref["image_id"]], SIZE)
            assert [h.ann_id for h in hits] == [target.ann_id], sent["raw"]
    # The pickle is the same list (RefCOCOg's refs(umd).p layout).
    assert pickle.loads(world.refs_pickle.read_bytes()) == refs


def test_spatial_words_mean_what_they_say():
    """Checked against raw geometry, not against the resolver (which shares the generator's logic)."""
    from jaxvlm.data.shapes_world import referring_expression

    def star(i, x, y):
        return ObjectInfo(ann_id=i, category="star", colour="red", size="small", bbox=(x, y, 10, 10))

    size = 100
    # Three identical stars: left/top one at (5, 5), one in the middle, right/bottom one at (80, 80).
    objs = (star(1, 5, 5), star(2, 45, 45), star(3, 80, 80))
    assert referring_expression(objs[0], objs, size) in ("the leftmost red star", "the leftmost star",
                                                         "the topmost star", "the topmost red star")
    assert referring_expression(objs[2], objs, size).split()[1] in ("rightmost", "bottommost")
    for expr, want in [("the leftmost star", 1), ("the rightmost star", 3), ("the topmost star", 1),
                       ("the bottommost star", 3)]:
        assert [o.ann_id for o in resolve_referring_expression(expr, objs, size)] == [want], expr
    two = (star(1, 70, 40), star(2, 10, 40))
    assert referring_expression(two[1], two, size) == "the star on the left"
    assert [o.ann_id for o in resolve_referring_expression("the star on the right", two, size)] == [1]


def _caption_groups(caption: str) -> Counter:
    """(colour, category) -> count as stated in a caption."""
    words = "|".join(["a", "an"] + list(vocab.NUMBER_WORDS))
    sizes = "|".join(vocab.SIZE_NAMES)
    colours = "|".join(vocab.COLOUR_NAMES)
    plurals = "|".join(sorted(vocab.PLURALS.values(), key=len, reverse=True))
    pattern = rf"\b({words}) (?:(?:{sizes}) )?({colours}) ({plurals}|{CAT_RE})\b"
    singular = {p: c for c, p in vocab.PLURALS.items()}
    found: Counter = Counter()
    for num, colour, noun in re.findall(pattern, caption.lower()):
        n = 1 if num in ("a", "an") else vocab.NUMBER_WORDS.index(num)
        found[(colour, singular.get(noun, noun))] += n
    return found


def test_captions_mention_every_object_and_nothing_else(world):
    objects = _objects(world)
    for split in shapes_world.SPLITS:
        caps = _load(world.captions[split])["annotations"]
        assert len(caps) == 3 * TINY[f"n_{split}"]
        for cap in caps:
            objs = objects[cap["image_id"]]
            assert _caption_groups(cap["caption"]) == Counter((o.colour, o.category)
                                                              for o in objs), cap["caption"]
    for rec in _load(world.llava["train"]):
        if rec["id"].endswith("_caption"):
            image_id = int(rec["id"].split("_")[0])
            text = rec["conversations"][1]["value"]
            assert _caption_groups(text) == Counter((o.colour, o.category)
                                                    for o in objects[image_id]), text


# ---------------------------------------------------------------------------------------- LLaVA
def test_llava_answers_match_the_scene(world):
    objects = _objects(world)
    seen = Counter()
    for split in shapes_world.SPLITS:
        records = _load(world.llava[split])
        assert len({r["id"] for r in records}) == len(records)
        for rec in records:
            assert (world.image_root / rec["image"]).is_file()
            objs = objects[int(rec["id"].split("_")[0])]
            assert rec["num_objects"] == len(objs)          # the curriculum's key
            conv = rec["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert all("<image>" not in t["value"] for t in conv[1:])
            for q, a in zip(conv[0::2], conv[1::2]):
                _check_turn(q["value"].removeprefix("<image>\n").split("\n")[0], a["value"],
                            objs, seen)
    assert {"rec", "reg", "count", "existence", "pope_existence"} <= set(seen), seen


def test_question_objects_are_what_each_answer_is_about(world):
    """`tasks.question_objects` (a region of interest's content) agrees with every VQA and existence answer:
    existence is "yes" iff it finds objects, a count is how many it finds, a colour or position question
    finds the one object whose colour or region is the answer, a relation question finds both objects."""
    from jaxvlm.data.shapes_world.language import grid_region
    from jaxvlm.data.shapes_world.tasks import question_objects
    objects = _objects(world)
    seen = Counter()
    for split in shapes_world.SPLITS:
        for rec in _load(world.llava[split]):
            if not rec["id"].endswith(("_vqa", "_exist")):
                continue
            objs = objects[int(rec["id"].split("_")[0])]
            conv = rec["conversations"]
            for q, a in zip(conv[0::2], conv[1::2]):
                found, a = question_objects(q["value"], objs, SIZE), a["value"]
                text = q["value"].removeprefix("<image>\n")
                kind = text.split()[0] + " " + text.split()[1]
                assert found is not None, text
                assert all(o in objs for o in found)
                if kind == "Is there":
                    assert (a == "yes") == bool(found), text
                elif kind == "How many":
                    assert a == str(len(found)), text
                elif kind == "What colour":
                    assert [o.colour for o in found] == [a], text
                elif kind == "Where is":
                    assert [grid_region(o, SIZE) for o in found] == [a], text
                else:
                    assert kind.startswith("Is ") and len(found) == 2 and found[0] != found[1], text
                seen[kind] += 1
    assert {"Is there", "How many", "What colour", "Where is"} <= set(seen), seen
    some = next(iter(objects.values()))
    assert question_objects("What is the meaning of life?", some, SIZE) is None
    assert question_objects("Is there a unicorn in the image?", some, SIZE) is None
    assert question_objects("How many plaid shapes are there?", some, SIZE) is None


def test_existence_records_are_balanced_pope_questions(world):
    """The training split's POPE-format records: as many "no" as "yes", every label exact, and
    negatives that include theme mates (the adversarial kind the evaluation asks about)."""
    objects = _objects(world)
    answers, mates = Counter(), 0
    for rec in _load(world.llava["train"]):
        if not rec["id"].endswith("_exist"):
            continue
        present = {o.category for o in objects[int(rec["id"].split("_")[0])]}
        labels = Counter()
        for q, a in zip(rec["conversations"][0::2], rec["conversations"][1::2]):
            m = re.fullmatch(r"Is there an? (\w+) in the image\?", q["value"].removeprefix("<image>\n"))
            assert m is not None, q["value"]
            assert a["value"] == ("yes" if m[1] in present else "no")
            labels[a["value"]] += 1
            mates += a["value"] == "no" and m[1] in shapes_world.tasks.theme_mates(sorted(present))
        assert labels["yes"] == labels["no"] >= 1, labels
        answers.update(labels)
    assert answers["yes"] > 0 and mates > 0, (answers, mates)


def _check_turn(q: str, a: str, objs, seen: Counter) -> None:
    if m := re.fullmatch(r"Give the bounding box of: (.+)", q):
        (hit,) = resolve_referring_expression(m[1], objs, SIZE)
        assert a == format_box(hit.bbox, SIZE)
        seen["rec"] += 1
    elif m := re.fullmatch(r"Describe the region (\[.+\])\.", q):
        (hit,) = resolve_referring_expression(a, objs, SIZE)
        assert format_box(hit.bbox, SIZE) == m[1]
        seen["reg"] += 1
    elif m := re.fullmatch(r"How many (\w+) are there\?", q):
        singular = {p: c for c, p in vocab.PLURALS.items()}
        assert a == str(sum(o.category == singular[m[1]] for o in objs))
        seen["count"] += 1
    elif m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        assert a == str(sum(o.colour == m[1] for o in objs))
        seen["count"] += 1
    elif m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q):
        assert a == ("yes" if any((o.colour, o.category) == (m[1], m[2]) for o in objs)
                     else "no")
        seen["existence"] += 1
    elif m := re.fullmatch(r"Is there an? (\w+) in the image\?", q):
        assert a == ("yes" if any(o.category == m[1] for o in objs) else "no")
        seen["pope_existence"] += 1
    elif m := re.fullmatch(r"What colour is (.+)\?", q):
        (hit,) = resolve_referring_expression(m[1], objs, SIZE)
        assert a == hit.colour
        seen["colour"] += 1
    elif m := re.fullmatch(rf"Is (.+) ({'|'.join(RELATIONS)}) (.+)\?", q):
        (x,) = resolve_referring_expression(m[1], objs, SIZE)
        (y,) = resolve_referring_expression(m[3], objs, SIZE)
        assert a == {True: "yes", False: "no"}[relation_holds(x, y, m[2], SIZE)]
        seen["relation"] += 1
    elif m := re.fullmatch(r"Where is (.+)\?", q):
        (hit,) = resolve_referring_expression(m[1], objs, SIZE)
        assert a == shapes_world.language.grid_region(hit, SIZE)
        seen["position"] += 1
    elif q == "Describe the image.":
        seen["caption"] += 1
    else:
        raise AssertionError(f"unrecognised question {q!r}")


# ----------------------------------------------------------------------------------- POPE / PhD
def test_pope_is_balanced_and_negatives_are_absent(world):
    pope_re = re.compile(rf"Is there an? ({CAT_RE}) in the image\?")
    for split in shapes_world.EVAL_SPLITS:
        by_file = _by_file(world, split)
        for setting, path in world.pope[split].items():
            rows = _jsonl(path)
            assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
            labels = Counter(r["label"] for r in rows)
            assert labels["yes"] == labels["no"] > 0 and set(labels) == {"yes", "no"}
            for r in rows:
                assert set(r) == {"question_id", "image", "text", "label"}
                category = pope_re.fullmatch(r["text"])[1]
                present = category in {o.category for o in by_file[r["image"]]}
                assert present == (r["label"] == "yes"), (setting, r)


def test_phd_labels(world):
    for split in shapes_world.EVAL_SPLITS:
        by_file = _by_file(world, split)
        rows = _jsonl(world.phd[split])
        assert {r["task"] for r in rows} <= {"object", "attribute", "counting", "positional"}
        assert {"object", "counting"} <= {r["task"] for r in rows}
        assert {r["mode"] for r in rows} == {"base", "sec", "icc"}
        for task in {r["task"] for r in rows}:
            labels = Counter(r["label"] for r in rows if r["task"] == task)
            assert labels["yes"] == labels["no"]
        for r in rows:
            objs = by_file[r["image"]]
            assert r["answer"] == r["label"] in ("yes", "no")
            if r["mode"] == "base":
                assert r["context"] is None
            else:
                assert r["question"].startswith(r["context"] + " ")
            q = r["question"].removeprefix((r["context"] or "") + " ")
            if r["task"] == "object":
                cat = re.fullmatch(rf"Is there an? ({CAT_RE}) in the image\?", q)[1]
                assert (r["label"] == "yes") == any(o.category == cat for o in objs)
            elif r["task"] == "counting":
                m = re.fullmatch(r"(?:Is|Are) there exactly (\w+) (\w+) in the image\?", q)
                n = vocab.NUMBER_WORDS.index(m[1])
                cat = {**{p: c for c, p in vocab.PLURALS.items()}, **{c: c for c in
                                                                      vocab.CATEGORIES}}[m[2]]
                assert (r["label"] == "yes") == (sum(o.category == cat for o in objs) == n)
            elif r["task"] == "attribute":
                m = re.fullmatch(r"Is (.+) (\w+)\?", q)
                (hit,) = resolve_referring_expression(m[1], objs, SIZE)
                assert (r["label"] == "yes") == (hit.colour == m[2])
            else:
                m = re.fullmatch(rf"Is (.+) ({'|'.join(RELATIONS)}) (.+)\?", q)
                (x,) = resolve_referring_expression(m[1], objs, SIZE)
                (y,) = resolve_referring_expression(m[3], objs, SIZE)
                assert (r["label"] == "yes") == relation_holds(x, y, m[2], SIZE)


# ------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trips_and_specials(world, tmp_path):
    tok = build_tokenizer(world, tmp_path / "tok")
    again = build_tokenizer(world)
    assert tok.get_vocab() == again.get_vocab()  # deterministic training
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == tok.get_vocab()
    assert 300 < len(tok) <= 1024
    assert loaded.image_token == "<image>" and loaded.video_token == "<|video_pad|>"
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    for t in SPECIAL_TOKENS:
        ids = loaded(t, add_special_tokens=False)["input_ids"]
        assert ids == [loaded.convert_tokens_to_ids(t)], t
    unk = loaded.unk_token_id
    texts = list(iter_world_text(world)) + [
        f"{VICUNA_V1_SYSTEM} USER: <image>\nHow many stars are there? ASSISTANT: 2</s>",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is the star?"
        "<|im_end|>\n<|im_start|>assistant\n<SPAN>top left</CN><|im_end|>",
    ]
    assert len(texts) > 500
    for text in texts:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids
        assert loaded.decode(ids) == text
    # Box coordinates are one token each (with or without the leading space); other digits are
    # split one per token.
    assert loaded.tokenize("[0.12, 0.34, 0.56, 1.00]") == \
        ["[", "0.12", ",", "\u01200.34", ",", "\u01200.56", ",", "\u01201.00", "]"]
    for k in range(101):
        for text in (f"{k / 100:.2f}", f" {k / 100:.2f}"):
            assert len(loaded.tokenize(text)) == 1, text
    assert loaded.tokenize("12") == ["1", "2"] and loaded.tokenize("0.125") == ["0", ".", "1", "2", "5"]


def test_number_rows_start_as_a_smooth_code_of_their_value(world):
    import jax

    from jaxvlm.train.number_init import init_number_rows, number_tokens
    tok = build_tokenizer(world)
    ids, values = number_tokens(tok)
    assert sorted(set(values)) == [k / 100 for k in range(101)] and len(ids) == len(set(ids)) == 202
    assert tok.convert_ids_to_tokens(ids[values.index(0.42)]) in ("0.42", "\u01200.42")
    v, d = len(tok), 64
    rng = np.random.default_rng(0)
    emb, head = rng.normal(0, 0.02, (v, d)).astype(np.float32), rng.normal(0, 0.02, (d, v)).astype(np.float32)
    params = {"vision_tower": {"w": np.zeros(3)},
              "language_model": {"embed_tokens": {"embedding": emb}, "lm_head": {"kernel": head}}}
    out = init_number_rows(params, ids, values, jax.random.key(0))
    new_emb, new_head = np.asarray(out["language_model"]["embed_tokens"]["embedding"]), \
        np.asarray(out["language_model"]["lm_head"]["kernel"])
    others = np.setdiff1d(np.arange(v), ids)
    assert np.array_equal(new_emb[others], emb[others]) and np.array_equal(new_head[:, others], head[:, others])
    assert out["vision_tower"] is params["vision_tower"]
    spaced = {val: i for i, val in zip(ids, values) if tok.convert_ids_to_tokens(i).startswith("\u0120")}

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    for rows in (new_emb, new_head.T):
        # similarity falls with the distance between the values, on average over the range
        sims = {gap: np.mean([cos(rows[spaced[round(x, 2)]], rows[spaced[round(x + gap, 2)]])
                              for x in np.arange(0, 1.0 - gap + 1e-9, 0.01)]) for gap in (0.01, 0.05, 0.3)}
        assert sims[0.01] > sims[0.05] > sims[0.3] and sims[0.01] > 0.8, sims
        # the rows keep the matrix's scale
        assert 0.5 < rows[ids].std() / 0.02 < 2.0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        init_number_rows(params, [v + 5], [0.5], jax.random.key(0))
    with pytest.raises(ValueError, match="no number tokens"):
        init_number_rows(params, [], [], jax.random.key(0))
    # tied embeddings (no lm_head): only the embedding rows change
    tied = init_number_rows({"embed_tokens": {"embedding": emb}}, ids, values, jax.random.key(0))
    assert set(tied) == {"embed_tokens"} and np.allclose(tied["embed_tokens"]["embedding"], new_emb)


# -------------------------------------------------------------------------------------- caching
def test_cache_returns_without_regenerating(world, monkeypatch):
    mtimes = {p: p.stat().st_mtime_ns for p in world.root.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise AssertionError("regenerated a cached world")

    monkeypatch.setattr(shapes_world.world, "sample_scene", boom)
    assert generate_world(world.root, seed=0, **TINY) == world
    assert generate_world(world.root, seed=0, verify=True, **TINY) == world
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_incomplete_or_changed_world_is_regenerated(tmp_path):
    root = tmp_path / "w"
    paths = generate_world(root, seed=0, **{**TINY, "n_train": 3})
    extra = paths.image_dir("train") / "shapes_train_1000003.png"
    assert extra.is_file()
    # Changed params: regenerated, and files only the old world listed are removed.
    paths = generate_world(root, seed=0, **{**TINY, "n_train": 2})
    assert _manifest(paths)["params"]["n_train"] == 2 and not extra.exists()
    # A truncated file (interrupted copy) is detected by size and regenerated.
    victim = paths.llava["val"]
    victim.write_bytes(victim.read_bytes()[:10])
    generate_world(root, seed=0, **{**TINY, "n_train": 2})
    assert json.loads(victim.read_text())
    assert not list(root.rglob(".*.tmp-*"))
