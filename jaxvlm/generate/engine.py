"""The generation engine: jitted pure steps over a `DecodeState`, for any jaxvlm backbone.

The engine talks to the model only through its call API (`model.apply(params, input_ids,
pixel_values=..., attention_mask=<over cache slots>, positions=..., cache=..., cache_index=...,
logits="last")` and `method="logit_lens"`), so LLaVA, Qwen2/2.5-VL (M-RoPE positions `[3, B, T]`)
and Qwen-VL-Chat all decode through it.

Steps (each one `state -> state`, jitted once per engine; shapes never depend on the prompt):
- `prefill(params, batch)`       encode a left-padded prompt batch into a fresh cache
- `step(params, state)`          choose one token per row from `state.logits` and run it
- `decode(params, state, n)`     `step` in a `lax.while_loop` until all rows finish or n new tokens
- `extend(params, state, ids)`   append tokens (a new chat turn, possibly with images) to the cache
- `rollback(params, state, n)`   truncate to n slots and recompute the logits there
- `generate(params, batch, ...)` the host loop for the common case (stop strings, text out)

Prompt lengths are padded (on the left) up to a bucket size, and a batch smaller than the compiled
size is padded with inactive rows, so a new prompt length or a short last batch does not recompile.

Example:
    >>> engine = Engine(model, batch_size=4, max_len=1024, sampler=SamplerConfig(eos_token_ids=(2,)))
    >>> state = engine.prefill(params, dict(input_ids=ids, attention_mask=mask, pixel_values=pix))
    >>> state = engine.decode(params, state, 64)                     # greedy (temperature 0)
    >>> tokens, mask = state.generated()
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.generate.hooks import Hooks, StepOutputs
from jaxvlm.generate.samplers import SamplerConfig, process_logits, select
from jaxvlm.generate.state import DecodeState, empty_state
from jaxvlm.models.llama import has_stacked_layers, init_cache, unstack_layers

Array = jax.Array
_RULE_STREAM = 0x5EED   # rng stream for logits rules, disjoint from the per-row sampling streams
_COMPILED: dict = {}    # jitted steps shared by engines with the same model and settings
# XLA CPU's YNNPACK GEMMs stream weights at ~3 GB/s for a few rows ([8, 768] x [768, 2048]), its
# Eigen path at ~6: batch-8 decode steps were ~1.5x faster without YNN, batch 1 ~10% slower (only
# batch 1 and 8 were measured; 4 is a guess at the crossover).
_CPU_BATCHED_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def question_keys(seed: int, questions: Sequence[int], streams: Sequence[int] | int = 0) -> Array:
    """`[n]` sampling keys, `fold_in(fold_in(key(seed), question), stream)` for each question index (and
    stream: an attempt, a second turn). Passed as `Engine.prefill(row_keys=)`, they make a question sample
    the same tokens whatever batch it is in.

    Example:
        >>> engine.generate(params, batch, max_new_tokens=64, temperature=1.0, row_keys=question_keys(0, [4, 5]))
    """
    q = np.asarray(questions, np.int32)
    s = np.broadcast_to(np.asarray(streams, np.int32), q.shape)
    return _question_keys(jax.random.key(seed), q, s)


@jax.jit
def _question_keys(base: Array, questions: Array, streams: Array) -> Array:
    return jax.vmap(lambda i, a: jax.random.fold_in(jax.random.fold_in(base, i), a))(questions, streams)


@functools.partial(jax.jit, static_argnums=1)
def _default_row_keys(rng: Array, batch: int) -> Array:
    return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(batch))


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_len`, plus `max_len` itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


@dataclasses.dataclass
class Generation:
    """Host-side result of `Engine.generate` for the real (unpadded) rows.

    tokens: `[B, n]` generated ids, pad after EOS / a stop string (as HF's `sequences[:, prompt:]`)
    lengths: `[B]` number of generated tokens kept (EOS included)
    texts: decoded answers (special tokens skipped) when a tokenizer was given
    state: the final decode state (continue it with `extend` / `decode`)
    """

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str] | None
    state: DecodeState


class Engine:
    """Jitted decode steps for one model, batch size and cache length.

    model: a jaxvlm Flax module (`Llava`, `DecoderLM`, Qwen2-VL, ...); its `cfg` (or `cfg.text`) is
        the LM config used to size the cache.
    batch_size, max_len: compiled batch rows and KV-cache slots (prompt + answer must fit).
    sampler: static sampling settings; the temperature is per call (0 = greedy).
    hooks: what a method needs from each step (see `jaxvlm.generate.hooks`).
    buckets: allowed padded prompt/chunk lengths (default: powers of two up to max_len).
    mrope: feed `[3, B, T]` positions (default: the LM config has an `mrope_section`).
    positions: default text positions when a batch brings none. "mask" (default): count real tokens
        (`cumsum(mask) - 1`, as HF's LLaVA / Qwen2 `generate`). "slots": the column index in the
        caller's (left-padded) prompt, padding included, continuing one per generated token: what
        Qwen-VL-Chat's original code uses for RoPE and logn. The engine's own bucket padding is not
        counted, so a prompt decodes the same in any bucket.
    unroll_layers: decode with the LM's layers unrolled (`scan_layers=False`: one buffer per layer's
        weights and KV cache). A scanned step copies every layer's weights and cache slice out of
        the stacked arrays per token; unrolled decoding was 1.4-2.3x faster here (more compile time,
        linear in depth). The engine converts scanned params on first use (`prepare`, a copy of the
        LM weights it keeps while the same params object comes back); pass `engine.prepare(params)`
        and drop the scanned copy to hold the weights once.
    Models whose LM config sets `rope_ntk_len` (Qwen-VL-Chat's dynamic NTK) get `ntk_seq_len` fixed
    at each prefill/extend to that turn's largest position + 1 (`DecodeState.ntk_seq_len`) and kept
    through the decode steps, as the original keeps the prefill's NTK alpha. With "slots" that is the
    caller's unpadded prompt length (the original's `input_ids.shape[1]`).

    Example (Qwen-VL-Chat, as the original decodes):
        >>> engine = Engine(QwenVL(cfg), batch_size=1, max_len=512, positions="slots")
    """

    def __init__(self, model, *, batch_size: int, max_len: int, sampler: SamplerConfig = SamplerConfig(),
                 hooks: Hooks = Hooks(), buckets: Sequence[int] | None = None, mrope: bool | None = None,
                 cache_dtype: Any = None, positions: str = "mask", unroll_layers: bool = True):
        if positions not in ("mask", "slots"):
            raise ValueError(f"positions must be 'mask' or 'slots', got {positions!r}")
        text_cfg = getattr(model.cfg, "text", model.cfg)
        if unroll_layers and text_cfg.scan_layers:
            text_cfg = text_cfg.replace(scan_layers=False)
            model = model.clone(cfg=model.cfg.replace(text=text_cfg) if hasattr(model.cfg, "text") else text_cfg)
        self.model, self.text_cfg = model, text_cfg
        self._prepared: tuple[Any, Any] | None = None
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        self.sampler, self.hooks = sampler, hooks
        self.buckets = tuple(sorted(set(buckets or default_buckets(self.max_len))))
        self.mrope = (getattr(self.text_cfg, "mrope_section", None) is not None) if mrope is None else mrope
        if positions == "slots" and self.mrope:
            raise ValueError("positions='slots' is for 1-D rotary models (Qwen-VL-Chat); M-RoPE models take "
                             "explicit `positions` (e.g. from qwen2_vl.rope_index)")
        self.position_mode = positions
        self.fixed_ntk = getattr(self.text_cfg, "rope_ntk_len", None) is not None
        self.cache_dtype = cache_dtype
        n_layers = self.text_cfg.num_layers
        for i in hooks.lens_layers:
            if not 0 <= i <= n_layers:
                raise ValueError(f"lens layer {i} out of range: hidden-state indices are 0..{n_layers} "
                                 f"(0 = embeddings, i = output of layer i)")
        if hooks.attention_layer is not None and not -n_layers <= hooks.attention_layer < n_layers:
            raise ValueError(f"attention_layer {hooks.attention_layer} out of range for {n_layers} layers")
        # Engines with the same model config and settings share compiled steps (a CLI run, or a method
        # that builds an engine per call, compiles once per process).
        key = (type(model), getattr(model, "cfg", id(model)), self.batch_size, self.max_len, sampler, hooks,
               self.buckets, self.mrope, str(cache_dtype), positions)
        if key not in _COMPILED:
            decode_opts = _CPU_BATCHED_DECODE_OPTIONS if (
                jax.default_backend() == "cpu" and self.batch_size >= 4) else None
            _COMPILED[key] = (jax.jit(self._empty_impl), jax.jit(self._extend_impl),
                              jax.jit(self._decode_impl, compiler_options=decode_opts), jax.jit(self._rollback_impl))
        self._empty, self._extend, self._decode, self._rollback = _COMPILED[key]

    def prepare(self, params):
        """`params` in the layout the engine's model takes: scanned LM layers are unstacked once
        (`llama.unstack_layers`) when the engine unrolls them; already-prepared params pass through."""
        if self.text_cfg.scan_layers or not has_stacked_layers(params):
            return params
        if self._prepared is None or self._prepared[0] is not params:
            self._prepared = (params, unstack_layers(params))
        return self._prepared[1]

    # ------------------------------------------------------------------ pure (traced) pieces

    def _model_positions(self, pos: Array) -> Array:
        """`[B, T]` text positions -> what the model's rotary wants."""
        return jnp.broadcast_to(pos[None], (3,) + pos.shape) if self.mrope else pos

    def _forward(self, params, state: DecodeState, ids: Array, mask: Array, pixel_values, positions,
                 extra: Mapping[str, Array], *, new_turn: bool, want_attention: bool) -> DecodeState:
        """Run a chunk `ids [B, T]` (left-padded within the chunk: `mask [B, T]`) at slots
        `length .. length+T-1` and leave the next-token logits of its last position in the state."""
        hooks, t = self.hooks, ids.shape[1]
        start = state.length
        mask = mask.astype(jnp.int32)
        if positions is None:
            pos = state.next_pos[:, None] + jnp.cumsum(mask, axis=-1) - 1
            pos = jnp.where(mask > 0, pos, 0)
            model_pos = self._model_positions(pos)
        else:
            positions = positions.astype(jnp.int32)
            pos = positions if positions.ndim == 2 else jnp.max(positions, axis=0)
            model_pos = self._model_positions(positions) if positions.ndim == 2 else positions
        kv_mask = jax.lax.dynamic_update_slice(state.kv_mask, mask, (0, start))
        kw: dict[str, Any] = dict(attention_mask=kv_mask, positions=model_pos, cache=state.cache,
                                  cache_index=start, logits="last", **extra)
        ntk = state.ntk_seq_len
        if self.fixed_ntk:
            if new_turn:
                ntk = (jnp.max(jnp.where(mask > 0, pos, -1)) + 1).astype(jnp.int32)
            kw["ntk_seq_len"] = ntk
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values
        if hooks.lens_layers:
            kw["output_hidden_states"] = True
        if want_attention and hooks.attention_layer is not None:
            kw["attn_layers"] = (hooks.attention_layer,)
        out = self.model.apply({"params": params}, ids, **kw)

        has_tok = jnp.any(mask > 0, axis=-1)
        last_pos = jnp.max(jnp.where(mask > 0, pos, -1), axis=-1)
        new = dict(
            cache=out.cache,
            kv_mask=kv_mask,
            ids=jax.lax.dynamic_update_slice(state.ids, ids.astype(jnp.int32), (0, start)),
            positions=jax.lax.dynamic_update_slice(state.positions, pos, (0, start)),
            length=start + t,
            next_pos=jnp.where(has_tok, last_pos + 1, state.next_pos),
            logits=out.logits[:, -1].astype(jnp.float32),
            ntk_seq_len=ntk,
        )
        if hooks.lens_layers:
            h = out.hidden_states[jnp.asarray(hooks.lens_layers), :, -1]               # [n, B, D]
            lens = self.model.apply({"params": params}, h, hooks.lens_norm, method="logit_lens")
            new["layer_logits"] = lens.astype(jnp.float32)
        img = getattr(out, "image_token_mask", None)
        if img is not None:
            new["image_slots"] = jax.lax.dynamic_update_slice(state.image_slots, img & (mask > 0), (0, start))
        if want_attention and hooks.attention_layer is not None:
            new["prompt_attention"] = out.attentions[0][:, :, -1, :].astype(jnp.float32)
        if new_turn:
            new["gen_start"] = start + t
            new["finished"] = jnp.where(has_tok, False, state.finished) | ~state.active
        return state.replace(**new)

    def _empty_impl(self, active, temperature, rng, row_keys) -> DecodeState:
        cache = init_cache(self.text_cfg, self.batch_size, self.max_len, self.cache_dtype)
        n_heads = self.text_cfg.num_heads if self.hooks.attention_layer is not None else None
        state = empty_state(cache, self.text_cfg.vocab_size, batch=self.batch_size, n_lens=len(self.hooks.lens_layers),
                            n_tracked=len(self.hooks.track_token_ids), num_heads=n_heads, rng=rng,
                            pad_token_id=self.sampler.pad_token_id)
        return state.replace(active=active, finished=~active, temperature=temperature, row_keys=row_keys)

    def _extend_impl(self, params, state, ids, mask, pixel_values, positions, extra):
        # prefill is an extend of an empty state: one compiled function per chunk bucket serves both
        return self._forward(params, state, ids, mask, pixel_values, positions, extra, new_turn=True,
                             want_attention=True)

    def _step_impl(self, params, state: DecodeState) -> DecodeState:
        cfg, hooks = self.sampler, self.hooks
        b, s = state.ids.shape
        slot = state.length
        scores = state.logits
        if hooks.rule is not None:
            key = jax.random.fold_in(jax.random.fold_in(state.rng, _RULE_STREAM), slot)
            scores = hooks.rule(state, StepOutputs(state.logits, state.layer_logits, key))
        seen = (jnp.arange(s)[None] < slot) & (state.kv_mask > 0)
        scores = process_logits(cfg, scores, state.ids, seen, slot - state.gen_start)
        keys = jax.vmap(jax.random.fold_in)(state.row_keys, state.next_pos)
        tok = select(cfg, scores, state.temperature, keys)
        live = ~state.finished
        tok = jnp.where(live, tok, cfg.pad_token_id)

        raw = jax.nn.log_softmax(state.logits, axis=-1)
        upd = dict(token_logprobs=state.token_logprobs.at[:, slot].set(
            jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0]))
        if hooks.track_token_ids:
            probs = jnp.exp(raw[:, jnp.asarray(hooks.track_token_ids)])
            upd["tracked_probs"] = state.tracked_probs.at[:, slot].set(probs)
        finished = state.finished
        if cfg.eos_token_ids:
            finished = finished | jnp.isin(tok, jnp.asarray(cfg.eos_token_ids))
        state = state.replace(finished=finished, **upd)
        # A finished row's pad token goes into a masked slot, so a later turn never attends to it.
        return self._forward(params, state, tok[:, None], live[:, None], None, None, {}, new_turn=False,
                             want_attention=False)

    def _decode_impl(self, params, state: DecodeState, max_new_tokens: Array) -> DecodeState:
        start, s = state.length, state.ids.shape[1]

        def cond(st):
            return (~jnp.all(st.finished)) & (st.length - start < max_new_tokens) & (st.length < s)

        return jax.lax.while_loop(cond, lambda st: self._step_impl(params, st), state)

    def _rollback_impl(self, params, state: DecodeState, length: Array) -> DecodeState:
        s = state.ids.shape[1]
        last = length - 1                     # the slot re-run to get the logits after `length` slots
        slots = jnp.arange(s)[None]
        keep = (slots < last) & (state.kv_mask > 0)
        tok = jax.lax.dynamic_slice_in_dim(state.ids, last, 1, axis=1)
        m = jax.lax.dynamic_slice_in_dim(state.kv_mask, last, 1, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(state.positions, last, 1, axis=1)
        gen_start = jnp.minimum(state.gen_start, length)
        finished = ~state.active
        if self.sampler.eos_token_ids:
            eos = jnp.isin(state.ids, jnp.asarray(self.sampler.eos_token_ids))
            in_answer = (slots >= gen_start) & (slots < length) & (state.kv_mask > 0)
            finished = finished | jnp.any(eos & in_answer, axis=-1)
        state = state.replace(
            kv_mask=jnp.where(keep, state.kv_mask, 0), length=last, gen_start=gen_start, finished=finished,
            next_pos=jnp.max(jnp.where(keep, state.positions, -1), axis=-1) + 1)
        return self._forward(params, state, tok, m, None, self._model_positions(pos), {}, new_turn=False,
                             want_attention=False)

    # ------------------------------------------------------------------ host-side entry points

    def _bucket(self, n: int, room: int) -> int:
        for b in self.buckets:
            if n <= b <= room:
                return b
        return n

    def _check_batch(self, b: int, what: str) -> None:
        if b > self.batch_size:
            raise ValueError(f"{what} has {b} rows but this engine was compiled for batch_size={self.batch_size}; "
                             f"split the batch or build an Engine with a larger batch_size")

    def _prepare_chunk(self, input_ids, attention_mask, positions, used: int, reserve: int, what: str):
        """numpy: drop all-pad leading columns, left-pad to a bucket and pad rows to the batch size."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"{what}: input_ids must be [batch, seq], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"{what}: attention_mask {mask.shape} does not match input_ids {ids.shape}")
        pos = None if positions is None else np.asarray(positions)
        self._check_batch(ids.shape[0], what)
        if not np.all(mask[:, -1] > 0):
            raise ValueError(f"{what}: every row must end with a real token (pad on the left); "
                             f"rows {np.nonzero(mask[:, -1] == 0)[0].tolist()} end with padding")
        first = int(np.argmax(np.any(mask > 0, axis=0)))
        ids, mask = ids[:, first:], mask[:, first:]
        pos = None if pos is None else pos[..., first:]
        b, t = ids.shape
        room = self.max_len - used
        if t + reserve > room:
            raise ValueError(f"{what}: {t} tokens (+{reserve} to generate) do not fit the decode cache: "
                             f"max_len={self.max_len} slots, {used} already used; build the Engine with a "
                             f"larger max_len or shorten the prompt")
        tb = self._bucket(t, room - reserve)
        pad_t, pad_b = tb - t, self.batch_size - b
        pad = self.sampler.pad_token_id
        ids = np.pad(ids, ((0, pad_b), (pad_t, 0)), constant_values=pad).astype(np.int32)
        mask = np.pad(mask, ((0, pad_b), (pad_t, 0))).astype(np.int32)
        mask[b:, -1] = 1   # inactive filler rows run one pad token so their forward is well defined
        if pos is not None:
            widths = [(0, 0)] * (pos.ndim - 2) + [(0, pad_b), (pad_t, 0)]
            pos = np.pad(pos, widths).astype(np.int32)
        active = np.arange(self.batch_size) < b
        return ids, mask, pos, active

    def _slot_positions(self, input_ids, positions, state: DecodeState | None):
        """positions='slots' without explicit positions: `[B, T]` caller columns, after the row's last
        position (0 for a prefill), padding included."""
        if positions is not None or self.position_mode != "slots" or np.ndim(input_ids) != 2:
            return positions     # (a bad shape is reported by `_prepare_chunk`)
        b, t = np.shape(input_ids)
        start = np.zeros((b, 1), np.int32) if state is None else np.asarray(state.next_pos)[:b, None]
        return (start + np.arange(t, dtype=np.int32)[None]).astype(np.int32)

    def prefill(self, params, batch: Mapping[str, Any], *, temperature: float | Sequence[float] = 0.0,
                rng: Array | int | None = None, row_keys: Array | None = None, reserve: int = 0) -> DecodeState:
        """Encode a prompt batch into a fresh state whose `logits` predict the first answer token.

        batch: `input_ids [B, T]` (left-padded), optional `attention_mask [B, T]`, `pixel_values`
            (the model's layout), `positions` (`[B, T]` or M-RoPE `[3, B, T]`; default from the mask);
            any other key is passed to the model (e.g. `image_grid_thw`).
        temperature: scalar or per row; 0 = greedy. rng: key or int seed for sampling (row r draws from
            `fold_in(rng, r)`). row_keys: optional `[B]` keys (`jax.random.key` array), one per given row,
            instead: a row then samples the same tokens whatever batch it is in.
        reserve: slots to keep free for the answer (chooses a smaller bucket if needed).
        """
        batch = dict(batch)
        positions = self._slot_positions(batch["input_ids"], batch.pop("positions", None), None)
        ids, mask, pos, active = self._prepare_chunk(batch.pop("input_ids"), batch.pop("attention_mask", None),
                                                     positions, 0, reserve, "prompt")
        pix = batch.pop("pixel_values", None)
        if isinstance(rng, int) or rng is None:
            rng = jax.random.key(0 if rng is None else rng)
        self._check_inputs(ids, pix, batch)
        state = self._empty(jnp.asarray(active), self._temperature(temperature), rng,
                            self._row_keys(rng, row_keys, int(np.sum(active))))
        return self._extend(self.prepare(params), state, ids, mask, None if pix is None else jnp.asarray(pix), pos,
                            batch)

    def extend(self, params, state: DecodeState, input_ids, attention_mask=None, *, pixel_values=None,
               positions=None, reserve: int = 0, **model_kwargs) -> DecodeState:
        """Append `input_ids [B, T]` (left-padded within the chunk) after the current tokens, e.g. the
        next chat turn with its images, and start a new answer after them."""
        positions = self._slot_positions(input_ids, positions, state)
        ids, mask, pos, _ = self._prepare_chunk(input_ids, attention_mask, positions, int(state.length), reserve,
                                                "extend")
        self._check_inputs(ids, pixel_values, model_kwargs)
        pix = None if pixel_values is None else jnp.asarray(pixel_values)
        return self._extend(self.prepare(params), state, ids, mask, pix, pos, model_kwargs)

    def _check_inputs(self, ids, pixel_values, model_kwargs) -> None:
        # The models' own checks are skipped under jit, so run them here on the concrete chunk.
        check = getattr(self.model, "check_inputs", None)
        if check is not None:
            check(ids, pixel_values, **model_kwargs)

    def step(self, params, state: DecodeState) -> DecodeState:
        """Choose one token per row and run it (the compiled `decode` loop run for one step; a
        no-op once every row has finished)."""
        if int(state.length) >= self.max_len:
            raise ValueError(f"the decode cache is full ({self.max_len} slots)")
        return self._decode(self.prepare(params), state, jnp.asarray(1, jnp.int32))

    def decode(self, params, state: DecodeState, max_new_tokens: int) -> DecodeState:
        """Up to `max_new_tokens` more tokens (fewer if every row finishes or the cache fills)."""
        return self._decode(self.prepare(params), state, jnp.asarray(max_new_tokens, jnp.int32))

    def rollback(self, params, state: DecodeState, length: int, *,
                 temperature: float | Sequence[float] | None = None) -> DecodeState:
        """Truncate to the first `length` slots (prompt included) and recompute the next-token logits
        there, optionally with a new temperature. Equivalent to prefilling those tokens afresh."""
        n = int(state.length)
        if not 1 <= int(length) <= n:
            raise ValueError(f"rollback length {length} must be in 1..{n} (the current length)")
        if temperature is not None:
            state = state.replace(temperature=self._temperature(temperature))
        return self._rollback(self.prepare(params), state, jnp.asarray(length, jnp.int32))

    def with_temperature(self, state: DecodeState, temperature) -> DecodeState:
        return state.replace(temperature=self._temperature(temperature))

    def _row_keys(self, rng: Array, given: Array | None, n: int) -> Array:
        """`[batch_size]` sampling keys: `given` for the first `n` rows, `fold_in(rng, row)` elsewhere."""
        keys = _default_row_keys(rng, self.batch_size)
        if given is None:
            return keys
        given = jnp.asarray(given)
        if given.shape != (n,) or not jnp.issubdtype(given.dtype, jax.dtypes.prng_key):
            raise ValueError(f"row_keys must be one jax.random.key per given row ({n}), "
                             f"got {given.dtype} {given.shape}")
        return keys.at[:n].set(given)

    def _temperature(self, t) -> Array:
        t = np.broadcast_to(np.asarray(t, np.float32), (self.batch_size,)) if np.ndim(t) == 0 else \
            np.pad(np.asarray(t, np.float32), (0, self.batch_size - len(t)))
        if np.any(t < 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {t}")
        return jnp.asarray(t)

    def generate(self, params, batch: Mapping[str, Any], *, max_new_tokens: int, temperature=0.0,
                 rng: Array | int | None = None, row_keys: Array | None = None,
                 stop_strings: Sequence[str] = (), tokenizer=None,
                 check_every: int = 32) -> Generation:
        """Prefill + decode with host-side stop strings (checked every `check_every` tokens on the
        decoded text; the answer is cut after the token that completes the string, which is kept,
        as HF's `StopStringCriteria` does)."""
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the text")
        n_rows = np.asarray(batch["input_ids"]).shape[0]
        state = self.prefill(params, batch, temperature=temperature, rng=rng, row_keys=row_keys,
                             reserve=max_new_tokens)
        start = int(state.gen_start)
        cut = np.full(self.batch_size, -1)
        done = 0
        while done < max_new_tokens and not bool(jnp.all(state.finished)):
            chunk = min(check_every, max_new_tokens - done) if stop_strings else max_new_tokens - done
            state = self.decode(params, state, chunk)
            done = int(state.length) - start
            if stop_strings:
                state, cut = self._apply_stop_strings(state, start, stop_strings, tokenizer, cut)
        ids, mask = state.generated(start)
        ids = np.where(mask > 0, ids, self.sampler.pad_token_id)
        for r in np.nonzero(cut >= 0)[0]:
            ids[r, cut[r]:] = self.sampler.pad_token_id
            mask[r, cut[r]:] = 0
        ids, lengths = ids[:n_rows], mask[:n_rows].sum(-1)
        texts = None
        if tokenizer is not None:
            texts = [tokenizer.decode(ids[r, :lengths[r]], skip_special_tokens=True) for r in range(n_rows)]
        return Generation(tokens=ids, lengths=lengths, texts=texts, state=state)

    def _apply_stop_strings(self, state, start, stop_strings, tokenizer, cut):
        ids, mask = state.generated(start)
        finished = np.asarray(state.finished).copy()
        for r in range(self.batch_size):
            if cut[r] >= 0 or not state.active[r]:
                continue
            row = ids[r][mask[r] > 0]
            text = tokenizer.decode(row, skip_special_tokens=False)
            if not any(s in text for s in stop_strings):
                continue
            # smallest prefix whose text contains a stop string
            n = next(k for k in range(1, len(row) + 1)
                     if any(s in tokenizer.decode(row[:k], skip_special_tokens=False) for s in stop_strings))
            cut[r] = n
            finished[r] = True
        return state.replace(finished=jnp.asarray(finished)), cut
