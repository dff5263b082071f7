"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT (2-D rotary, fused qkv, 2x2 patch merger),
the M-RoPE position index, and the composition with the Qwen2 decoder (`DecoderLM`, 3-D positions).

Everything runs on a *padded static patch sequence*: all images (then all videos) of a batch are
packed into one `[N, C*T*P*P]` array, padded to a static N, with a `[G, 3]` grid array padded
with zero rows. The per-patch layout (which image / frame / window a patch belongs to, its 2-D
position) and the M-RoPE index are computed on device from the grids, so one compiled function
serves any image layout with the same padded shapes. HF's `cu_seqlens` (attention restricted to
one frame of one image) becomes a segment-id mask; Qwen2.5-VL's window attention is the same
mask with window ids. The tower reorders patches by window as HF does (`window_order`) so that
each window is contiguous and can take a block of slots of its own (`Windows`: one block of keys per
query instead of a dense N x N mask), and undoes the order after.

Example:
    >>> cfg = Qwen2VLConfig.from_hf(hf_config)                    # Qwen2-VL or Qwen2.5-VL
    >>> model = Qwen2VL(cfg)
    >>> out = model.apply({"params": params}, input_ids, pixel_values, image_grid_thw,
    ...                   attention_mask=mask, output_hidden_states=True, output_vision_hidden_states=True)
    >>> out.logits, out.hidden_states, out.vision_hidden_states, out.image_token_mask
    >>> pos, deltas = rope_index(cfg, input_ids, image_grid_thw, attention_mask=mask)   # [3,B,T], [B,1]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.models import layers as L
from jaxvlm.models.llama import DecoderLM, LMConfig
from jaxvlm.models.llava import VLMOutput, real_first, splice_image_features

Array = jax.Array

# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """Vision tower of Qwen2-VL (`variant="qwen2_vl"`: LayerNorm, quick_gelu MLP, full attention)
    or Qwen2.5-VL (`"qwen2_5_vl"`: RMSNorm, SwiGLU with bias, window attention except at
    `fullatt_block_indexes`)."""

    variant: str = "qwen2_5_vl"
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_layers: int = 32
    num_heads: int = 16
    out_hidden_size: int = 3584           # = the LM's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "silu"
    window_size: int | None = 112         # pixels; None = full attention everywhere (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float | None = 2   # Qwen2.5-VL video time scaling; None for Qwen2-VL
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.variant not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"variant must be 'qwen2_vl' or 'qwen2_5_vl', got {self.variant!r}")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision head_dim {self.hidden_size}/{self.num_heads} must be a multiple of 4 "
                             "(2-D rotary: half the rotary frequencies per axis)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int | None:
        """Window side in merged units (HF's `vit_merger_window_size`)."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        """Most patches in one attention window (0 without windows): the block of the blocked
        window attention, which needs every window to fit in it."""
        return self.window_units ** 2 * self.merge_unit if self.window_units else 0

    @property
    def full_attention_flags(self) -> np.ndarray:
        """Per-layer bool: full (per-frame) attention vs window attention."""
        if self.window_size is None:
            return np.ones(self.num_layers, bool)
        return np.isin(np.arange(self.num_layers), self.fullatt_block_indexes)

    def replace(self, **kw) -> "QwenVisionConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: Any, model_type: str | None = None, **overrides) -> "QwenVisionConfig":
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        mt = model_type or d.get("model_type", "qwen2_5_vl")
        theta = float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        common = dict(num_layers=d["depth"], num_heads=d["num_heads"], patch_size=d.get("patch_size", 14),
                      temporal_patch_size=d.get("temporal_patch_size", 2),
                      spatial_merge_size=d.get("spatial_merge_size", 2), in_channels=d.get("in_channels", 3),
                      rope_theta=theta)
        if mt.startswith("qwen2_vl"):
            kw = dict(variant="qwen2_vl", hidden_size=d["embed_dim"],
                      intermediate_size=int(d["embed_dim"] * d.get("mlp_ratio", 4)),
                      out_hidden_size=d["hidden_size"], hidden_act=d.get("hidden_act", "quick_gelu"),
                      window_size=None, fullatt_block_indexes=(), tokens_per_second=None, **common)
        else:
            kw = dict(variant="qwen2_5_vl", hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                      out_hidden_size=d["out_hidden_size"], hidden_act=d.get("hidden_act", "silu"),
                      window_size=d.get("window_size", 112),
                      fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", (7, 15, 23, 31))),
                      tokens_per_second=d.get("tokens_per_second", 4), **common)
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    text: LMConfig
    vision: QwenVisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != LM hidden_size "
                             f"{self.text.hidden_size}")
        if self.text.mrope_section is None:
            raise ValueError("the Qwen2-VL LM needs mrope_section (rope_parameters['mrope_section'])")

    @property
    def variant(self) -> str:
        return self.vision.variant

    def replace(self, **kw) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **kw)

    def with_dtype(self, dtype: str, param_dtype: str | None = None) -> "Qwen2VLConfig":
        p = param_dtype or dtype
        return self.replace(text=self.text.replace(dtype=dtype, param_dtype=p),
                            vision=self.vision.replace(dtype=dtype, param_dtype=p))

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "Qwen2VLConfig":
        """From a transformers `Qwen2VLConfig` / `Qwen2_5_VLConfig` (object or `config.json` dict;
        the flat hub schema with text fields at the top level is accepted too)."""
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        mt = d.get("model_type", "qwen2_5_vl")
        text = dict(d.get("text_config") or {k: v for k, v in d.items() if k != "vision_config"})
        text.setdefault("model_type", mt + "_text")
        if "rope_parameters" not in text and text.get("rope_scaling"):   # v4 hub schema
            text["rope_parameters"] = dict(text["rope_scaling"], rope_theta=text.get("rope_theta", 1e6))
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        kw = dict(text=LMConfig.from_hf(text, tie_word_embeddings=tie),
                  vision=QwenVisionConfig.from_hf(d["vision_config"], model_type=mt),
                  image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
                  vision_start_token_id=d.get("vision_start_token_id", 151652),
                  vision_end_token_id=d.get("vision_end_token_id", 151653))
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------- patch layout (on device)


@flax.struct.dataclass
class PatchLayout:
    """Per-patch metadata of a packed patch sequence, all `[N]` int32 (computed by `patch_layout`).

    hpos/wpos: row/column of the patch in its image (2-D rotary); frame: id of the (image, frame)
    the patch belongs to (full attention = same frame); window: id of its attention window
    (Qwen2.5-VL); valid: 1 for real patches, 0 for padding. Padding gets frame = window = -1.
    """

    hpos: Array
    wpos: Array
    frame: Array
    window: Array
    valid: Array

    @staticmethod
    def concat(a: "PatchLayout", b: "PatchLayout") -> "PatchLayout":
        """Images then videos: b's ids are shifted past a's so segments stay distinct."""
        fo, wo = jnp.max(a.frame) + 1, jnp.max(a.window) + 1
        shift = lambda x, o: jnp.where(x >= 0, x + o, x)
        return PatchLayout(hpos=jnp.concatenate([a.hpos, b.hpos]), wpos=jnp.concatenate([a.wpos, b.wpos]),
                           frame=jnp.concatenate([a.frame, shift(b.frame, fo)]),
                           window=jnp.concatenate([a.window, shift(b.window, wo)]),
                           valid=jnp.concatenate([a.valid, b.valid]))


def patch_layout(grid_thw: Array, n_patches: int, cfg: QwenVisionConfig) -> PatchLayout:
    """Layout of `n_patches` packed patches from `grid_thw [G, 3]` (t, h, w in patches; zero rows = no image).

    Patch order is the HF image processor's: per image, per frame, 2x2 merge blocks row-major, the
    m x m patches of a block row-major. Jittable; the grid values may be traced.
    """
    m = cfg.spatial_merge_size
    grid = jnp.asarray(grid_thw, jnp.int32).reshape(-1, 3)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    sizes = t * h * w
    ends = jnp.cumsum(sizes)
    p = jnp.arange(n_patches, dtype=jnp.int32)
    g = jnp.clip(jnp.searchsorted(ends, p, side="right"), 0, grid.shape[0] - 1)
    valid = p < ends[-1]
    local = p - (ends - sizes)[g]
    hw = jnp.maximum(h[g] * w[g], 1)
    f, r = local // hw, local % hw
    wm = jnp.maximum(w[g] // m, 1)
    block, within = r // (m * m), r % (m * m)
    bh, bw = block // wm, block % wm
    hpos, wpos = bh * m + within // m, bw * m + within % m
    frame = (jnp.cumsum(t) - t)[g] + f
    if cfg.window_units is None:
        window = frame
    else:
        win = cfg.window_units
        # HF pads every grid by a full window even when it divides evenly; ids only need to be
        # distinct and ordered, so the same counts keep ids aligned with HF's window order.
        nwh, nww = (h // m) // win + 1, (w // m) // win + 1
        per_grid = t * nwh * nww
        window = (jnp.cumsum(per_grid) - per_grid)[g] + f * (nwh * nww)[g] + (bh // win) * nww[g] + bw // win
    neg = jnp.full_like(p, -1)
    return PatchLayout(hpos=jnp.where(valid, hpos, 0), wpos=jnp.where(valid, wpos, 0),
                       frame=jnp.where(valid, frame, neg), window=jnp.where(valid, window, neg),
                       valid=valid.astype(jnp.int32))


def slot_layout(grid_thw: Array, rows: int, cfg: QwenVisionConfig) -> PatchLayout:
    """Layouts `[S, rows]` of S image slots, one image (or none: a zero grid row) per slot, each slot's
    `t*h*w` patch rows first, then padding (the tower's row input, as `jaxvlm.data.pipeline` batches
    Qwen images)."""
    return jax.vmap(lambda g: patch_layout(g[None], rows, cfg))(jnp.asarray(grid_thw, jnp.int32).reshape(-1, 3))


def window_order(layout: PatchLayout, cfg: QwenVisionConfig) -> Array:
    """HF Qwen2.5-VL's window reordering of merge units (`get_vision_window_index`): `[N/m^2]`
    indices, real units first. Its inverse is `jnp.argsort(order)`. Units inside a window are
    already row-major in processor order, so a stable sort by window id is the whole permutation."""
    u = cfg.merge_unit
    win = layout.window[::u]
    key = jnp.where(layout.valid[::u] > 0, win, jnp.iinfo(jnp.int32).max)
    return jnp.argsort(key, stable=True)


def patch_window_order(layout: PatchLayout, cfg: QwenVisionConfig) -> Array:
    """`window_order` expanded to patches `[N]` (the order of HF's per-block vision hidden states)."""
    u = cfg.merge_unit
    order = window_order(layout, cfg)
    return (order[:, None] * u + jnp.arange(u)[None]).reshape(-1)


# ----------------------------------------------------------------------------- vision tower


@flax.struct.dataclass
class QwenVisionOutput:
    """last_hidden: `[N, Dv]` (`[B, N, Dv]` for row input) before the merger; merged: `[N/m^2, D]`
    (`[B*N/m^2, D]`, row-major), processor order; hidden_states: `[Lv+1, N, Dv]` (`[Lv+1, B, N, Dv]`;
    index 0 = patch embeddings) or None."""

    last_hidden: Array
    merged: Array
    hidden_states: Array | None = None


VISION_AXES = dict(embed_axis="vision_embed", mlp_axis="vision_mlp")


@flax.struct.dataclass
class Windows:
    """Qwen2.5-VL's window layout of the (window-ordered) patches, built once per tower call:
    `ids` `[N]` window of each patch, `slots` each window in a block of its own (`L.segment_slots`)."""

    ids: Array
    slots: L.SegmentSlots


#: Slots for window attention, as a share of the patch count: windows cut by the image edge leave
#: their block partly empty (448 px: none; 644 x 476 px: 23%), and layouts needing more room fall
#: back to `segment_block_attention` (3 blocks of keys per query instead of 1, ~3x the work).
WINDOW_SLACK = 0.25


def vision_windows(layout: PatchLayout, order: Array, cfg: QwenVisionConfig) -> Windows:
    """The windows of the patches taken in `order` (`patch_window_order`), each given a block of
    `window_patches` slots in a buffer of the patch count plus `WINDOW_SLACK`. `slots.fits` says
    whether this layout found room (else the tower falls back to `segment_block_attention`)."""
    block = cfg.window_patches
    n_slots = -(-int(order.shape[0] * (1 + WINDOW_SLACK)) // block) * block
    ids = layout.window[order]
    return Windows(ids=ids, slots=L.segment_slots(ids, layout.valid[order], block, n_slots))


class VisionAttention(nn.Module):
    """Bidirectional attention with fused `qkv` (HF's layout) and 2-D rotary, restricted to a frame
    (dense, with the frame bias) or, when `windows` are given and `full` is false, to a window
    (patches arrive window-ordered: each window in a block of slots, see `L.slotted_segment_attention`)."""

    num_heads: int
    window_block: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, frame_bias: Array, windows: Windows | None = None,
                 full: Array | bool = True) -> Array:
        b, n, d = x.shape
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        # The fused output axis holds [q | k | v]; it carries the heads name so tensor sharding
        # splits it, at the cost of a reshard (q, k, v sit on different shards).
        qkv = L.Linear(3 * d, ("vision_embed", "vision_heads"), name="qkv", **kw)(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        q, k = L.apply_rotary(q, cos, sin), L.apply_rotary(k, cos, sin)
        dense = lambda q, k, v: L.dot_attention(q, k, v, frame_bias)[0]
        if windows is None:
            out = dense(q, k, v)
        else:
            slotted = lambda q, k, v: L.slotted_segment_attention(q, k, v, windows.slots)
            blocked = lambda q, k, v: L.segment_block_attention(q, k, v, windows.ids, self.window_block)
            # One branch for the whole batch (rows laid out separately must all fit for the slotted path).
            windowed = lambda q, k, v: jax.lax.cond(jnp.all(windows.slots.fits), slotted, blocked, q, k, v)
            out = jax.lax.cond(full, dense, windowed, q, k, v)
        return L.Linear(d, ("vision_heads", "vision_embed"), name="proj", **kw)(out.reshape(b, n, d))


class VisionBlock(nn.Module):
    """Pre-norm ViT block; scanned. `full` (per-layer, scanned) picks frame or window attention."""

    cfg: QwenVisionConfig
    output_hidden_states: bool = False

    @nn.compact
    def __call__(self, h: Array, cos, sin, frame_bias, windows, full):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kind = "layer" if cfg.variant == "qwen2_vl" else "rms"
        x = L.make_norm(kind, cfg.norm_eps, dt, pdt, "norm1", "vision_embed")(h)
        h = h + VisionAttention(cfg.num_heads, cfg.window_patches, dt, pdt, name="attn")(
            x, cos, sin, frame_bias, windows, full)
        x = L.make_norm(kind, cfg.norm_eps, dt, pdt, "norm2", "vision_embed")(h)
        if cfg.variant == "qwen2_vl":
            mlp = L.MLP(cfg.intermediate_size, act=cfg.hidden_act, dtype=dt, param_dtype=pdt, name="mlp", **VISION_AXES)
        else:
            mlp = L.GatedMLP(cfg.intermediate_size, cfg.hidden_act, use_bias=True, dtype=dt, param_dtype=pdt,
                             name="mlp", **VISION_AXES)
        h = L.constrain(h + mlp(x), ("batch", "vision_seq", "vision_embed"))
        return h, (h if self.output_hidden_states else None)


class PatchMerger(nn.Module):
    """norm -> concat each 2x2 block of patches -> Linear -> GELU -> Linear to the LM width."""

    cfg: QwenVisionConfig

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kind = "layer" if cfg.variant == "qwen2_vl" else "rms"
        x = L.make_norm(kind, cfg.norm_eps, dt, pdt, "ln_q", "vision_embed")(h)
        x = x.reshape(-1, cfg.hidden_size * cfg.merge_unit)
        return L.MLP(x.shape[-1], cfg.out_hidden_size, act="gelu", embed_axis="vision_embed", mlp_axis="vision_mlp",
                     out_axis="embed", dtype=dt, param_dtype=pdt, name="mlp")(x)


class QwenVisionTower(nn.Module):
    """Patch embedding (Conv3d as a matmul) -> scanned blocks with 2-D rotary -> PatchMerger.

    Takes the patches packed into one sequence (`[N, C*T*P*P]`, as HF does: any number of images of
    any sizes, attention restricted per frame) or as B rows of their own (`[B, N, C*T*P*P]`, layout
    `[B, N]`: e.g. one image per row, `slot_layout`). Rows are the batch axis of every activation, so
    they shard over data-parallel devices, where one packed sequence cannot."""

    cfg: QwenVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array, layout: PatchLayout, output_hidden_states: bool = False
                 ) -> QwenVisionOutput:
        """pixel_values: `[N, C*T*P*P]` or `[B, N, C*T*P*P]` (N a multiple of merge_size^2), layout
        `[N]` or `[B, N]` to match."""
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        packed = pixel_values.ndim == 2
        if packed:
            pixel_values, layout = pixel_values[None], jax.tree.map(lambda a: a[None], layout)
        n = pixel_values.shape[1]
        if pixel_values.shape[-1] != cfg.patch_dim:
            raise ValueError(f"pixel_values rows have {pixel_values.shape[-1]} values, the patch embedding expects "
                             f"C*T*P*P = {cfg.patch_dim}")
        if n % cfg.merge_unit:
            raise ValueError(f"the padded patch count {n} must be a multiple of merge_size^2 = {cfg.merge_unit}")
        x = L.Linear(cfg.hidden_size, ("vision_patch", "vision_embed"), dtype=dt, param_dtype=pdt,
                     name="patch_embed")(pixel_values.astype(dt))                  # [B, N, Dv]
        rows = jax.vmap(lambda a, i: a[i])                                          # per-row gather
        hpos, wpos, frame = layout.hpos, layout.wpos, layout.frame
        if cfg.window_units is not None:
            # HF's window reordering: each window becomes contiguous, so it can take a block of slots
            # of its own (`vision_windows`: one window of keys per query instead of N); undone after
            # the last block.
            order = jax.vmap(lambda lay: patch_window_order(lay, cfg))(layout)    # [B, N]
            x, hpos, wpos, frame = (rows(a, order) for a in (x, hpos, wpos, frame))
        # 2-D rotary = M-RoPE with two axes (h, w) over the same head_dim/4 frequencies.
        inv = L.rope_inv_freq(cfg.head_dim // 2, cfg.rope_theta)[0]
        cos, sin = L.rope_cos_sin(jnp.stack([hpos, wpos]), np.concatenate([inv, inv]), 1.0, (len(inv), len(inv)))
        # The frame bias is built once, outside the layer scan (see `layers.dot_attention`).
        frame_bias = L.mask_bias((frame[:, :, None] == frame[:, None, :])[:, None])   # [B, 1, N, N]
        windows = None
        if cfg.window_units is not None:
            windows = jax.vmap(lambda lay, o: vision_windows(lay, o, cfg))(layout, order)
        stack = L.scan_layers(L.remat_block(VisionBlock, cfg.remat), cfg.num_layers, in_axes=(nn.broadcast,) * 4 + (0,))
        h, ys = stack(cfg, output_hidden_states, name="blocks")(
            x, cos, sin, frame_bias, windows, jnp.asarray(cfg.full_attention_flags))
        if cfg.window_units is not None:
            inverse = jnp.argsort(order, axis=-1)
            x, h = rows(x, inverse), rows(h, inverse)
            ys = None if ys is None else jax.vmap(rows, in_axes=(0, None))(ys, inverse)
        merged = PatchMerger(cfg, name="merger")(h)                                  # [B*N/m^2, D]
        hidden = jnp.concatenate([x[None], ys], axis=0) if output_hidden_states else None
        if packed:
            h, hidden = h[0], None if hidden is None else hidden[:, 0]
        return QwenVisionOutput(last_hidden=h, merged=merged, hidden_states=hidden)


# ----------------------------------------------------------------------------- M-RoPE index


def rope_index(cfg: Qwen2VLConfig, input_ids: Array, image_grid_thw: Array | None = None,
               video_grid_thw: Array | None = None, *, attention_mask: Array | None = None,
               mm_token_type_ids: Array | None = None, second_per_grid_ts: Array | None = None
               ) -> tuple[Array, Array]:
    """The 3-D (temporal, height, width) M-RoPE positions `[3, B, T]` and `rope_deltas [B, 1]`,
    as HF's `get_rope_index`, computed with array ops (jittable, no host sync, static shapes).

    Text tokens advance all three axes together; the k-th run of image (video) tokens, counted
    row-major over the batch, takes grid k of `image_grid_thw` (`video_grid_thw`) and gets
    `start + (t * interval, row, col)` in merged units; text after it resumes at
    `start + max(h, w) / merge`. `interval` is 1 for images and Qwen2-VL, and
    `tokens_per_second * second_per_grid_ts[k]` for Qwen2.5-VL videos. Padding gets position 0.
    Decoding continues at `n_valid_tokens + rope_deltas` on all three axes (`decode_positions`).

    mm_token_type_ids: 0 text, 1 image, 2 video (default: from the image/video token ids).
    """
    ids = jnp.asarray(input_ids)
    b, t = ids.shape
    m = cfg.vision.spatial_merge_size
    valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask) > 0
    if mm_token_type_ids is None:
        typ = jnp.where(ids == cfg.image_token_id, 1, jnp.where(ids == cfg.video_token_id, 2, 0))
    else:
        typ = jnp.asarray(mm_token_type_ids, jnp.int32)
    typ = jnp.where(valid, typ, -1)
    edge = jnp.full((b, 1), -1, typ.dtype)
    prev = jnp.concatenate([edge, typ[:, :-1]], axis=1)
    nxt = jnp.concatenate([typ[:, 1:], edge], axis=1)
    vis = typ > 0
    start, end = vis & (typ != prev), vis & (typ != nxt)

    def grid_of(grid, modality):
        ordinal = (jnp.cumsum((start & (typ == modality)).reshape(-1)) - 1).reshape(b, t)
        if grid is None:
            return jnp.zeros((b, t, 3), jnp.int32), ordinal
        grid = jnp.asarray(grid, jnp.int32).reshape(-1, 3)
        return grid[jnp.clip(ordinal, 0, grid.shape[0] - 1)], ordinal

    img_grid, _ = grid_of(image_grid_thw, 1)
    vid_grid, vid_ord = grid_of(video_grid_thw, 2)
    grid = jnp.where((typ == 2)[..., None], vid_grid, img_grid)
    gh, gw = jnp.maximum(grid[..., 1] // m, 1), jnp.maximum(grid[..., 2] // m, 1)
    idx = jnp.arange(t)
    k = idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)          # index inside the run
    # Every text token advances by 1; a vision run by max(h, w)/m, booked on its last token so
    # the exclusive cumsum is the run's start position at every token of the run.
    adv = jnp.where(typ == 0, 1, jnp.where(end, jnp.maximum(gh, gw), 0))
    cur = jnp.cumsum(adv, axis=1) - adv
    tt, hh, ww = k // (gh * gw), (k // gw) % gh, k % gw
    if cfg.vision.tokens_per_second is not None:
        if second_per_grid_ts is None:
            interval = jnp.full((b, t), cfg.vision.tokens_per_second, jnp.float32)
        else:
            s = jnp.asarray(second_per_grid_ts, jnp.float32).reshape(-1)
            interval = jnp.float32(cfg.vision.tokens_per_second) * s[jnp.clip(vid_ord, 0, s.shape[0] - 1)]
        # float product truncated to int, as torch's `(arange * interval).long()`
        t_off = jnp.where(typ == 2, (tt.astype(jnp.float32) * interval).astype(jnp.int32), tt)
    else:
        t_off = tt
    pos = jnp.stack([cur + jnp.where(vis, t_off, 0), cur + jnp.where(vis, hh, 0), cur + jnp.where(vis, ww, 0)])
    pos = jnp.where(valid[None], pos, 0).astype(jnp.int32)
    n_valid = jnp.sum(valid, axis=1)
    deltas = jnp.max(jnp.where(valid[None], pos, -1), axis=(0, 2)) + 1 - n_valid
    return pos, deltas[:, None].astype(jnp.int32)


def decode_positions(text_positions: Array, rope_deltas: Array) -> Array:
    """M-RoPE positions `[3, B, T]` of tokens generated after a prefill: `text_positions [B, T]` is
    the ordinary 1-D index (number of valid tokens before each), shifted by `rope_deltas [B, 1]`."""
    return jnp.broadcast_to((text_positions + rope_deltas)[None], (3,) + text_positions.shape).astype(jnp.int32)


# ----------------------------------------------------------------------------- input checks (host side)


def check_inputs(cfg: Qwen2VLConfig, input_ids, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None) -> None:
    """Clear errors for inconsistent concrete inputs; a no-op on traced values (call it before jit).

    Checks: grids are positive multiples of the merge size, the grids' patch count fits (and, when
    unpadded, equals) the pixel rows, and the number of image/video tokens equals the features."""
    arrays = (input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, mm_token_type_ids)
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        return
    m = cfg.vision.spatial_merge_size
    ids = np.asarray(input_ids)
    types = None if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    for name, pix, grid, token_id, code in (("image", pixel_values, image_grid_thw, cfg.image_token_id, 1),
                                            ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id, 2)):
        n_tok = int(np.sum(ids == token_id))
        if pix is None:
            if n_tok and grid is not None:
                raise ValueError(f"the prompt has {n_tok} {name} tokens but no {name} pixel values were given")
            continue
        if grid is None:
            raise ValueError(f"{name} pixel values need {name}_grid_thw (t, h, w in patches per {name})")
        grid = np.asarray(grid).reshape(-1, 3)
        real = grid[grid.prod(-1) > 0]
        bad = real[(real[:, 1] % m != 0) | (real[:, 2] % m != 0) | (real[:, 1] < m) | (real[:, 2] < m)]
        if len(bad):
            raise ValueError(f"{name} grid {bad[0].tolist()} (t, h, w in patches) is smaller than one merged patch or "
                             f"not a multiple of spatial_merge_size={m}: images must be at least "
                             f"{m * cfg.vision.patch_size}px and resized to multiples of it (smart_resize)")
        n_patches = int(real.prod(-1).sum())
        # Packed rows are one slot holding every grid; slots ([S, M, D]) hold one grid each.
        slots = [(np.asarray(pix), real)] if np.ndim(pix) == 2 else list(zip(np.asarray(pix), grid[:, None]))
        if np.ndim(pix) == 3 and len(grid) != np.shape(pix)[0]:
            raise ValueError(f"{name} slots: pixel values have {np.shape(pix)[0]} slots but {name}_grid_thw has "
                             f"{len(grid)} rows (one grid per slot, zeros for an empty slot)")
        for i, (rows, g) in enumerate(slots):
            where = "" if np.ndim(pix) == 2 else f" in slot {i}"
            need = int(g.prod(-1).sum())
            if need > len(rows):
                raise ValueError(f"{name}_grid_thw describes {need} patches{where} but pixel values hold only "
                                 f"{len(rows)} rows")
            if np.any(rows[need:] != 0):
                raise ValueError(f"{name}_grid_thw describes {need} patches{where} but pixel values have {len(rows)} "
                                 f"rows with non-zero data past them (grid and pixel values do not match)")
        n_feat = n_patches // cfg.vision.merge_unit
        if n_tok != n_feat:
            raise ValueError(f"{name} tokens do not match {name} features: the prompt has {n_tok} {name} tokens "
                             f"(id {token_id}) but the grids give {n_feat} merged patches")
        if types is not None and int(np.sum(types == code)) != n_tok:
            raise ValueError(f"mm_token_type_ids marks {int(np.sum(types == code))} {name} tokens, "
                             f"input_ids have {n_tok}")


# ----------------------------------------------------------------------------- composition


class Qwen2VL(nn.Module):
    """Qwen2-VL / Qwen2.5-VL: vision tower (images and videos in one packed call) -> features
    spliced at `<|image_pad|>` / `<|video_pad|>` -> Qwen2 decoder with M-RoPE."""

    cfg: Qwen2VLConfig

    def setup(self):
        self.visual = QwenVisionTower(self.cfg.vision)
        self.language_model = DecoderLM(self.cfg.text)

    def logit_lens(self, hidden: Array, apply_norm: bool = True) -> Array:
        return self.language_model.logit_lens(hidden, apply_norm)

    def embed(self, input_ids: Array) -> Array:
        return self.language_model.embed(jnp.clip(input_ids, 0, self.cfg.text.vocab_size - 1))

    def encode(self, pixel_values: Array | None, image_grid_thw: Array | None,
               pixel_values_videos: Array | None = None, video_grid_thw: Array | None = None,
               output_hidden_states: bool = False) -> tuple[QwenVisionOutput, int]:
        """One tower call over images then videos. Returns the output and the static row where the
        video features start among the merged features.

        Images in slots (pixel_values `[S, M, D]`, one image per slot, grid `[S, 3]`): one tower row
        per slot, and `merged` holds the real slots' features in slot order, then padding."""
        vcfg = self.cfg.vision
        if pixel_values is not None and pixel_values.ndim == 3:
            if pixel_values_videos is not None:
                raise ValueError("images in slots (pixel_values [S, M, D]) cannot be mixed with videos: pass the "
                                 "images packed ([N, D], HF's layout) to encode them together")
            vis = self.visual(pixel_values, slot_layout(image_grid_thw, pixel_values.shape[1], vcfg),
                              output_hidden_states)
            u = pixel_values.shape[1] // vcfg.merge_unit
            sizes = jnp.prod(jnp.asarray(image_grid_thw).reshape(-1, 3), axis=-1) // vcfg.merge_unit
            real = (jnp.arange(u)[None, :] < sizes[:, None]).reshape(-1)
            merged = vis.merged[real_first(real)]
            return vis.replace(merged=merged), merged.shape[0]
        parts, layouts = [], []
        for pix, grid in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw)):
            if pix is not None:
                parts.append(pix)
                layouts.append(patch_layout(grid, pix.shape[0], vcfg))
        layout = layouts[0] if len(layouts) == 1 else PatchLayout.concat(*layouts)
        pix = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        n_img = 0 if pixel_values is None else pixel_values.shape[0] // vcfg.merge_unit
        return self.visual(pix, layout, output_hidden_states), n_img

    def check_inputs(self, input_ids, pixel_values=None, image_grid_thw=None, *, pixel_values_videos=None,
                     video_grid_thw=None, mm_token_type_ids=None, **_) -> None:
        """Host-side input checks on concrete arrays; call before `jax.jit` (the Engine does)."""
        check_inputs(self.cfg, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                     mm_token_type_ids)

    def __call__(self, input_ids: Array, pixel_values: Array | None = None, image_grid_thw: Array | None = None,
                 *, pixel_values_videos: Array | None = None, video_grid_thw: Array | None = None,
                 second_per_grid_ts: Array | None = None, mm_token_type_ids: Array | None = None,
                 attention_mask: Array | None = None, positions: Array | None = None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | int | None = None,
                 output_hidden_states: bool = False, output_vision_hidden_states: bool = False,
                 attn_layers: Sequence[int] = (), logits: str = "all") -> VLMOutput:
        """input_ids `[B, T]` with one `<|image_pad|>` per merged patch (grid.prod() / 4 per image).

        pixel_values `[N, C*T*P*P]`: the patches of all images of the batch in order, padded to a
        static N with zero rows; image_grid_thw `[G, 3]` padded with zero rows. Videos likewise.
        Or images in slots, `[S, M, C*T*P*P]` with image_grid_thw `[S, 3]`: slot s holds one image's
        `prod(grid[s])` rows then zeros (empty slots: zero grid row), the images in prompt order; the
        tower then runs one row per slot, which shards over the batch (what training feeds).
        positions: `[3, B, T]`; default `rope_index(...)` (prefill). With a cache, pass them
        (`rope_index` for the prefill, `decode_positions` for later steps).
        Outputs as `VLMOutput`: `vision_hidden_states [Lv+1, N, Dv]` (images then videos, processor
        order), `image_features [M, D]` merged features, `image_token_mask` = image or video tokens.
        """
        cfg = self.cfg
        check_inputs(cfg, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                     mm_token_type_ids)
        embeds = self.embed(input_ids)
        image_mask, video_mask = input_ids == cfg.image_token_id, input_ids == cfg.video_token_id
        feats = vis_states = None
        if pixel_values is not None or pixel_values_videos is not None:
            vis, n_img = self.encode(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                     output_vision_hidden_states)
            feats, vis_states = vis.merged, vis.hidden_states
            if pixel_values is not None:
                embeds = splice_image_features(embeds, image_mask, feats[:n_img])
            if pixel_values_videos is not None:
                embeds = splice_image_features(embeds, video_mask, feats[n_img:])
        if positions is None:
            if pixel_values is not None and pixel_values.ndim == 3:
                # The M-RoPE index gives the k-th image of the batch the k-th grid row: an empty slot's
                # zero row must not sit between two images' grids.
                image_grid_thw = image_grid_thw[real_first(jnp.prod(image_grid_thw, axis=-1) > 0)]
            if cache is not None:
                raise ValueError("with a KV cache pass positions: rope_index(...) for the prefill, "
                                 "decode_positions(...) for later steps")
            positions, _ = rope_index(cfg, input_ids, image_grid_thw, video_grid_thw, attention_mask=attention_mask,
                                      mm_token_type_ids=mm_token_type_ids, second_per_grid_ts=second_per_grid_ts)
        out = self.language_model(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask,
                                  cache=cache, cache_index=cache_index, output_hidden_states=output_hidden_states,
                                  attn_layers=attn_layers, logits=logits)
        return VLMOutput(logits=out.logits, final_hidden=out.final_hidden, hidden_states=out.hidden_states,
                         attentions=out.attentions, cache=out.cache, vision_hidden_states=vis_states,
                         image_features=feats, image_token_mask=image_mask | video_mask)


def example_inputs(cfg: Qwen2VLConfig):
    """Smallest inputs that touch every parameter (for abstract init): one 2x2-merged image."""
    m = cfg.vision.spatial_merge_size
    ids = jnp.full((1, 1), cfg.image_token_id, jnp.int32)
    pix = jnp.zeros((m * m, cfg.vision.patch_dim), jnp.float32)
    grid = jnp.asarray([[1, m, m]], jnp.int32)
    return ids, pix, grid
