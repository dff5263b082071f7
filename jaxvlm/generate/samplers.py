"""Next-token selection with Hugging Face `generate` semantics, as pure jittable functions.

Order (as in transformers' `_get_logits_processor`): processors first (repetition penalty, min new
tokens), then, only when sampling, the warpers (temperature, top-k, top-p, min-p). Greedy rows take the
argmax of the processed logits. Removed tokens get `-inf`, as HF's `filter_value`.

The sampler's shape-changing knobs are static (`SamplerConfig`, hashable); the temperature is a
per-row array in the decode state, so a method may change it (REVERSE raises it after each rejection)
without a recompile. Temperature 0 means greedy for that row.

Example:
    >>> cfg = SamplerConfig(top_k=50, top_p=0.9, repetition_penalty=1.05, eos_token_ids=(2,))
    >>> scores = process_logits(cfg, logits, ids, ids_valid, num_generated)      # [B, V]
    >>> token = select(cfg, scores, temperature, keys)                          # [B]
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampling settings (defaults = all off). `top_k=0`, `top_p=1`, `min_p=0`,
    `repetition_penalty=1` disable the corresponding step, as in HF."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def replace(self, **kw) -> "SamplerConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- processors


def repetition_penalty(logits: Array, ids: Array, valid: Array, penalty: float) -> Array:
    """HF `RepetitionPenaltyLogitsProcessor`: every token id seen in `ids [B, S]` (where `valid`)
    has its logit divided by `penalty` if positive, multiplied if negative."""
    if penalty == 1.0:
        return logits
    b, v = logits.shape
    seen = jnp.take_along_axis(logits, jnp.clip(ids, 0, v - 1), axis=-1)
    seen = jnp.where(seen < 0, seen * penalty, seen / penalty)
    idx = jnp.where(valid, ids, v)  # out of range -> dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
    return logits.at[rows, idx].set(seen, mode="drop")


def suppress_eos(logits: Array, eos_token_ids: tuple[int, ...], active: Array) -> Array:
    """HF `MinNewTokensLengthLogitsProcessor`: EOS ids get -inf on rows where `active [B]`."""
    if not eos_token_ids:
        return logits
    eos = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(eos_token_ids)].set(True)
    return jnp.where(active[:, None] & eos[None], NEG_INF, logits)


def process_logits(cfg: SamplerConfig, logits: Array, ids: Array, ids_valid: Array,
                   num_generated: Array) -> Array:
    """Processors applied to greedy and sampled rows alike. `num_generated`: scalar or `[B]`."""
    logits = repetition_penalty(logits.astype(jnp.float32), ids, ids_valid, cfg.repetition_penalty)
    if cfg.min_new_tokens > 0:
        too_short = jnp.broadcast_to(num_generated < cfg.min_new_tokens, logits.shape[:1])
        logits = suppress_eos(logits, cfg.eos_token_ids, too_short)
    return logits


# ----------------------------------------------------------------------------- warpers


def top_k_filter(logits: Array, k: int) -> Array:
    """HF `TopKLogitsWarper`: keep every logit >= the k-th largest (ties at the k-th stay)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: Array, p: float) -> Array:
    """HF `TopPLogitsWarper`: drop the low tail whose cumulative probability is <= 1 - p (the most
    likely token always stays)."""
    if p >= 1.0:
        return logits
    ascending = jnp.sort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = cum <= 1.0 - p
    removed = removed.at[..., -1].set(False)
    # The removed set is a prefix of the ascending order: keep everything >= the first kept value.
    cut = jnp.take_along_axis(ascending, jnp.sum(removed, -1, keepdims=True), axis=-1)
    return jnp.where(logits < cut, NEG_INF, logits)


def min_p_filter(logits: Array, min_p: float) -> Array:
    """HF `MinPLogitsWarper`: drop tokens whose probability is below `min_p * max prob`."""
    if min_p <= 0.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    thr = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < thr, NEG_INF, logits)


def warp_logits(cfg: SamplerConfig, scores: Array, temperature: Array) -> Array:
    """Temperature -> top-k -> top-p -> min-p (HF order). temperature: `[B]`, > 0 on sampled rows."""
    t = jnp.where(temperature > 0, temperature, 1.0).astype(scores.dtype)
    scores = scores / t[:, None]
    scores = top_k_filter(scores, cfg.top_k)
    scores = top_p_filter(scores, cfg.top_p)
    return min_p_filter(scores, cfg.min_p)


def select(cfg: SamplerConfig, scores: Array, temperature: Array, keys: Array) -> Array:
    """Next token per row: argmax where `temperature == 0`, else a draw from the warped scores.
    scores: processed logits `[B, V]`; keys: one PRNG key per row `[B]`."""
    greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)

    def draw(_):
        warped = warp_logits(cfg, scores, temperature)
        drawn = jax.vmap(jax.random.categorical)(keys, warped).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # Greedy batches skip the warpers and the [B, V] Gumbel draw (a few ms per step on CPU).
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
