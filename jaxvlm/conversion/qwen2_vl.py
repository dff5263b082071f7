"""Qwen2-VL / Qwen2.5-VL <-> jaxvlm: one declarative table drives both directions.

Canonical layout = what `save_pretrained` writes and the hub checkpoints use (`model.layers.*`,
`model.embed_tokens.*`, `model.norm.*`, `lm_head.*`, `visual.*`). transformers 5 in-memory
names (`model.language_model.*`, `model.visual.*`) are normalised on the way in.

Example:
    >>> cfg, model, params = qwen2_vl_from_torch(hf_model)
    >>> state = qwen2_vl_state_from_params(params, cfg)          # canonical HF names -> numpy
"""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from jaxvlm.conversion import layouts
from jaxvlm.conversion.api import torch_state
from jaxvlm.conversion.table import (Rule, conv_as_matmul, export_params, import_params, linear_rules, lm_rules,
                                     norm_rules)
from jaxvlm.models.params import abstract_params
from jaxvlm.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, QwenVisionConfig, example_inputs

QWEN2_VL_LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "saved": [(r"^(model\.(layers|embed_tokens|norm)\.|lm_head\.|visual\.)", r"\1")],
    "hf_memory": [
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
        (r"^lm_head\.", "lm_head."),
    ],
}


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("model.language_model.", "model.visual.")) for k in keys):
        return "hf_memory"
    if any(k.startswith(("model.layers.", "visual.")) for k in keys):
        return "saved"
    raise ValueError("unknown Qwen2-VL checkpoint layout: expected keys like 'model.layers.0.*' + 'visual.*' "
                     "(saved / hub) or 'model.language_model.*' + 'model.visual.*' (transformers 5 in memory); "
                     f"got e.g. {sorted(keys)[:5]}")


def vision_rules(cfg: QwenVisionConfig, hf_prefix: str = "visual.", path: str = "visual") -> list[Rule]:
    n, p, blk = cfg.num_layers, path + "/", f"{hf_prefix}blocks.{{i}}."
    norm_bias = cfg.variant == "qwen2_vl"          # LayerNorm vs RMSNorm
    conv = conv_as_matmul((cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size))
    rules = [Rule(f"{hf_prefix}patch_embed.proj.weight", f"{p}patch_embed/kernel", conv)]
    rules += norm_rules(f"{blk}norm1", f"{p}blocks/norm1", norm_bias, n)
    rules += norm_rules(f"{blk}norm2", f"{p}blocks/norm2", norm_bias, n)
    rules += linear_rules(f"{blk}attn.qkv", f"{p}blocks/attn/qkv", True, n)
    rules += linear_rules(f"{blk}attn.proj", f"{p}blocks/attn/proj", True, n)
    mlp = ("fc1", "fc2") if cfg.variant == "qwen2_vl" else ("gate_proj", "up_proj", "down_proj")
    for name in mlp:
        rules += linear_rules(f"{blk}mlp.{name}", f"{p}blocks/mlp/{name}", True, n)
    rules += norm_rules(f"{hf_prefix}merger.ln_q", f"{p}merger/ln_q", norm_bias)
    rules += linear_rules(f"{hf_prefix}merger.mlp.0", f"{p}merger/mlp/fc1", True)
    rules += linear_rules(f"{hf_prefix}merger.mlp.2", f"{p}merger/mlp/fc2", True)
    return rules


def qwen2_vl_rules(cfg: Qwen2VLConfig) -> list[Rule]:
    """The whole model in the canonical (saved) layout."""
    return vision_rules(cfg.vision) + lm_rules(cfg.text, "model.", "lm_head.weight", "language_model")


def _ignored(key: str) -> bool:
    return key.endswith(("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq"))


def _import(keys, get, cfg: Qwen2VLConfig, layout: str | None, dtype, progress=None) -> dict:
    layout = layout or detect_layout(keys)
    mapper = layouts.key_mapper(layout, QWEN2_VL_LAYOUTS)
    canon = {}
    for k in keys:
        c = mapper(k)
        if c is not None and not _ignored(c):
            canon[c] = k
    if cfg.text.tie_word_embeddings:
        canon.pop("lm_head.weight", None)      # some exports write the tied head anyway
    expected = abstract_params(Qwen2VL(cfg), *example_inputs(cfg))
    return import_params(qwen2_vl_rules(cfg), lambda k: np.asarray(get(canon[k])), canon.keys(), expected, dtype,
                         ignore=_ignored, progress=progress)


def qwen2_vl_params_from_state(state: Mapping[str, np.ndarray], cfg: Qwen2VLConfig, layout: str | None = None,
                               dtype=None) -> dict:
    """A Qwen2(.5)-VL state dict in either layout -> jaxvlm params (checked against the model's shapes)."""
    return _import(list(state.keys()), state.__getitem__, cfg, layout, dtype)


def qwen2_vl_params_from_checkpoint(source, cfg: Qwen2VLConfig | None = None, dtype=None):
    """(config, params) from a checkpoint directory / file(s), one tensor at a time (tqdm progress).
    Without `cfg`, the directory's `config.json` is read."""
    import json
    import pathlib

    from tqdm import tqdm

    from jaxvlm.conversion.io import open_checkpoint
    if cfg is None:
        path = pathlib.Path(source)
        cfg_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"no config.json beside {source}; pass cfg")
        cfg = Qwen2VLConfig.from_hf(json.loads(cfg_file.read_text()))
    with open_checkpoint(source) as reader, tqdm(unit="B", unit_scale=True, desc="import") as bar:
        params = _import(reader.keys(), reader.get, cfg, None, dtype, progress=bar.update)
    return cfg, params


def write_qwen2_vl_safetensors(path, params: Mapping, cfg: Qwen2VLConfig, dtype=None) -> int:
    """Export to one safetensors file in the saved (hub) layout; pair it with the HF `config.json`."""
    from jaxvlm.conversion.io import write_safetensors
    return write_safetensors(path, export_qwen2_vl(params, cfg, "saved", dtype))


def export_qwen2_vl(params: Mapping, cfg: Qwen2VLConfig, layout: str = "saved",
                    dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_key, array)` one tensor at a time, in `layout` ("saved" or "hf_memory")."""
    if layout not in QWEN2_VL_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(QWEN2_VL_LAYOUTS)}")
    from jaxvlm.models.llama import stack_layers
    for key, x in export_params(qwen2_vl_rules(cfg), stack_layers(params), dtype):   # unrolled LM layers too
        if layout == "hf_memory":
            key = ("model.language_model." + key[len("model."):] if key.startswith("model.")
                   else "model." + key if key.startswith("visual.") else key)
        yield key, x


def qwen2_vl_state_from_params(params: Mapping, cfg: Qwen2VLConfig, layout: str = "saved", dtype=None
                               ) -> dict[str, np.ndarray]:
    return dict(export_qwen2_vl(params, cfg, layout, dtype))


def qwen2_vl_from_torch(hf_model, dtype=None):
    """(config, module, params) from a transformers `Qwen2VLForConditionalGeneration` /
    `Qwen2_5_VLForConditionalGeneration`."""
    cfg = Qwen2VLConfig.from_hf(hf_model.config)
    return cfg, Qwen2VL(cfg), qwen2_vl_params_from_state(torch_state(hf_model), cfg, dtype=dtype)


__all__ = ["QWEN2_VL_LAYOUTS", "detect_layout", "vision_rules", "qwen2_vl_rules", "qwen2_vl_params_from_state",
           "export_qwen2_vl", "qwen2_vl_state_from_params", "qwen2_vl_from_torch",
           "qwen2_vl_params_from_checkpoint", "write_qwen2_vl_safetensors"]
