"""The generation engine against transformers' `generate` and against full (cache-free) forwards.

One tiny LLaVA (Llama-2 style) is shared by most tests and one engine per configuration is built
per module, so each jitted step compiles once. The batch: 3 left-padded prompts of different
lengths, one image each, compiled for 4 rows (the 4th is an inactive filler row).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.conversion.api import llava_from_torch
from jaxvlm.generate import Engine, Hooks, SamplerConfig, attention_to_image, tracked_prob
from parity_utils import rel_err
from test_llava_parity import IMG, tiny_llava_hf

TOL = 1e-5
NEW = 64
LENGTHS = (30, 45, 22)


@pytest.fixture(scope="module")
def torch_mods():
    import torch
    import transformers
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny models: thread hand-offs cost ~20x the math in HF's decode loop
    yield torch, transformers
    torch.set_num_threads(threads)


def prompts(rng, lengths=LENGTHS, image_at=3):
    """Left-padded ids with one 16-token image run per row, and one image per row."""
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        row = rng.integers(3, IMG, size=n)
        row[0] = 1
        row[image_at:image_at + 16] = IMG
        ids[b, t - n:], mask[b, t - n:] = row, 1
    pix = rng.standard_normal((len(lengths), 3, 32, 32)).astype(np.float32)
    return ids, mask, pix


def hf_generate(torch, hf, ids, mask, pix, **kw):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pix), do_sample=False, pad_token_id=0, max_new_tokens=NEW,
                          return_dict_in_generate=True, output_logits=True, **kw)
    toks = out.sequences[:, ids.shape[1]:].numpy()
    return toks, np.stack([x.numpy() for x in out.logits], axis=1)   # [B, n], [B, n, V]


def full_logits(model, params, ids, mask, pix, **kw):
    """Cache-free forward of the whole sequence (the reference for incremental decoding)."""
    f = jax.jit(lambda p, i, m, x: model.apply({"params": p}, i, x, attention_mask=m, **kw))
    return f(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pix))


def assert_same_greedy(ours, ref, ref_logits):
    """Token-identical, except that a divergence is allowed only at a numerical near-tie of the
    reference's top two logits (after which the sequences are no longer comparable)."""
    for r in range(ref.shape[0]):
        diff = np.nonzero(ours[r] != ref[r])[0]
        if diff.size:
            j = diff[0]
            top2 = np.sort(ref_logits[r, j])[-2:]
            gap = (top2[1] - top2[0]) / np.max(np.abs(ref_logits[r, j]))
            assert gap < 1e-5, f"row {r} differs at step {j} with a clear margin ({gap:.2e})"


@pytest.fixture(scope="module")
def llava(torch_mods):
    torch, transformers = torch_mods
    hf = tiny_llava_hf(transformers, "llama2")
    cfg, model, params = llava_from_torch(hf)
    ids, mask, pix = prompts(np.random.default_rng(0))
    # An extra EOS that row 0 emits early and some other row never emits: rows finish apart.
    free, _ = hf_generate(torch, hf, ids, mask, pix, eos_token_id=2)
    first = lambda x: [int(np.argmax(r == x)) if np.any(r == x) else NEW for r in free]
    stop = next(int(x) for x in free[0, 12:48] if min(first(x)) >= 12 and max(first(x)) == NEW)
    return dict(hf=hf, cfg=cfg, model=model, params=params, ids=ids, mask=mask, pix=pix, stop=stop)


@pytest.fixture(scope="module")
def engine(llava):
    return Engine(llava["model"], batch_size=4, max_len=192, buckets=(64, 128, 192),
                  sampler=SamplerConfig(eos_token_ids=(2, llava["stop"])))


def batch_of(d):
    return dict(input_ids=d["ids"], attention_mask=d["mask"], pixel_values=d["pix"])


def test_greedy_matches_hf_and_full_forward(torch_mods, llava, engine):
    torch, _ = torch_mods
    d = llava
    ref, ref_logits = hf_generate(torch, d["hf"], d["ids"], d["mask"], d["pix"], eos_token_id=[2, d["stop"]])
    params = d["params"]

    # Host loop over `step`, keeping every step's logits ...
    state = engine.prefill(params, batch_of(d))
    start = int(state.gen_start)
    step_logits, live = [], []
    while not bool(jnp.all(state.finished)) and int(state.length) - start < NEW:
        step_logits.append(np.asarray(state.logits[:3]))
        live.append(~np.asarray(state.finished[:3]))
        state = engine.step(params, state)
    toks, tmask = state.generated()
    toks = np.where(tmask > 0, toks, 0)[:3]
    # ... and the one-compile while-loop decode must agree.
    looped = engine.decode(params, engine.prefill(params, batch_of(d)), NEW)
    np.testing.assert_array_equal(np.asarray(looped.ids), np.asarray(state.ids))

    n = toks.shape[1]
    finish = [np.nonzero(~np.array(live)[:, r])[0] for r in range(3)]
    assert len({int(f[0]) if f.size else n for f in finish}) > 1, "rows should finish at different steps"
    assert_same_greedy(toks, ref[:, :n], ref_logits)
    np.testing.assert_array_equal(toks, ref[:, :n])
    assert np.all(ref[:, n:] == 0)

    # Incremental logits == full-forward logits at every step of every unfinished row (and == HF's).
    seq = np.concatenate([d["ids"], toks], 1)
    seq_mask = np.concatenate([d["mask"], tmask[:3]], 1)
    full = np.asarray(full_logits(d["model"], params, seq, seq_mask, d["pix"]).logits)
    t = d["ids"].shape[1]
    ours = np.stack(step_logits, 1)
    live = np.stack(live, 1)
    assert rel_err(ours, full[:, t - 1:t - 1 + n], live) < TOL
    assert rel_err(ours, ref_logits[:, :n], live) < TOL


def test_llama3_style_repetition_penalty_min_new_tokens_match_hf(torch_mods):
    torch, transformers = torch_mods
    hf = tiny_llava_hf(transformers, "llama3")
    _, model, params = llava_from_torch(hf)
    ids, mask, pix = prompts(np.random.default_rng(1), lengths=(40, 25, 33))
    free, _ = hf_generate(torch, hf, ids, mask, pix, eos_token_id=2)
    eos = int(free[1, 2])  # emitted early: min_new_tokens must hold it back
    ref, ref_logits = hf_generate(torch, hf, ids, mask, pix, eos_token_id=eos, repetition_penalty=1.3,
                                  min_new_tokens=6)
    eng = Engine(model, batch_size=3, max_len=128,
                 sampler=SamplerConfig(repetition_penalty=1.3, min_new_tokens=6, eos_token_ids=(eos,)))
    state = eng.decode(params, eng.prefill(params, dict(input_ids=ids, attention_mask=mask, pixel_values=pix)), NEW)
    toks, tmask = state.generated()
    toks = np.where(tmask > 0, toks, 0)
    assert_same_greedy(toks, ref[:, :toks.shape[1]], ref_logits)
    np.testing.assert_array_equal(toks, ref[:, :toks.shape[1]])
    lengths = tmask.sum(1)
    assert lengths.min() >= 6 and not np.array_equal(free, ref)


def test_sampling_is_reproducible(llava, engine):
    params, b = llava["params"], batch_of(llava)
    run = lambda t, seed: np.asarray(engine.decode(params, engine.prefill(params, b, temperature=t, rng=seed),
                                                   24).ids)
    a, a2, c = run(1.0, 7), run(1.0, 7), run(1.0, 8)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a[:3], c[:3])
    greedy, mixed = run(0.0, 7), run([0.0, 1.0, 0.0], 7)
    np.testing.assert_array_equal(mixed[[0, 2]], greedy[[0, 2]])
    assert not np.array_equal(mixed[1], greedy[1])


def test_rollback_equals_fresh_prefill(llava, engine):
    params, d = llava["params"], llava
    state = engine.decode(params, engine.prefill(params, batch_of(d)), 24)
    start = int(state.gen_start)
    keep = 10
    # Greedy: rolling back and continuing reproduces the same tokens.
    back = engine.rollback(params, state, start + keep)
    assert int(back.length) == start + keep
    again = engine.decode(params, back, 24 - keep)
    np.testing.assert_array_equal(np.asarray(again.ids[:3, :start + 24]), np.asarray(state.ids[:3, :start + 24]))

    # With a new temperature: same tokens and logits as a fresh prefill of the truncated text.
    gen, gmask = state.generated()
    assert gmask[:3, :keep].all(), "pick a prefix before any row finished"
    back = engine.rollback(params, state, start + keep, temperature=0.9)
    fresh_batch = dict(input_ids=np.concatenate([d["ids"], gen[:3, :keep]], 1),
                       attention_mask=np.concatenate([d["mask"], gmask[:3, :keep]], 1), pixel_values=d["pix"])
    fresh = engine.prefill(params, fresh_batch, temperature=0.9, rng=0)
    assert rel_err(back.logits[:3], fresh.logits[:3]) < TOL
    cont_a = engine.decode(params, back, 12).generated(start + keep)
    cont_b = engine.decode(params, fresh, 12).generated()
    np.testing.assert_array_equal(np.where(cont_a[1], cont_a[0], -1)[:3], np.where(cont_b[1], cont_b[0], -1)[:3])


def test_extend_second_turn_equals_fresh_prefill(llava, engine):
    """Chain-of-Spot style: a second turn (text + a new image) appended to the first turn's cache."""
    params, d = llava["params"], llava
    rng = np.random.default_rng(5)
    turn1 = engine.decode(params, engine.prefill(params, batch_of(d)), 12)
    gen, gmask = turn1.generated()
    lens2 = (26, 20, 31)
    ids2, mask2, pix2 = prompts(rng, lens2, image_at=4)
    turn2 = engine.extend(params, turn1, ids2, mask2, pixel_values=pix2)
    out2 = engine.decode(params, turn2, 16)

    rows, pix = [], []
    for r in range(3):
        rows.append(np.concatenate([d["ids"][r][d["mask"][r] > 0], gen[r][gmask[r] > 0], ids2[r][mask2[r] > 0]]))
        pix += [d["pix"][r], pix2[r]]
    t = max(map(len, rows))
    fids = np.stack([np.pad(x, (t - len(x), 0)) for x in rows])
    fmask = np.stack([np.pad(np.ones_like(x), (t - len(x), 0)) for x in rows])
    fresh = engine.prefill(params, dict(input_ids=fids, attention_mask=fmask, pixel_values=np.stack(pix)))
    assert rel_err(turn2.logits[:3], fresh.logits[:3]) < TOL
    a, b = out2.generated(), engine.decode(params, fresh, 16).generated()
    np.testing.assert_array_equal(np.where(a[1], a[0], -1)[:3], np.where(b[1], b[0], -1)[:3])


def test_clear_errors(llava, engine):
    params, d = llava["params"], llava
    long_ids = np.ones((1, 300), np.int64)
    with pytest.raises(ValueError, match="do not fit the decode cache"):
        engine.prefill(params, dict(input_ids=long_ids))
    with pytest.raises(ValueError, match="compiled for batch_size=4"):
        engine.prefill(params, dict(input_ids=np.ones((5, 8), np.int64)))
    with pytest.raises(ValueError, match="end with a real token"):
        engine.prefill(params, dict(input_ids=np.ones((2, 8), np.int64),
                                    attention_mask=np.array([[1] * 8, [1] * 7 + [0]])))
    with pytest.raises(ValueError, match="do not fit the decode cache"):
        engine.generate(params, batch_of(d), max_new_tokens=180)
    # The model's image-token check is skipped under jit; the engine runs it before compiling.
    b = batch_of(d)
    with pytest.raises(ValueError, match="image tokens do not match images"):
        engine.prefill(params, dict(b, pixel_values=b["pixel_values"][:1]))
    with pytest.raises(ValueError, match="image tokens do not match images"):
        engine.prefill(params, dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"]))
    state = engine.prefill(params, batch_of(d))
    with pytest.raises(ValueError, match="rollback length"):
        engine.rollback(params, state, int(state.length) + 1)
    with pytest.raises(ValueError, match="lens layer"):
        Engine(d["model"], batch_size=1, max_len=32, hooks=Hooks(lens_layers=(9,)))


def test_hooks_layer_contrast_tracked_probs_and_attention(llava):
    """UE-style rule on un-normed intermediate logits + REVERSE-style tracked probabilities +
    JUDGER-style prompt attention, each checked against one cache-free forward."""
    model, params, d = llava["model"], llava["params"], llava
    lens, track, attn_layer, penalty = (0, 2), (5, 9), 1, 1.2

    def contrast(state, out):
        return jax.nn.log_softmax(out.logits) - jax.nn.log_softmax(out.layer_logits[1])

    hooks = Hooks(lens_layers=lens, lens_norm=False, rule=contrast, track_token_ids=track, attention_layer=attn_layer)
    eng = Engine(model, batch_size=3, max_len=128, buckets=(64, 128), hooks=hooks, sampler=SamplerConfig(repetition_penalty=penalty))
    state0 = eng.prefill(params, batch_of(d))
    state = eng.decode(params, state0, 20)
    start, n = int(state.gen_start), 20
    gen, _ = state.generated()
    seq = np.concatenate([d["ids"], gen], 1)
    seq_mask = np.concatenate([d["mask"], np.ones_like(gen)], 1)
    ref = full_logits(model, params, seq, seq_mask, d["pix"], output_hidden_states=True,
                      attn_layers=(attn_layer,))
    t = d["ids"].shape[1]
    at = slice(t - 1, t - 1 + n)                          # positions predicting the generated tokens
    final = np.asarray(ref.logits[:, at])
    h = ref.hidden_states[jnp.asarray(lens)][:, :, at]    # [2, B, n, D]
    lens_ref = np.asarray(model.apply({"params": params}, h, False, method="logit_lens"))

    # Layer logits of the last position, and the rule's choice at every step (teacher forced).
    last = np.asarray(ref.logits[:, -1]), np.asarray(model.apply(
        {"params": params}, ref.hidden_states[jnp.asarray(lens)][:, :, -1], False, method="logit_lens"))
    assert rel_err(state.layer_logits, last[1]) < TOL
    scores = jax.nn.log_softmax(jnp.asarray(final)) - jax.nn.log_softmax(jnp.asarray(lens_ref[1]))
    for j in range(n):
        s = np.asarray(scores[:, j]).copy()
        for r in range(3):
            seen = np.unique(seq[r, :t + j][seq_mask[r, :t + j] > 0])
            s[r, seen] = np.where(s[r, seen] < 0, s[r, seen] * penalty, s[r, seen] / penalty)
        np.testing.assert_array_equal(np.argmax(s, -1), gen[:, j], err_msg=f"step {j}")

    # Raw probabilities: tracked ids and the chosen token, at every generated slot.
    probs = np.asarray(jax.nn.softmax(jnp.asarray(final), -1))
    slots = slice(start, start + n)
    for k, tok in enumerate(track):
        assert rel_err(tracked_prob(state, tok, hooks)[:, slots], probs[..., tok]) < TOL
    chosen = np.take_along_axis(probs, gen[..., None], -1)[..., 0]
    assert rel_err(np.exp(state.token_logprobs[:, slots]), chosen) < TOL

    # Attention of the last prompt token at the chosen layer, computed during prefill (causal: the
    # full forward's row t-1 sees only the prompt).
    a_ref = np.asarray(ref.attentions[0][:, :, t - 1, :t])      # [B, H, T]
    pad = start - t
    assert rel_err(state0.prompt_attention[:, :, pad:start], a_ref) < TOL
    img = attention_to_image(state0, 16)
    img_ref = np.stack([a_ref[r][:, d["ids"][r] == IMG] for r in range(3)])
    assert img.shape == (3, model.cfg.text.num_heads, 16)
    assert rel_err(img, img_ref) < TOL


def test_ue_decoding_contrasts_each_step_against_its_layer(llava):
    """jaxvlm.methods.ue through the engine: every generated token is the argmax of UE's contrast
    (repetition penalty applied after it) on teacher-forced cache-free logits, against the JS-chosen
    layer; a prior that all but fixes the draw (weight 50 on one layer) contrasts against that layer."""
    from jaxvlm.methods.ue import contrast_scores, ue_hooks
    model, d = llava["model"], llava
    # In the random model every un-normed lens is near-flat, so any contrast picks the final argmax. Make
    # the layers tell apart: layer 1's MLP writes 60x louder (lenses 2-3 peak, lens 0 stays flat) and the
    # head is 10x sharper; relative_top 1e-3 (UE: 0.1) keeps more than one plausible token.
    lm = dict(llava["params"]["language_model"])
    lm["layers"] = dict(lm["layers"])
    lm["layers"]["mlp"] = dict(lm["layers"]["mlp"], down_proj=dict(
        kernel=jnp.asarray(lm["layers"]["mlp"]["down_proj"]["kernel"]).at[1].multiply(60.0)))
    lm["lm_head"] = dict(kernel=lm["lm_head"]["kernel"] * 10.0)
    params = dict(llava["params"], language_model=lm)
    layers, penalty, n, alpha = (0, 1, 2), 1.05, 12, 1e-3
    runs = {"js": (None, slice(0, 3)), "prior->0": ((50.0, 0.0, 0.0), slice(0, 1)),
            "prior->2": ((0.0, 0.0, 50.0), slice(2, 3))}
    outs = {}
    t = d["ids"].shape[1]
    for name, (prior, cands) in runs.items():
        eng = Engine(model, batch_size=3, max_len=128, buckets=(64, 128), hooks=ue_hooks(layers, prior=prior, relative_top=alpha),
                     sampler=SamplerConfig(repetition_penalty=penalty))
        gen = outs[name] = eng.decode(params, eng.prefill(params, batch_of(d)), n).generated()[0]
        seq = np.concatenate([d["ids"], gen], 1)
        seq_mask = np.concatenate([d["mask"], np.ones_like(gen)], 1)
        ref = full_logits(model, params, seq, seq_mask, d["pix"], output_hidden_states=True)
        at = slice(t - 1, t - 1 + n)
        final = ref.logits[:, at]                                                     # [B, n, V]
        lens = model.apply({"params": params}, ref.hidden_states[jnp.asarray(layers)][:, :, at], False,
                           method="logit_lens")[cands]                               # [L, B, n, V]
        for j in range(n):
            s = np.asarray(contrast_scores(final[:, j], lens[:, :, j], relative_top=alpha)[0]).copy()
            for r in range(3):
                seen = np.unique(seq[r, :t + j][seq_mask[r, :t + j] > 0])
                s[r, seen] = np.where(s[r, seen] < 0, s[r, seen] * penalty, s[r, seen] / penalty)
            np.testing.assert_array_equal(np.argmax(s, -1), gen[:, j], err_msg=f"{name}, step {j}")
    assert not np.array_equal(outs["prior->0"], outs["prior->2"])      # the draw does pick the layer


def test_qwen2_5_vl_greedy_matches_hf(torch_mods):
    """Qwen2.5-VL through the same engine: M-RoPE positions from `rope_index`, per-row HF reference."""
    qv = pytest.importorskip("jaxvlm.models.qwen2_vl", reason="Qwen2-VL port (jaxvlm.models.qwen2_vl) not present")
    conv = pytest.importorskip("jaxvlm.conversion.qwen2_vl", reason="Qwen2-VL conversion not present")
    torch, transformers = torch_mods
    from test_qwen2_vl_parity import IMG as QIMG, VE, VS, tiny_hf
    hf = tiny_hf(transformers, torch, "qwen2_5_vl")
    cfg, model, params = conv.qwen2_vl_from_torch(hf)
    rng = np.random.default_rng(3)
    grid = np.array([[1, 4, 4]] * 3)
    rows = []
    for n in (20, 28, 14):
        text = list(rng.integers(3, 150, size=n))
        rows.append(np.array([1] + text[:3] + [VS] + [QIMG] * 4 + [VE] + text[3:]))
    pix = rng.standard_normal((48, 3 * 2 * 14 * 14)).astype(np.float32)
    t = max(map(len, rows))
    ids = np.stack([np.pad(r, (t - len(r), 0)) for r in rows])
    mask = np.stack([np.pad(np.ones_like(r), (t - len(r), 0)) for r in rows])
    pos, _ = qv.rope_index(cfg, jnp.asarray(ids), jnp.asarray(grid), attention_mask=jnp.asarray(mask))
    eng = Engine(model, batch_size=3, max_len=96, sampler=SamplerConfig(eos_token_ids=(2,)))
    assert eng.mrope
    state = eng.decode(params, eng.prefill(params, dict(input_ids=ids, attention_mask=mask, pixel_values=pix,
                                                        image_grid_thw=grid, positions=np.asarray(pos))), 32)
    toks, tmask = state.generated()
    for r, row in enumerate(rows):      # HF one prompt at a time (no padding), same settings
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor(row[None]), pixel_values=torch.tensor(pix[16 * r:16 * (r + 1)]),
                              image_grid_thw=torch.tensor(grid[r:r + 1]),
                              mm_token_type_ids=torch.tensor((row[None] == QIMG).astype(np.int64)),
                              do_sample=False, max_new_tokens=32, eos_token_id=2, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True)
        ref = out.sequences[0, len(row):].numpy()
        ref_logits = np.stack([x.numpy() for x in out.logits], axis=1)
        ours = np.where(tmask[r] > 0, toks[r], 0)[:len(ref)]
        assert_same_greedy(ours[None], ref[None], ref_logits)
        np.testing.assert_array_equal(ours, ref)


class LetterTokenizer:
    """Stand-in tokenizer: token i is the letter chr(65 + i % 26)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + int(i) % 26) for i in ids)


def test_stop_strings_cut_each_row_after_the_string(llava, engine):
    params, d = llava["params"], llava
    free = engine.generate(params, batch_of(d), max_new_tokens=24)
    tok = LetterTokenizer()
    stop = tok.decode(free.tokens[0, 5:7])                  # a two-token string row 0 emits at step 5..6
    out = engine.generate(params, batch_of(d), max_new_tokens=24, stop_strings=(stop,), tokenizer=tok,
                          check_every=4)
    for r in range(3):
        row = free.tokens[r, :free.lengths[r]]
        text = tok.decode(row)
        cut = next((k for k in range(1, len(row) + 1) if stop in text[:k]), len(row))
        assert out.lengths[r] == cut
        np.testing.assert_array_equal(out.tokens[r, :cut], row[:cut])
        assert np.all(out.tokens[r, cut:] == 0)
        assert out.texts[r] == text[:cut]
    assert out.lengths[0] <= 7


def test_unrolled_decode_layers_match_scanned(llava, engine):
    """The engine decodes with the LM's layers unrolled (one buffer per layer's weights and cache);
    the scanned model gives the same per-layer states, attention maps, cache and tokens."""
    from jaxvlm.models.llama import has_stacked_layers, stack_layers, unstack_layers
    d, params = llava, llava["params"]
    assert not engine.text_cfg.scan_layers and d["cfg"].text.scan_layers
    fast = engine.prepare(params)
    assert engine.prepare(params) is fast and engine.prepare(fast) is fast
    assert has_stacked_layers(params) and not has_stacked_layers(fast)
    back = stack_layers(fast)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    # forward: every layer's state and a middle layer's attention probabilities
    kw = dict(output_hidden_states=True, attn_layers=(1,))
    ref = full_logits(d["model"], params, d["ids"], d["mask"], d["pix"], **kw)
    ours = full_logits(engine.model, fast, d["ids"], d["mask"], d["pix"], **kw)
    assert rel_err(ours.hidden_states, ref.hidden_states) < 1e-6
    assert rel_err(ours.attentions, ref.attentions) < 1e-6
    assert rel_err(ours.logits, ref.logits) < 1e-6
    # decoding: same tokens and logits as a scanned engine, cache one buffer per layer
    scanned = Engine(d["model"], batch_size=4, max_len=192, buckets=(64, 128, 192), unroll_layers=False,
                     sampler=engine.sampler)
    a = engine.decode(params, engine.prefill(params, batch_of(d)), 16)
    b = scanned.decode(params, scanned.prefill(params, batch_of(d)), 16)
    assert len(a.cache[0]) == d["cfg"].text.num_layers and a.cache[0][0].ndim == 3 and b.cache[0].ndim == 4
    np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))
    assert rel_err(a.logits, b.logits) < 1e-6
    assert rel_err(jnp.stack(a.cache[0]), b.cache[0]) < 1e-6
