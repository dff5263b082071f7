"""Building blocks shared by every family: norms, MLPs, rotary embeddings, attention.

Conventions
- Linear kernels are stored `[in, out]` (PyTorch stores `[out, in]`; conversion transposes).
- Activations are `[batch, seq, features]`; heads are split as `[batch, seq, heads, head_dim]`.
- Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, ...);
  `jaxvlm.train.sharding` maps them onto mesh axes. Without a mesh the names cost nothing.
- Rotary embeddings follow the HF "rotate-half" layout so converted weights need no permutation.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

Array = jax.Array
Dtype = Any

# ----------------------------------------------------------------------------- initialisers


def dense_init(axes: tuple[str, ...], std: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh + rules context)."""
    return nn.with_logical_constraint(x, axes)


@jax.custom_jvp
def linear_matmul(x: Array, kernel: Array) -> Array:
    """`x [..., in] @ kernel [in, out]`, the forward as a plain dot; a custom JVP makes the kernel's
    gradient one 2-D GEMM over `[prod(...), in]`. Left to autodiff, a `[B, T, in]` operand gives a
    kernel gradient that contracts two axes, which XLA CPU runs 2-3x slower (the demo's train step
    went from 0.54x torch to 0.81x: `bench/bench_train.py --shape demo`). A JVP rather than a VJP
    keeps forward-mode (`jax.jvp`, `jax.hessian`) working; its kernel-tangent term is written on the
    2-D view, so its transpose is the 2-D GEMM. The forward keeps the 3-D dot: reshaping there too
    measured 1.14 s vs 1.09 s on the seq-1024 forward bench (within that box's noise, not settled)."""
    return jnp.dot(x, kernel)


def _linear_matmul_jvp(primals, tangents):
    x, kernel = primals
    dx, dk = tangents
    y = jnp.dot(x, kernel)
    parts = []
    if not isinstance(dx, SymbolicZero):
        parts.append(jnp.dot(dx, kernel))
    if not isinstance(dk, SymbolicZero):      # a frozen kernel gets no tangent and costs no GEMM
        parts.append(jnp.dot(x.reshape(-1, x.shape[-1]), dk).reshape(y.shape))
    return y, sum(parts[1:], parts[0]) if parts else jnp.zeros_like(y)


linear_matmul.defjvp(_linear_matmul_jvp, symbolic_zeros=True)


class Linear(nn.Module):
    """`y = x @ kernel (+ bias)` with logical axes on the kernel `[in, out]`."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", dense_init(self.axes), (x.shape[-1], self.features), self.param_dtype)
        y = linear_matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", zeros_init(self.axes[1:]), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Llama/Qwen RMSNorm: statistics in fp32, weight applied after casting back (as HF does)."""

    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", ones_init((self.axis_name,)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias; statistics in fp32."""

    eps: float = 1e-5
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", ones_init((self.axis_name,)), (d,), self.param_dtype)
        bias = self.param("bias", zeros_init((self.axis_name,)), (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


def make_norm(kind: str, eps: float, dtype: Dtype, param_dtype: Dtype, name: str, axis_name: str = "embed"):
    cls = {"rms": RMSNorm, "layer": LayerNorm}[kind]
    return cls(eps=eps, axis_name=axis_name, dtype=dtype, param_dtype=param_dtype, name=name)


# ----------------------------------------------------------------------------- activations / MLPs


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """SwiGLU-style `down(act(gate(x)) * up(x))` (Llama, Qwen2, Qwen2.5-VL vision)."""

    intermediate_size: int
    act: str = "silu"
    use_bias: bool = False
    embed_axis: str = "embed"
    mlp_axis: str = "mlp"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        ax_in, ax_out = (self.embed_axis, self.mlp_axis), (self.mlp_axis, self.embed_axis)
        gate = Linear(self.intermediate_size, ax_in, name="gate_proj", **kw)(x)
        up = Linear(self.intermediate_size, ax_in, name="up_proj", **kw)(x)
        return Linear(x.shape[-1], ax_out, name="down_proj", **kw)(activation(self.act)(gate) * up)


class MLP(nn.Module):
    """Plain `fc2(act(fc1(x)))` (CLIP, LLaVA projector, Qwen2-VL vision)."""

    intermediate_size: int
    out_features: int | None = None
    act: str = "gelu"
    use_bias: bool = True
    names: tuple[str, str] = ("fc1", "fc2")
    embed_axis: str = "embed"
    mlp_axis: str = "mlp"
    out_axis: str | None = None   # logical name of the output features (default: embed_axis)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear(self.intermediate_size, (self.embed_axis, self.mlp_axis), name=self.names[0], **kw)(x)
        out = self.out_features or x.shape[-1]
        axes = (self.mlp_axis, self.out_axis or self.embed_axis)
        return Linear(out, axes, name=self.names[1], **kw)(activation(self.act)(h))


# ----------------------------------------------------------------------------- rotary embeddings


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  rotary_dim: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[rotary_dim/2]` (fp32, computed in fp64 then rounded) and the
    attention scaling factor for a rope variant.

    Variants (`scaling["rope_type"]`): `default`, `linear`, `llama3` (Llama-3.1 wavelength-
    dependent scaling), `dynamic` (NTK: the base is rescaled at run time from the sequence
    length, see `qwen_ntk_inv_freq`; here the unscaled frequencies are returned).
    """
    dim = rotary_dim or head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float64(theta) ** exponent.astype(np.float64))).astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind in ("default", "mrope", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq.astype(np.float64)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    raise ValueError(f"unsupported rope_type {kind!r} (known: default, linear, llama3, dynamic, mrope)")


def qwen_ntk_inv_freq(rotary_dim: int, theta: float, seq_len: Array | int, ntk_len: int) -> Array:
    """QWen (Qwen-VL v1) dynamic NTK, jittable: the base grows by `alpha ** (d / (d - 2))` with
    `alpha = max(2 ** ceil(log2(seq_len / ntk_len) + 1) - 1, 1)` (1, 3, 7, 15, ... per doubling).

    The original fixes alpha from the length of the call without a past (the prefill) and keeps it
    while decoding, so pass the prefill length here, not the growing one. `ceil(log2(.))` is done
    by counting doublings so that exact powers of two never land in the wrong bucket.
    """
    t = jnp.asarray(seq_len, jnp.float32)
    doublings = jnp.sum(float(ntk_len) * 2.0 ** jnp.arange(40, dtype=jnp.float32) < t)
    alpha = jnp.maximum(2.0 ** (doublings + 1.0) - 1.0, 1.0)
    base = theta * alpha ** (rotary_dim / (rotary_dim - 2))
    exponent = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (base ** exponent)


def logn_scale(positions: Array, logn_len: int) -> Array:
    """QWen logn attention: the query at absolute position p is scaled by `log(p+1) / log(logn_len)`
    once `p + 1 > logn_len` (1 before). positions `[B, T]` -> `[B, T]` fp32."""
    p1 = positions.astype(jnp.float32) + 1.0
    return jnp.where(p1 > logn_len, jnp.log(p1) / math.log(logn_len), 1.0)


def rope_cos_sin(positions: Array, inv_freq: Array, scaling: float = 1.0,
                 mrope_section: Sequence[int] | None = None) -> tuple[Array, Array]:
    """cos/sin tables `[B, T, rotary_dim]` in fp32.

    positions: `[B, T]` ints, or `[3, B, T]` (temporal, height, width) for M-RoPE, in which case
    the `head_dim/2` frequencies are split into `mrope_section` chunks, chunk i taking its
    angle from axis i (Qwen2-VL / Qwen2.5-VL).
    """
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if positions.ndim == 3:
        if mrope_section is None or sum(mrope_section) != inv_freq.shape[0]:
            raise ValueError(f"M-RoPE needs mrope_section summing to {inv_freq.shape[0]}, got {mrope_section}")
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, F]
        axis_of = jnp.asarray(np.concatenate([np.full(n, i) for i, n in enumerate(mrope_section)]))
        out = freqs[0]
        for i in range(1, positions.shape[0]):
            out = jnp.where(axis_of == i, freqs[i], out)
        freqs = out
    else:
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, F]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x: `[B, T, H, D]`; cos/sin `[B, T, R]` with R <= D (partial rotary leaves the rest)."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :r], x[..., r:]
    return jnp.concatenate([xr * cos + rotate_half(xr) * sin, xp], axis=-1)


# ----------------------------------------------------------------------------- attention


def heads_major(x: Array) -> Array:
    """`[B, T, K, D]` -> `[B*K, T, D]` (row b*K + k): the KV cache's layout and the attention's
    batched-GEMM operand layout."""
    b, t, k, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * k, t, d)


def dot_attention(q: Array, k: Array, v: Array, mask: Array | None, *, scale: float | None = None,
                  return_probs: bool = False, impl: str = "xla", causal_blocks: int = 1,
                  kv_heads_major: bool = False) -> tuple[Array, Array | None]:
    """Grouped-query scaled dot-product attention, the one attention of the library.

    q: `[B, T, H, D]`, k/v: `[B, S, K, D]` with H a multiple of K; mask broadcastable to
    `[B, 1, T, S]`: bool (True = attend) or an additive fp32 bias from `mask_bias` (what the decoder
    passes: built once per forward, not once per layer). Softmax in fp32. Returns
    `([B, T, H, D], probs [B, H, T, S] | None)`. kv_heads_major: k/v come as `[B*K, S, D]` (the KV
    cache's layout, which decoding then reads without a transposing copy per layer and step; one
    batch axis, so XLA CPU need not bitcast the updated cache and copy it for a second consumer).
    `impl="cudnn"`/`"auto"` uses `jax.nn.dot_product_attention` (fused kernels on GPU) when no
    probabilities are requested.
    causal_blocks: > 1 promises that `mask` is causal over aligned slots (query t sees keys <= t,
    T == S): queries are split into that many near-equal blocks (any T) and each skips the keys after its last query,
    about half the score/softmax work at long T (ignored when probabilities are requested or there
    is no mask). Query rows that see no key at all (left padding) get a different but equally
    meaningless output than without blocks.
    """
    b, t, h, d = q.shape
    if causal_blocks > 1 and mask is not None and not return_probs and not kv_heads_major and t == k.shape[1]:
        # Block edges spread evenly (sizes differ by at most one), so any length gets the blocks: a
        # prime length (e.g. 773) would otherwise fall back to one full attention at twice the work.
        edges = [round(i * t / causal_blocks) for i in range(causal_blocks + 1)]
        full = jnp.broadcast_to(mask, (mask.shape[0], 1, t, t))
        outs = [dot_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], full[:, :, lo:hi, :hi], scale=scale, impl=impl)[0]
                for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
        return jnp.concatenate(outs, axis=1), None
    kh, vh = (k, v) if kv_heads_major else (heads_major(k), heads_major(v))
    kvh, s = kh.shape[0] // b, kh.shape[1]
    scale = d ** -0.5 if scale is None else scale
    is_bias = mask is not None and mask.dtype != jnp.bool_
    if impl != "xla" and not return_probs:
        if kv_heads_major:
            k, v = (x.reshape(b, kvh, s, d).transpose(0, 2, 1, 3) for x in (kh, vh))
        out = jax.nn.dot_product_attention(q, k, v, bias=mask if is_bias else None,
                                           mask=None if is_bias else mask, scale=scale,
                                           implementation=None if impl == "auto" else impl)
        return out, None
    g = h // kvh
    # Head-major operands ([B*K, G*T, D] x [B*K, S, D]): plain batched GEMMs. The 5-D einsum
    # this replaces let XLA CPU pick transposed layouts for the scores, 1.3-3.4x slower in total.
    # Scaling q ([T, D]) rather than the scores ([T, S]) is the cheaper multiply.
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kvh, g * t, d)
    logits = jnp.einsum("nqd,nsd->nqs", qh, kh, preferred_element_type=jnp.float32)
    if mask is not None:
        # An add fuses into the softmax; a select on a broadcast bool mask runs as its own slow
        # loop on CPU (about half the attention time at T=1024).
        bias = mask if is_bias else mask_bias(mask)
        logits = logits.reshape(b, kvh, g, t, s) + jnp.broadcast_to(bias, (b, 1, t, s))[:, :, None]
    # (softmax over the 5-D view: reshaping back first made XLA fuse the bias ~1.5x slower)
    probs = jax.nn.softmax(logits, axis=-1).reshape(b * kvh, g * t, s)
    out = jnp.einsum("nqs,nsd->nqd", probs.astype(v.dtype), vh)
    out = out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return out, (probs.reshape(b, h, t, s) if return_probs else None)


def segment_block_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int, *,
                            scale: float | None = None) -> Array:
    """Bidirectional attention restricted to equal `segment_ids`, for sequences whose segments are
    contiguous and at most `block` long (e.g. Qwen2.5-VL's vision windows after the window
    reordering). Each block of `block` queries attends only to the keys of its own and its two
    neighbouring blocks — every segment touching a block lies there — so the work is `3 * block`
    keys per query instead of T, with static shapes whatever the segment layout.

    q/k/v: `[B, T, H|K, D]`; segment_ids: `[B, T]` or `[T]` int (rows with equal ids attend each
    other). Returns `[B, T, H, D]`, equal to `dot_attention` with the dense segment mask.
    The caller guarantees the layout (ids are traced, so it cannot be checked here): a segment
    longer than `block`, or split into non-contiguous runs, silently loses keys.
    """
    b, t, h, d = q.shape
    ids = jnp.broadcast_to(segment_ids, (b, t)).astype(jnp.int32)
    pad = (-t) % block
    n = (t + pad) // block
    # Padding rows get an id no real row has; the edge blocks' missing neighbours get another.
    edge, fill = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).min + 1
    ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=fill)

    def neighbours(x: Array, value) -> Array:          # [B, T+pad, ...] -> [B*n, 3*block, ...]
        widths = ((0, 0), (block, block)) + ((0, 0),) * (x.ndim - 2)
        xb = jnp.pad(x, widths, constant_values=value).reshape(b, n + 2, block, *x.shape[2:])
        return jnp.concatenate([xb[:, :-2], xb[:, 1:-1], xb[:, 2:]], axis=2).reshape(b * n, 3 * block, *x.shape[2:])

    padt = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qb = padt(q).reshape(b * n, block, h, d)
    kb, vb = neighbours(padt(k), 0), neighbours(padt(v), 0)
    qid, kid = ids.reshape(b * n, block), neighbours(ids, edge)
    bias = mask_bias(qid[:, None, :, None] == kid[:, None, None, :])            # [B*n, 1, block, 3*block]
    out, _ = dot_attention(qb, kb, vb, bias, scale=scale)
    return out.reshape(b, n * block, h, d)[:, :t]


@flax.struct.dataclass
class SegmentSlots:
    """Where the rows of a sequence of contiguous segments (each at most `block` long) sit when every
    segment starts a block of its own in a buffer of S slots (`segment_slots`): then each block
    attends only to itself, `block` keys per query, instead of `segment_block_attention`'s `3 * block`.

    src: `[S]` row feeding each slot (T for an empty slot); slot: `[T]` slot of each row (S for rows
    left out: padding, or every row when the segments need more than S slots); key_bias: `[S/block, 1, 1,
    block]` additive bias, 0 on filled slots; fits: scalar bool, the segments found room in S slots."""

    src: Array
    slot: Array
    key_bias: Array
    fits: Array


def segment_slots(segment_ids: Array, valid: Array, block: int, n_slots: int) -> SegmentSlots:
    """segment_ids/valid: `[T]`; a segment is a run of equal ids (each id must be one run: a split id
    becomes two segments); invalid rows (padding) sit after the valid ones. n_slots: a multiple of
    `block`. Jittable: the ids may be traced, so whether they fit (enough slots, no segment longer
    than `block`) is a traced flag (`fits`) for the caller to branch on."""
    if n_slots % block:
        raise ValueError(f"n_slots {n_slots} must be a multiple of the block {block}")
    t = segment_ids.shape[0]
    pos = jnp.arange(t, dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones(1, bool), segment_ids[1:] != segment_ids[:-1]])
    rank = jnp.cumsum(start.astype(jnp.int32)) - 1
    offset = pos - jax.lax.cummax(jnp.where(start, pos, 0))          # row's place in its segment
    slot = rank * block + offset
    # A segment longer than `block` would spill into the next segment's block: report it as not
    # fitting, so the caller takes its other path instead of mixing segments.
    fits = ((jnp.max(jnp.where(valid > 0, rank + 1, 0)) * block <= n_slots)
            & jnp.all(jnp.where(valid > 0, offset, 0) < block))
    slot = jnp.where((valid > 0) & fits, slot, n_slots)
    src = jnp.full(n_slots, t, jnp.int32).at[slot].set(pos, mode="drop")
    return SegmentSlots(src=src, slot=slot, key_bias=mask_bias((src < t).reshape(-1, 1, 1, block)), fits=fits)


def slotted_segment_attention(q: Array, k: Array, v: Array, slots: SegmentSlots, *,
                              scale: float | None = None) -> Array:
    """Bidirectional attention within segments laid out by `segment_slots`: rows are gathered into
    their segment's block, each block attends to itself, and the outputs are gathered back. Equal to
    `dot_attention` with the dense segment mask on the rows that have a slot; rows without one (padding,
    or all rows when `slots.fits` is false: branch on it) get zeros.

    q/k/v: `[B, T, H|K, D]`; slots: one layout for every batch row, or one per row (`segment_slots`
    vmapped: src `[B, S]`, slot `[B, T]`). Returns `[B, T, H, D]`."""
    b, t, h, d = q.shape
    block = slots.key_bias.shape[-1]
    n = slots.src.shape[-1] // block

    def take(x: Array, rows: Array) -> Array:  # rows of x [B, R, ...]; index R picks a zero row
        x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
        return x[:, rows] if rows.ndim == 1 else jax.vmap(lambda xb, rb: xb[rb])(x, rows)

    gather = lambda x: take(x, slots.src).reshape(b * n, block, *x.shape[2:])  # noqa: E731
    bias = jnp.broadcast_to(slots.key_bias.reshape(-1, n, 1, 1, block), (b, n, 1, 1, block)).reshape(b * n, 1, 1, block)
    out, _ = dot_attention(gather(q), gather(k), gather(v), bias, scale=scale)
    return take(out.reshape(b, n * block, h, d), slots.slot)


def mask_bias(mask: Array) -> Array:
    """Bool attention mask (True = attend) -> additive fp32 bias: 0 where attended, the most negative
    float elsewhere (so a fully masked row softmaxes to uniform, as a select would give)."""
    return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def causal_mask(q_slots: Array, kv_valid: Array) -> Array:
    """Bool `[B, 1, T, S]`: key slot s is visible to the query at slot q iff s <= q and s is valid.

    q_slots: `[B, T]` or `[T]` slot index of each query; kv_valid: `[B, S]` bool.
    """
    s = jnp.arange(kv_valid.shape[1])
    q = q_slots if q_slots.ndim == 2 else q_slots[None]
    return (s[None, None, :] <= q[:, :, None])[:, None] & kv_valid[:, None, None, :].astype(bool)


def segment_mask(segment_ids: Array) -> Array:
    """Bool `[B, 1, T, T]` for packed rows (`segment_ids [B, T]`: 1, 2, ... per sample, 0 on padding): a
    query sees only keys of its own segment. Padding queries are left unrestricted, so a 0/1 mask changes
    nothing: combine with `causal_mask`, which hides padding keys."""
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    return ((q == k) | (q == 0))[:, None]


def segment_positions(segment_ids: Array) -> Array:
    """`[B, T]` -> int32 `[B, T]`: each token's place in its segment (a run of one id; padding between the
    tokens of one segment is skipped, so a 0/1 mask gives `cumsum(mask) - 1`, as HF `generate` does);
    1 on padding."""
    valid = segment_ids > 0
    count = jnp.cumsum(valid, -1)
    t = jnp.arange(segment_ids.shape[-1])
    last = jax.lax.cummax(jnp.where(valid, t, -1), axis=segment_ids.ndim - 1)
    prev = jnp.concatenate([jnp.full_like(last[..., :1], -1), last[..., :-1]], -1)    # last real token before t
    prev_id = jnp.where(prev >= 0, jnp.take_along_axis(segment_ids, jnp.maximum(prev, 0), -1), 0)
    start = valid & (segment_ids != prev_id)
    base = jax.lax.cummax(jnp.where(start, count - 1, 0), axis=segment_ids.ndim - 1)
    return jnp.where(valid, count - 1 - base, 1).astype(jnp.int32)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional rotary and KV cache.

    `__call__(x [B,T,E], cos/sin [B,T,R] | None, mask [B,1,T,S], cache=(k, v) [B*K,S,D] | None,
    cache_index: scalar slot where x's first token goes, q_scale [B,T] | None: factor on the rotated
    queries)` -> `(out [B,T,E], probs | None, new_cache)`.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    embed_axis: str = "embed"
    heads_axis: str = "heads"
    kv_heads_axis: str = "kv_heads"
    scale: float | None = None
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos: Array | None, sin: Array | None, mask: Array | None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 return_probs: bool = False, q_scale: Array | None = None, causal_blocks: int = 1):
        b, t, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = Linear(hd, (self.embed_axis, self.heads_axis), self.qkv_bias, name=self.names[0], **kw)(x)
        k = Linear(kvd, (self.embed_axis, self.kv_heads_axis), self.qkv_bias, name=self.names[1], **kw)(x)
        v = Linear(kvd, (self.embed_axis, self.kv_heads_axis), self.qkv_bias, name=self.names[2], **kw)(x)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if q_scale is not None:  # per-query factor after rotary, keys untouched (QWen logn)
            q = q * q_scale[:, :, None, None].astype(q.dtype)
        new_cache = None
        if cache is not None:   # head-major cache: the T new rows are transposed, not the cache
            ck, cv = cache
            idx = (0, cache_index, 0)
            ck = jax.lax.dynamic_update_slice(ck, heads_major(k).astype(ck.dtype), idx)
            cv = jax.lax.dynamic_update_slice(cv, heads_major(v).astype(cv.dtype), idx)
            new_cache = (ck, cv)
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)
        out, probs = dot_attention(q, k, v, mask, scale=self.scale, return_probs=return_probs, impl=self.impl,
                                   causal_blocks=causal_blocks, kv_heads_major=cache is not None)
        out = out.reshape(b, t, hd)
        out = Linear(x.shape[-1], (self.heads_axis, self.embed_axis), self.out_bias, name=self.names[3], **kw)(out)
        return out, probs, new_cache


# ----------------------------------------------------------------------------- layer stacks

#: Rematerialisation policies, by the name a model config's `remat` field gives.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block: type[nn.Module], remat: str) -> type[nn.Module]:
    """`block` under `nn.remat` with the named policy; "none" returns it unchanged."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not a rematerialisation policy; known: {sorted(REMAT_POLICIES)}")
    policy = REMAT_POLICIES[remat]
    return block if policy is None else nn.remat(block, policy=policy, prevent_cse=False)


def scan_layers(block: type[nn.Module], length: int, in_axes: Any = nn.broadcast) -> type[nn.Module]:
    """`block` applied `length` times by `nn.scan`: its params gain a leading axis (logical name
    "layers", so the sharding rules see it) and its per-layer outputs are stacked on axis 0.

    The block is called as `block(...)(carry, *xs) -> (carry, y)`; `in_axes` says, per `xs` entry,
    `nn.broadcast` (same for every layer) or 0 (sliced per layer)."""
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=length, metadata_params={nn.PARTITION_NAME: "layers"})


class ViTBlock(nn.Module):
    """Pre-LayerNorm encoder block, full bidirectional attention with biases, plain MLP:
    `h += attn(norm1 h)`, `h += mlp(norm2 h)`. CLIP's and Qwen-VL's ViTs differ only in the
    activation and the parameter names (`names`: norm1, attention, norm2, mlp; `mlp_names`).

    Scanned by `scan_layers` as `(h, _) -> (h, h or None)` (the per-layer state when
    `output_hidden_states`)."""

    heads: int
    head_dim: int
    mlp_dim: int
    act: str
    eps: float
    names: tuple[str, str, str, str]
    mlp_names: tuple[str, str] = ("fc1", "fc2")
    output_hidden_states: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Array, _) -> tuple[Array, Array | None]:
        """h: `[N, P, D]`."""
        norm = dict(eps=self.eps, axis_name="vision_embed", dtype=self.dtype, param_dtype=self.param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(**norm, name=self.names[0])(h)
        a, _, _ = Attention(self.heads, self.heads, self.head_dim, qkv_bias=True, out_bias=True,
                            names=("q_proj", "k_proj", "v_proj", "out_proj"), name=self.names[1],
                            embed_axis="vision_embed", heads_axis="vision_heads", kv_heads_axis="vision_heads",
                            **kw)(x, None, None, None)
        h = h + a
        x = LayerNorm(**norm, name=self.names[2])(h)
        h = h + MLP(self.mlp_dim, act=self.act, names=self.mlp_names, embed_axis="vision_embed",
                    mlp_axis="vision_mlp", name=self.names[3], **kw)(x)
        h = constrain(h, ("batch", "vision_seq", "vision_embed"))
        return h, (h if self.output_hidden_states else None)
