"""Sample packing (`make_dataset(pack=True)`, `jaxvlm train --set data.pack=True`): several samples per row,
`attention_mask` holding each token's sample. The LM reads those as segments, so a packed row's logits are each
sample's own logits, its loss is the unpacked batch's loss, and every record lands once per epoch."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_utils import build_tokenizer, write_mixed_records
from jaxvlm.data import chat_templates as ct
from jaxvlm.models import layers as L

T, TPI, IMG, SLOTS, ROW_IMAGES = 320, 4, 16, 2, 6


def naive_positions(seg: np.ndarray) -> np.ndarray:
    out = np.ones_like(seg)
    for b in range(seg.shape[0]):
        last_id, n = 0, 0
        for t, s in enumerate(seg[b]):
            if s == 0:
                continue
            n = n + 1 if s == last_id else 0
            out[b, t], last_id = n, s
    return out


def test_segment_positions_and_mask():
    rng = np.random.default_rng(0)
    rows = [[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0], [1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3], [0, 0, 0, 0, 0, 0]]
    rows += [np.sort(rng.integers(0, 4, 6)).tolist() for _ in range(20)]
    seg = np.asarray(rows, np.int32)
    np.testing.assert_array_equal(np.asarray(L.segment_positions(jnp.asarray(seg))), naive_positions(seg))
    # a 0/1 mask: cumsum - 1 on real tokens, as before segments existed
    m01 = (seg[:2] > 0).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(L.segment_positions(jnp.asarray(m01)))[m01 > 0],
                                  (np.cumsum(m01, -1) - 1)[m01 > 0])
    mask = np.asarray(L.causal_mask(jnp.arange(6), jnp.asarray(seg)) & L.segment_mask(jnp.asarray(seg)))
    for b in range(len(rows)):
        for q in range(6):
            for k in range(6):
                want = k <= q and seg[b, k] > 0 and (seg[b, q] == seg[b, k] or seg[b, q] == 0)
                assert mask[b, 0, q, k] == want, (rows[b], q, k)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """18 records: every 6th text-only, every 6th+1 with two images, the rest one."""
    return write_mixed_records(tmp_path_factory.mktemp("pack"), 18)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def make(world, tok, pack: bool, **kw):
    from jaxvlm.data.image_processing import LlavaImageProcessor
    from jaxvlm.data.pipeline import make_dataset
    d, path = world
    args = dict(image_root=d / "img", tokenizer=tok, template="vicuna_v1",
                image_processor=LlavaImageProcessor(image_size=IMG, tokens_per_image=TPI), max_len=T,
                images_per_sample=SLOTS, batch_size=2, seed=0, shard_index=0, shard_count=1, image_token_id=4,
                num_threads=0, num_epochs=1, shuffle=False, pack=pack, images_per_row=ROW_IMAGES if pack else None)
    args.update(kw)
    return make_dataset(path, **args)


def samples_of(batch, slots):
    """Each row's samples: (record number, ids, labels, its images), split at the segment ids."""
    out = []
    pix = batch["pixel_values"].reshape(len(batch["input_ids"]), slots, *batch["pixel_values"].shape[1:])
    valid = batch["image_valid"].reshape(len(batch["input_ids"]), slots)
    for r in range(len(batch["input_ids"])):
        seg, images = batch["attention_mask"][r], list(pix[r][valid[r]])
        for s in range(1, seg.max() + 1):
            ids, labels = batch["input_ids"][r][seg == s], batch["labels"][r][seg == s]
            n_img = int((ids == 4).sum()) // TPI
            text = tok_decode(labels[labels != ct.IGNORE_INDEX])
            out.append((int(re.match(r" answer (\d+)</s>", text).group(1)), ids, labels, images[:n_img]))
            images = images[n_img:]
        assert not images and np.all(batch["input_ids"][r][seg == 0] == batch["input_ids"][r][-1])
    return out


tok_decode = build_tokenizer().decode


def test_packed_rows_hold_every_sample_once_as_built(world, tok):
    plain = [s for b in make(world, tok, False) for s in samples_of(b, SLOTS)]
    packed_batches = list(make(world, tok, True, batch_size=1))      # batch 1: no row dropped as a remainder
    packed = [s for b in packed_batches for s in samples_of(b, ROW_IMAGES)]
    assert sorted(n for n, *_ in packed) == sorted(n for n, *_ in plain) == list(range(18))
    assert len(packed_batches) < 18 // 2                           # under two samples a row: it did pack
    assert max(b["attention_mask"].max() for b in packed_batches) >= 3
    by_n = {n: (ids, labels, imgs) for n, ids, labels, imgs in plain}
    for n, ids, labels, imgs in packed:
        want_ids, want_labels, want_imgs = by_n[n]
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(labels[1:], want_labels[1:])   # the first is never supervised
        assert len(imgs) == len(want_imgs) and all(np.array_equal(a, b) for a, b in zip(imgs, want_imgs))
    for b in packed_batches:
        np.testing.assert_array_equal(b["image_valid"].reshape(1, ROW_IMAGES).sum(1), b["num_images"])

    # resume: the state after two batches gives the same third batch
    it = iter(make(world, tok, True, num_epochs=None, shuffle=True))
    next(it), next(it)
    state = it.get_state()
    want = next(it)
    it2 = iter(make(world, tok, True, num_epochs=None, shuffle=True))
    it2.set_state(state)
    got = next(it2)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_qwen_rows_pack_their_grids_and_token_types(world, tok):
    """chatml + the Qwen2-VL processor: packed rows carry each image's grid and patches in its slot and the
    token types of their samples, and hold every record once."""
    from jaxvlm.data.image_processing import Qwen2VLImageProcessor
    qproc = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    kw = dict(template="chatml", image_processor=qproc, image_token_id=None, batch_size=1)
    plain = [b for b in make(world, tok, False, **kw)]
    packed = [b for b in make(world, tok, True, **kw)]
    assert len(packed) < len(plain) == 18
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    n_seg = 0
    for b in packed:
        grid, seg = b["image_grid_thw"], b["attention_mask"][0]
        assert grid.shape == (ROW_IMAGES, 3) and np.all((grid[:, 0] > 0) == b["image_valid"])
        np.testing.assert_array_equal(b["mm_token_type_ids"][0], (b["input_ids"][0] == pad_id) & (seg > 0))
        assert (b["input_ids"][0] == pad_id).sum() == (grid.prod(1) // 4).sum()
        n_seg += seg.max()
    assert n_seg == 18
    grids = [g for b in plain for g in b["image_grid_thw"] if g[0]]
    assert np.array_equal(np.concatenate([b["image_grid_thw"][b["image_valid"]] for b in packed]), np.stack(grids))


def test_packing_refuses_what_it_cannot_pack(world, tok):
    with pytest.raises(ValueError, match="a sample has 2 images but images_per_row=1"):
        list(make(world, tok, True, images_per_row=1))


def test_a_packed_row_computes_each_samples_own_logits_and_loss(world, tok):
    """A tiny random LLaVA: logits of the packed rows at each sample's tokens equal that sample run alone, and
    the packed batch's loss equals the unpacked batch's (both average over the same supervised tokens)."""
    from jaxvlm.train.config import apply_overrides, train_defaults
    from jaxvlm.train.loop import build_model, example_inputs, model_config
    from jaxvlm.models.params import init_params
    from jaxvlm.train.step import real_images_first, vlm_lm_loss
    cfg = apply_overrides(train_defaults(), ["model.text.vocab_size=448", "model.image_token_id=4",
                                             f"model.vision.image_size={IMG}", "model.vision.patch_size=8",
                                             "model.text.max_position_embeddings=512"])
    mc = model_config(cfg)
    assert mc.tokens_per_image == TPI
    model = build_model(mc)
    params = jax.jit(lambda k: init_params(model, k, *example_inputs(mc)))(jax.random.key(0))
    forward = jax.jit(lambda p, ids, pix, mask: model.apply({"params": p}, ids, pix, attention_mask=mask).logits)

    packed = next(iter(make(world, tok, True, batch_size=1)))
    seg = packed["attention_mask"][0]
    assert seg.max() >= 3 and (packed["input_ids"][0] == 4).sum() >= 2 * TPI
    pix = real_images_first(jnp.asarray(packed["pixel_values"]), jnp.asarray(packed["image_valid"]))
    got = np.asarray(forward(params, packed["input_ids"], pix, packed["attention_mask"]))[0]
    n_images = 0
    for s in range(1, seg.max() + 1):
        ids = packed["input_ids"][0][seg == s]
        k = int((ids == 4).sum()) // TPI
        mine = pix[n_images:n_images + k] if k else jnp.zeros((1,) + pix.shape[1:], pix.dtype)
        alone = np.asarray(forward(params, ids[None], mine, np.ones((1, len(ids)), np.int32)))[0]
        np.testing.assert_allclose(got[seg == s], alone, rtol=1e-5, atol=1e-5, err_msg=f"segment {s}")
        n_images += k

    loss_fn = jax.jit(vlm_lm_loss(model))
    plain = [b for b in make(world, tok, False, batch_size=18)]
    packed_all = [b for b in make(world, tok, True, batch_size=len(list(make(world, tok, True, batch_size=1))))]
    assert len(plain) == len(packed_all) == 1
    (l_plain, m_plain), (l_packed, m_packed) = (loss_fn(params, jax.tree.map(jnp.asarray, b), None)
                                                for b in (plain[0], packed_all[0]))
    assert int(m_plain["num_tokens"]) == int(m_packed["num_tokens"]) > 0
    np.testing.assert_allclose(float(l_packed), float(l_plain), rtol=1e-5)


def test_train_packs_through_the_config(world, tok, tmp_path):
    """`jaxvlm train --set data.pack=True` trains on packed LLaVA records (the loss falls); packing the
    synthetic source is refused."""
    import json

    from jaxvlm.cli import main
    d, path = world
    tok.save_pretrained(tmp_path / "tok")
    config = str(__import__("pathlib").Path(__file__).parents[1] / "configs" / "train_tiny.py")
    sets = [f"data.path={path}", f"data.image_root={d / 'img'}", f"data.tokenizer={tmp_path / 'tok'}",
            "data.kind=pipeline", f"data.seq_len={T}", "data.pack=True", "data.images_per_sample=2",
            "data.batch_size=8", "model.text.vocab_size=448", "model.image_token_id=4",
            f"model.vision.image_size={IMG}", "model.vision.patch_size=8", "model.text.max_position_embeddings=512",
            "train.steps=8", "train.log_every=1", "optim.default_lr=3e-3", "train.fast_compile=True"]
    args = ["train", "--config", config, "--no-progress", "--workdir", str(tmp_path / "w")]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl") if '"loss"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert main(["train", "--config", config, "--no-progress", "--workdir", str(tmp_path / "x"),
                 "--set", "data.pack=True"]) == 2


def test_train_reports_truncated_records(world, tok, tmp_path):
    """`jaxvlm train` reports the pipeline's truncation count as `data_truncated`: none at a seq_len that holds
    every record, and at least every consumed sample when each is longer than seq_len (text cut after its images,
    so no record is refused)."""
    import json

    from jaxvlm.cli import main
    d, path = world
    tok.save_pretrained(tmp_path / "tok")
    config = str(__import__("pathlib").Path(__file__).parents[1] / "configs" / "train_tiny.py")  # as above
    from jaxvlm.data.conversation import load_records
    longest = max(len(ct.encode("vicuna_v1", r.messages, tok, image_token_id=4,
                                image_token_counts=[TPI] * len(r.images)).input_ids) for r in load_records(path))
    for seq_len, work in ((longest, "fits"), (70, "cut")):
        sets = [f"data.path={path}", f"data.image_root={d / 'img'}", f"data.tokenizer={tmp_path / 'tok'}",
                "data.kind=pipeline", f"data.seq_len={seq_len}", "data.images_per_sample=2", "data.batch_size=8",
                "model.text.vocab_size=448", "model.image_token_id=4", f"model.vision.image_size={IMG}",
                "model.vision.patch_size=8", "train.steps=2", "train.log_every=1", "train.fast_compile=True"]
        args = ["train", "--config", config, "--no-progress", "--workdir", str(tmp_path / work)]
        assert main(args + [a for s in sets for a in ("--set", s)]) == 0
        rows = [json.loads(line) for line in open(tmp_path / work / "metrics.jsonl") if '"loss"' in line]
        if work == "fits":
            assert [r["data_truncated"] for r in rows] == [0, 0]
        else:                     # every record is 81-91 tokens; the read-ahead may have built more than 16
            assert longest > 70 and rows[-1]["data_truncated"] >= 2 * 8
