"""Qwen-VL-Chat (Qwen-VL v1, 9.6B): ViT-bigG 448px + 256-query resampler + QWen-7B.

`ORIGINAL_CONFIG` is the checkpoint's `config.json` (remote-code schema); the model config is built
from it exactly as a converted checkpoint's would be, so `abstract_params` of `get_config()["model"]`
has the published parameter count (9,656,935,168 = the bf16 index's total_size / 2).

    >>> cfg = get_config()
    >>> QwenVL(cfg["model"])
"""
from __future__ import annotations

from jaxvlm.models.qwen_vl import QwenVLConfig

ORIGINAL_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 22016, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False,
    "tokenizer_type": "QWenTokenizer", "torch_dtype": "bfloat16", "use_cache": True, "use_dynamic_ntk": True,
    "use_flash_attn": False, "use_logn_attn": True,
    "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
               "output_dim": 4096, "patch_size": 14, "width": 1664},
    "vocab_size": 151936,
}
NUM_PARAMS = 9_656_935_168

# generation_config.json of the chat model (sampling); SC-Tune's locator and the fixtures decode greedily.
GENERATION = dict(chat_format="chatml", eos_token_id=151643, pad_token_id=151643, do_sample=True, top_k=0,
                  top_p=0.3, max_new_tokens=512, max_window_size=6144)


def get_config(dtype: str = "bfloat16", param_dtype: str = "float32") -> dict:
    """Model config + what a run needs next to it (tokenizer file, image size, generation defaults)."""
    model = QwenVLConfig.from_original(ORIGINAL_CONFIG).with_dtype(dtype, param_dtype)
    return {
        "model": model,
        "hf_repo": "Qwen/Qwen-VL-Chat",          # original remote-code layout: load with conversion.qwen_vl
        "tokenizer_file": "qwen.tiktoken",
        "image_size": ORIGINAL_CONFIG["visual"]["image_size"],
        "generation": dict(GENERATION),
        "num_params": NUM_PARAMS,
    }
