"""fp32 parity of the LLaVA family and the Qwen2 LM against transformers' PyTorch classes.

Prompts are >= 512 tokens (rotary bugs hide at short positions), the batch is padded, one sample
carries two images, and every layer's state (LM and vision tower) is compared.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.conversion.api import llava_from_torch, lm_from_torch
from parity_utils import rel_err

TOL = 1e-5
IMG = 127


@pytest.fixture(scope="module")
def torch_mods():
    import torch
    import transformers
    torch.manual_seed(0)
    return torch, transformers


def tiny_llava_hf(transformers, style: str):
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if style == "llama3":
        text.update(num_attention_heads=8, num_key_value_heads=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**text),
                                   image_token_index=IMG, image_seq_length=16, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def llava_batch(rng, lengths=(600, 530), images=(2, 1), pad_side="left"):
    """Random ids with image-token runs of 16; padded to the longest sample."""
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for b, (n, k) in enumerate(zip(lengths, images)):
        row = rng.integers(3, IMG, size=n)
        row[0] = 1
        for j in range(k):
            start = 5 + j * 40
            row[start:start + 16] = IMG
        sl = slice(t - n, t) if pad_side == "left" else slice(0, n)
        ids[b, sl], mask[b, sl] = row, 1
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
    pix = rng.standard_normal((sum(images), 3, 32, 32)).astype(np.float32)
    return ids, mask, pos, pix


@pytest.mark.parametrize("style,pad_side", [("llama2", "left"), ("llama3", "right")])
def test_llava_parity(torch_mods, style, pad_side):
    torch, transformers = torch_mods
    hf = tiny_llava_hf(transformers, style)
    cfg, model, params = llava_from_torch(hf)
    ids, mask, pos, pix = llava_batch(np.random.default_rng(0), pad_side=pad_side)

    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos), output_hidden_states=True)
        ref_vis = hf.model.vision_tower(torch.tensor(pix), output_hidden_states=True)

    fwd = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, attention_mask=m, output_hidden_states=True,
                                                 output_vision_hidden_states=True))
    out = fwd(params, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))
    valid = mask.astype(bool)
    n_layers = cfg.text.num_layers
    assert out.hidden_states.shape == (n_layers + 1,) + ids.shape + (cfg.text.hidden_size,)
    for i in range(n_layers):
        assert rel_err(out.hidden_states[i], ref.hidden_states[i].numpy(), valid) < TOL, f"LM layer {i}"
    assert rel_err(out.final_hidden, ref.hidden_states[n_layers].numpy(), valid) < TOL
    assert rel_err(out.logits, ref.logits.numpy(), valid) < TOL
    for i, h in enumerate(ref_vis.hidden_states):
        assert rel_err(out.vision_hidden_states[i], h.numpy()) < TOL, f"vision layer {i}"
    np.testing.assert_array_equal(np.asarray(out.image_token_mask), ids == IMG)


def test_qwen2_lm_parity(torch_mods):
    torch, transformers = torch_mods
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1000000.0},
        tie_word_embeddings=False)).eval()
    cfg, model, params = lm_from_torch(hf)
    assert cfg.qkv_bias and cfg.family == "qwen2"
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 160, size=(2, 520))
    mask = np.ones_like(ids)
    mask[1, :37] = 0
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 output_hidden_states=True)
    out = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m, output_hidden_states=True))(
        params, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    for i in range(cfg.num_layers):
        assert rel_err(out.hidden_states[i], ref.hidden_states[i].numpy(), valid) < TOL, f"layer {i}"
    assert rel_err(out.logits, ref.logits.numpy(), valid) < TOL


def test_attention_probs_and_logit_lens(torch_mods):
    """Requested attention maps equal HF's eager attention; logit lens of the last layer with the
    norm equals the logits, and without it differs (UE reads the un-normed version)."""
    torch, transformers = torch_mods
    hf = tiny_llava_hf(transformers, "llama3")
    hf.set_attn_implementation("eager")
    cfg, model, params = llava_from_torch(hf)
    ids, mask, pos, pix = llava_batch(np.random.default_rng(3), lengths=(90, 70))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos), output_attentions=True)
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pix), attention_mask=jnp.asarray(mask),
                      attn_layers=(0, 2), output_hidden_states=True)
    assert out.attentions.shape == (2, 2, cfg.text.num_heads, ids.shape[1], ids.shape[1])
    q_valid = mask.astype(bool)[:, None, :, None]
    for j, layer in enumerate((0, 2)):
        ref_a = ref.attentions[layer].numpy()
        m = np.broadcast_to(q_valid, ref_a.shape)
        assert rel_err(out.attentions[j], ref_a, m) < TOL, f"attention layer {layer}"
    # rows are distributions over the valid keys only
    a = np.asarray(out.attentions[0])
    np.testing.assert_allclose(a.sum(-1)[np.broadcast_to(mask.astype(bool)[:, None], a.shape[:3])], 1.0, atol=1e-5)
    assert np.all(a[0][:, :, ~mask[0].astype(bool)] == 0)
    lens = model.apply({"params": params}, out.hidden_states[-1], True, method="logit_lens")
    np.testing.assert_allclose(np.asarray(lens), np.asarray(out.logits), rtol=1e-6, atol=1e-6)
    raw = model.apply({"params": params}, out.hidden_states[1], False, method="logit_lens")
    assert raw.shape == out.logits.shape and not np.allclose(np.asarray(raw), np.asarray(out.logits), atol=1e-3)


def test_image_token_count_mismatch_is_a_clear_error(torch_mods):
    _, transformers = torch_mods
    cfg, model, params = llava_from_torch(tiny_llava_hf(transformers, "llama2"))
    ids, mask, pos, pix = llava_batch(np.random.default_rng(0), lengths=(80, 70))
    with pytest.raises(ValueError, match=r"48 image tokens .* 2 image\(s\) x 16"):
        model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pix[:2]), attention_mask=jnp.asarray(mask))
    with pytest.raises(ValueError, match="image_size=32"):
        model.apply({"params": params}, jnp.asarray(ids), jnp.zeros((3, 3, 48, 48)), attention_mask=jnp.asarray(mask))


def test_causal_query_blocks_and_mask_bias_match_one_full_attention():
    """The cacheless fast path (query blocks that skip future keys, additive mask bias) gives the
    plain masked softmax attention on every query row that sees at least one key."""
    from jaxvlm.models import layers as L
    from jaxvlm.models.llama import causal_query_blocks

    # ~48 queries per block, at most 8 (1 below 96); blocks need not divide t (771 = 3 x 257, 773 prime)
    assert [causal_query_blocks(t) for t in (80, 100, 192, 256, 512, 1024, 771, 773, 4096)] == [1, 2, 4, 5, 8, 8, 8, 8, 8]
    b, t, h, kvh, d = 3, 96, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k = jax.random.normal(ks[1], (b, t, kvh, d))
    v = jax.random.normal(ks[2], (b, t, kvh, d))
    # row 1 left-padded by 17, row 2 right-padded by 11 (padding queries after the valid keys)
    valid = (jnp.arange(t)[None] >= jnp.array([[0], [17], [0]])) & (jnp.arange(t)[None] < jnp.array([[t], [t], [t - 11]]))
    mask = L.causal_mask(jnp.arange(t), valid)
    # reference: explicit select + softmax, no blocks
    qg = q.reshape(b, t, kvh, h // kvh, d) * d ** -0.5
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k)
    logits = jnp.where(mask[:, :, None], logits, -jnp.inf)
    ref = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(logits, -1), v).reshape(b, t, h, d)
    seen = np.asarray(valid)                                        # rows with at least one key
    # jitted: op-by-op, the blocked path's many small ops took ~20 s here
    attend = jax.jit(L.dot_attention, static_argnames="causal_blocks")
    for blocks in (1, 4, 6, 7):           # 7 does not divide 96: blocks of 13-14 queries
        for m in (mask, L.mask_bias(mask)):
            out, _ = attend(q, k, v, m, causal_blocks=blocks)
            assert rel_err(np.asarray(out)[seen], np.asarray(ref)[seen]) < 1e-6, blocks
    # No mask means bidirectional: blocks must not drop future keys then.
    full_ref = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(jnp.einsum("btkgd,bskd->bkgts", qg, k), -1),
                          v).reshape(b, t, h, d)
    assert rel_err(L.dot_attention(q, k, v, None, causal_blocks=4)[0], full_ref) < 1e-6


def test_segment_block_attention_matches_dense_segment_mask():
    """Blocked attention over contiguous segments (Qwen2.5-VL's windows after reordering) equals the
    dense attention with the segment mask — segments straddling block edges, of every length up to
    the block, T not a multiple of the block."""
    from jaxvlm.models import layers as L

    block, h, kvh, d = 8, 4, 2, 8
    lengths = [8, 3, 8, 5, 1, 7, 8, 2, 5]               # 47 rows; several segments cross block edges
    ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths))
    t = len(ids)
    assert t % block and any(s // block != (s + n - 1) // block for s, n in zip(np.cumsum([0] + lengths), lengths))
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (2, t, h, d))
    k = jax.random.normal(ks[1], (2, t, kvh, d))
    v = jax.random.normal(ks[2], (2, t, kvh, d))
    ref, _ = L.dot_attention(q, k, v, (ids[:, None] == ids[None, :])[None, None])
    out = jax.jit(L.segment_block_attention, static_argnums=4)(q, k, v, ids, block)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-6
    # a block too small for the segments is not silently right: the test would catch a wrong neighbourhood
    assert rel_err(L.segment_block_attention(q, k, v, ids, 2), ref) > 1e-3


def test_slotted_segment_attention_matches_dense_segment_mask():
    """Each segment in a block of its own (Qwen2.5-VL's window attention): equal to the dense segment
    mask on every real row, padding rows zero; a buffer too small says so (`fits` false) and leaves
    every row out rather than mixing segments."""
    from jaxvlm.models import layers as L

    block, h, kvh, d = 8, 4, 2, 8
    lengths = [8, 3, 8, 5, 1, 7, 8, 2, 5]               # 47 real rows in 9 segments, then 5 padding rows
    ids = np.concatenate([np.repeat(np.arange(len(lengths)), lengths), np.full(5, -1)])
    valid = jnp.asarray(ids >= 0)
    ids = jnp.asarray(ids)
    t = len(ids)
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (2, t, h, d))
    k = jax.random.normal(ks[1], (2, t, kvh, d))
    v = jax.random.normal(ks[2], (2, t, kvh, d))
    ref, _ = L.dot_attention(q, k, v, (ids[:, None] == ids[None, :])[None, None])
    run = jax.jit(lambda q, k, v, ids, n: L.slotted_segment_attention(q, k, v, L.segment_slots(ids, valid, block, n)),
                  static_argnums=4)
    slots = L.segment_slots(ids, valid, block, 9 * block)
    assert bool(slots.fits) and int((slots.src < t).sum()) == 47
    out = np.asarray(run(q, k, v, ids, 9 * block))
    assert rel_err(out[:, :47], np.asarray(ref)[:, :47]) < 1e-6
    assert not out[:, 47:].any(), "padding rows get zeros"
    # 9 segments need 9 blocks: with 8 the flag is down and no row is attended at all
    small = L.segment_slots(ids, valid, block, 8 * block)
    assert not bool(small.fits) and int((small.slot < 8 * block).sum()) == 0
    assert not np.asarray(run(q, k, v, ids, 8 * block)).any()
    # a segment longer than the block would spill into its neighbour's block: not fitting, however many slots
    long = jnp.asarray(np.repeat([0, 1], [block + 1, 3]))
    assert not bool(L.segment_slots(long, jnp.ones(block + 4, bool), block, 4 * block).fits)
    assert bool(L.segment_slots(long[1:], jnp.ones(block + 3, bool), block, 4 * block).fits)
    with pytest.raises(ValueError, match="multiple of the block"):
        L.segment_slots(ids, valid, block, 9 * block + 1)


def test_unknown_remat_policy_is_a_clear_error():
    from jaxvlm.models import layers as L
    assert L.remat_block(L.ViTBlock, "none") is L.ViTBlock
    with pytest.raises(ValueError, match="remat='dot'.*known: \\['dots', 'dots_no_batch', 'full', 'none'\\]"):
        L.remat_block(L.ViTBlock, "dot")


def test_linear_matmul_gradients_match_autodiff_of_the_plain_dot():
    """`Linear`'s custom JVP (kernel gradient as one 2-D GEMM) against autodiff of `x @ kernel`,
    for 2-D, 3-D and 4-D operands, under jit, in forward mode, and with the kernel frozen."""
    from jaxvlm.models import layers as L
    for shape in ((6, 7), (3, 5, 7), (2, 3, 4, 7)):
        kx, kk = jax.random.split(jax.random.key(len(shape)))
        x, kern = jax.random.normal(kx, shape), jax.random.normal(kk, (7, 4))
        np.testing.assert_array_equal(np.asarray(L.linear_matmul(x, kern)), np.asarray(x @ kern))
        got = jax.jit(jax.grad(lambda x, k: jnp.sin(L.linear_matmul(x, k)).sum(), (0, 1)))(x, kern)
        want = jax.grad(lambda x, k: jnp.sin(x @ k).sum(), (0, 1))(x, kern)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert rel_err(np.asarray(g), np.asarray(w)) < 1e-6, shape
        gx = jax.grad(lambda x: jnp.sin(L.linear_matmul(x, kern)).sum())(x)     # kernel constant
        assert rel_err(np.asarray(gx), np.asarray(want[0])) < 1e-6, shape
        tx, tk = jax.random.normal(kx, shape), jax.random.normal(kk, (7, 4))
        _, jv = jax.jvp(L.linear_matmul, (x, kern), (tx, tk))
        assert rel_err(np.asarray(jv), np.asarray(tx @ kern + x @ tk)) < 1e-6, shape
