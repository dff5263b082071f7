"""Grain pipeline: fixed shapes, deterministic per-epoch order, exact resume, disjoint host shards, bad input,
LLaVA pad-to-square preprocessing, and the empty-image-slot contract with the LLaVA splice."""
import re

import numpy as np
import pytest
from PIL import Image

from jaxvlm.data import chat_templates as ct
from jaxvlm.data.conversation import BadRecordError, DataFileError, load_records
from jaxvlm.data.image_processing import LlavaImageProcessor, Qwen2VLImageProcessor, expand_to_square
from jaxvlm.data.pipeline import make_dataset
from data_utils import build_tokenizer, llava_record, write_image, write_mixed_records, write_records

N, B, S, T, TPI, IMG = 24, 4, 2, 112, 4, 16   # records, batch, image slots, max_len, tokens/image, image side
IMAGE_ID = 4                                   # "<image>" in the test tokenizer (a model config would give it)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def proc():
    return LlavaImageProcessor(image_size=IMG, tokens_per_image=TPI)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24 records: every 6th text-only, every 6th+1 with two images, the rest one image (mixed aspect ratios)."""
    return write_mixed_records(tmp_path_factory.mktemp("llava"), N)


def make(world, tok, proc, **kw):
    d, path = world
    args = dict(records_path=path, image_root=d / "img", tokenizer=tok, template="vicuna_v1", image_processor=proc,
                max_len=T, images_per_sample=S, batch_size=B, seed=0, shard_index=0, shard_count=1,
                image_token_id=IMAGE_ID, num_threads=2, prefetch=8)
    args.update(kw)
    return make_dataset(**args)


def record_ids(batch, tok) -> list[int]:
    """Which record each row is: the first supervised span reads ' answer {i}</s>'."""
    out = []
    for row in batch["labels"]:
        text = tok.decode(row[row != ct.IGNORE_INDEX])
        out.append(int(re.match(r" answer (\d+)</s>", text).group(1)))
    return out


def take(it, n):
    return [next(it) for _ in range(n)]


def test_fixed_shapes_and_batch_contract(world, tok, proc):
    pipe = make(world, tok, proc, num_epochs=1, shuffle=False)
    assert pipe.num_records == N and pipe.steps_per_epoch == N // B
    batches = list(pipe)
    assert len(batches) == N // B
    want = {"input_ids": ((B, T), np.int32), "attention_mask": ((B, T), np.int32), "labels": ((B, T), np.int32),
            "pixel_values": ((B * S, 3, IMG, IMG), np.float32), "image_valid": ((B * S,), np.bool_),
            "num_images": ((B,), np.int32)}
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
        valid = b["image_valid"].reshape(B, S)
        np.testing.assert_array_equal(valid.sum(1), b["num_images"])
        assert np.all(valid == (np.arange(S) < b["num_images"][:, None]))      # valid slots come first
        # Image tokens in each row == its images x tokens_per_image; empty slots hold zeros.
        np.testing.assert_array_equal((b["input_ids"] == IMAGE_ID).sum(1), b["num_images"] * TPI)
        assert np.all(b["pixel_values"][~b["image_valid"]] == 0)
        assert np.all(np.abs(b["pixel_values"][b["image_valid"]]).sum((1, 2, 3)) > 0)
        # Padding: mask 0, pad id, never supervised; every row has supervised tokens and no truncation here.
        pad = b["attention_mask"] == 0
        assert np.all(b["input_ids"][pad] == tok.pad_token_id) and np.all(b["labels"][pad] == ct.IGNORE_INDEX)
        assert pad[:, -1].all() and np.all((b["labels"] != ct.IGNORE_INDEX).sum(1) > 0)
    assert [i for b in batches for i in record_ids(b, tok)] == list(range(N))   # unshuffled = file order


def test_order_deterministic_per_seed_and_epoch(world, tok, proc):
    steps = N // B
    a = [record_ids(b, tok) for b in take(iter(make(world, tok, proc, seed=7)), 2 * steps)]
    b = [record_ids(x, tok) for x in take(iter(make(world, tok, proc, seed=7)), 2 * steps)]
    c = [record_ids(x, tok) for x in take(iter(make(world, tok, proc, seed=8)), steps)]
    assert a == b                                          # same seed, same order
    ep1, ep2 = sum(a[:steps], []), sum(a[steps:], [])
    assert sorted(ep1) == sorted(ep2) == list(range(N))    # each epoch is a permutation of all records
    assert ep1 != ep2 and ep1 != list(range(N))            # shuffled, differently per epoch
    assert sum(c, []) != ep1                               # another seed, another order


def test_get_state_set_state_resumes_exact_next_batch(world, tok, proc):
    pipe = make(world, tok, proc, seed=3)
    it = iter(pipe)
    take(it, 7)                                            # crosses the epoch boundary (6 steps/epoch)
    state = it.get_state()
    expected = take(it, 3)
    it2 = iter(make(world, tok, proc, seed=3))             # a fresh pipeline, as after a restart
    it2.set_state(state)
    for want, got in zip(expected, take(it2, 3)):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_curriculum_serves_easy_records_first_then_regular_epochs(world, tok, proc):
    import dataclasses
    records = [dataclasses.replace(r, extra={"num_objects": i % 4}) for i, r in enumerate(load_records(world[1]))]
    stages = [(2, 0), (5, 1)]                       # batches 0-1: value 0 only; 2-4: value <= 1; then everything
    it = iter(make(world, tok, proc, records_path=records, seed=5, curriculum=stages))
    ids = [record_ids(b, tok) for b in take(it, 5 + 2 * (N // B))]
    assert all(i % 4 == 0 for b in ids[:2] for i in b)
    assert all(i % 4 <= 1 for b in ids[2:5] for i in b) and any(i % 4 == 1 for b in ids[2:5] for i in b)
    # stage 1 has 12 records for 12 slots: one pass over its pool, no repeats
    assert sorted(sum(ids[2:5], [])) == [i for i in range(N) if i % 4 <= 1]
    # then the regular shuffled epochs, as without a curriculum
    plain = [record_ids(b, tok) for b in take(iter(make(world, tok, proc, records_path=records, seed=5)), 2 * (N // B))]
    assert ids[5:] == plain
    # the state resumes inside the curriculum and across its end
    it = iter(make(world, tok, proc, records_path=records, seed=5, curriculum=stages))
    take(it, 4)
    state = it.get_state()
    it2 = iter(make(world, tok, proc, records_path=records, seed=5, curriculum=stages))
    it2.set_state(state)
    assert [record_ids(b, tok) for b in take(it2, 3)] == ids[4:7]
    with pytest.raises(ValueError, match="record 'r0' has no numeric 'num_objects'"):
        make(world, tok, proc, curriculum=stages)
    with pytest.raises(ValueError, match="no record has num_objects <= -1"):
        make(world, tok, proc, records_path=records, curriculum=[(2, -1)])
    with pytest.raises(ValueError, match="increasing steps"):
        make(world, tok, proc, records_path=records, curriculum=[(2, 0), (2, 1)])
    for bad in ([2, 1], [(2,)], [("2", 1)], [(2.5, 1)]):    # a flat pair, a stage of one, a string, a half step
        with pytest.raises(ValueError, match="curriculum stage 0 must be \\[until_step, max_num_objects\\]"):
            make(world, tok, proc, records_path=records, curriculum=bad)


def test_shards_partition_records_disjointly(world, tok, proc):
    seen = []
    for k in range(3):
        pipe = make(world, tok, proc, shard_index=k, shard_count=3, batch_size=2, num_epochs=1)
        seen.append({i for b in pipe for i in record_ids(b, tok)})
        assert len(seen[-1]) == N // 3 == pipe.num_records
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == set(range(N))
    # Uneven: 24 records over 5 hosts -> the 4-record tail is dropped so every host has 4 records.
    sizes = [make(world, tok, proc, shard_index=k, shard_count=5, num_epochs=1).num_records for k in range(5)]
    assert sizes == [4] * 5


def test_unreadable_data_file(tmp_path, world, tok, proc):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataFileError, match=re.escape(str(missing))):
        make(world, tok, proc, records_path=missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}\n{"id": "b", oops\n')
    with pytest.raises(DataFileError, match=re.escape(str(bad)) + ":2: malformed JSON line"):
        load_records(bad)
    for name, text, msg in (("empty.json", " \n", "is empty"), ("obj.json", '{"id": "a"}', "expected a list of records"),
                            ("cut.json", '[{"id": "a"},', "is not valid JSON")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataFileError, match=re.escape(str(tmp_path / name)) + ".*" + msg):
            load_records(tmp_path / name)
    lines = tmp_path / "ok.jsonl"
    lines.write_text('\n{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}\n\n'
                     '{"id": "b", "conversations": [{"from": "bot", "value": "x"}]}\n')
    with pytest.raises(DataFileError, match=re.escape(str(lines)) + " line 4: record 'b' turn 0"):
        load_records(lines)
    shape = tmp_path / "shape.json"
    shape.write_text('[{"id": "c", "conversations": [{"from": "robot", "value": "x"}]}]')
    with pytest.raises(DataFileError, match="record 'c' turn 0"):
        load_records(shape)


def test_bad_images_error_or_counted_skip(tmp_path, tok, proc):
    (tmp_path / "img").mkdir()
    recs = []
    for i in range(8):
        write_image(tmp_path / "img" / f"{i}.png", 10, 14, seed=i)
        recs.append(llava_record(i, [f"{i}.png"]))
    recs[2] = llava_record(2, ["gone.png"])                                 # missing
    (tmp_path / "img" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")   # undecodable
    path = write_records(tmp_path / "r.json", recs, jsonl=False)
    kw = dict(records_path=path, image_root=tmp_path / "img", tokenizer=tok, template="vicuna_v1",
              image_processor=proc, max_len=T, images_per_sample=1, batch_size=2, seed=0, shard_index=0,
              shard_count=1, image_token_id=IMAGE_ID, num_epochs=1, shuffle=False, num_threads=0)
    with pytest.raises(BadRecordError, match=r"record 'r2': image file .*gone\.png does not exist"):
        list(make_dataset(**kw))
    recs[2] = llava_record(2, ["2.png"])
    write_records(path, recs, jsonl=False)
    with pytest.raises(BadRecordError, match=r"record 'r5': image file .*5\.png cannot be decoded"):
        list(make_dataset(**kw))
    recs[2] = llava_record(2, ["gone.png"])
    write_records(path, recs, jsonl=False)
    pipe = make_dataset(**kw, on_bad_record="skip")
    ids = [i for b in pipe for i in record_ids(b, tok)]
    assert ids == [0, 1, 3, 4, 6, 7]
    assert dict(pipe.skipped.counts) == {"missing_image": 1, "bad_image": 1} and pipe.skipped.total == 2


def test_truncation_never_cuts_image_tokens(tmp_path, tok, proc, caplog):
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "a.png", 9, 9, seed=0)
    path = write_records(tmp_path / "r.jsonl", [llava_record(0, ["a.png"])])
    kw = dict(records_path=path, image_root=tmp_path / "img", tokenizer=tok, template="llava_v1",
              image_processor=proc, max_len=60, images_per_sample=2, batch_size=1, seed=0, shard_index=0,
              shard_count=1, image_token_id=IMAGE_ID, num_epochs=1, shuffle=False, num_threads=0)
    # Text-only truncation: the two-turn record is longer than 60 tokens -> cut there, image intact, labels cut.
    full = ct.encode("llava_v1", load_records(path)[0].messages, tok, image_token_id=IMAGE_ID,
                     image_token_counts=[TPI])
    assert len(full.input_ids) > 60
    pipe = make_dataset(**kw)
    with caplog.at_level("WARNING", logger="jaxvlm.data.pipeline"):
        b = next(iter(pipe))
    assert b["attention_mask"].sum() == 60 and (b["input_ids"] == IMAGE_ID).sum() == TPI
    np.testing.assert_array_equal(b["input_ids"][0], full.input_ids[:60])
    np.testing.assert_array_equal(b["labels"][0], full.labels[:60])
    # ... and counted: this cut comes before the first answer token, so the sample trains nothing (said so).
    answer = np.asarray(full.labels) != ct.IGNORE_INDEX
    assert not answer[:60].any()
    assert (pipe.truncated.records, pipe.truncated.label_tokens, pipe.truncated.emptied) == (1, answer.sum(), 1)
    warned = [r.getMessage() for r in caplog.records if "truncated to max_len" in r.getMessage()]
    assert len(warned) == 1 and f"record 'r0': {len(full.input_ids)} tokens" in warned[0] and \
        "lost all of its answer tokens: it trains nothing" in warned[0]
    # A cut inside the answers: the answer tokens lost are counted and named.
    kw["max_len"] = len(full.input_ids) - 3
    lost = int(answer[kw["max_len"]:].sum())
    assert 0 < lost < answer.sum()
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxvlm.data.pipeline"):
        pipe = make_dataset(**kw)
        b = next(iter(pipe))
    assert (b["labels"] != ct.IGNORE_INDEX).sum() == answer.sum() - lost
    assert (pipe.truncated.records, pipe.truncated.label_tokens, pipe.truncated.emptied) == (1, lost, 0)
    assert any(f"lost {lost} answer token(s)" in r.getMessage() for r in caplog.records)
    kw["max_len"] = 60
    # Image tokens past max_len: an error naming the record and the image tokens, or a counted skip.
    many = {"id": "many", "image": ["a.png", "a.png"], "conversations": [
        {"from": "human", "value": "<image> What colour is the square? What colour is the square? <image>"},
        {"from": "gpt", "value": "red"}]}
    write_records(path, [many])
    kw["max_len"] = 56
    with pytest.raises(BadRecordError, match=r"record 'many': \d+ tokens; truncating to max_len=56 would cut "
                                             r"image 1 \(image tokens at \d+\.\.\d+\)"):
        list(make_dataset(**kw))
    pipe = make_dataset(**kw, on_bad_record="skip")
    assert list(pipe) == [] and dict(pipe.skipped.counts) == {"too_long": 1}


def test_llava_pad_to_square_matches_manual_expand(proc):
    """aspect='pad': centred on a mean-colour square (LLaVA expand2square) before CLIP resize/crop."""
    im = Image.new("RGB", (8, 16), (255, 0, 0))
    out = proc(im)
    assert out.pixel_values.shape == (3, IMG, IMG) and out.num_tokens == TPI
    fill = tuple(int(x * 255) for x in proc.hf.image_mean)
    manual = Image.new("RGB", (16, 16), fill)
    manual.paste(im, (4, 0))
    np.testing.assert_allclose(out.pixel_values, proc.hf(manual, return_tensors="np")["pixel_values"][0], atol=1e-6)
    # Left/right bands are the mean colour -> ~0 after normalisation; the centre stays red.
    mean, std = np.array(proc.hf.image_mean), np.array(proc.hf.image_std)
    np.testing.assert_allclose(out.pixel_values[:, 8, 0], (np.array(fill) / 255 - mean) / std, atol=1e-5)
    np.testing.assert_allclose(out.pixel_values[:, 8, 8], (np.array([1, 0, 0]) - mean) / std, atol=1e-5)
    assert expand_to_square(im, fill).size == (16, 16)
    crop = LlavaImageProcessor(proc.hf, aspect="crop", tokens_per_image=TPI)(im)
    assert not np.allclose(crop.pixel_values, out.pixel_values)


def test_empty_slots_with_llava_splice(world, tok, proc):
    """The documented model-side recipe: real slots first (`llava.real_first`, what the train step does), then
    the row-major splice, puts each sample's own image features on its image tokens."""
    import jax
    import jax.numpy as jnp
    from jaxvlm.models.llava import real_first, splice_image_features
    b = next(iter(make(world, tok, proc, shuffle=False, num_epochs=1)))
    assert not b["image_valid"].all()                      # batch 0 has a text-only and a two-image record

    @jax.jit
    def splice(input_ids, image_valid):
        n_slots = image_valid.shape[0]
        feats = jnp.broadcast_to(jnp.arange(n_slots, dtype=jnp.float32)[:, None, None], (n_slots, TPI, 1))  # slot id
        feats = feats[real_first(image_valid)]
        return splice_image_features(jnp.full((B, T, 1), -1.0), input_ids == IMAGE_ID, feats.reshape(-1, 1))

    out = np.asarray(splice(b["input_ids"], b["image_valid"]))[..., 0]
    for r in range(B):
        got = out[r][b["input_ids"][r] == IMAGE_ID]
        want = np.repeat(r * S + np.arange(b["num_images"][r]), TPI)
        np.testing.assert_array_equal(got, want)


def test_qwen_chatml_slots(world, tok):
    """chatml + Qwen2-VL processor: padded patch rows per slot, image_grid_thw, token counts from the grid."""
    qproc = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    b = next(iter(make(world, tok, qproc, template="chatml", image_token_id=None, shuffle=False, num_epochs=1,
                       max_len=160)))
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert b["pixel_values"].shape == (B * S, qproc.max_patches, 3 * 2 * 14 * 14)
    grid = b["image_grid_thw"]
    assert grid.shape == (B * S, 3) and np.all((grid[:, 0] > 0) == b["image_valid"])
    ntok = (grid.prod(1) // 4).reshape(B, S).sum(1)
    np.testing.assert_array_equal((b["input_ids"] == pad_id).sum(1), ntok)
    np.testing.assert_array_equal(b["mm_token_type_ids"], (b["input_ids"] == pad_id).astype(np.int32))
    for g, pv in zip(grid, b["pixel_values"]):
        assert np.all(pv[g.prod():] == 0)
