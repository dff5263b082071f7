"""The embedded default's second recipe: a 2.56M-parameter Qwen2.5-VL (windowed patch tower with 2-D
rotary, 2x2 PatchMerger, Qwen2 LM with M-RoPE) learning the synthetic shapes world from scratch on a
2-core CPU, through the same train loop as `configs/shapes_llava.py`.

    jaxvlm demo --family qwen2_5_vl --train --out out/demo_qwen

`jaxvlm demo --family qwen2_5_vl` generates the world and tokenizer, sets the data paths and runs
stage 0 (VISION_PRETRAIN: dense per-patch pretraining of the tower, as for the LLaVA recipe) first.

Shapes: 112 px images in 8 px patches (14 x 14), merged 2 x 2 into 7 x 7 = 49 image tokens, the
LLaVA recipe's grid; windows of 64 px (4 x 4 merged units, so a 7-unit side has a full window and a
partial one, the padded-window path) with full attention in the last block, as Qwen2.5-VL mixes them.
The LM is the LLaVA recipe's LM in Qwen2 form (qkv bias, M-RoPE over head_dim 32: sections 4/6/6).
"""
from jaxvlm.train.config import train_defaults

VOCAB = 1024           # >= the shapes tokenizer's size (jaxvlm.data.shapes_tokenizer.DEFAULT_VOCAB_SIZE)
# The shapes tokenizer's Qwen2.5-VL specials (ids fixed by jaxvlm.data.shapes_tokenizer.SPECIAL_TOKENS;
# checked by the demo).
TOKEN_IDS = dict(vision_start_token_id=8, vision_end_token_id=9, image_token_id=10, video_token_id=11)
IMAGE_PIXELS = 112 * 112   # the world's images: smart_resize keeps them as they are

#: Stage 0 as in configs/shapes_llava.py, on the tower's last block (the merger's input), per 8 px
#: patch. A Qwen image is 196 patch rows against LLaVA's 49, so fewer steps fit the budget.
VISION_PRETRAIN = dict(steps=1200, batch=16, lr=3e-3, warmup=100, object_weight=5.0, images=6000)


def get_config():
    cfg = train_defaults()
    cfg.model.update(
        family="qwen2_vl",
        text=dict(vocab_size=VOCAB, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6,
                  num_kv_heads=2, max_position_embeddings=512, rope_theta=10000.0, mrope_section=(4, 6, 6),
                  scan_layers=False),
        vision=dict(variant="qwen2_5_vl", hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4,
                    out_hidden_size=192, patch_size=8, temporal_patch_size=2, spatial_merge_size=2,
                    window_size=64, fullatt_block_indexes=(2,), hidden_act="silu"),
        **TOKEN_IDS)
    cfg.data.update(kind="pipeline", template="chatml", batch_size=8, seq_len=192, images_per_sample=1, seed=0,
                    min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS)
    # The tower (patch embedding + blocks) stays frozen after stage 0, as the LLaVA recipe keeps its tower;
    # the merger, Qwen's projector, trains with the LM.
    cfg.optim.update(groups=[dict(name="vision_tower", pattern=r"visual/(?!merger/).*", lr=None)], default_lr=3e-4,
                     schedule="warmup_cosine", warmup_steps=100, weight_decay=0.01, clip_norm=1.0,
                     end_lr_ratio=0.05)
    cfg.train.update(steps=1400, log_every=50, workdir="out/demo_qwen/train")
    cfg.checkpoint.update(every=500, keep=1)
    return cfg
