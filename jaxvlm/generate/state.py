"""The decode state: one pytree that `prefill`, `step`, `extend` and `rollback` map to a new one.

Everything is indexed by KV-cache *slot* (0 .. S-1). A left-padded prompt occupies slots
`0 .. T-1` (padding slots masked out); generated tokens follow. Because every per-token record
(`ids`, `kv_mask`, `positions`, `token_logprobs`, ...) is per slot, truncating the state to a length
is just masking slots, and a method can read any record back by slot.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class DecodeState:
    """Shapes: B batch rows (the compiled size), S cache slots, V vocabulary, n hooked layers.

    cache:          `(k, v)`, each `[L, B*K, S, Dh]` or a tuple of L `[B*K, S, Dh]` (unrolled layers;
                    model layout, `jaxvlm.models.llama.init_cache`)
    kv_mask:        `[B, S]` int32, 1 = slot holds a real token the next query may attend to
    ids:            `[B, S]` int32 token id in each slot (prompt ids, generated ids, pad elsewhere)
    positions:      `[B, S]` int32 rotary (text) position of each slot's token
    length:         scalar int32, the next slot to write (same for all rows: prompts are left-padded)
    gen_start:      scalar int32, slot where the current answer began (min_new_tokens, EOS scan)
    next_pos:       `[B]` int32 position of the next token; for M-RoPE it already holds the rope delta
    finished:       `[B]` bool, row hit EOS (or is batch padding); its later tokens are pad, masked out
    active:         `[B]` bool, row is a real sample (False for rows padding the batch to the compiled size)
    temperature:    `[B]` float32, 0 = greedy
    rng:            PRNG key of the logits rules' stream (`Hooks.rule`)
    row_keys:       `[B]` PRNG keys, one per row (by default `fold_in(rng, row)`); the draw for a token uses
                    `fold_in(row_keys[row], position)`, so a rollback and a fresh prefill of the same text
                    sample the same token, and a row given its own key samples as it would in any batch
    logits:         `[B, V]` float32 raw next-token logits of the last forward (final layer)
    layer_logits:   `[n, B, V]` logit-lens logits of `Hooks.lens_layers` at the same position, or None
    token_logprobs: `[B, S]` float32 log-prob of each generated slot's token under the raw logits
    tracked_probs:  `[B, S, m]` float32 raw probability of `Hooks.track_token_ids` at each generated
                    slot (whatever was chosen), or None
    image_slots:    `[B, S]` bool, slots holding image features (when the model reports them)
    prompt_attention: `[B, H, S]` float32 attention of the last token of the latest prefill/extend
                    chunk at `Hooks.attention_layer`, or None
    ntk_seq_len:    scalar int32, the length that fixes QWen's dynamic-NTK alpha (models whose LM
                    config has `rope_ntk_len`): set by each prefill/extend to the turn's text length
                    (largest position + 1) and kept by the decode steps, as the original does
    """

    cache: tuple[Array, Array]
    kv_mask: Array
    ids: Array
    positions: Array
    length: Array
    gen_start: Array
    next_pos: Array
    finished: Array
    active: Array
    temperature: Array
    rng: Array
    row_keys: Array
    logits: Array
    token_logprobs: Array
    image_slots: Array
    layer_logits: Array | None = None
    tracked_probs: Array | None = None
    prompt_attention: Array | None = None
    ntk_seq_len: Array | None = None

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def max_len(self) -> int:
        return self.ids.shape[1]

    def generated(self, start: int | None = None):
        """Host-side view: `(ids [B, n], mask [B, n])` of the slots `start .. length-1`
        (default: since `gen_start`); mask is 0 after a row's EOS."""
        import numpy as np
        s = int(self.gen_start if start is None else start)
        n = int(self.length)
        return np.array(self.ids[:, s:n]), np.array(self.kv_mask[:, s:n])


def empty_state(cache: tuple[Array, Array], vocab_size: int, *, batch: int, n_lens: int = 0, n_tracked: int = 0,
                num_heads: int | None = None, rng: Array | None = None, pad_token_id: int = 0) -> DecodeState:
    """A state with nothing in the cache (`length == 0`); `prefill` fills it."""
    b, s = batch, cache[0][0].shape[-2]               # one layer's keys [B*K, S, Dh], stacked or unrolled
    rng = jax.random.key(0) if rng is None else rng
    f32 = jnp.float32
    return DecodeState(
        cache=cache,
        kv_mask=jnp.zeros((b, s), jnp.int32),
        ids=jnp.full((b, s), pad_token_id, jnp.int32),
        positions=jnp.zeros((b, s), jnp.int32),
        length=jnp.zeros((), jnp.int32),
        gen_start=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((b,), jnp.int32),
        finished=jnp.zeros((b,), bool),
        active=jnp.ones((b,), bool),
        temperature=jnp.zeros((b,), f32),
        rng=rng,
        row_keys=jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(b)),   # the engine's default
        logits=jnp.zeros((b, vocab_size), f32),
        token_logprobs=jnp.zeros((b, s), f32),
        image_slots=jnp.zeros((b, s), bool),
        layer_logits=jnp.zeros((n_lens, b, vocab_size), f32) if n_lens else None,
        tracked_probs=jnp.zeros((b, s, n_tracked), f32) if n_tracked else None,
        prompt_attention=jnp.zeros((b, num_heads, s), f32) if num_heads else None,
        ntk_seq_len=jnp.zeros((), jnp.int32),
    )
