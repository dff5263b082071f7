"""Python configs: a nested dict with attribute access, plus strict `key=value` overrides.

A config file defines `get_config() -> Config`; `--set optim.default_lr=3e-5 --set mesh.tensor=4`
overrides existing keys only (an unknown key is an error naming the known ones); values are parsed
as Python literals and must keep the type of the default (ints are accepted for floats; a default
of None accepts anything).
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import os
from typing import Any, Iterable


class Config(dict):
    """dict with attribute access; nested dicts become Configs."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        for k, v in list(self.items()):
            if isinstance(v, dict) and not isinstance(v, Config):
                self[k] = Config(v)

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(f"config has no key {k!r}; known: {sorted(self)}") from None

    def __setattr__(self, k, v):
        self[k] = Config(v) if isinstance(v, dict) and not isinstance(v, Config) else v

    def to_dict(self) -> dict:
        return {k: (v.to_dict() if isinstance(v, Config) else copy.deepcopy(v)) for k, v in self.items()}


def load_config(path: str | os.PathLike) -> Config:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("_jaxvlm_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    cfg = module.get_config()
    return cfg if isinstance(cfg, Config) else Config(cfg)


def _parse(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text   # bare strings: --set data.path=/x/y.jsonl


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply `a.b.c=value` overrides in order (a new Config; the input is not modified)."""
    cfg = Config(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = cfg
        for i, p in enumerate(parts):
            if not isinstance(node, dict) or p not in node:
                where = ".".join(parts[:i]) or "<top level>"
                known = sorted(node) if isinstance(node, dict) else []
                raise KeyError(f"unknown config key {key!r}: {where} has no {p!r} (known: {known})")
            if i < len(parts) - 1:
                node = node[p]
        old, value = node[parts[-1]], _parse(text)
        if old is not None and value is not None:
            if isinstance(old, bool) != isinstance(value, bool) or (
                    not isinstance(value, type(old)) and not (isinstance(old, float) and isinstance(value, int))
                    and not (isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)))):
                raise TypeError(f"--set {key}: expected {type(old).__name__} like the default {old!r}, "
                                f"got {type(value).__name__} {value!r}")
            if isinstance(old, float):
                value = float(value)
        node[parts[-1]] = Config(value) if isinstance(value, dict) else value
    return cfg


def train_defaults() -> Config:
    """Every key a train config may set (`--set` can only override these)."""
    return Config(
        model=dict(
            family="llava",              # llava | qwen2_vl (Qwen2-VL / Qwen2.5-VL: `vision` holds QwenVisionConfig keys)
            init_from=None,              # HF LLaVA / Qwen2-VL dir (config.json + safetensors); None = random init from below
            vision_init=None,            # vision tower params from jaxvlm.train.dense_vision (random init only)
            number_init=False,           # Fourier-code rows for the tokenizer's "0.00".."1.00" tokens (random init only)
            lm_init=None,                # language_model params from jaxvlm.train.lookup_pretrain (random init only)
            projector_init=None,         # multi_modal_projector params (lookup_pretrain.align_projector; random init only)
            text=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                      num_kv_heads=4, max_position_embeddings=2048),
            vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32,
                        patch_size=8),
            image_token_id=127,
            video_token_id=None,         # qwen2_vl only: the tokenizer's <|video_pad|>, <|vision_start|>, <|vision_end|>
            vision_start_token_id=None,
            vision_end_token_id=None,
            dtype="float32",             # compute dtype ("bfloat16" on TPU/GPU)
            param_dtype="float32",       # master weights and optimizer state
            text_remat="none",           # none | full | dots | dots_no_batch
            vision_remat="none",
        ),
        mesh=dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1),
        sharding=dict(preset="fsdp_tp", overrides={}, warn_replicated_mib=16.0),
        optim=dict(groups=[], default_lr=1e-4, schedule="warmup_cosine", warmup_steps=0, total_steps=0,
                   end_lr_ratio=0.0, decay_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0),
        lora=dict(enabled=False, rank=8, alpha=16.0, dropout=0.0,
                  targets=[r"language_model/layers/(self_attn|mlp)/\w+_proj"], exclude=[r".*lm_head"]),
        # add: tokens added to the tokenizer (tokenizer: its path, default data.tokenizer) and the vocabulary
        tokens=dict(add=[], tokenizer=None, num_new=0, init="mean_cov", trainable=True, multiple_of=8),
        data=dict(kind="synthetic",          # synthetic | npz (pre-tokenized arrays) | pipeline (jaxvlm.data)
                  path=None, image_root=None, tokenizer=None, template="vicuna_v1",
                  batch_size=8, seq_len=32, images_per_sample=1, seed=0,
                  min_pixels=None, max_pixels=None,    # qwen2_vl: smart_resize bounds (None: HF's defaults)
                  curriculum=[],                       # pipeline: [[until_step, max_value], ...], easy records
                  curriculum_key="num_objects",        # first (jaxvlm.data.pipeline.curriculum_order)
                  reverse_labels=False,                # pipeline: REVERSE's span masking of the targets
                  pack=False,                          # pipeline: several samples per row
                  images_per_row=0,                    # pack: image slots a row (0: LLaVA seq_len // tokens per
                                                       # image, Qwen 4 x images_per_sample)
                  pack_bins=8),                        # pack: rows filled first-fit at a time
        train=dict(steps=100, accum_steps=1, seed=0, log_every=10, workdir="runs/default",
                   export=None,              # dir: write the final (LoRA-merged) params as a converted
                                             # checkpoint `jaxvlm generate --checkpoint` reads
                   fast_compile=False),      # XLA backend opt level 0: faster CPU compiles, slower steps
        checkpoint=dict(every=1000, keep=3, async_save=True),
    )
