"""A tiny random Qwen-VL-Chat that speaks the real tokenizer (vocab 151936, ../shared's qwen.tiktoken),
shared by the SC-Tune loop and the `jaxvlm generate` tests."""
from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np

# seq_length 2048: logn attention and dynamic NTK stay off at these lengths, as for the real model
TINY = dict(hidden_size=128, num_attention_heads=4, kv_channels=32, num_hidden_layers=2, intermediate_size=256,
            vocab_size=151936, seq_length=2048, layer_norm_epsilon=1e-6, rotary_emb_base=10000, no_bias=True,
            visual=dict(heads=2, image_size=56, image_start_id=151857, layers=1, mlp_ratio=2.0, output_dim=128,
                        patch_size=14, width=32))


def tiny_qwen_vl_chat(shared_dir: pathlib.Path):
    """(tokenizer, model, host params) of the tiny random model."""
    from jaxvlm.data.qwen_vl_tokenizer import QwenTokenizer
    from jaxvlm.models.params import init_params
    from jaxvlm.models.qwen_vl import QwenVL, QwenVLConfig, example_inputs
    tok = QwenTokenizer.from_dir(str(shared_dir / "fixtures" / "qwen_vl_chat"))
    cfg = QwenVLConfig.from_original(TINY)
    model = QwenVL(cfg)
    return tok, model, jax.device_get(init_params(model, jax.random.key(0), *example_inputs(cfg)))


def write_original_folder(path: pathlib.Path, model, params, shared_dir: pathlib.Path) -> pathlib.Path:
    """The model as an original Qwen-VL-Chat folder: config.json, safetensors weights, qwen.tiktoken."""
    from jaxvlm.conversion import qwen_vl as conv
    conv.save_original(path, model.cfg, params)
    shutil.copy(shared_dir / "fixtures" / "qwen_vl_chat" / "qwen.tiktoken", path)
    return path


def random_images(folder: pathlib.Path, n: int, seed: int = 0) -> list[str]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names
