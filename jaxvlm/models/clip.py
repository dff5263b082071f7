"""CLIP ViT vision tower (the LLaVA family's image encoder), blocks scanned.

Example:
    >>> from jaxvlm.models.params import init_params
    >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    ...                        image_size=32, patch_size=8)
    >>> tower = CLIPVision(cfg)
    >>> pix = jnp.zeros((1, 3, 32, 32))                      # NCHW, as HF image processors emit
    >>> params = init_params(tower, jax.random.key(0), pix)
    >>> out = tower.apply({"params": params}, pix)
    >>> out.hidden_states.shape                               # (L+1, N, 1 + 16, 32); 0 = after pre_layrnorm
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxvlm.models import layers as L

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def replace(self, **kw) -> "CLIPVisionConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "CLIPVisionConfig":
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        kw = dict(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                  num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                  image_size=d["image_size"], patch_size=d["patch_size"], num_channels=d.get("num_channels", 3),
                  layer_norm_eps=d.get("layer_norm_eps", 1e-5), hidden_act=d.get("hidden_act", "quick_gelu"))
        kw.update(overrides)
        return cls(**kw)


@flax.struct.dataclass
class VisionOutput:
    """last_hidden: `[N, 1+P, D]` (before post_layernorm); pooled: post_layernorm(CLS) `[N, D]`;
    hidden_states: `[L+1, N, 1+P, D]` (index 0 = after pre_layrnorm, as HF) or None."""

    last_hidden: Array
    pooled: Array
    hidden_states: Array | None = None


def patchify(pixel_values: Array, patch: int) -> Array:
    """`[N, C, H, W]` -> `[N, (H/p)*(W/p), C*p*p]`, patches row-major, features in (C, p, p) order
    so that a Conv2d weight `[D, C, p, p]` becomes a matmul kernel by `reshape(D, -1).T`."""
    n, c, h, w = pixel_values.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


class _Embeddings(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, patches: Array) -> Array:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x = L.Linear(cfg.hidden_size, ("vision_patch", "vision_embed"), dtype=dt, param_dtype=pdt,
                     name="patch_embedding")(patches)
        cls = self.param("class_embedding", L.dense_init(("vision_embed",)), (cfg.hidden_size,), pdt)
        pos = self.param("position_embedding", L.dense_init(("vision_pos", "vision_embed")),
                         (cfg.num_patches + 1, cfg.hidden_size), pdt)
        cls = jnp.broadcast_to(cls.astype(dt), (x.shape[0], 1, cfg.hidden_size))
        return jnp.concatenate([cls, x], axis=1) + pos.astype(dt)[None]


class CLIPVision(nn.Module):
    """Patch embedding + CLS + learned positions -> pre_layrnorm -> scanned blocks -> post_layernorm(CLS)."""

    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array, output_hidden_states: bool = False) -> VisionOutput:
        """pixel_values: `[N, C, H, W]` (HF layout)."""
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if pixel_values.shape[-1] != cfg.image_size or pixel_values.shape[-2] != cfg.image_size:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match image_size={cfg.image_size}")
        patches = patchify(pixel_values.astype(dt), cfg.patch_size)
        x = _Embeddings(cfg, name="embeddings")(patches)
        x = L.LayerNorm(cfg.layer_norm_eps, "vision_embed", dt, pdt, name="pre_layrnorm")(x)
        stack = L.scan_layers(L.remat_block(L.ViTBlock, cfg.remat), cfg.num_layers)
        h, ys = stack(cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.intermediate_size, cfg.hidden_act,
                      cfg.layer_norm_eps, ("layer_norm1", "self_attn", "layer_norm2", "mlp"),
                      output_hidden_states=output_hidden_states, dtype=dt, param_dtype=pdt, name="layers")(x, None)
        pooled = L.LayerNorm(cfg.layer_norm_eps, "vision_embed", dt, pdt, name="post_layernorm")(h[:, 0])
        hidden = jnp.concatenate([x[None], ys], axis=0) if output_hidden_states else None
        return VisionOutput(last_hidden=h, pooled=pooled, hidden_states=hidden)
