"""Tiny LLaVA on synthetic batches: the smoke / resumption / CLI config (runs on a laptop CPU).

jaxvlm train --config configs/train_tiny.py --set train.steps=20 --set mesh.fsdp=2 --set mesh.data=-1
"""
from jaxvlm.train.config import train_defaults


def get_config():
    cfg = train_defaults()
    cfg.optim.update(default_lr=1e-3, warmup_steps=2, schedule="warmup_cosine")
    cfg.train.update(steps=20, log_every=1, workdir="runs/tiny")
    cfg.checkpoint.update(every=10, keep=2)
    return cfg
