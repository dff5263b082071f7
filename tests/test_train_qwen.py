"""Training Qwen2.5-VL through the shared train step: per-slot patch batches (as `jaxvlm.data.pipeline`
makes them) run through the tower one row per slot, equal to HF's packed layout; the sharded step
with gradient accumulation equals the single-device step, the train config builds the family, and
stage 0's Qwen targets follow the processor's patch order."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.models import qwen2_vl as Q
from jaxvlm.models.llama import LMConfig
from jaxvlm.models.params import init_params, logical_axes
from jaxvlm.train import optim as O
from jaxvlm.train.step import next_token_loss, vlm_lm_loss

from sharding_utils import assert_no_replication_fallback, run_steps
TOL = 1e-5
IMG, VS, VE, VID = 120, 121, 122, 123
B, SLOTS, M_ROWS, T = 8, 2, 32, 48


def tiny_config() -> Q.Qwen2VLConfig:
    # dims divisible by the mesh axes that shard them; windows of 2 x 2 merge units; full attention in block 1
    text = LMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
                    mrope_section=(2, 1, 1), qkv_bias=True, family="qwen2")
    vision = Q.QwenVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, out_hidden_size=64,
                                patch_size=4, window_size=16, fullatt_block_indexes=(1,))
    return Q.Qwen2VLConfig(text, vision, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
                           vision_end_token_id=VE)


def slot_batch(cfg: Q.Qwen2VLConfig, seed: int = 0) -> dict:
    """B samples of 0-2 images of different grids in SLOTS slots of M_ROWS patch rows (zero padded)."""
    rng = np.random.default_rng(seed)
    grids = [(1, 4, 4), (1, 4, 8), (1, 8, 4)]
    d = cfg.vision.patch_dim
    pix = np.zeros((B * SLOTS, M_ROWS, d), np.float32)
    thw = np.zeros((B * SLOTS, 3), np.int32)
    ids = rng.integers(20, 110, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b in range(B):
        pos = 1
        for s in range(b % 3):                        # 0, 1 or 2 images
            g = grids[(b + s) % 3]
            n = int(np.prod(g))
            pix[b * SLOTS + s, :n] = rng.standard_normal((n, d))
            thw[b * SLOTS + s] = g
            k = n // 4
            ids[b, pos:pos + k + 2] = [VS] + [IMG] * k + [VE]
            pos += k + 3
        mask[b, T - b:] = 0                            # right padding
    labels = np.where((ids != IMG) & (ids != VS) & (ids != VE) & (mask == 1), ids, -100).astype(np.int32)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pix, image_grid_thw=thw,
                image_valid=thw[:, 0] > 0, mm_token_type_ids=(ids == IMG).astype(np.int32))


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    model = Q.Qwen2VL(cfg)
    ex = Q.example_inputs(cfg)
    params = jax.device_get(jax.jit(lambda k: init_params(model, k, *ex))(jax.random.key(0)))
    abstract = jax.eval_shape(lambda p: p, params)
    opt = O.make_optimizer(O.OptimConfig(default_lr=0.1, schedule="constant", eps=1.0, weight_decay=0.01), abstract)
    return dict(cfg=cfg, model=model, params=params, logical=logical_axes(model, *ex), abstract=abstract, opt=opt,
                batch=slot_batch(cfg), loss_fn=vlm_lm_loss(model))


def test_tower_slot_rows_equal_the_packed_tower(setup):
    """The tower on one row per slot (empty slots included) == the tower on the real rows packed into
    one sequence: every patch's state after every block, and the merged features (real slots first, in order)."""
    b, model, p, cfg = setup["batch"], setup["model"], setup["params"], setup["cfg"]
    pix, grid = jnp.asarray(b["pixel_values"]), jnp.asarray(b["image_grid_thw"])
    real = b["image_grid_thw"][:, 0] > 0
    sizes = b["image_grid_thw"].prod(-1)
    rows = np.concatenate([x[:n] for x, n in zip(b["pixel_values"], sizes)])
    packed = model.apply({"params": p}, jnp.asarray(rows), jnp.asarray(b["image_grid_thw"][real]),
                         output_hidden_states=True, method="encode")[0]
    slotted, n_img = model.apply({"params": p}, pix, grid, output_hidden_states=True, method="encode")
    lay = Q.slot_layout(grid, M_ROWS, cfg.vision)
    wins = jax.vmap(lambda lay: Q.vision_windows(lay, Q.patch_window_order(lay, cfg.vision), cfg.vision))(lay)
    assert bool(jnp.all(wins.slots.fits))                           # the slotted window path, not the fallback
    scale = np.abs(np.asarray(packed.last_hidden)).max()
    got = np.concatenate([h[:n] for h, n in zip(np.asarray(slotted.last_hidden), sizes)])
    assert np.abs(got - np.asarray(packed.last_hidden)).max() <= TOL * scale
    hs, want_hs = np.asarray(slotted.hidden_states), np.asarray(packed.hidden_states)     # [L+1, S, M, D], [L+1, N, D]
    assert hs.shape[:3] == (cfg.vision.num_layers + 1, B * SLOTS, M_ROWS)
    got_hs = np.concatenate([hs[:, i, :n] for i, n in enumerate(sizes)], axis=1)
    assert np.abs(got_hs - want_hs).max() <= TOL * np.abs(want_hs).max()
    n = int(sizes.sum()) // 4
    assert n_img == B * SLOTS * M_ROWS // 4 and 0 < real.sum() < len(real) and not real[0]   # empty slots in between
    want = np.asarray(packed.merged)
    assert np.abs(np.asarray(slotted.merged)[:n] - want).max() <= TOL * np.abs(want).max()


def test_slot_batch_equals_the_packed_forward(setup):
    """Logits and loss on per-slot rows == the model on HF-style packed rows (no slot padding, real grids
    only), and each sample's logits do not depend on the other samples of the batch."""
    b, model, p = setup["batch"], setup["model"], setup["params"]
    # jitted: eager op-by-op dispatch of the slot forward took ~30 s here; one compile per batch shape
    forward = jax.jit(lambda p, ids, pix, grid, tt, mask: model.apply(
        {"params": p}, ids, pix, grid, mm_token_type_ids=tt, attention_mask=mask).logits)

    def slot_logits(idx):
        slots = np.concatenate([[i * SLOTS + j for j in range(SLOTS)] for i in idx])
        return np.asarray(forward(p, *(jnp.asarray(x) for x in (
            b["input_ids"][idx], b["pixel_values"][slots], b["image_grid_thw"][slots], b["mm_token_type_ids"][idx],
            b["attention_mask"][idx]))))

    real = b["image_grid_thw"][:, 0] > 0
    rows = np.concatenate([x[:int(np.prod(g))] for x, g in zip(b["pixel_values"], b["image_grid_thw"])])
    model.check_inputs(b["input_ids"], rows, b["image_grid_thw"][real], mm_token_type_ids=b["mm_token_type_ids"])
    out = model.apply({"params": p}, jnp.asarray(b["input_ids"]), jnp.asarray(rows),
                      jnp.asarray(b["image_grid_thw"][real]), mm_token_type_ids=jnp.asarray(b["mm_token_type_ids"]),
                      attention_mask=jnp.asarray(b["attention_mask"]))
    want = np.asarray(out.logits)
    full = slot_logits(np.arange(B))
    valid = b["attention_mask"] == 1
    scale = np.abs(want[valid]).max()
    assert np.abs(full[valid] - want[valid]).max() <= 1e-5 * scale
    for i in range(B):                      # alone: other samples' images change the slot layout
        alone = slot_logits(np.array([i]))[0]
        assert np.abs(alone[valid[i]] - want[i][valid[i]]).max() <= 1e-5 * scale, i
    loss, metrics = jax.jit(setup["loss_fn"])(p, {k: jnp.asarray(v) for k, v in b.items()}, None)
    ref, _ = next_token_loss(out.logits, jnp.asarray(b["labels"]))
    assert abs(float(loss) - float(ref)) <= 1e-6 * abs(float(ref))
    assert int(metrics["num_tokens"]) == int(((b["labels"][:, 1:]) != -100).sum())


def test_packed_row_computes_each_samples_own_logits(setup):
    """Qwen2.5-VL with packing (`data.pack`): samples of 1, 2 and 1 images in one row, attention_mask holding
    their segment ids and the row's 4 slots their images in order. M-RoPE runs on across the row, which
    changes nothing within a sample (rotary is relative in each section); the segment mask does the rest."""
    b, model, p = setup["batch"], setup["model"], setup["params"]
    forward = jax.jit(lambda p, ids, pix, grid, tt, mask: model.apply(
        {"params": p}, ids, pix, grid, mm_token_type_ids=tt, attention_mask=mask).logits)
    picks, row_slots = [1, 2, 4], 4
    lens = [int(b["attention_mask"][i].sum()) for i in picks]
    width = sum(lens) + 6
    ids, seg, tt = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    pix = np.zeros((row_slots,) + b["pixel_values"].shape[1:], np.float32)
    grid = np.zeros((row_slots, 3), np.int32)
    at, slot = 0, 0
    for k, (i, n) in enumerate(zip(picks, lens)):
        ids[0, at:at + n], tt[0, at:at + n] = b["input_ids"][i, :n], b["mm_token_type_ids"][i, :n]
        seg[0, at:at + n] = k + 1
        for j in range(i % 3):
            pix[slot], grid[slot] = b["pixel_values"][i * SLOTS + j], b["image_grid_thw"][i * SLOTS + j]
            slot += 1
        at += n
    assert slot == 4
    got = np.asarray(forward(p, *(jnp.asarray(x) for x in (ids, pix, grid, tt, seg))))[0]
    for k, (i, n) in enumerate(zip(picks, lens)):
        mine = slice(i * SLOTS, (i + 1) * SLOTS)
        alone = np.asarray(forward(p, *(jnp.asarray(x) for x in (
            b["input_ids"][i:i + 1, :n], b["pixel_values"][mine], b["image_grid_thw"][mine],
            b["mm_token_type_ids"][i:i + 1, :n], np.ones((1, n), np.int32)))))[0]
        scale = np.abs(alone).max()
        assert np.abs(got[seg[0] == k + 1] - alone).max() <= 1e-5 * scale, i


def test_sharded_accumulated_step_matches_single_device(setup, capfd):
    """data x fsdp x tensor = 2 x 2 x 2 with 2 micro-batches (each splits the image slots with their
    samples) == one device, one batch: losses and updated parameters; the tower's rows shard with the
    batch (no activation replicated whole)."""
    ref, out = run_steps(setup, (1, 1, 1)), run_steps(setup, (2, 2, 2), accum=2)
    assert_no_replication_fallback(capfd.readouterr().err)
    ref_state, ref_losses, state, losses = ref["state"], ref["losses"], out["state"], out["losses"]
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL)
    assert losses[1] < losses[0]
    got, want = jax.device_get(state.params), jax.device_get(ref_state.params)
    for (path, g), r, p0 in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                                jax.tree.leaves(setup["params"])):
        g, r, p0 = (np.asarray(x, np.float64) for x in (g, r, p0))
        assert np.max(np.abs(g - r)) <= TOL * max(np.max(np.abs(r)), 1e-6), jax.tree_util.keystr(path)
        # the update itself, to 1e-4 of its size or 2 fp32 ulps of the parameter (a norm scale near 1
        # moves by ~6e-4 here, below what 1e-4 of it can resolve in fp32)
        ulp = float(np.spacing(np.float32(np.max(np.abs(r)))))
        assert np.max(np.abs((g - p0) - (r - p0))) <= max(1e-4 * np.max(np.abs(r - p0)), 2 * ulp), \
            f"update of {jax.tree_util.keystr(path)}"


def test_train_config_builds_the_family():
    from jaxvlm.train.config import apply_overrides, train_defaults
    from jaxvlm.train.loop import build_model, image_processor, model_config
    cfg = train_defaults()
    cfg.model.update(family="qwen2_vl", image_token_id=IMG,
                     text=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                               num_kv_heads=4, mrope_section=[2, 1, 1]),
                     vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, out_hidden_size=64,
                                 patch_size=4, window_size=16, fullatt_block_indexes=[1]))
    with pytest.raises(ValueError, match="model.video_token_id, model.vision_start_token_id"):
        model_config(cfg)
    cfg = apply_overrides(cfg, [f"model.video_token_id={VID}", f"model.vision_start_token_id={VS}",
                                f"model.vision_end_token_id={VE}", "data.min_pixels=1024", "data.max_pixels=4096"])
    mc = model_config(cfg)
    assert mc == tiny_config()                     # Qwen2 LM defaults (qkv bias, M-RoPE) filled in
    assert isinstance(build_model(mc), Q.Qwen2VL)
    proc = image_processor(mc, cfg.data)
    assert (proc.patch_size, proc.merge_size, proc.max_patches) == (4, 2, 4096 // 16)
    with pytest.raises(ValueError, match="unknown model.family 'qwen3'"):
        model_config(apply_overrides(cfg, ["model.family=qwen3"]))


def test_stage0_patch_order_is_the_model_layout():
    """Stage 0's Qwen targets are permuted into the processor's row order; the model's own
    `patch_layout` (2-D rotary positions) must put each row at the same image position."""
    from jaxvlm.train.dense_vision import processor_patch_order
    cfg = tiny_config().vision
    for g in (4, 8, 14):
        lay = Q.patch_layout(jnp.asarray([[1, g, g]]), g * g, cfg)
        np.testing.assert_array_equal(processor_patch_order(g, 2), np.asarray(lay.hpos * g + lay.wpos))


def test_slot_inputs_are_checked(setup):
    b, model = setup["batch"], setup["model"]
    ids, pix, grid = b["input_ids"], b["pixel_values"].copy(), b["image_grid_thw"]
    model.check_inputs(ids, pix, grid, mm_token_type_ids=b["mm_token_type_ids"])
    with pytest.raises(ValueError, match=f"pixel values have {B * SLOTS} slots but image_grid_thw has {B * SLOTS - 1}"):
        model.check_inputs(ids, pix, grid[:-1])
    s = int(np.flatnonzero((grid.prod(-1) > 0) & (grid.prod(-1) < M_ROWS))[0])   # a slot with room left
    pix[s, int(np.prod(grid[s]))] = 1.0                   # data past the slot's grid
    with pytest.raises(ValueError, match=f"describes {int(np.prod(grid[s]))} patches in slot {s} but pixel values"):
        model.check_inputs(ids, pix, grid)
    big = grid.copy()
    big[s] = (1, 8, 8)                                    # 64 patches in a slot of M_ROWS rows
    with pytest.raises(ValueError, match=f"describes 64 patches in slot {s} but pixel values hold only {M_ROWS} rows"):
        model.check_inputs(ids, b["pixel_values"], big)
    with pytest.raises(ValueError, match="cannot be mixed with videos"):
        model.apply({"params": setup["params"]}, b["pixel_values"], grid, b["pixel_values"][0], np.array([[1, 4, 8]]),
                    method="encode")
