"""Qwen-VL-Chat (Qwen-VL v1): ViT-bigG-style encoder -> cross-attention resampler (256 queries) ->
features written over the 256 positions between `<img>` and `</img>` -> QWen-7B LM.

The LM is the shared `DecoderLM`: QWen's fused `c_attn` (with bias) is split into q/k/v and its
`w1 * silu(w2)` MLP becomes a `GatedMLP` (gate = w2) at conversion time; logn query scaling and
dynamic NTK are `LMConfig.logn_attn_len / rope_ntk_len`, active at inference only (`train=False`).
Every quirk reproduced here is listed in `shared/specs/qwen_vl_chat.md`; the ones that shape the
code: the 16x16 position tables are resampled with torch's bicubic rule (`torch_bicubic_matrix`),
RoPE and logn use the absolute slot index (padding included, `position_ids` ignored), and the
image span is found from the ids (`<img>` = `image_start_id`, `</img>` = +1, `<imgpad>` = +2).

Example:
    >>> cfg = QwenVLConfig.from_original(json.load(open("config.json")))
    >>> model = QwenVL(cfg)
    >>> out = model.apply({"params": params}, input_ids, pixel_values, attention_mask=mask,
    ...                   output_hidden_states=True)
    >>> out.logits, out.hidden_states, out.image_features, out.image_token_mask
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.models import layers as L
from jaxvlm.models.clip import patchify
from jaxvlm.models.llama import DecoderLM, LMConfig, init_cache as lm_init_cache
from jaxvlm.models.llava import VLMOutput, splice_image_features

Array = jax.Array

POS_TABLE_GRID = 16       # `positional_embedding` is hard-coded (256, width) in the original
RESAMPLER_HEAD_DIM = 128  # resampler heads = output_dim // 128


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class QwenVisualConfig:
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    image_size: int = 448
    patch_size: int = 14
    output_dim: int = 4096
    n_queries: int = 256
    num_channels: int = 3
    layer_norm_eps: float = 1e-6    # hard-coded for every visual LayerNorm in the original
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"visual width={self.width} is not a multiple of heads={self.heads}")
        if self.output_dim < RESAMPLER_HEAD_DIM or self.output_dim % RESAMPLER_HEAD_DIM:
            raise ValueError(f"visual output_dim={self.output_dim} must be a positive multiple of "
                             f"{RESAMPLER_HEAD_DIM} (the resampler has output_dim // 128 heads)")
        if math.isqrt(self.n_queries) ** 2 != self.n_queries:
            raise ValueError(f"n_queries={self.n_queries} must be a square (a 2-D sin-cos grid)")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def resampler_heads(self) -> int:
        return self.output_dim // RESAMPLER_HEAD_DIM

    def replace(self, **kw) -> "QwenVisualConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    text: LMConfig
    visual: QwenVisualConfig
    image_start_id: int = 151857     # `</img>` = +1, `<imgpad>` = +2 (the original reads only this one)

    def __post_init__(self):
        if self.visual.output_dim != self.text.hidden_size:
            raise ValueError(f"visual output_dim={self.visual.output_dim} must equal the LM hidden_size="
                             f"{self.text.hidden_size}: resampler outputs overwrite token embeddings")

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2

    @property
    def tokens_per_image(self) -> int:
        return self.visual.n_queries

    def replace(self, **kw) -> "QwenVLConfig":
        return dataclasses.replace(self, **kw)

    def with_dtype(self, dtype: str, param_dtype: str | None = None) -> "QwenVLConfig":
        p = param_dtype or dtype
        return self.replace(text=self.text.replace(dtype=dtype, param_dtype=p),
                            visual=self.visual.replace(dtype=dtype, param_dtype=p))

    @classmethod
    def from_original(cls, d: Mapping[str, Any], **overrides) -> "QwenVLConfig":
        """From Qwen-VL-Chat's `config.json` (remote-code `QWenConfig` schema, with its `visual` dict)."""
        d = dict(d)
        h, heads = d["hidden_size"], d["num_attention_heads"]
        kv = d.get("kv_channels", h // heads)
        if kv * heads != h:
            raise ValueError(f"kv_channels={kv} x num_attention_heads={heads} != hidden_size={h}: the original "
                             "splits c_attn by hidden_size, so these must agree")
        if float(d.get("rotary_pct", 1.0)) != 1.0:
            raise NotImplementedError(f"rotary_pct={d['rotary_pct']}: only full rotary (1.0) is ported")
        seq = int(d.get("seq_length", 2048))
        no_bias = bool(d.get("no_bias", True))
        text = LMConfig(
            vocab_size=d["vocab_size"], hidden_size=h, intermediate_size=d["intermediate_size"] // 2,
            num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=heads, head_dim=kv,
            rms_norm_eps=d.get("layer_norm_epsilon", 1e-6), rope_theta=float(d.get("rotary_emb_base", 10000)),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            qkv_bias=True, o_bias=not no_bias, mlp_bias=not no_bias, hidden_act="silu",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), family="qwen",
            logn_attn_len=seq if d.get("use_logn_attn", True) else None,
            rope_ntk_len=seq if d.get("use_dynamic_ntk", True) else None)
        v = dict(d["visual"])
        visual = QwenVisualConfig(
            width=v["width"], layers=v["layers"], heads=v["heads"], mlp_ratio=v["mlp_ratio"],
            image_size=v["image_size"], patch_size=v["patch_size"], output_dim=v["output_dim"],
            n_queries=v.get("n_queries", 256))
        kw = dict(text=text, visual=visual, image_start_id=v["image_start_id"])
        kw.update(overrides)
        return cls(**kw)

    def to_original(self) -> dict:
        """The `config.json` dict of the original schema (inverse of `from_original`)."""
        t, v = self.text, self.visual
        seq = t.logn_attn_len or t.rope_ntk_len or 2048
        visual = dict(heads=v.heads, image_size=v.image_size, image_start_id=self.image_start_id,
                      layers=v.layers, mlp_ratio=v.mlp_ratio, output_dim=v.output_dim, patch_size=v.patch_size,
                      width=v.width)
        if v.n_queries != 256:
            visual["n_queries"] = v.n_queries
        return {
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False,
            "fp32": t.param_dtype == "float32", "hidden_size": t.hidden_size, "initializer_range": 0.02,
            "intermediate_size": 2 * t.intermediate_size, "kv_channels": t.head_dim,
            "layer_norm_epsilon": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
            "model_type": "qwen", "no_bias": not t.mlp_bias, "num_attention_heads": t.num_heads,
            "num_hidden_layers": t.num_layers, "onnx_safe": None, "rotary_emb_base": t.rope_theta,
            "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": seq,
            "tie_word_embeddings": t.tie_word_embeddings, "tokenizer_type": "QWenTokenizer",
            "use_cache": True, "use_dynamic_ntk": t.rope_ntk_len is not None, "use_flash_attn": False,
            "use_logn_attn": t.logn_attn_len is not None, "visual": visual, "vocab_size": t.vocab_size,
        }


# ----------------------------------------------------------------------------- position tables


def _cubic_weights(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
    """Keys cubic kernel at the 4 taps (torch's `get_cubic_upsample_coefficients`)."""
    def near(x):   # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return far(t + 1), near(t), near(1 - t), far(2 - t)


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` matrix of `F.interpolate(mode='bicubic', align_corners=False)` along one axis.

    torch: A = -0.75, no antialias, `src = (dst + 0.5) * in/out - 0.5` (not clamped for cubic),
    taps floor(src)-1 .. floor(src)+2 clamped to the border. `jax.image.resize('bicubic')` differs
    (A = -0.5, antialiasing when downsampling), hence this table.
    """
    m = np.zeros((out_size, in_size), np.float64)
    scale = np.float32(in_size) / np.float32(out_size)          # torch computes the scale in fp32
    for dst in range(out_size):
        src = np.float32((dst + 0.5) * scale - 0.5)
        i0 = math.floor(src)
        for k, w in zip(range(i0 - 1, i0 + 3), _cubic_weights(float(src) - i0)):
            m[dst, min(max(k, 0), in_size - 1)] += w
    return m


def resize_pos_table(table: Array, grid: int) -> Array:
    """The original's `get_abs_pos`: a square `[S*S, C]` table bicubic-resampled to `[grid*grid, C]`
    (identity when S == grid). Static sizes, so the resampling matrix is a numpy constant."""
    side = math.isqrt(table.shape[0])
    if side == grid:
        return table
    m = jnp.asarray(torch_bicubic_matrix(side, grid), jnp.float32)
    x = table.astype(jnp.float32).reshape(side, side, -1)
    out = jnp.einsum("ia,jb,abc->ijc", m, m, x, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(grid * grid, -1).astype(table.dtype)


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
    """MAE 2-D sin-cos table `[grid*grid, dim]` in fp32 as the original builds it: the first dim/2
    channels encode the column (w), the last dim/2 the row, each half `[sin | cos]`."""
    coords = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w first

    def one_axis(d, pos):
        omega = np.arange(d // 2, dtype=np.float32) / np.float32(d / 2.0)
        omega = (1.0 / np.float32(10000) ** omega).astype(np.float32)
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one_axis(dim // 2, coords[0]), one_axis(dim // 2, coords[1])], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- vision encoder


class Resampler(nn.Module):
    """`attn_pool`: 256 learned queries cross-attend (one `nn.MultiheadAttention`, no residual, no MLP)
    to the ViT tokens. query = ln_q(query) + pos (16x16 sin-cos); key = ln_kv(kv_proj x) + pos
    resampled to the ViT grid; value = ln_kv(kv_proj x)."""

    cfg: QwenVisualConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x `[N, P, width]` -> `[N, n_queries, output_dim]` (before ln_post / proj)."""
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, heads = cfg.output_dim, cfg.resampler_heads
        n, p = x.shape[:2]
        query = self.param("query", L.dense_init(("vision_query", "embed")), (cfg.n_queries, d), pdt)
        table = sincos_2d_table(d, math.isqrt(cfg.n_queries))   # frozen in the original; stored in checkpoints
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            lambda *_: jnp.asarray(table, pdt), ("vision_query", "embed")), (cfg.n_queries, d), pdt)
        if cfg.width != d:   # the original uses Identity when the widths agree
            x = L.Linear(d, ("vision_embed", "embed"), dtype=dt, param_dtype=pdt, name="kv_proj")(x)
        norm = dict(eps=cfg.layer_norm_eps, axis_name="embed", dtype=dt, param_dtype=pdt)
        kv = L.LayerNorm(**norm, name="ln_kv")(x)
        q = L.LayerNorm(**norm, name="ln_q")(query) + pos.astype(dt)
        k = kv + resize_pos_table(pos, math.isqrt(p)).astype(dt)[None]
        lin = dict(use_bias=True, dtype=dt, param_dtype=pdt)
        q = L.Linear(d, ("embed", "heads"), name="q_proj", **lin)(q)
        k = L.Linear(d, ("embed", "heads"), name="k_proj", **lin)(k)
        v = L.Linear(d, ("embed", "heads"), name="v_proj", **lin)(kv)
        hd = d // heads
        q = jnp.broadcast_to(q.reshape(1, cfg.n_queries, heads, hd), (n, cfg.n_queries, heads, hd))
        out, _ = L.dot_attention(q, k.reshape(n, p, heads, hd), v.reshape(n, p, heads, hd), None)
        return L.Linear(d, ("heads", "embed"), name="out_proj", **lin)(out.reshape(n, cfg.n_queries, d))


class QwenVisual(nn.Module):
    """`transformer.visual`: patch conv (as a matmul) + resampled 16x16 positions -> ln_pre -> scanned
    resblocks -> resampler -> ln_post -> `x @ proj` (a raw `(D, D)` parameter, not a Linear)."""

    cfg: QwenVisualConfig

    @nn.compact
    def __call__(self, pixel_values: Array, output_hidden_states: bool = False) -> tuple[Array, Array | None]:
        """pixel_values `[N, C, H, W]` -> (features `[N, n_queries, output_dim]`,
        per-layer ViT states `[layers+1, N, P, width]` (0 = after ln_pre) | None)."""
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match "
                             f"(N, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size})")
        x = L.Linear(cfg.width, ("vision_patch", "vision_embed"), dtype=dt, param_dtype=pdt, name="conv1")(
            patchify(pixel_values.astype(dt), cfg.patch_size))
        pos = self.param("positional_embedding", L.dense_init(("vision_pos", "vision_embed")),
                         (POS_TABLE_GRID ** 2, cfg.width), pdt)
        x = x + resize_pos_table(pos, cfg.grid).astype(dt)[None]
        x = L.LayerNorm(cfg.layer_norm_eps, "vision_embed", dt, pdt, name="ln_pre")(x)
        # The original's resblock (ln_1, attn with per-head packed in_proj, split by conversion; ln_2,
        # c_fc/c_proj with exact GELU) is the shared pre-norm ViT block under these names.
        stack = L.scan_layers(L.remat_block(L.ViTBlock, cfg.remat), cfg.layers)
        h, ys = stack(cfg.heads, cfg.width // cfg.heads, cfg.mlp_width, "gelu", cfg.layer_norm_eps,
                      ("ln_1", "attn", "ln_2", "mlp"), ("c_fc", "c_proj"),
                      output_hidden_states=output_hidden_states, dtype=dt, param_dtype=pdt, name="layers")(x, None)
        feats = Resampler(cfg, name="attn_pool")(h)
        feats = L.LayerNorm(cfg.layer_norm_eps, "embed", dt, pdt, name="ln_post")(feats)
        proj = self.param("proj", L.dense_init(("embed", "vision_proj")), (cfg.output_dim, cfg.output_dim), pdt)
        feats = jnp.einsum("nqd,de->nqe", feats, proj.astype(dt))
        hidden = jnp.concatenate([x[None], ys], axis=0) if output_hidden_states else None
        return feats, hidden


# ----------------------------------------------------------------------------- image spans


def image_span_mask(input_ids: Array, image_start_id: int) -> Array:
    """`[B, T]` bool: the positions strictly between an `<img>` and its `</img>` (path bytes and pads
    alike), which the resampler outputs overwrite. `<img>`/`</img>` keep their embeddings."""
    is_start = input_ids == image_start_id
    opened = jnp.cumsum(is_start, axis=-1) - jnp.cumsum(input_ids == image_start_id + 1, axis=-1)
    return (opened > 0) & ~is_start


def check_image_spans(input_ids, n_images: int, cfg: QwenVLConfig) -> None:
    """Host-side check (skipped under tracing) that every `<img>..</img>` span is what the tokenizer
    writes (exactly `n_queries` positions, a path of at most `n_queries - 2` bytes so that an
    `<imgpad>` follows it, as the original's path lookup requires) and that there is one image each."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    starts, ends = np.argwhere(ids == cfg.image_start_id), np.argwhere(ids == cfg.image_end_id)
    if len(starts) != len(ends) or (len(starts) and np.any(starts[:, 0] != ends[:, 0])):
        raise ValueError(f"unbalanced image spans: {len(starts)} <img> (id {cfg.image_start_id}) vs {len(ends)} "
                         f"</img> (id {cfg.image_end_id}), or a span crossing rows")
    if len(starts) != n_images:
        raise ValueError(f"the prompt has {len(starts)} image span(s) but {n_images} image(s) were given")
    q = cfg.tokens_per_image
    for k, ((b, s), (_, e)) in enumerate(zip(starts, ends)):
        if e - s - 1 != q:
            raise ValueError(f"image span {k} (row {b}, <img> at {s}, </img> at {e}) holds {e - s - 1} positions; "
                             f"Qwen-VL writes exactly {q} resampler outputs between <img> and </img> "
                             f"(use the Qwen-VL tokenizer's <img>path</img> encoding)")
        if not np.any(ids[b, s + 1:e - 1] == cfg.image_pad_id):
            raise ValueError(f"image span {k} (row {b}, <img> at {s}) has no <imgpad> (id {cfg.image_pad_id}) "
                             f"before its last slot: the path is longer than {q - 2} bytes, which the original "
                             "model cannot read back")


# ----------------------------------------------------------------------------- composition


class QwenVL(nn.Module):
    """`transformer.visual` + QWen LM (`DecoderLM`), with images spliced at the `<img>` spans."""

    cfg: QwenVLConfig

    def setup(self):
        self.visual = QwenVisual(self.cfg.visual)
        self.language_model = DecoderLM(self.cfg.text)

    def encode_images(self, pixel_values: Array, output_hidden_states: bool = False):
        """`[N, C, H, W]` -> (features `[N, 256, D]`, ViT per-layer states | None)."""
        return self.visual(pixel_values, output_hidden_states)

    def embed(self, input_ids: Array) -> Array:
        return self.language_model.embed(jnp.clip(input_ids, 0, self.cfg.text.vocab_size - 1))

    def logit_lens(self, hidden: Array, apply_norm: bool = True) -> Array:
        return self.language_model.logit_lens(hidden, apply_norm)

    def check_inputs(self, input_ids, pixel_values=None, **_) -> None:
        """Host-side input checks on concrete arrays; call before `jax.jit` (the Engine does)."""
        check_image_spans(input_ids, 0 if pixel_values is None else int(np.shape(pixel_values)[0]), self.cfg)

    def __call__(self, input_ids: Array, pixel_values: Array | None = None, *,
                 attention_mask: Array | None = None, positions: Array | None = None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | int | None = None,
                 ntk_seq_len: Array | int | None = None, output_hidden_states: bool = False,
                 output_vision_hidden_states: bool = False, attn_layers: Sequence[int] = (),
                 logits: str = "all", train: bool = False) -> VLMOutput:
        """input_ids `[B, T]` with `<img>path</img>` spans as the tokenizer writes them (258 ids);
        pixel_values `[N, C, H, W]`, one per span in row-major (batch, position) order, or None
        (text only / decoding steps).

        attention_mask: `[B, T]` without a cache, `[B, S]` over cache slots with one.
        positions: default the absolute slot index `cache_index + arange(T)` for every row: the
            original ignores padding for RoPE and logn, so left-padded rows keep their pads' slots.
        ntk_seq_len: the prefill length; pass it on every cached decoding step so the NTK alpha
            stays the prefill's, as the original does (see `DecoderLM`).
        train: training mode (no logn, no NTK), as the original's `self.training`.
        hidden_states follow `LMOutput` (index L = last layer before `ln_f`; HF's tuple instead holds
        `ln_f` of it, which is `final_hidden` here).
        """
        cfg = self.cfg
        b, t = input_ids.shape
        embeds = self.embed(input_ids)
        image_mask = image_span_mask(input_ids, cfg.image_start_id)
        feats = vis_states = None
        if pixel_values is not None:
            check_image_spans(input_ids, pixel_values.shape[0], cfg)
            feats, vis_states = self.encode_images(pixel_values, output_vision_hidden_states)
            embeds = splice_image_features(embeds, image_mask, feats.reshape(-1, feats.shape[-1]))
        if positions is None:
            start = 0 if cache is None else jnp.asarray(cache_index, jnp.int32)
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        out = self.language_model(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask,
                                  cache=cache, cache_index=cache_index, output_hidden_states=output_hidden_states,
                                  attn_layers=attn_layers, logits=logits, ntk_seq_len=ntk_seq_len, train=train)
        return VLMOutput(logits=out.logits, final_hidden=out.final_hidden, hidden_states=out.hidden_states,
                         attentions=out.attentions, cache=out.cache, vision_hidden_states=vis_states,
                         image_features=feats, image_token_mask=image_mask)


def example_inputs(cfg: QwenVLConfig) -> tuple[Array, Array]:
    """Smallest inputs that touch every parameter (for `init_params` / `abstract_params`)."""
    q = cfg.tokens_per_image
    ids = jnp.asarray([[cfg.image_start_id] + [cfg.image_pad_id] * q + [cfg.image_end_id]], jnp.int32)
    pix = jnp.zeros((1, cfg.visual.num_channels, cfg.visual.image_size, cfg.visual.image_size), jnp.float32)
    return ids, pix


def init_cache(cfg: QwenVLConfig, batch: int, max_len: int, dtype=None) -> tuple[Array, Array]:
    """Zeroed KV cache `(k, v)`, each `[L, B*H, max_len, Dh]` (see `llama.init_cache`)."""
    return lm_init_cache(cfg.text, batch, max_len, dtype)
