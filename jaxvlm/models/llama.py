"""Decoder-only language model: Llama-2 / Vicuna, Llama-3.1, Qwen2 (and the LM of Qwen2-VL /
Qwen2.5-VL) from one module with config switches. Layers are scanned (`nn.scan`), so compile
time does not grow with depth and every layer parameter has a leading `layers` axis.

For decoding, `scan_layers=False` unrolls the layers instead (params `layers_0 .. layers_{L-1}`,
KV cache one buffer per layer; `unstack_layers` / `stack_layers` convert params): a scanned
decode step copies each layer's weight and cache slice out of the stacked arrays on every token
(XLA CPU), which cost about half of a decode step here. The generation engine does this itself.

Example:
    >>> from jaxvlm.models.params import init_params
    >>> cfg = LMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    ...                num_heads=4, num_kv_heads=2)
    >>> model = DecoderLM(cfg)
    >>> params = init_params(model, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    >>> out = model.apply({"params": params}, jnp.ones((1, 8), jnp.int32), output_hidden_states=True)
    >>> out.logits.shape, out.hidden_states.shape       # ((1, 8, 128), (3, 1, 8, 64))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.models import layers as L

Array = jax.Array

def _freeze(d: Mapping | None):
    """Dict -> sorted tuple of items, so configs stay hashable (usable as static jit args)."""
    if d is None:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None          # frozen dict items, e.g. llama3 parameters
    mrope_section: tuple[int, ...] | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False                     # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    dtype: str = "float32"                     # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"                        # key of layers.REMAT_POLICIES
    attn_impl: str = "xla"                     # "xla" | "auto" | "cudnn" (see layers.dot_attention)
    family: str = "llama"                      # "llama" | "qwen2"
    # QWen (Qwen-VL v1) inference-only extras, off by default; both use the original's seq_length.
    logn_attn_len: int | None = None           # queries at absolute position p >= this scaled by log_len(p+1)
    rope_ntk_len: int | None = None            # dynamic NTK: alpha from the prefill length (layers.qwen_ntk_inv_freq)
    scan_layers: bool = True                   # False: unrolled layers_i params, per-layer KV cache (decoding)

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat not in L.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; known: {sorted(L.REMAT_POLICIES)}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(self.mrope_section))

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> "LMConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "LMConfig":
        """From a transformers text config (object or dict; v4 `rope_theta/rope_scaling` or v5
        `rope_parameters` schema). `model_type` picks the family."""
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or None
        if rope and rope.get("rope_type", "default") not in ("default", None):
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        elif scaling is None and rope.get("mrope_section") is not None:
            scaling = None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "mrope_section")}
            if scaling.get("rope_type", scaling.get("type")) in (None, "default", "mrope"):
                scaling = None
        mrope = rope.get("mrope_section") or (d.get("rope_scaling") or {}).get("mrope_section")
        model_type = d.get("model_type", "llama")
        family = "qwen2" if model_type.startswith("qwen2") else "llama"
        kw = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=_freeze(scaling), mrope_section=tuple(mrope) if mrope else None,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            qkv_bias=bool(d.get("attention_bias", False)) or family == "qwen2",
            o_bias=bool(d.get("attention_bias", False)) and family == "llama",
            mlp_bias=bool(d.get("mlp_bias", False)), hidden_act=d.get("hidden_act", "silu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), family=family,
        )
        kw.update(overrides)
        return cls(**kw)


@flax.struct.dataclass
class LMOutput:
    """What one LM call returns. Optional fields are None unless requested.

    logits:        `[B, T, V]` (or `[B, 1, V]` with `logits="last"`)
    hidden_states: `[L+1, B, T, D]`: index 0 = embeddings, index i = output of layer i (before the
                   final norm; HF's tuple instead puts the final-norm state at index L)
    final_hidden:  `[B, T, D]` after the final norm (what `lm_head` sees)
    attentions:    `[len(attn_layers), B, H, T, S]` probabilities of the requested layers
    cache:         updated KV cache `(k, v)`, each `[L, B*K, S, Dh]`
    """

    logits: Array | None
    final_hidden: Array
    hidden_states: Array | None = None
    attentions: Array | None = None
    cache: tuple[Array, Array] | None = None


def causal_query_blocks(t: int, block: int = 48, most: int = 8) -> int:
    """How many causal query blocks a cacheless forward of length `t` uses: about `block` queries
    each, at most `most` (1 = one full attention, short sequences); blocks need not divide `t`
    (`layers.dot_attention` spreads the edges). At t=1024 that is 8 blocks of 128 (a little faster
    than 4 of 256 on the forward bench); 48 makes the demo's t=192 train step use 4 blocks, its
    attention backward ~2x faster than one full attention."""
    return max(min(most, t // block), 1)


class DecoderBlock(nn.Module):
    """One pre-norm decoder layer; scanned over layers by `DecoderLM`.

    carry: dict(h [B,T,D], i layer index, optional attn buffer). The KV cache `[L,B*K,S,Dh]` comes in
    read-only (broadcast); each layer emits only its T new keys/values, and `DecoderLM` writes them
    into the cache with one update after the scan, so a decode step moves T slots, not the cache.
    Unrolled (`scan_layers=False`), `cache` is this layer's own `(k, v)`, each `[B*K,S,Dh]`, and the
    block returns it updated (no second copy of the buffer is kept alive).
    """

    cfg: LMConfig
    attn_layers: tuple[int, ...] = ()
    output_hidden_states: bool = False
    causal_blocks: int = 1       # see `layers.dot_attention`; > 1 only for cacheless forwards

    @nn.compact
    def __call__(self, carry: dict, cos, sin, mask, cache_index, q_scale=None, cache=None):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        h, i = carry["h"], carry["i"]
        unrolled = cache is not None and cache[0].ndim == 3     # this layer's own [B*K, S, Dh] buffers
        layer_cache = None
        if cache is not None:
            layer_cache = cache if unrolled else (cache[0][i], cache[1][i])
        x = L.RMSNorm(cfg.rms_norm_eps, dtype=dt, param_dtype=pdt, name="input_layernorm")(h)
        attn_out, probs, new_cache = L.Attention(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias, out_bias=cfg.o_bias,
            impl=cfg.attn_impl, dtype=dt, param_dtype=pdt, name="self_attn",
        )(x, cos, sin, mask, layer_cache, cache_index, return_probs=bool(self.attn_layers), q_scale=q_scale,
          causal_blocks=self.causal_blocks)
        h = h + attn_out
        x = L.RMSNorm(cfg.rms_norm_eps, dtype=dt, param_dtype=pdt, name="post_attention_layernorm")(h)
        h = h + L.GatedMLP(cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, dtype=dt, param_dtype=pdt,
                           name="mlp")(x)
        h = L.constrain(h, ("batch", "seq", "embed"))
        out = dict(carry, h=h, i=i + 1)
        new_kv = None
        if unrolled:
            new_kv = new_cache   # this layer's updated buffers, written in place
        elif new_cache is not None:
            t = h.shape[1]
            new_kv = tuple(jax.lax.dynamic_slice_in_dim(c, cache_index, t, axis=1) for c in new_cache)
        if self.attn_layers:
            buf = carry["attn"]
            for j, layer in enumerate(self.attn_layers):
                buf = buf.at[j].set(jnp.where(i == layer, probs.astype(buf.dtype), buf[j]))
            out["attn"] = buf
        return out, (h if self.output_hidden_states else None, new_kv)


class DecoderLM(nn.Module):
    """Token embeddings -> scanned decoder blocks -> final RMSNorm -> lm_head."""

    cfg: LMConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.norm = L.RMSNorm(cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = L.Linear(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.dtype(cfg.dtype),
                                    param_dtype=jnp.dtype(cfg.param_dtype))

    def embed(self, input_ids: Array) -> Array:
        """`[B, T]` ids -> `[B, T, D]` embeddings."""
        # The table's embed shards are gathered first (as FSDP gathers any weight before use): a
        # lookup in the sharded table gives rows split along D over the axis the batch also uses,
        # which XLA can only reach the batch-sharded activations from by replicating them whole.
        table = L.constrain(self.embed_tokens.embedding, ("vocab", None))
        rows = jnp.take(table, input_ids, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return L.constrain(rows, ("batch", "seq", "embed"))

    def head(self, h: Array) -> Array:
        """`lm_head` on states that are already normed."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def logit_lens(self, hidden: Array, apply_norm: bool = True) -> Array:
        """Vocabulary logits of any layer's state `[..., D]` (UE reads them *without* the norm)."""
        return self.head(self.norm(hidden) if apply_norm else hidden)

    def rotary(self, positions: Array, ntk_seq_len: Array | int | None = None) -> tuple[Array, Array]:
        """cos/sin for `positions`; with `cfg.rope_ntk_len` and an `ntk_seq_len`, QWen dynamic NTK."""
        cfg = self.cfg
        inv_freq, scale = L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        if cfg.rope_ntk_len is not None and ntk_seq_len is not None:
            inv_freq = L.qwen_ntk_inv_freq(cfg.head_dim, cfg.rope_theta, ntk_seq_len, cfg.rope_ntk_len)
        return L.rope_cos_sin(positions, inv_freq, scale, cfg.mrope_section)

    @nn.compact  # the scanned blocks are built here: their flags depend on what the call asks for
    def __call__(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
                 positions: Array | None = None, attention_mask: Array | None = None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | int | None = None,
                 output_hidden_states: bool = False, attn_layers: Sequence[int] = (),
                 logits: str = "all", ntk_seq_len: Array | int | None = None, train: bool = False) -> LMOutput:
        """Run the LM.

        input_ids `[B, T]` or inputs_embeds `[B, T, D]`.
        attention_mask: `[B, T]` (no cache) or `[B, S]` over cache slots (with cache), 1 = real token;
            without a cache also segment ids 1, 2, ... of the samples packed in a row (0 = padding): each
            token attends within its own sample only.
        positions: `[B, T]` (or `[3, B, T]` M-RoPE); default each token's place in its segment, which for a
            0/1 mask is `cumsum(mask) - 1` as HF `generate` does.
        cache: `(k, v)` each `[L, B*K, S, Dh]` (`scan_layers=False`: each a tuple of L `[B*K, S, Dh]`);
            the T new tokens are written at slots `cache_index .. cache_index + T - 1` and attend to
            every valid earlier slot.
        attn_layers: layers whose attention probabilities are returned (`[n, B, H, T, S]`).
        logits: "all" | "last" (only the final position) | "none".
        ntk_seq_len: with `cfg.rope_ntk_len`, the length that fixes the NTK alpha: pass the prefill
            length on every decoding step (as the original caches it); default: the slots seen so
            far (`cache_index + T`, i.e. T without a cache).
        train: training mode, which (as QWen's `self.training`) turns off logn scaling and NTK.
        """
        cfg = self.cfg
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
        b, t = h.shape[:2]
        h = L.constrain(h, ("batch", "seq", "embed"))
        if cache is not None:
            if attention_mask is None or cache_index is None:
                raise ValueError("decoding with a cache needs attention_mask over cache slots and cache_index")
            cache_index = jnp.asarray(cache_index, jnp.int32)
            mask = L.causal_mask(cache_index + jnp.arange(t), attention_mask)
        else:
            if attention_mask is None:
                attention_mask = jnp.ones((b, t), jnp.int32)
            mask = L.causal_mask(jnp.arange(t), attention_mask) & L.segment_mask(attention_mask)
        if positions is None:
            if cache is not None:
                raise ValueError("pass explicit positions when decoding with a cache")
            positions = L.segment_positions(attention_mask)
        q_scale = None
        if not train and cfg.rope_ntk_len is not None and ntk_seq_len is None:
            ntk_seq_len = t if cache is None else cache_index + t
        cos, sin = self.rotary(positions, None if train else ntk_seq_len)
        if not train and cfg.logn_attn_len is not None:
            q_scale = L.logn_scale(positions, cfg.logn_attn_len)

        bias = L.mask_bias(mask)     # once here, not once per layer inside the scan
        carry: dict[str, Any] = {"h": h, "i": jnp.zeros((), jnp.int32)}
        attn_layers = tuple(int(a) % cfg.num_layers for a in attn_layers)
        if attn_layers:
            s = mask.shape[-1]
            carry["attn"] = jnp.zeros((len(attn_layers), b, cfg.num_heads, t, s), jnp.float32)

        block = L.remat_block(DecoderBlock, cfg.remat)
        blocks = causal_query_blocks(t) if cache is None else 1
        if cfg.scan_layers:
            scanned = L.scan_layers(block, cfg.num_layers, in_axes=(nn.broadcast,) * 6)
            carry, (ys, new_kv) = scanned(cfg, attn_layers, output_hidden_states, blocks, name="layers")(
                carry, cos, sin, bias, cache_index, q_scale, cache)
            if cache is not None:   # one in-place write of the new slots of every layer
                at = (0, 0, cache_index, 0)
                cache = tuple(jax.lax.dynamic_update_slice(c, n.astype(c.dtype), at) for c, n in zip(cache, new_kv))
        else:
            ys, new_cache = [], []
            for j in range(cfg.num_layers):
                layer_cache = None if cache is None else (cache[0][j], cache[1][j])
                carry, (y, kv) = block(cfg, attn_layers, output_hidden_states, blocks, name=f"layers_{j}")(
                    carry, cos, sin, bias, cache_index, q_scale, layer_cache)
                ys.append(y)
                new_cache.append(kv)
            ys = jnp.stack(ys) if output_hidden_states else None
            cache = None if cache is None else tuple(tuple(kv[i] for kv in new_cache) for i in range(2))
        last = carry["h"]
        final = self.norm(last)
        if logits == "all":
            out_logits = self.head(final)
        elif logits == "last":
            out_logits = self.head(final[:, -1:])
        else:
            out_logits = None
        hidden = jnp.concatenate([h[None], ys], axis=0) if output_hidden_states else None
        return LMOutput(
            logits=out_logits, final_hidden=final, hidden_states=hidden,
            attentions=carry.get("attn"),
            cache=cache,
        )


def init_cache(cfg: LMConfig, batch: int, max_len: int, dtype=None) -> tuple[Array, Array]:
    """Zeroed KV cache `(k, v)`, each `[L, B*K, max_len, Dh]` (`scan_layers=False`: each a tuple of
    L `[B*K, max_len, Dh]` buffers; row b*K + k = batch row b, kv head k). Head-major, so attention
    reads it without a transposing copy."""
    shape = (batch * cfg.num_kv_heads, max_len, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    if not cfg.scan_layers:
        return tuple(tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)) for _ in range(2))
    return jnp.zeros((cfg.num_layers,) + shape, dt), jnp.zeros((cfg.num_layers,) + shape, dt)


def _is_lm(tree: Any) -> bool:
    return isinstance(tree, Mapping) and "embed_tokens" in tree and "norm" in tree


def _map_lms(params: Mapping, fn) -> dict:
    """Apply `fn` to every DecoderLM subtree (the dict holding `embed_tokens` and `norm`)."""
    if _is_lm(params):
        return fn(dict(params))
    return {k: _map_lms(v, fn) if isinstance(v, Mapping) else v for k, v in params.items()}


def has_stacked_layers(params: Mapping) -> bool:
    """Whether some DecoderLM inside `params` has scanned (stacked) layers."""
    if _is_lm(params):
        return "layers" in params
    return any(has_stacked_layers(v) for v in params.values() if isinstance(v, Mapping))


def unstack_layers(params: Mapping) -> dict:
    """Scanned LM params (`layers` with a leading L axis) -> unrolled (`layers_0 .. layers_{L-1}`),
    for a model whose LM config has `scan_layers=False`. Any model's params: every DecoderLM inside
    is converted, vision towers are left alone. Each layer becomes its own buffer (a copy).

    >>> fast = unstack_layers(params)          # then apply Llava(cfg with text.scan_layers=False)
    """
    def unstack(lm: dict) -> dict:
        if "layers" not in lm:
            return lm
        stacked = lm.pop("layers")
        n = jax.tree.leaves(stacked)[0].shape[0]
        lm.update({f"layers_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(n)})
        return lm
    return _map_lms(params, unstack)


def stack_layers(params: Mapping) -> dict:
    """Inverse of `unstack_layers` (for saving, training, conversion or sharding rules that expect
    `layers`); params already stacked pass through, numpy layers stay numpy (host memory)."""
    def stack(lm: dict) -> dict:
        names = sorted((k for k in lm if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
        if not names:
            return lm
        layers = [lm.pop(k) for k in names]
        lm["layers"] = jax.tree.map(lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs),
                                    *layers)
        return lm
    return _map_lms(params, stack)
