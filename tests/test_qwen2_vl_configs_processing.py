"""Real-checkpoint configs (abstract build, parameter counts derived by hand) and preprocessing
(against transformers' processor: smart_resize, patch order, placeholder expansion, token types)."""
import sys

import numpy as np
import pytest

from data_utils import QWEN_NAMED, QWEN_SPECIALS, build_tokenizer
from jaxvlm.data.qwen2_vl_processing import (CHAT_TEMPLATE, ImageOnlyQwen2VLProcessor, QwenVLPreprocessor,
                                             make_image_processor, pad_batch)
from jaxvlm.models.params import abstract_params, count_params
from jaxvlm.models.qwen2_vl import Qwen2VL, check_inputs, example_inputs

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from configs.qwen2_vl import get_config  # noqa: E402

# Published sizes on the model cards (safetensors parameter counts).
PUBLISHED = {"qwen2_vl_2b": 2_208_985_600, "qwen2_vl_7b": 8_291_375_616,
             "qwen2_5_vl_3b": 3_754_622_976, "qwen2_5_vl_7b": 8_292_166_656}


def hand_count(vocab, d, ffn, layers, heads, kv, tie, vision):
    """Parameter count from the architecture, written out independently of the model code."""
    hd = d // heads
    attn = (d * d + d) + 2 * (d * kv * hd + kv * hd) + d * d          # q, k, v with bias; o without
    lm = layers * (attn + 3 * d * ffn + 2 * d) + d + vocab * d * (1 if tie else 2)
    kind, dv, ffn_v, depth = vision
    patch = dv * 3 * 2 * 14 * 14
    qkv_proj = dv * 3 * dv + 3 * dv + dv * dv + dv
    if kind == "qwen2_vl":                       # LayerNorm (w+b) x2, fc1/fc2 with bias
        block, ln_q = qkv_proj + 4 * dv + (dv * ffn_v + ffn_v) + (ffn_v * dv + dv), 2 * dv
    else:                                        # RMSNorm x2, gate/up/down with bias
        block, ln_q = qkv_proj + 2 * dv + 2 * (dv * ffn_v + ffn_v) + (ffn_v * dv + dv), dv
    merger = ln_q + (4 * dv) ** 2 + 4 * dv + 4 * dv * d + d
    return lm + patch + depth * block + merger


ARCH = {
    "qwen2_vl_2b": (151936, 1536, 8960, 28, 12, 2, True, ("qwen2_vl", 1280, 5120, 32)),
    "qwen2_vl_7b": (152064, 3584, 18944, 28, 28, 4, False, ("qwen2_vl", 1280, 5120, 32)),
    "qwen2_5_vl_3b": (151936, 2048, 11008, 36, 16, 2, True, ("qwen2_5_vl", 1280, 3420, 32)),
    "qwen2_5_vl_7b": (152064, 3584, 18944, 28, 28, 4, False, ("qwen2_5_vl", 1280, 3420, 32)),
}


@pytest.mark.parametrize("name", sorted(ARCH))
def test_real_configs_build_abstractly_with_published_counts(name):
    cfg = get_config(name, dtype="bfloat16")
    shapes = abstract_params(Qwen2VL(cfg), *example_inputs(cfg))
    assert count_params(shapes) == hand_count(*ARCH[name]) == PUBLISHED[name]
    assert shapes["visual"]["patch_embed"]["kernel"].shape == (1176, 1280)
    assert shapes["language_model"]["layers"]["self_attn"]["q_proj"]["bias"].shape[0] == cfg.text.num_layers


# ----------------------------------------------------------------------------- preprocessing

@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["You are a helpful assistant.", "What is in this picture? Describe the image.", "system user assistant"]
    return build_tokenizer(QWEN_SPECIALS, corpus * 20, vocab_size=300, **QWEN_NAMED,
                           extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                 "vision_bos_token": "<|vision_start|>",
                                                 "vision_eos_token": "<|vision_end|>"})


def images(rng, sizes):
    from PIL import Image
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_preprocessing_matches_hf_processor(tokenizer):
    ip = make_image_processor(min_pixels=28 * 28 * 4, max_pixels=56 * 56 * 4)
    pre = QwenVLPreprocessor(tokenizer, ip)
    hf = ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"},
                                         {"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    imgs = images(np.random.default_rng(0), [(60, 80), (130, 45)])
    ours = pre(msgs, images=imgs)
    prompt = pre.prompt(msgs)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    ref = hf(text=[prompt], images=imgs, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"][0])
    np.testing.assert_array_equal(ours["mm_token_type_ids"], ref["mm_token_type_ids"][0])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(ours["image_grid_thw"][0], [1, 4, 6])          # 60x80 -> 56x84 (smart_resize)
    assert (ours["input_ids"] == pre.image_token_id).sum() == ours["image_grid_thw"].prod(-1).sum() // 4

    batch = pad_batch([ours, pre("<|image_pad|>hi", images=imgs[:1])], seq_len=96, n_patches=128, n_images=4)
    assert batch["input_ids"].shape == (2, 96) and batch["pixel_values"].shape == (128, 1176)
    assert batch["image_grid_thw"].shape == (4, 3) and batch["image_grid_thw"][3].sum() == 0
    cfg = get_config("qwen2_vl_2b").replace(image_token_id=pre.image_token_id, video_token_id=pre.video_token_id)
    check_inputs(cfg, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                 mm_token_type_ids=batch["mm_token_type_ids"])     # padded batch is consistent


def test_preprocessing_errors(tokenizer):
    pre = QwenVLPreprocessor(tokenizer, make_image_processor(min_pixels=28 * 28 * 4, max_pixels=56 * 56 * 4))
    with pytest.raises(ValueError, match="smaller than one merged patch"):
        pre("<|image_pad|>", images=images(np.random.default_rng(0), [(20, 60)]))
    with pytest.raises(ValueError, match="2 image placeholders but 1 image"):
        pre("<|image_pad|><|image_pad|>", images=images(np.random.default_rng(0), [(56, 56)]))
    with pytest.raises(ValueError, match="more than seq_len"):
        pad_batch([pre("hello there")], seq_len=2, n_patches=4, n_images=1)


def test_from_hf_reads_flat_hub_config_json():
    """The hub's Qwen2-VL-7B-Instruct config.json (v4 schema: text fields at the top level,
    `rope_scaling: {type: mrope}`) gives the same model config as configs/qwen2_vl.py."""
    from jaxvlm.models.qwen2_vl import Qwen2VLConfig
    hub = {"model_type": "qwen2_vl", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
           "hidden_act": "silu", "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653,
           "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                             "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                             "temporal_patch_size": 2}}
    assert Qwen2VLConfig.from_hf(hub) == get_config("qwen2_vl_7b")
