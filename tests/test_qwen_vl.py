"""Qwen-VL-Chat port: fp32 parity with the original code's outputs (../shared fixtures), cached greedy
decoding, a second tiny model in the original layout (upsampled position tables, left padding, two
images in a prompt, logn + NTK) checked against a plain-torch re-statement of the spec, bit-exact
checkpoint round trips, and clear errors on bad input.

Tolerance: atol = rtol = 1e-4, the spec's suggestion: the original runs its own summation orders
(torch bicubic taps, MHA, additive masks); an independent torch port sits at 2.7e-5 on these logits.
"""
import functools
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.conversion import qwen_vl as conv
from jaxvlm.conversion.io import open_checkpoint
from jaxvlm.conversion.table import ConversionError
from jaxvlm.models import layers as L
from jaxvlm.models.params import abstract_params, count_params
from jaxvlm.models.qwen_vl import (QwenVL, QwenVLConfig, example_inputs, init_cache, resize_pos_table,
                                   sincos_2d_table, torch_bicubic_matrix)

TOL = dict(atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- shared jitted calls


@functools.lru_cache(maxsize=None)
def jitted(cfg: QwenVLConfig):
    """(forward, prefill, step) for one config, compiled once per session."""
    model = QwenVL(cfg)
    forward = jax.jit(lambda p, ids, pix, mask: model.apply(
        {"params": p}, ids, pix, attention_mask=mask, output_hidden_states=True, output_vision_hidden_states=True))
    prefill = jax.jit(lambda p, i, x, m, c: model.apply({"params": p}, i, x, attention_mask=m, cache=c, cache_index=0,
                                                        output_hidden_states=True, output_vision_hidden_states=True))
    step = jax.jit(lambda p, tok, m, c, idx, ntk: model.apply({"params": p}, tok, attention_mask=m, cache=c,
                                                              cache_index=idx, ntk_seq_len=ntk, logits="last"))
    return forward, prefill, step


def greedy_decode(cfg, params, ids, mask, pix, n_new):
    """Prefill + jitted single-token cached steps; the NTK alpha stays the prefill's (as the original).
    Returns (ids [B, n_new], per-step logits [B, n_new, V], the prefill's output)."""
    _, prefill, step = jitted(cfg)
    b, t = ids.shape
    slots = jnp.zeros((b, t + n_new), jnp.int32).at[:, :t].set(jnp.asarray(mask, jnp.int32))
    out = prefill(params, jnp.asarray(ids), jnp.asarray(pix), slots, init_cache(cfg, b, t + n_new))
    first = out
    logits = [out.logits[:, -1]]
    toks = [jnp.argmax(logits[-1], -1)]
    cache = out.cache
    for k in range(1, n_new):
        slots = slots.at[:, t + k - 1].set(1)
        out = step(params, toks[-1][:, None].astype(jnp.int32), slots, cache, t + k - 1, t)
        cache = out.cache
        logits.append(out.logits[:, 0])
        toks.append(jnp.argmax(logits[-1], -1))
    return np.stack([np.asarray(x) for x in toks], 1), np.stack([np.asarray(x) for x in logits], 1), first


# ----------------------------------------------------------------------------- the public fixture


@pytest.fixture(scope="module")
def public(shared_dir):
    from safetensors.numpy import load_file
    d = shared_dir / "fixtures" / "qwen_vl_chat" / "tiny_public"
    cfg, params = conv.load_original(d, show_progress=False)
    return dict(dir=d, cfg=cfg, params=params, model=QwenVL(cfg), inp=load_file(d / "inputs.safetensors"),
                exp=load_file(d / "expected.safetensors"))


@pytest.fixture(scope="module")
def public_decoded(public):
    """24 greedy steps; the prefill (KV-cache path, slots for the new tokens masked) is the forward."""
    inp = public["inp"]
    return greedy_decode(public["cfg"], public["params"], inp["input_ids"], inp["attention_mask"],
                         inp["pixel_values"], public["exp"]["greedy_ids"].shape[1])


def test_public_forward_parity(public, public_decoded):
    cfg, exp, inp = public["cfg"], public["exp"], public["inp"]
    out = public_decoded[2]
    np.testing.assert_allclose(out.image_features, exp["visual_features"], **TOL)
    np.testing.assert_allclose(out.vision_hidden_states[-1], exp["debug.vit_out"], **TOL)
    n = cfg.text.num_layers
    # HF-style tuple: [0] embeddings after the image overwrite, [i] block i-1 output, [L] ln_f(last block)
    for i in range(n):
        np.testing.assert_allclose(out.hidden_states[i], exp["hidden_states"][i], **TOL, err_msg=f"hidden {i}")
    np.testing.assert_allclose(out.final_hidden, exp["hidden_states"][n], **TOL)
    np.testing.assert_allclose(out.logits, exp["logits"], **TOL)
    # image positions: the 256 strictly between <img> and </img>
    (_, s, e), = inp["image_spans"]
    want = np.zeros(inp["input_ids"].shape, bool)
    want[0, s + 1:e] = True
    np.testing.assert_array_equal(out.image_token_mask, want)
    # logit lens of the last layer with the norm is the model's own head
    lens = public["model"].apply({"params": public["params"]}, out.hidden_states[n], method=QwenVL.logit_lens)
    np.testing.assert_allclose(lens, out.logits, atol=1e-5, rtol=1e-5)


def test_public_tables(public):
    """logn factors, NTK frequencies and both bicubic-resampled position tables (16x16 -> 4x4)."""
    exp, v = public["exp"], public["params"]["visual"]
    t = public["inp"]["input_ids"].shape[1]
    np.testing.assert_allclose(L.logn_scale(jnp.arange(t)[None], 32)[0], exp["debug.logn"], rtol=1e-6)
    np.testing.assert_allclose(L.qwen_ntk_inv_freq(32, 10000.0, t, 32), exp["debug.rope_inv_freq"], rtol=1e-6)
    np.testing.assert_allclose(resize_pos_table(v["positional_embedding"], 4), exp["debug.vit_pos_embed_interp"],
                               atol=1e-5)
    np.testing.assert_allclose(resize_pos_table(v["attn_pool"]["pos_embed"], 4),
                               exp["debug.resampler_key_pos_embed_interp"], atol=1e-5)
    # the frozen sin-cos table in the checkpoint is the one the model would build
    np.testing.assert_allclose(sincos_2d_table(256, 16), v["attn_pool"]["pos_embed"], atol=1e-6)


def test_public_greedy_decode(public, public_decoded):
    exp = public["exp"]
    ids, logits, _ = public_decoded
    np.testing.assert_array_equal(ids, exp["greedy_ids"])
    np.testing.assert_allclose(logits, exp["decode_logits"], **TOL)


def test_training_mode_turns_off_logn_and_ntk(public):
    """train=True equals inference with logn/NTK removed from the config.
    Text only, 100 tokens > 2 x seq_length (32), so both are active at inference."""
    cfg, params = public["cfg"], public["params"]
    ids = jnp.asarray(public["inp"]["input_ids"][:, :100])
    plain = QwenVL(cfg.replace(text=cfg.text.replace(logn_attn_len=None, rope_ntk_len=None)))
    a = jax.jit(lambda p: public["model"].apply({"params": p}, ids, train=True).logits)(params)
    b = jax.jit(lambda p: plain.apply({"params": p}, ids).logits)(params)
    np.testing.assert_array_equal(a, b)   # (inference differs from `plain`: the parity tests need logn/NTK)


def test_bad_inputs(public):
    model, params, inp = public["model"], public["params"], public["inp"]
    ids, pix = inp["input_ids"], jnp.asarray(inp["pixel_values"])
    (_, s, e), = inp["image_spans"]
    short = np.delete(ids, e - 1, axis=1)                     # one <imgpad> fewer: a 255-position span
    with pytest.raises(ValueError, match="holds 255 positions"):
        model.apply({"params": params}, short, pix)
    long_path = ids.copy()
    long_path[0, s + 1:e] = ord("p")                         # 256 path bytes, no <imgpad> left
    with pytest.raises(ValueError, match="longer than 254 bytes"):
        model.apply({"params": params}, long_path, pix)
    with pytest.raises(ValueError, match="1 image span"):
        model.apply({"params": params}, ids, jnp.concatenate([pix, pix]))
    # a config.json whose visual dict does not match the weights
    from safetensors.numpy import load_file
    state = load_file(public["dir"] / "model.safetensors")
    cfg = public["cfg"]
    for bad, what in [(dict(mlp_ratio=4.0), "mlp_ratio"), (dict(layers=3), "visual.layers=3"),
                      (dict(patch_size=8, image_size=56), "patch_size")]:
        with pytest.raises(ConversionError, match=what):
            conv.params_from_state(state, cfg.replace(visual=cfg.visual.replace(**bad)))


# ----------------------------------------------------------------------------- bicubic rule


def test_bicubic_matches_torch_interpolate():
    import torch
    rng = np.random.default_rng(0)
    table = rng.standard_normal((256, 5)).astype(np.float32)
    for g in (4, 7, 16, 18, 32):
        ref = torch.nn.functional.interpolate(torch.tensor(table).reshape(1, 16, 16, 5).permute(0, 3, 1, 2),
                                              size=(g, g), mode="bicubic", align_corners=False)
        ref = ref.permute(0, 2, 3, 1).reshape(g * g, 5).numpy()
        np.testing.assert_allclose(resize_pos_table(jnp.asarray(table), g), ref, atol=3e-6, err_msg=f"grid {g}")
    assert torch_bicubic_matrix(16, 32).sum(1) == pytest.approx(np.ones(32))


# ----------------------------------------------------------------------------- a second tiny model


SECOND = {
    "hidden_size": 128, "intermediate_size": 192, "kv_channels": 32, "layer_norm_epsilon": 1e-6,
    "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True, "num_attention_heads": 4,
    "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 64,
    "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True, "vocab_size": 300,
    # grid 72 / 4 = 18: both 16x16 position tables are *up*sampled; resampler has 128 // 128 = 1 head
    "visual": {"heads": 4, "image_size": 72, "image_start_id": 290, "layers": 2, "mlp_ratio": 2.5,
               "output_dim": 128, "patch_size": 4, "width": 48},
}


def original_state(d: dict, rng) -> dict:
    """Random weights with the original key names and shapes (written from the spec's key table)."""
    h, v = d["hidden_size"], d["visual"]
    w, dq, m, vm = v["width"], v["output_dim"], d["intermediate_size"] // 2, int(v["width"] * v["mlp_ratio"])
    shapes = {"transformer.wte.weight": (d["vocab_size"], h), "transformer.ln_f.weight": (h,),
              "lm_head.weight": (d["vocab_size"], h)}
    for i in range(d["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes.update({p + "attn.c_attn.weight": (3 * h, h), p + "attn.c_attn.bias": (3 * h,),
                       p + "attn.c_proj.weight": (h, h), p + "ln_1.weight": (h,), p + "ln_2.weight": (h,),
                       p + "mlp.w1.weight": (m, h), p + "mlp.w2.weight": (m, h), p + "mlp.c_proj.weight": (h, m)})
    vis = "transformer.visual."
    shapes.update({vis + "conv1.weight": (w, 3, v["patch_size"], v["patch_size"]),
                   vis + "positional_embedding": (256, w), vis + "ln_pre.weight": (w,), vis + "ln_pre.bias": (w,),
                   vis + "attn_pool.query": (256, dq), vis + "attn_pool.kv_proj.weight": (dq, w),
                   vis + "attn_pool.attn.in_proj_weight": (3 * dq, dq), vis + "attn_pool.attn.in_proj_bias": (3 * dq,),
                   vis + "attn_pool.attn.out_proj.weight": (dq, dq), vis + "attn_pool.attn.out_proj.bias": (dq,),
                   vis + "ln_post.weight": (dq,), vis + "ln_post.bias": (dq,), vis + "proj": (dq, dq)})
    for n in ("ln_kv", "ln_q"):
        shapes.update({f"{vis}attn_pool.{n}.weight": (dq,), f"{vis}attn_pool.{n}.bias": (dq,)})
    for i in range(v["layers"]):
        p = f"{vis}transformer.resblocks.{i}."
        shapes.update({p + "attn.in_proj.weight": (3 * w, w), p + "attn.in_proj.bias": (3 * w,),
                       p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                       p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                       p + "mlp.c_fc.weight": (vm, w), p + "mlp.c_fc.bias": (vm,),
                       p + "mlp.c_proj.weight": (w, vm), p + "mlp.c_proj.bias": (w,)})
    state = {}
    for k, s in shapes.items():
        if "ln" in k and k.endswith("weight"):
            state[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
        else:
            state[k] = (rng.standard_normal(s) * (0.05 if k.endswith("bias") else 0.1)).astype(np.float32)
    state[vis + "attn_pool.pos_embed"] = sincos_2d_table(dq, 16)
    return state


def torch_reference(state: dict, d: dict, ids, mask, pix, ntk_len=None):
    """The original forward as the spec states it, in plain torch (MHA from torch.nn). Returns
    (visual features, HF-style hidden-states tuple, logits)."""
    import torch
    F = torch.nn.functional
    sd = {k: torch.tensor(v) for k, v in state.items()}
    v, vis = d["visual"], "transformer.visual."
    w, g = v["width"], v["image_size"] // v["patch_size"]

    def abs_pos(tab, n):
        s = math.isqrt(tab.shape[0])
        return tab if s == n else F.interpolate(tab.reshape(1, s, s, -1).permute(0, 3, 1, 2), size=(n, n),
                                                mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(n * n, -1)

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)

    with torch.no_grad():
        x = F.conv2d(torch.tensor(pix), sd[vis + "conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
        x = ln(x + abs_pos(sd[vis + "positional_embedding"], g), vis + "ln_pre")
        nh, hd = v["heads"], w // v["heads"]
        for i in range(v["layers"]):
            p = f"{vis}transformer.resblocks.{i}."
            y = F.linear(ln(x, p + "ln_1"), sd[p + "attn.in_proj.weight"], sd[p + "attn.in_proj.bias"])
            q, k, vv = y.view(*y.shape[:2], nh, 3 * hd).transpose(1, 2).split(hd, -1)   # per-head packing
            a = torch.softmax((q / math.sqrt(hd)) @ k.transpose(-1, -2), -1) @ vv
            x = x + F.linear(a.transpose(1, 2).reshape(x.shape), sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
            y = F.gelu(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
            x = x + F.linear(y, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        pool, dq = vis + "attn_pool.", v["output_dim"]
        mha = torch.nn.MultiheadAttention(dq, dq // 128)
        mha.load_state_dict({k[len(pool + "attn."):]: sd[k] for k in sd if k.startswith(pool + "attn.")})
        kv = ln(F.linear(x, sd[pool + "kv_proj.weight"]), pool + "ln_kv").permute(1, 0, 2)
        q = ln(sd[pool + "query"], pool + "ln_q").unsqueeze(1).repeat(1, kv.shape[1], 1)
        pos = sd[pool + "pos_embed"]
        feats = mha(q + pos.unsqueeze(1), kv + abs_pos(pos, g).unsqueeze(1), kv)[0].permute(1, 0, 2)
        feats = ln(feats, vis + "ln_post") @ sd[vis + "proj"]

        # LM
        ids_t, h_dim, heads = torch.tensor(ids), d["hidden_size"], d["num_attention_heads"]
        hd, s_len, b, t = h_dim // heads, d["seq_length"], *ids.shape
        h = sd["transformer.wte.weight"][ids_t].clone()
        start = v["image_start_id"]
        spans = list(zip(torch.where(ids_t == start)[0].tolist(), torch.where(ids_t == start)[1].tolist(),
                         torch.where(ids_t == start + 1)[1].tolist()))
        for n, (bi, a, e) in enumerate(spans):
            h[bi, a + 1:e] = feats[n]
        n_ctx = t if ntk_len is None else ntk_len
        alpha = max(2 ** math.ceil(math.log(n_ctx / s_len, 2) + 1) - 1, 1)
        base = d["rotary_emb_base"] * alpha ** (hd / (hd - 2))
        inv = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
        emb = torch.cat([torch.outer(torch.arange(t).float(), inv)] * 2, -1)
        cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]
        logn = torch.tensor([math.log(i, s_len) if i > s_len else 1.0 for i in range(1, t + 1)])[None, :, None, None]
        fmin = torch.finfo(torch.float32).min
        add = torch.triu(torch.full((t, t), fmin), 1)[None, None] + (1 - torch.tensor(mask)[:, None, None, :].float()) * fmin

        def rot(x):
            x1, x2 = x.chunk(2, -1)
            return torch.cat([-x2, x1], -1)

        def rms(x, key):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + d["layer_norm_epsilon"]) * sd[key]

        states = [h]
        for i in range(d["num_hidden_layers"]):
            p = f"transformer.h.{i}."
            y = F.linear(rms(h, p + "ln_1.weight"), sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"])
            q, k, vv = (z.view(b, t, heads, hd) for z in y.split(h_dim, -1))
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            q = q * logn
            sc = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) / math.sqrt(hd) + add
            o = (torch.softmax(sc, -1) @ vv.transpose(1, 2)).transpose(1, 2).reshape(b, t, h_dim)
            h = h + F.linear(o, sd[p + "attn.c_proj.weight"])
            y = rms(h, p + "ln_2.weight")
            h = h + F.linear(F.linear(y, sd[p + "mlp.w1.weight"]) * F.silu(F.linear(y, sd[p + "mlp.w2.weight"])),
                             sd[p + "mlp.c_proj.weight"])
            states.append(h)
        final = rms(h, "transformer.ln_f.weight")
        states[-1] = final
        return feats.numpy(), [s.numpy() for s in states], F.linear(final, sd["lm_head.weight"]).numpy()


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    rng = np.random.default_rng(7)
    d = SECOND
    state = original_state(d, rng)
    folder = tmp_path_factory.mktemp("second")
    # the original's sharded .bin layout with an index
    import torch
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        torch.save({k: torch.tensor(state[k]) for k in ks}, folder / name)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (folder / "config.json").write_text(json.dumps(d))

    # left-padded batch of 2; row 0 holds two images, row 1 one; T = 540 > 8 * seq_length
    start, pad = d["visual"]["image_start_id"], d["visual"]["image_start_id"] + 2

    def span(path):
        b = list(path.encode())
        return [start] + b + [pad] * (256 - len(b)) + [start + 1]

    text = lambda n: list(rng.integers(0, 290, n))
    rows = [text(10) + span("a.jpg") + text(5) + span("dir/b.png") + text(9),
            text(7) + span("c.jpg") + text(12)]
    t = max(map(len, rows))
    ids, mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
    for b, r in enumerate(rows):
        ids[b, t - len(r):], mask[b, t - len(r):] = r, 1
    pix = rng.standard_normal((3, 3, 72, 72)).astype(np.float32)
    return dict(folder=folder, state=state, d=d, ids=ids, mask=mask, pix=pix)


def test_second_model_convert_forward_generate(second):
    cfg, params = conv.load_original(second["folder"], show_progress=False)
    assert cfg.visual.grid == 18 and cfg.text.logn_attn_len == 64
    ids, mask, pix = second["ids"], second["mask"], second["pix"]
    feats, states, logits = torch_reference(second["state"], second["d"], ids, mask, pix)
    forward = jitted(cfg)[0]
    out = forward(params, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(out.image_features, feats, **TOL)
    for i in range(cfg.text.num_layers):
        np.testing.assert_allclose(np.asarray(out.hidden_states[i])[valid], states[i][valid], **TOL, err_msg=f"hidden {i}")
    np.testing.assert_allclose(np.asarray(out.final_hidden)[valid], states[-1][valid], **TOL)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], logits[valid], **TOL)
    assert out.image_token_mask.sum() == 3 * 256

    # pad ids are invisible to valid positions (exactly, as in the original)
    other = ids.copy()
    other[~valid] = 17
    out2 = forward(params, jnp.asarray(other), jnp.asarray(pix), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(out2.logits)[valid], np.asarray(out.logits)[valid])

    # cached greedy decoding; the reference recomputes prompt + generated tokens with the prefill's
    # alpha (540 and 547 tokens share the NTK bucket, so this is also what the original computes)
    n_new = 8
    gen, step_logits, _ = greedy_decode(cfg, params, ids, mask, pix, n_new)
    full = np.concatenate([ids, gen[:, :-1]], 1)
    full_mask = np.concatenate([mask, np.ones((2, n_new - 1), np.int64)], 1)
    _, _, ref = torch_reference(second["state"], second["d"], full, full_mask, pix, ntk_len=ids.shape[1])
    ref = ref[:, ids.shape[1] - 1:]
    np.testing.assert_allclose(step_logits, ref, **TOL)
    np.testing.assert_array_equal(gen, ref.argmax(-1))


def test_second_model_checkpoint_round_trip(second, tmp_path):
    cfg, params = conv.load_original(second["folder"], show_progress=False)
    state = second["state"]
    assert conv.state_plan(params, cfg) == [(k, x.nbytes) for k, x in conv.iter_state(params, cfg)]
    for fmt, shard in [("bin", 400_000), ("safetensors", None)]:
        out = tmp_path / fmt
        files = conv.save_original(out, cfg, params, fmt=fmt, max_shard_bytes=shard)
        assert (len(files) > 1) == (shard is not None)
        back = open_checkpoint(out)
        assert sorted(back.keys()) == sorted(state)
        for k, x in state.items():
            y = back.get(k)
            assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x), k
        cfg2, params2 = conv.load_original(out, show_progress=False)
        assert cfg2 == cfg
        jax.tree.map(np.testing.assert_array_equal, params2, params)
    # bf16 in, bf16 out, bit for bit
    import ml_dtypes
    bf = {k: x.astype(ml_dtypes.bfloat16) for k, x in state.items()}
    p16 = conv.params_from_state(bf, cfg)
    back = conv.state_from_params(p16, cfg)
    assert all(back[k].dtype == bf[k].dtype and np.array_equal(back[k].view(np.uint16), bf[k].view(np.uint16))
               for k in bf)


# ----------------------------------------------------------------------------- the real model


def test_real_config_builds_abstractly(shared_dir):
    spec = importlib.util.spec_from_file_location("qwen_vl_chat_config",
                                                  pathlib.Path(__file__).parents[1]
                                                  / "configs" / "qwen_vl_chat.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()["model"]
    real = json.loads((shared_dir / "fixtures" / "qwen_vl_chat" / "config.json").read_text())
    assert QwenVLConfig.from_original(real) == QwenVLConfig.from_original(mod.ORIGINAL_CONFIG)
    shapes = abstract_params(QwenVL(cfg), *example_inputs(cfg))
    index = json.loads((shared_dir / "fixtures" / "qwen_vl_chat" / "pytorch_model.bin.index.json").read_text())
    assert count_params(shapes) == mod.NUM_PARAMS == index["metadata"]["total_size"] // 2
    assert cfg.visual.mlp_width == 8192 and cfg.visual.resampler_heads == 32
    # the table covers the real checkpoint's 853 keys exactly
    rules = conv.qwen_vl_rules(cfg)
    fused = {k for f in conv.fused_tensors(cfg) for k in f.keys()}
    mapped = {k.partition("#")[0] for r in rules for k in r.hf_keys()}
    assert mapped == set(index["weight_map"]) and fused <= mapped
