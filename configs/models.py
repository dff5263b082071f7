"""Model configs of the real checkpoints the methods start from (shapes as published).

    >>> from configs import models
    >>> cfg = models.get_config("llava-v1.5-7b", dtype="bfloat16")

Names: llava-v1.5-7b / -13b (llava-hf layout: vocab 32064 with `<image>` = 32000),
llava-v1.5-7b-original (liuhaotian/llava-v1.5-7b, the original-repo layout REVERSE and
Chain-of-Spot use: vocab 32000, image slots are -200 in input_ids), llava-more-8b
(aimagelab LLaVA-MORE, Llama-3.1-8B + CLIP-L/336, original layout), and the LMs vicuna-7b
(lmsys/vicuna-7b-v1.5) and llama-3.1-8b. A checkpoint's own config.json always wins at import;
these are for building models abstractly (sharding plans, memory estimates) and for checks.
"""
from __future__ import annotations

from jaxvlm.models.clip import CLIPVisionConfig
from jaxvlm.models.llama import LMConfig
from jaxvlm.models.llava import LlavaConfig

IMAGE_TOKEN_INDEX = -200   # original LLaVA repo placeholder (see jaxvlm.conversion.llava_io)

# openai/clip-vit-large-patch14-336: 24 x 1024, 16 heads, 336 px / 14 = 24 x 24 = 576 patches.
CLIP_L_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                              image_size=336, patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu")


def vicuna_7b(vocab_size: int = 32000) -> LMConfig:
    """lmsys/vicuna-7b-v1.5 (Llama-2-7B shape)."""
    return LMConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)


def vicuna_13b(vocab_size: int = 32000) -> LMConfig:
    """lmsys/vicuna-13b-v1.5 (Llama-2-13B shape)."""
    return LMConfig(vocab_size=vocab_size, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                    num_kv_heads=40, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)


def llama31_8b() -> LMConfig:
    """meta-llama/Llama-3.1-8B(-Instruct): GQA 32/8, theta 500000, llama3 rope scaling x8."""
    return LMConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                    num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192),
                    max_position_embeddings=131072)


def _llava(text: LMConfig, image_token_id: int) -> LlavaConfig:
    # LLaVA-1.5 recipe: penultimate CLIP layer, CLS dropped ('patch'), mlp2x_gelu projector.
    return LlavaConfig(text=text, vision=CLIP_L_336, image_token_id=image_token_id, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu", projector_bias=True)


def llava_v15_7b() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf: 7.06B params, 576 image tokens."""
    return _llava(vicuna_7b(vocab_size=32064), image_token_id=32000)


def llava_v15_7b_original() -> LlavaConfig:
    """liuhaotian/llava-v1.5-7b (original layout; CLIP weights come from openai/clip-vit-large-patch14-336)."""
    return _llava(vicuna_7b(), image_token_id=IMAGE_TOKEN_INDEX)


def llava_v15_13b() -> LlavaConfig:
    """llava-hf/llava-1.5-13b-hf: 13.35B params."""
    return _llava(vicuna_13b(vocab_size=32064), image_token_id=32000)


def llava_more_8b() -> LlavaConfig:
    """aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning: Llama-3.1-8B-Instruct + CLIP-L/336 (original layout)."""
    return _llava(llama31_8b(), image_token_id=IMAGE_TOKEN_INDEX)


MODELS = {
    "llava-v1.5-7b": llava_v15_7b,
    "llava-v1.5-7b-original": llava_v15_7b_original,
    "llava-v1.5-13b": llava_v15_13b,
    "llava-more-8b": llava_more_8b,
    "vicuna-7b": vicuna_7b,
    "llama-3.1-8b": llama31_8b,
}


def get_config(name: str = "llava-v1.5-7b", dtype: str | None = None, param_dtype: str | None = None):
    """The named model's config, optionally with compute / parameter dtypes (e.g. "bfloat16")."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    cfg = MODELS[name]()
    if dtype is None:
        return cfg
    if isinstance(cfg, LlavaConfig):
        return cfg.with_dtype(dtype, param_dtype)
    return cfg.replace(dtype=dtype, param_dtype=param_dtype or dtype)
