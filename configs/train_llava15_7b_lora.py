"""LLaVA-1.5-7B LoRA fine-tune (REVERSE-style groups: LoRA 2e-4, projector 2e-5, rest frozen) on a
TPU/GPU slice, bf16 compute with fp32 master weights, full remat of the LM blocks.

jaxvlm train --config configs/train_llava15_7b_lora.py --set model.init_from=/ckpt/llava-1.5-7b-hf \
    --set data.kind='npz' --set data.path=/data/train.npz
"""
from jaxvlm.train.config import train_defaults


def get_config():
    cfg = train_defaults()
    cfg.model.update(init_from="/path/to/llava-1.5-7b-hf", dtype="bfloat16", param_dtype="float32",
                     text_remat="full", vision_remat="full")
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    cfg.lora.update(enabled=True, rank=128, alpha=256.0, dropout=0.05)
    cfg.optim.update(groups=[dict(name="lora", pattern=r"lora/.*", lr=2e-4),
                             dict(name="projector", pattern=r"base/multi_modal_projector/.*", lr=2e-5)],
                     default_lr=None, warmup_steps=30, schedule="warmup_cosine", weight_decay=0.0)
    cfg.data.update(kind="npz", batch_size=128, seq_len=2048)
    cfg.train.update(steps=5000, accum_steps=8, log_every=10, workdir="runs/llava15_7b_lora")
    cfg.checkpoint.update(every=500, keep=3)
    return cfg
