"""LLaVA-1.5 / LLaVA-MORE: CLIP tower -> feature layer + select strategy -> mlp2x_gelu projector ->
features spliced into the LM's embedding sequence at the image tokens.

Example:
    >>> cfg = LlavaConfig.from_hf(hf_llava_config_dict)
    >>> model = Llava(cfg)
    >>> out = model.apply({"params": params}, input_ids, pixel_values, attention_mask=mask,
    ...                   output_hidden_states=True, attn_layers=(1,))
    >>> out.logits, out.hidden_states, out.attentions, out.vision_hidden_states, out.image_token_mask
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
from jaxvlm.models.clip import CLIPVision, CLIPVisionConfig
from jaxvlm.models.llama import DecoderLM, LMConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    text: LMConfig
    vision: CLIPVisionConfig
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"   # "default" drops CLS, "full" keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def replace(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, **kw)

    def with_dtype(self, dtype: str, param_dtype: str | None = None) -> "LlavaConfig":
        p = param_dtype or dtype
        return self.replace(text=self.text.replace(dtype=dtype, param_dtype=p),
                            vision=self.vision.replace(dtype=dtype, param_dtype=p))

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "LlavaConfig":
        """From a transformers `LlavaConfig` (object or `config.json` dict)."""
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        text = LMConfig.from_hf(d["text_config"])
        vision = CLIPVisionConfig.from_hf(d["vision_config"])
        kw = dict(text=text, vision=vision,
                  image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
                  vision_feature_layer=d.get("vision_feature_layer", -2),
                  vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                  projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                  projector_bias=d.get("multimodal_projector_bias", True))
        kw.update(overrides)
        return cls(**kw)


@flax.struct.dataclass
class VLMOutput:
    """LM outputs (see `LMOutput`) plus the vision side.

    vision_hidden_states: `[Lv+1, N, 1+P, Dv]` per-layer tower states (on request)
    image_features:       `[N, P', D]` projected features that were spliced in
    image_token_mask:     `[B, T]` bool, where the image features sit in the sequence
    """

    logits: Array | None
    final_hidden: Array
    hidden_states: Array | None = None
    attentions: Array | None = None
    cache: tuple[Array, Array] | None = None
    vision_hidden_states: Array | None = None
    image_features: Array | None = None
    image_token_mask: Array | None = None


def splice_image_features(embeds: Array, image_mask: Array, features: Array) -> Array:
    """Put `features [M, D]` (all images, in order) at the True positions of `image_mask [B, T]`,
    row-major over the batch, as HF's `masked_scatter` does. Static shapes, jittable."""
    flat = image_mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    gathered = features[idx].reshape(embeds.shape).astype(embeds.dtype)
    return jnp.where(image_mask[..., None], gathered, embeds)


def real_first(mask: Array) -> Array:
    """Stable permutation putting the True entries of `mask [S]` first, in order: real image slots
    (or their feature rows, or their grid rows) ahead of padding, so that `splice_image_features`,
    which takes features in order of the image tokens, never reads a padding slot."""
    return jnp.argsort(~mask.astype(bool), stable=True)


def check_image_tokens(input_ids, n_images: int, tokens_per_image: int, image_token_id: int) -> None:
    """Host-side check (skipped under tracing): image tokens must match the features exactly."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    n_tok = int(np.sum(np.asarray(input_ids) == image_token_id))
    if n_tok != n_images * tokens_per_image:
        raise ValueError(
            f"image tokens do not match images: the prompt has {n_tok} image tokens (id {image_token_id}) but "
            f"{n_images} image(s) x {tokens_per_image} features = {n_images * tokens_per_image}")


class Llava(nn.Module):
    cfg: LlavaConfig

    def setup(self):
        cfg = self.cfg
        self.vision_tower = CLIPVision(cfg.vision)
        # mlp2x_gelu: linear_1 -> GELU -> linear_2
        self.multi_modal_projector = L.MLP(
            cfg.text.hidden_size, cfg.text.hidden_size, act=cfg.projector_hidden_act, use_bias=cfg.projector_bias,
            names=("linear_1", "linear_2"), embed_axis="vision_embed", mlp_axis="mlp", out_axis="embed",
            dtype=jnp.dtype(cfg.text.dtype), param_dtype=jnp.dtype(cfg.text.param_dtype))
        self.language_model = DecoderLM(cfg.text)

    def encode_images(self, pixel_values: Array, output_hidden_states: bool = False):
        """`[N, C, H, W]` -> (projected features `[N, P', D]`, vision per-layer states | None)."""
        cfg = self.cfg
        vis = self.vision_tower(pixel_values, output_hidden_states=True)
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, tuple) \
            else (cfg.vision_feature_layer,)
        feats = jnp.concatenate([vis.hidden_states[i] for i in layers], axis=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats), (vis.hidden_states if output_hidden_states else None)

    def logit_lens(self, hidden: Array, apply_norm: bool = True) -> Array:
        return self.language_model.logit_lens(hidden, apply_norm)

    def embed(self, input_ids: Array) -> Array:
        return self.language_model.embed(jnp.clip(input_ids, 0, self.cfg.text.vocab_size - 1))

    def check_inputs(self, input_ids, pixel_values=None, **_) -> None:
        """Host-side input checks on concrete arrays; call before `jax.jit` (the Engine does)."""
        n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
        check_image_tokens(input_ids, n_images, self.cfg.tokens_per_image, self.cfg.image_token_id)

    def __call__(self, input_ids: Array, pixel_values: Array | None = None, *,
                 attention_mask: Array | None = None, positions: Array | None = None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | int | None = None,
                 output_hidden_states: bool = False, output_vision_hidden_states: bool = False,
                 attn_layers: Sequence[int] = (), logits: str = "all") -> VLMOutput:
        """input_ids `[B, T]` with `image_token_id` placeholders (`tokens_per_image` per image);
        pixel_values `[N, C, H, W]` for the N images in order of appearance (None when decoding)."""
        cfg = self.cfg
        embeds = self.embed(input_ids)
        image_mask = input_ids == cfg.image_token_id
        feats = vis_states = None
        if pixel_values is not None:
            check_image_tokens(input_ids, pixel_values.shape[0], cfg.tokens_per_image, cfg.image_token_id)
            feats, vis_states = self.encode_images(pixel_values, output_vision_hidden_states)
            embeds = splice_image_features(embeds, image_mask, feats.reshape(-1, feats.shape[-1]))
        out = self.language_model(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask,
                                  cache=cache, cache_index=cache_index, output_hidden_states=output_hidden_states,
                                  attn_layers=attn_layers, logits=logits)
        return VLMOutput(logits=out.logits, final_hidden=out.final_hidden, hidden_states=out.hidden_states,
                         attentions=out.attentions, cache=out.cache, vision_hidden_states=vis_states,
                         image_features=feats, image_token_mask=image_mask)
