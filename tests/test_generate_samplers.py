"""Samplers against transformers' logits processors on random logits (HF semantics, -inf filter)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.generate import samplers as S

V = 97


@pytest.fixture(scope="module")
def hf():
    import torch
    from transformers.generation import logits_process as lp
    return torch, lp


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, V)).astype(np.float32) * 3
    x[1, :5] = x[1, 5]           # ties at the top-k / top-p boundaries stay in, as in HF
    return x


def same_filter(ours, ref):
    ours, ref = np.asarray(ours), ref.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    keep = ~np.isneginf(ref)
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k(hf, logits, k):
    torch, lp = hf
    same_filter(S.top_k_filter(jnp.asarray(logits), k), lp.TopKLogitsWarper(k)(None, torch.tensor(logits)))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p(hf, logits, p):
    torch, lp = hf
    same_filter(S.top_p_filter(jnp.asarray(logits), p), lp.TopPLogitsWarper(p)(None, torch.tensor(logits)))


@pytest.mark.parametrize("m", [0.01, 0.1, 0.5])
def test_min_p(hf, logits, m):
    torch, lp = hf
    same_filter(S.min_p_filter(jnp.asarray(logits), m), lp.MinPLogitsWarper(m)(None, torch.tensor(logits)))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty(hf, logits, penalty):
    torch, lp = hf
    ids = np.random.default_rng(1).integers(0, V, size=(6, 30))
    ours = S.repetition_penalty(jnp.asarray(logits), jnp.asarray(ids), jnp.ones(ids.shape, bool), penalty)
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)
    # slots marked invalid (padding, rolled-back slots) are not penalised
    valid = np.zeros(ids.shape, bool)
    valid[:, :10] = True
    ours = S.repetition_penalty(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(valid), penalty)
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids[:, :10]), torch.tensor(logits))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)


def test_min_new_tokens_and_full_warp_chain(hf, logits):
    torch, lp = hf
    cfg = S.SamplerConfig(top_k=30, top_p=0.8, min_p=0.05, repetition_penalty=1.2, min_new_tokens=3,
                          eos_token_ids=(2, 7))
    ids = np.random.default_rng(2).integers(0, V, size=(6, 12))
    prompt = 8
    procs = lp.LogitsProcessorList([
        lp.RepetitionPenaltyLogitsProcessor(1.2),
        lp.MinNewTokensLengthLogitsProcessor(prompt, 3, [2, 7]),
        lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(30), lp.TopPLogitsWarper(0.8), lp.MinPLogitsWarper(0.05)])
    for n_new in (2, 4):   # still under min_new_tokens (EOS suppressed), then past it
        ref = procs(torch.tensor(ids[:, :prompt + n_new]), torch.tensor(logits))
        valid = np.arange(12)[None] < prompt + n_new
        scores = S.process_logits(cfg, jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(valid), jnp.int32(n_new))
        ours = S.warp_logits(cfg, scores, jnp.full((6,), 0.7))
        same_filter(ours, ref)
        assert np.isneginf(np.asarray(scores)[:, [2, 7]]).all() == (n_new < 3)


def test_select_greedy_rows_and_sampled_distribution(logits):
    cfg = S.SamplerConfig(top_k=3)
    x = jnp.asarray(logits)
    temp = jnp.asarray([0.0, 1.0, 0.0, 1.0, 1.0, 0.5])
    keys = jax.random.split(jax.random.key(0), 6)
    tok = np.asarray(S.select(cfg, x, temp, keys))
    np.testing.assert_array_equal(tok[[0, 2]], np.argmax(logits[[0, 2]], -1))
    # draws stay inside the top-k set and follow its softmax
    draw = jax.jit(jax.vmap(lambda k: S.select(cfg, x[3:4], jnp.ones(1), k[None])[0]))
    samples = np.asarray(draw(jax.random.split(jax.random.key(1), 4000)))
    top = np.argsort(logits[3])[-3:]
    assert set(np.unique(samples)) <= set(top)
    p = np.exp(logits[3, top] - logits[3, top].max())
    p /= p.sum()
    freq = np.array([(samples == t).mean() for t in top])
    np.testing.assert_allclose(freq, p, atol=0.03)
    assert np.array_equal(np.asarray(S.select(cfg, x, temp, keys)), tok)   # same keys, same draw
