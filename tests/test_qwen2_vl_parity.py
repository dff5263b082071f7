"""fp32 parity of Qwen2-VL and Qwen2.5-VL against transformers' PyTorch classes, the jittable M-RoPE
index, the KV cache, conversion round trips and bad-input errors.

One padded batch of 2 (left padding), >= 512 tokens: sample 0 carries two images of different sizes,
sample 1 a video (t = 2, Qwen2.5-VL time scaling with a fractional second_per_grid_ts) and an image.
Pixel values and grids are padded past the real patches (static shapes), as the jitted model sees them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.conversion.qwen2_vl import (qwen2_vl_from_torch, qwen2_vl_params_from_checkpoint, qwen2_vl_params_from_state,
                                       qwen2_vl_state_from_params, write_qwen2_vl_safetensors)
from jaxvlm.models.qwen2_vl import (check_inputs, decode_positions, patch_layout, patch_window_order, rope_index)
from jaxvlm.models.llama import init_cache
from parity_utils import rel_err, torch_state

TOL = 1e-5
IMG, VID, VS, VE = 151, 152, 153, 154
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def torch_mods():
    import torch
    import transformers
    return torch, transformers


def tiny_hf(transformers, torch, variant: str):
    torch.manual_seed(0)
    text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    if variant == "qwen2_vl":
        vision = dict(depth=3, embed_dim=32, mlp_ratio=2, num_heads=4, hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        return transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1])
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


def make_batch(rng, images=((1, 4, 6), (1, 8, 4), (1, 4, 4)), video=(2, 4, 4), lengths=(600, 540),
               split=(2, 1), spg=1.3, n_pix=(96, 40), n_grid=(4, 2)):
    """Tokens with vision runs; images[:split[0]] go to sample 0, then the video and the rest to sample 1."""
    def run(tok, grid):
        return [VS] + [tok] * (int(np.prod(grid)) // 4) + [VE]

    rows = []
    for b, n in enumerate(lengths):
        segs = [run(IMG, g) for g in images[:split[0]]] if b == 0 else \
            [run(VID, video)] + [run(IMG, g) for g in images[split[0]:]]
        text = list(rng.integers(3, 150, size=n - sum(map(len, segs))))
        row, cut = [1], len(text) // (len(segs) + 1)
        for j, s in enumerate(segs):
            row += text[j * cut:(j + 1) * cut] + s
        rows.append(row + text[len(segs) * cut:])
    t = max(map(len, rows))
    ids, mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
    for b, row in enumerate(rows):
        ids[b, t - len(row):], mask[b, t - len(row):] = row, 1
    mm = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    gi, gv = np.asarray(images, np.int64), np.asarray([video], np.int64)
    pix = rng.standard_normal((int(gi.prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    vpix = rng.standard_normal((int(gv.prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    pad = lambda x, n: np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])
    return dict(ids=ids, mask=mask, mm=mm, grid=gi, vgrid=gv, pix=pix, vpix=vpix, spg=np.asarray([spg], np.float32),
                # what the jitted model gets: static, padded
                pix_p=pad(pix, n_pix[0]), grid_p=pad(gi, n_grid[0]), vpix_p=pad(vpix, n_pix[1]),
                vgrid_p=pad(gv, n_grid[1]), spg_p=np.asarray([spg, 0.0], np.float32))


def jax_inputs(d):
    return (jnp.asarray(d["ids"]), jnp.asarray(d["pix_p"]), jnp.asarray(d["grid_p"]), jnp.asarray(d["vpix_p"]),
            jnp.asarray(d["vgrid_p"]), jnp.asarray(d["spg_p"]), jnp.asarray(d["mask"]))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def setup(request, torch_mods):
    torch, transformers = torch_mods
    hf = tiny_hf(transformers, torch, request.param)
    cfg, model, params = qwen2_vl_from_torch(hf)

    @jax.jit
    def fwd(p, ids, pix, grid, vpix, vgrid, spg, mask):
        return model.apply({"params": p}, ids, pix, grid, pixel_values_videos=vpix, video_grid_thw=vgrid,
                           second_per_grid_ts=spg, attention_mask=mask, output_hidden_states=True,
                           output_vision_hidden_states=True)

    batch = make_batch(np.random.default_rng(0))
    out = jax.tree.map(np.asarray, fwd(params, *jax_inputs(batch)))   # host copies: no eager slicing ops later
    return dict(variant=request.param, hf=hf, cfg=cfg, model=model, params=params, fwd=fwd, batch=batch, out=out)


def test_rope_index_matches_hf(setup, torch_mods):
    torch, _ = torch_mods
    d, cfg, hf = setup["batch"], setup["cfg"], setup["hf"]
    kw = dict(mm_token_type_ids=torch.tensor(d["mm"]), image_grid_thw=torch.tensor(d["grid"]),
              video_grid_thw=torch.tensor(d["vgrid"]), attention_mask=torch.tensor(d["mask"]))
    if setup["variant"] == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor(d["spg"])
    ref_pos, ref_delta = hf.model.get_rope_index(torch.tensor(d["ids"]), **kw)
    pos, delta = jax.jit(lambda *a: rope_index(cfg, a[0], a[1], a[2], attention_mask=a[3], second_per_grid_ts=a[4]))(
        d["ids"], d["grid_p"], d["vgrid_p"], d["mask"], d["spg_p"])
    np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy())
    if setup["variant"] == "qwen2_5_vl":      # time scaling really kicked in: frame 1 at floor(4 * 1.3) = 5
        t_pos = np.asarray(pos)[0, 1][d["ids"][1] == VID]
        assert sorted(set(t_pos - t_pos.min())) == [0, 5]


def test_vision_tower_parity(setup, torch_mods):
    torch, _ = torch_mods
    d, cfg, hf, out = setup["batch"], setup["cfg"], setup["hf"], setup["out"]
    n_img_rows, permuted = d["pix_p"].shape[0], []
    for pix, grid, lo in ((d["pix"], d["grid"], 0), (d["vpix"], d["vgrid"], n_img_rows)):
        with torch.no_grad():
            ref = hf.model.visual(torch.tensor(pix), grid_thw=torch.tensor(grid), output_hidden_states=True)
        n = len(pix)
        # HF keeps Qwen2.5-VL block states in window order; map ours (processor order) onto it.
        perm = np.asarray(jax.jit(lambda g: patch_window_order(patch_layout(g, n, cfg.vision), cfg.vision))(grid))
        permuted.append(not np.array_equal(perm, np.arange(n)))
        assert len(ref.hidden_states) == cfg.vision.num_layers + 1
        for i, h in enumerate(ref.hidden_states):
            ours = np.asarray(out.vision_hidden_states[i, lo:lo + n])[perm]
            assert rel_err(ours, h.numpy()) < TOL, f"vision block {i}"
        m = n // 4
        assert rel_err(out.image_features[lo // 4:lo // 4 + m], ref.pooler_output.numpy()) < TOL, "merger"
    if setup["variant"] == "qwen2_5_vl":
        assert permuted[0], "the window order should permute the images' patches"


def test_window_attention_both_paths_match_hf(setup, torch_mods):
    """Qwen2.5-VL windows run in blocks of their own when they fit the slot buffer (the batch above) and
    fall back to 3-block neighbourhoods when they do not (six images of one merge unit: a window each, 4
    of its 16 slots used); both equal HF's per-window attention."""
    if setup["variant"] != "qwen2_5_vl":
        pytest.skip("Qwen2-VL's vision tower has no windows")
    from jaxvlm.models.qwen2_vl import vision_windows
    torch, _ = torch_mods
    cfg, model, params, hf = setup["cfg"], setup["model"], setup["params"], setup["hf"]
    vc = cfg.vision
    rng = np.random.default_rng(3)

    def fits(grid, n):
        lay = patch_layout(jnp.asarray(grid), n, vc)
        return bool(vision_windows(lay, patch_window_order(lay, vc), vc).slots.fits)

    d = setup["batch"]
    assert fits(d["grid_p"], d["pix_p"].shape[0]), "the main batch should take the slotted path"
    grid = np.tile([[1, 2, 2]], (6, 1))
    pix = rng.standard_normal((24, PATCH_DIM)).astype(np.float32)
    assert not fits(grid, 24), "six one-window images should overflow the slot buffer"
    ours = jax.jit(lambda p, x, g: model.apply({"params": p}, x, g, method=lambda m, x, g: m.encode(x, g)[0].merged))(
        params, jnp.asarray(pix), jnp.asarray(grid))
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pix), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    assert rel_err(ours, ref) < TOL


def test_lm_parity(setup, torch_mods):
    torch, _ = torch_mods
    d, cfg, hf, out = setup["batch"], setup["cfg"], setup["hf"], setup["out"]
    assert d["ids"].shape[1] >= 512
    kw = {}
    if setup["variant"] == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor(d["spg"])
    hf.model.rope_deltas = None
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(d["ids"]), attention_mask=torch.tensor(d["mask"]),
                 pixel_values=torch.tensor(d["pix"]), image_grid_thw=torch.tensor(d["grid"]),
                 pixel_values_videos=torch.tensor(d["vpix"]), video_grid_thw=torch.tensor(d["vgrid"]),
                 mm_token_type_ids=torch.tensor(d["mm"]), output_hidden_states=True, **kw)
    valid = d["mask"].astype(bool)
    n = cfg.text.num_layers
    for i in range(n):
        assert rel_err(out.hidden_states[i], ref.hidden_states[i].numpy(), valid) < TOL, f"LM layer {i}"
    assert rel_err(out.final_hidden, ref.hidden_states[n].numpy(), valid) < TOL
    assert rel_err(out.logits, ref.logits.numpy(), valid) < TOL
    np.testing.assert_array_equal(np.asarray(out.image_token_mask), (d["ids"] == IMG) | (d["ids"] == VID))
    lens = setup["model"].apply({"params": setup["params"]}, out.hidden_states[n], method="logit_lens")
    assert rel_err(lens, ref.logits.numpy(), valid) < TOL


def test_one_compilation_for_two_layouts(setup):
    """Same padded shapes, different image sizes / placements: no retrace of the index or the model."""
    cfg, fwd = setup["cfg"], setup["fwd"]
    traces = []

    @jax.jit
    def index(ids, grid, vgrid, mask, spg):
        traces.append(1)
        return rope_index(cfg, ids, grid, vgrid, attention_mask=mask, second_per_grid_ts=spg)

    a = setup["batch"]
    b = make_batch(np.random.default_rng(1), images=((1, 2, 2), (1, 4, 8), (1, 6, 6)), video=(2, 2, 6),
                   lengths=(590, 600), spg=0.5)
    assert a["ids"].shape == b["ids"].shape and a["pix_p"].shape == b["pix_p"].shape
    pa = index(a["ids"], a["grid_p"], a["vgrid_p"], a["mask"], a["spg_p"])[0]
    pb = index(b["ids"], b["grid_p"], b["vgrid_p"], b["mask"], b["spg_p"])[0]
    assert len(traces) == 1 and not np.array_equal(np.asarray(pa), np.asarray(pb))
    out_b = fwd(setup["params"], *jax_inputs(b))
    assert fwd._cache_size() == 1
    assert np.isfinite(np.asarray(out_b.logits)).all()


def test_kv_cache_decode_matches_full_forward(setup):
    """Prefill all but the last k tokens into a cache, then decode them one at a time. The cache path is
    the shared DecoderLM's, identical for both variants: one variant keeps the compile time down."""
    if setup["variant"] != "qwen2_5_vl":
        pytest.skip("cache path is variant-independent; checked on qwen2_5_vl")
    cfg, model, params, d, out = setup["cfg"], setup["model"], setup["params"], setup["batch"], setup["out"]
    ids, mask = jnp.asarray(d["ids"]), jnp.asarray(d["mask"])
    b, t = ids.shape
    k, s = 3, t + 5
    pos, deltas = rope_index(cfg, ids, d["grid_p"], d["vgrid_p"], attention_mask=mask, second_per_grid_ts=d["spg_p"])
    slot_mask = jnp.zeros((b, s), jnp.int32).at[:, :t].set(mask)
    cache = init_cache(cfg.text, b, s)
    pre = jax.jit(lambda p, c: model.apply(
        {"params": p}, ids[:, :t - k], d["pix_p"], d["grid_p"], pixel_values_videos=d["vpix_p"],
        video_grid_thw=d["vgrid_p"], attention_mask=slot_mask, positions=pos[:, :, :t - k], cache=c, cache_index=0,
        logits="last"))(params, cache)
    step = jax.jit(lambda p, tok, c, i, pos_: model.apply({"params": p}, tok, attention_mask=slot_mask,
                                                          positions=pos_, cache=c, cache_index=i))
    cache, text_pos = pre.cache, jnp.sum(mask[:, :t - k], axis=1, keepdims=True)
    valid = np.asarray(mask).astype(bool)
    for j in range(k):
        i = t - k + j
        o = step(params, ids[:, i:i + 1], cache, i, decode_positions(text_pos + j, deltas))
        cache = o.cache
        assert rel_err(o.logits[:, 0], np.asarray(out.logits)[:, i], valid[:, i]) < TOL, f"decode step {j}"


def test_round_trip_bit_exact_and_loads_in_transformers(setup, torch_mods, tmp_path):
    torch, transformers = torch_mods
    hf, cfg, params = setup["hf"], setup["cfg"], setup["params"]
    ref_state = torch_state(hf)
    for layout in ("saved", "hf_memory"):
        exported = qwen2_vl_state_from_params(params, cfg, layout)
        if layout == "hf_memory":
            assert set(exported) == set(ref_state)
            for key, x in exported.items():
                np.testing.assert_array_equal(x, ref_state[key], err_msg=key)
        again = qwen2_vl_params_from_state(exported, cfg)
        jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params))
    saved = qwen2_vl_state_from_params(params, cfg, "saved")
    assert any(k.startswith("visual.blocks.0.") for k in saved) and any(k.startswith("model.layers.0.") for k in saved)
    from jaxvlm.models.llama import unstack_layers          # a scan_layers=False model's params export alike
    unrolled = qwen2_vl_state_from_params(unstack_layers(params), cfg, "saved")
    assert sorted(unrolled) == sorted(saved) and all(np.array_equal(unrolled[k], saved[k]) for k in saved)
    hf.config.save_pretrained(tmp_path)
    write_qwen2_vl_safetensors(tmp_path / "model.safetensors", params, cfg)
    cfg2, from_file = qwen2_vl_params_from_checkpoint(tmp_path)             # config.json + file, streamed
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, from_file, jax.tree.map(np.asarray, params))
    reloaded = type(hf).from_pretrained(tmp_path).eval()
    d = setup["batch"]
    kw = dict(input_ids=torch.tensor(d["ids"]), attention_mask=torch.tensor(d["mask"]),
              pixel_values=torch.tensor(d["pix"]), image_grid_thw=torch.tensor(d["grid"]),
              mm_token_type_ids=torch.tensor(np.where(d["ids"] == IMG, 1, 0)))
    ids = np.where(d["ids"] == VID, 5, d["ids"])          # images only: fewer inputs to thread
    kw["input_ids"] = torch.tensor(ids)
    with torch.no_grad():
        hf.model.rope_deltas = None
        a = hf(**kw).logits
        b = reloaded(**kw).logits
    assert torch.equal(a, b)


def test_bad_inputs(setup):
    cfg = setup["cfg"]
    ids = np.array([[1, VS] + [IMG] * 4 + [VE]])
    pix = np.ones((16, PATCH_DIM), np.float32)
    with pytest.raises(ValueError, match="smaller than one merged patch"):
        check_inputs(cfg, ids[:, :3], pix[:2], np.array([[1, 1, 2]]))
    with pytest.raises(ValueError, match="pixel values hold only 16 rows"):
        check_inputs(cfg, ids, pix, np.array([[1, 4, 6]]))
    with pytest.raises(ValueError, match="do not match"):
        check_inputs(cfg, ids, pix, np.array([[1, 2, 4]]))            # 8 patches described, 16 rows of data
    with pytest.raises(ValueError, match="image tokens do not match image features"):
        check_inputs(cfg, ids[:, :5], pix, np.array([[1, 4, 4]]))      # 3 tokens for 4 merged patches
    with pytest.raises(ValueError, match="image tokens do not match"):  # through the model call itself
        setup["model"].apply({"params": setup["params"]}, jnp.asarray(ids[:, :5]), jnp.asarray(pix),
                             jnp.asarray([[1, 4, 4]]))


def test_engine_checks_inputs_before_jit(setup):
    """Under jit the model's token/grid checks cannot run; the engine runs them on the concrete prompt."""
    from jaxvlm.generate import Engine
    engine = Engine(setup["model"], batch_size=1, max_len=32, buckets=(16, 32))
    ids = np.array([[1, VS] + [IMG] * 3 + [VE]])                 # 3 tokens for 4 merged patches
    pix = np.ones((16, PATCH_DIM), np.float32)
    with pytest.raises(ValueError, match="image tokens do not match image features"):
        engine.prefill(setup["params"], dict(input_ids=ids, pixel_values=pix, image_grid_thw=np.array([[1, 4, 4]])))
    with pytest.raises(ValueError, match="pixel values hold only 16 rows"):
        engine.prefill(setup["params"], dict(input_ids=ids, pixel_values=pix, image_grid_thw=np.array([[1, 4, 6]])))
