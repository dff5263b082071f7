"""What a decoding method can ask of the engine, decided once per engine (static, so compiled in).

- `lens_layers`: logit-lens logits of these hidden-state indices at every step (0 = embeddings,
  i = output of decoder layer i, before the final norm), with or without the final norm
  (`lens_norm`; UE uses without). Only the requested layers go through the LM head.
- `rule(state, outputs) -> logits [B, V]`: replaces the next-token scores before the processors and
  sampler run (UE's layer contrast, a REVERSE threshold, ...). Randomness: derive keys from
  `outputs.rng` (already distinct per step).
- `track_token_ids`: record the raw probability of these ids at every generated slot (REVERSE reads
  P(</UN>) at the step that closed a span, whatever token was chosen). The log-prob of the chosen
  token is always recorded (`DecodeState.token_logprobs`).
- `attention_layer`: keep the attention of the last token of each prefill/extend chunk at that layer
  (`DecodeState.prompt_attention [B, H, S]`; JUDGER's relative attention); read the image part with
  `attention_to_image`.

Example (UE-style contrast of the final layer against layer 4, no final norm):
    >>> def contrast(state, out):
    ...     return jax.nn.log_softmax(out.logits) - jax.nn.log_softmax(out.layer_logits[0])
    >>> hooks = Hooks(lens_layers=(4,), lens_norm=False, rule=contrast)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class StepOutputs:
    """What a logits rule sees. logits: `[B, V]` raw final-layer logits; layer_logits: `[n, B, V]`
    (order of `Hooks.lens_layers`) or None; rng: a fresh key for this step."""

    logits: Array
    layer_logits: Array | None
    rng: Array


@dataclasses.dataclass(frozen=True)
class Hooks:
    lens_layers: tuple[int, ...] = ()
    lens_norm: bool = True
    rule: Callable | None = None
    track_token_ids: tuple[int, ...] = ()
    attention_layer: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "lens_layers", tuple(int(i) for i in self.lens_layers))
        object.__setattr__(self, "track_token_ids", tuple(int(i) for i in self.track_token_ids))


def attention_to_image(state, num_image_tokens: int, image_index: int = 0) -> Array:
    """`[B, H, P]` attention of the last chunk token to the `image_index`-th run of
    `num_image_tokens` image slots in each row (rows may place their image at different slots).

    Needs an engine built with `Hooks(attention_layer=...)`.
    """
    if state.prompt_attention is None:
        raise ValueError("this engine keeps no prompt attention: build it with Hooks(attention_layer=...)")
    slots = state.image_slots
    rank = jnp.cumsum(slots, axis=-1) - 1                                   # [B, S] image-token rank
    want = image_index * num_image_tokens + jnp.arange(num_image_tokens)    # [P]
    hit = slots[:, None, :] & (rank[:, None, :] == want[None, :, None])     # [B, P, S]
    idx = jnp.argmax(hit, axis=-1)                                          # [B, P] slot of each token
    return jnp.take_along_axis(state.prompt_attention, idx[:, None, :], axis=-1)


def tracked_prob(state, token_id: int, hooks: Hooks) -> Array:
    """`[B, S]` raw probability of `token_id` at every generated slot."""
    if state.tracked_probs is None or token_id not in hooks.track_token_ids:
        raise ValueError(f"token {token_id} is not tracked; build the engine with "
                         f"Hooks(track_token_ids=(..., {token_id}))")
    return state.tracked_probs[..., hooks.track_token_ids.index(token_id)]
