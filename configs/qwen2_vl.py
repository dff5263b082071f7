"""Model configs of the released Qwen2-VL / Qwen2.5-VL Instruct checkpoints (values from their
`config.json`). `get_config(name)` -> `jaxvlm.models.qwen2_vl.Qwen2VLConfig`.

    >>> cfg = get_config("qwen2_5_vl_7b")
    >>> abstract_params(Qwen2VL(cfg), *example_inputs(cfg))     # shapes only, no memory
"""
from __future__ import annotations

from jaxvlm.models.llama import LMConfig
from jaxvlm.models.qwen2_vl import Qwen2VLConfig, QwenVisionConfig

MROPE = (16, 24, 24)     # head_dim 128 -> 64 frequencies split over (t, h, w)


def _lm(vocab, hidden, inter, layers, heads, kv, tie, max_pos):
    return LMConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, rms_norm_eps=1e-6, rope_theta=1_000_000.0, mrope_section=MROPE,
                    max_position_embeddings=max_pos, qkv_bias=True, tie_word_embeddings=tie, family="qwen2")


def _qwen2_vl_vision(out):
    return QwenVisionConfig(variant="qwen2_vl", hidden_size=1280, intermediate_size=1280 * 4, num_layers=32,
                            num_heads=16, out_hidden_size=out, hidden_act="quick_gelu", window_size=None,
                            fullatt_block_indexes=(), tokens_per_second=None)


def _qwen2_5_vl_vision(out):
    return QwenVisionConfig(variant="qwen2_5_vl", hidden_size=1280, intermediate_size=3420, num_layers=32,
                            num_heads=16, out_hidden_size=out, hidden_act="silu", window_size=112,
                            fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)


CONFIGS = {
    "qwen2_vl_2b": lambda: Qwen2VLConfig(_lm(151936, 1536, 8960, 28, 12, 2, True, 32768), _qwen2_vl_vision(1536)),
    "qwen2_vl_7b": lambda: Qwen2VLConfig(_lm(152064, 3584, 18944, 28, 28, 4, False, 32768), _qwen2_vl_vision(3584)),
    "qwen2_5_vl_3b": lambda: Qwen2VLConfig(_lm(151936, 2048, 11008, 36, 16, 2, True, 128000),
                                           _qwen2_5_vl_vision(2048)),
    "qwen2_5_vl_7b": lambda: Qwen2VLConfig(_lm(152064, 3584, 18944, 28, 28, 4, False, 128000),
                                           _qwen2_5_vl_vision(3584)),
}
HF_NAMES = {"qwen2_vl_2b": "Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl_7b": "Qwen/Qwen2-VL-7B-Instruct",
            "qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct"}


def get_config(name: str = "qwen2_5_vl_7b", dtype: str = "float32", param_dtype: str | None = None) -> Qwen2VLConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown Qwen2-VL config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name]().with_dtype(dtype, param_dtype)
