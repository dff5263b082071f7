"""Qwen-VL-Chat original (remote-code) checkpoints <-> jaxvlm `QwenVL` params.

The original layout (`transformer.h.*`, `transformer.visual.*`, `lm_head.weight`) has three fused
tensors that jaxvlm keeps split: the LM's `c_attn` (`[Q; K; V]` blocks), the ViT's `in_proj`
(packed *per head*: rows `[h0:q, h0:k, h0:v, h1:q, ...]`) and the resampler's MHA `in_proj_*`
(`[Q; K; V]` blocks). `Fused` declares each; the table then maps the parts `key#q/#k/#v` with
ordinary `table.Rule`s, so import and export stay one declarative table and round trips are
exact. QWen's MLP `c_proj(w1(x) * silu(w2(x)))` maps onto `GatedMLP` with gate = w2, up = w1.

Example:
    >>> cfg, params = load_original("Qwen-VL-Chat/")        # config.json + sharded .bin or safetensors
    >>> save_original("out/", cfg, params, fmt="bin", max_shard_bytes=2 << 30)
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from jaxvlm.conversion.io import CheckpointReader, atomic_output_dir, open_checkpoint, write_sharded_safetensors
from jaxvlm.conversion.table import (IDENTITY, LINEAR, ConversionError, Rule, conv_as_matmul, export_params,
                                     import_params, linear_rules, norm_rules)
from jaxvlm.models.params import abstract_params
from jaxvlm.models.qwen_vl import POS_TABLE_GRID, QwenVL, QwenVLConfig, example_inputs

PARTS = ("q", "k", "v")


# ----------------------------------------------------------------------------- fused tensors


@dataclasses.dataclass(frozen=True)
class Fused:
    """One original tensor holding q, k and v (dim 0), seen by the table as `key#q`, `key#k`, `key#v`.

    heads == 0: blocks `[Q; K; V]`; heads > 0: packed per head (Megatron style).
    """

    key: str                # "{i}" for per-layer tensors
    heads: int = 0
    num_layers: int = 0

    def keys(self) -> list[str]:
        return [self.key.format(i=i) for i in range(self.num_layers)] if self.num_layers else [self.key]

    def split(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.heads:
            y = x.reshape((self.heads, 3, x.shape[0] // (3 * self.heads)) + x.shape[1:])
            return {p: np.ascontiguousarray(y[:, j].reshape((-1,) + x.shape[1:])) for j, p in enumerate(PARTS)}
        return {p: np.ascontiguousarray(a) for p, a in zip(PARTS, np.split(x, 3, axis=0))}

    def fuse(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        xs = [parts[p] for p in PARTS]
        if self.heads:
            y = np.stack([x.reshape((self.heads, -1) + x.shape[1:]) for x in xs], axis=1)
            return np.ascontiguousarray(y.reshape((-1,) + xs[0].shape[1:]))
        return np.concatenate(xs, axis=0)


def fused_tensors(cfg: QwenVLConfig) -> list[Fused]:
    n, v = cfg.text.num_layers, cfg.visual
    vis = "transformer.visual."
    return [
        Fused("transformer.h.{i}.attn.c_attn.weight", 0, n), Fused("transformer.h.{i}.attn.c_attn.bias", 0, n),
        Fused(vis + "transformer.resblocks.{i}.attn.in_proj.weight", v.heads, v.layers),
        Fused(vis + "transformer.resblocks.{i}.attn.in_proj.bias", v.heads, v.layers),
        Fused(vis + "attn_pool.attn.in_proj_weight"), Fused(vis + "attn_pool.attn.in_proj_bias"),
    ]


def _part_rules(key: str, path: str, transform, num_layers: int) -> list[Rule]:
    return [Rule(f"{key}#{p}", f"{path}/{p}_proj/{'kernel' if key.endswith('weight') else 'bias'}",
                 transform, num_layers) for p in PARTS]


# ----------------------------------------------------------------------------- the table


def qwen_vl_rules(cfg: QwenVLConfig) -> list[Rule]:
    """Original key (fused tensors as `key#q/k/v`) -> `QwenVL` param path."""
    t, v = cfg.text, cfg.visual
    n, nv = t.num_layers, v.layers
    lay, lm = "transformer.h.{i}.", "language_model/layers"
    rules = [Rule("transformer.wte.weight", "language_model/embed_tokens/embedding")]
    rules += _part_rules(lay + "attn.c_attn.weight", f"{lm}/self_attn", LINEAR, n)
    rules += _part_rules(lay + "attn.c_attn.bias", f"{lm}/self_attn", IDENTITY, n)
    rules += linear_rules(lay + "attn.c_proj", f"{lm}/self_attn/o_proj", t.o_bias, n)
    # c_proj(w1(x) * silu(w2(x))): the SiLU sits on w2, so w2 is the gate.
    rules += linear_rules(lay + "mlp.w2", f"{lm}/mlp/gate_proj", t.mlp_bias, n)
    rules += linear_rules(lay + "mlp.w1", f"{lm}/mlp/up_proj", t.mlp_bias, n)
    rules += linear_rules(lay + "mlp.c_proj", f"{lm}/mlp/down_proj", t.mlp_bias, n)
    rules += norm_rules(lay + "ln_1", f"{lm}/input_layernorm", False, n)
    rules += norm_rules(lay + "ln_2", f"{lm}/post_attention_layernorm", False, n)
    rules += norm_rules("transformer.ln_f", "language_model/norm", False)
    if not t.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", "language_model/lm_head/kernel", LINEAR))

    vis, blk = "transformer.visual.", "transformer.visual.transformer.resblocks.{i}."
    rules += [
        Rule(vis + "conv1.weight", "visual/conv1/kernel", conv_as_matmul((v.num_channels, v.patch_size, v.patch_size))),
        Rule(vis + "positional_embedding", "visual/positional_embedding"),
    ]
    rules += norm_rules(vis + "ln_pre", "visual/ln_pre", True)
    rules += norm_rules(blk + "ln_1", "visual/layers/ln_1", True, nv)
    rules += _part_rules(blk + "attn.in_proj.weight", "visual/layers/attn", LINEAR, nv)
    rules += _part_rules(blk + "attn.in_proj.bias", "visual/layers/attn", IDENTITY, nv)
    rules += linear_rules(blk + "attn.out_proj", "visual/layers/attn/out_proj", True, nv)
    rules += norm_rules(blk + "ln_2", "visual/layers/ln_2", True, nv)
    rules += linear_rules(blk + "mlp.c_fc", "visual/layers/mlp/c_fc", True, nv)
    rules += linear_rules(blk + "mlp.c_proj", "visual/layers/mlp/c_proj", True, nv)
    pool = vis + "attn_pool."
    rules += [Rule(pool + "query", "visual/attn_pool/query"), Rule(pool + "pos_embed", "visual/attn_pool/pos_embed")]
    if v.width != v.output_dim:
        rules += linear_rules(pool + "kv_proj", "visual/attn_pool/kv_proj", False)
    rules += norm_rules(pool + "ln_kv", "visual/attn_pool/ln_kv", True)
    rules += norm_rules(pool + "ln_q", "visual/attn_pool/ln_q", True)
    rules += _part_rules(pool + "attn.in_proj_weight", "visual/attn_pool", LINEAR, 0)
    rules += _part_rules(pool + "attn.in_proj_bias", "visual/attn_pool", IDENTITY, 0)
    rules += linear_rules(pool + "attn.out_proj", "visual/attn_pool/out_proj", True)
    rules += norm_rules(vis + "ln_post", "visual/ln_post", True)
    rules.append(Rule(vis + "proj", "visual/proj"))   # used as `x @ proj`: no transpose
    return rules


# ----------------------------------------------------------------------------- reading checkpoints


class _SplitView:
    """A state (key -> array getter) with each fused tensor shown as its q/k/v parts."""

    def __init__(self, get: Callable[[str], np.ndarray], keys: Iterable[str], fused: list[Fused]):
        self._get, self._parts = get, {}
        self._fused = {k: f for f in fused for k in f.keys()}
        self._last: tuple[str, dict] | None = None
        self.keys = []
        for k in keys:
            if k in self._fused:
                self.keys += [f"{k}#{p}" for p in PARTS]
            else:
                self.keys.append(k)

    def get(self, key: str) -> np.ndarray:
        base, _, part = key.partition("#")
        if not part:
            return self._get(key)
        if self._last is None or self._last[0] != base:   # the q/k/v rules of one tensor read it once
            self._last = (base, self._fused[base].split(self._get(base)))
        return self._last[1][part]


# ----------------------------------------------------------------------------- checks


def check_visual_config(cfg: QwenVLConfig, shape: Callable[[str], tuple[int, ...]], keys: Iterable[str]) -> None:
    """The `visual` dict of config.json against the visual weights; raises ConversionError naming both."""
    v, vis = cfg.visual, "transformer.visual."
    keys = set(keys)
    problems = []

    def want(key, expected, fields):
        if key not in keys:
            problems.append(f"{key} is missing")
        elif tuple(shape(key)) != tuple(expected):
            problems.append(f"{key} has shape {tuple(shape(key))} but config {fields} implies {tuple(expected)}")

    want(vis + "conv1.weight", (v.width, v.num_channels, v.patch_size, v.patch_size), "visual.width/patch_size")
    want(vis + "positional_embedding", (POS_TABLE_GRID ** 2, v.width), "visual.width")
    n_blocks = len({m.group(1) for k in keys for m in [re.match(re.escape(vis) + r"transformer\.resblocks\.(\d+)\.", k)] if m})
    if n_blocks != v.layers:
        problems.append(f"the checkpoint has {n_blocks} visual resblocks but config visual.layers={v.layers}")
    want(vis + "transformer.resblocks.0.mlp.c_fc.weight", (v.mlp_width, v.width),
         f"visual.mlp_ratio={v.mlp_ratio} (int(width * mlp_ratio) = {v.mlp_width})")
    want(vis + "attn_pool.query", (v.n_queries, v.output_dim), "visual.output_dim / n_queries")
    want(vis + "proj", (v.output_dim, v.output_dim), "visual.output_dim")
    if problems:
        raise ConversionError("config.json's visual settings do not match the checkpoint's visual weights:\n  "
                              + "\n  ".join(problems))


# ----------------------------------------------------------------------------- entry points


def params_from_state(state: Mapping[str, np.ndarray] | CheckpointReader, cfg: QwenVLConfig, dtype=None,
                      progress: Callable[[int], None] | None = None) -> dict:
    """An original-layout state (dict or `io.CheckpointReader`) -> `QwenVL` params, shape-checked."""
    if isinstance(state, CheckpointReader):
        get, keys, shape = state.get, state.keys(), (lambda k: state.get(k).shape)   # mmap views: no copy
    else:
        get, keys, shape = (lambda k: np.asarray(state[k])), list(state), (lambda k: np.shape(state[k]))
    check_visual_config(cfg, shape, keys)
    view = _SplitView(get, keys, fused_tensors(cfg))
    expected = abstract_params(QwenVL(cfg), *example_inputs(cfg))
    return import_params(qwen_vl_rules(cfg), view.get, view.keys, expected, dtype,
                         ignore=lambda k: k.endswith("rotary_emb.inv_freq"), progress=progress)


def iter_state(params: Mapping, cfg: QwenVLConfig, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(original_key, array)`; fused tensors once all their parts have been produced."""
    fused = {k: f for f in fused_tensors(cfg) for k in f.keys()}
    pending: dict[str, dict[str, np.ndarray]] = {}
    for key, x in export_params(qwen_vl_rules(cfg), params, dtype):
        base, _, part = key.partition("#")
        if not part:
            yield key, x
            continue
        pending.setdefault(base, {})[part] = x
        if len(pending[base]) == len(PARTS):
            yield base, fused[base].fuse(pending.pop(base))


def state_plan(params: Mapping, cfg: QwenVLConfig, dtype=None) -> list[tuple[str, int]]:
    """`(original_key, nbytes)` in the order `iter_state` yields them, from shapes alone."""
    sizes: dict[str, int] = {}
    order: list[str] = []
    for rule in qwen_vl_rules(cfg):
        leaf = params
        for part in rule.path.split("/"):
            leaf = leaf[part]
        shape = leaf.shape[1:] if rule.num_layers else leaf.shape
        nbytes = int(np.prod(shape)) * np.dtype(dtype or leaf.dtype).itemsize   # transforms keep the size
        for key in rule.hf_keys():
            base, _, part = key.partition("#")
            sizes[base] = sizes.get(base, 0) + nbytes
            if part in ("", PARTS[-1]):        # a fused tensor is yielded with its last part
                order.append(base)
    return [(k, sizes[k]) for k in order]


def state_from_params(params: Mapping, cfg: QwenVLConfig, dtype=None) -> dict[str, np.ndarray]:
    """`QwenVL` params -> original-layout state dict (inverse of `params_from_state`)."""
    return dict(iter_state(params, cfg, dtype))


def load_original(path: str | os.PathLike, dtype=None, show_progress: bool = True) -> tuple[QwenVLConfig, dict]:
    """(config, params) from an original Qwen-VL(-Chat) folder: `config.json` + weights."""
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as fh:
        cfg = QwenVLConfig.from_original(json.load(fh))
    bar = None
    if show_progress:
        from tqdm import tqdm
        bar = tqdm(desc=f"converting {os.path.basename(path.rstrip('/'))}", unit="B", unit_scale=True, leave=False)
    with open_checkpoint(path) as reader:
        try:
            # copy out of the memory map: the reader is closed when this returns
            params = params_from_state(reader, cfg, dtype, progress=bar.update if bar is not None else None)
            params = _copy_tree(params)
        finally:
            if bar is not None:
                bar.close()
    return cfg, params


def _copy_tree(tree):
    """Own every array (tensors taken as-is are views into the checkpoint's memory map)."""
    return {k: _copy_tree(v) if isinstance(v, dict) else (v if v.flags.owndata else np.array(v))
            for k, v in tree.items()}


def save_original(path: str | os.PathLike, cfg: QwenVLConfig, params: Mapping, fmt: str = "safetensors",
                  max_shard_bytes: int | None = None, dtype=None, overwrite: bool = False) -> list[str]:
    """Write `config.json` and the weights in the original layout (`fmt`: "safetensors", or "bin" as
    the released checkpoint; sharded with an index when `max_shard_bytes` is exceeded). The folder
    appears only once complete. Returns the weight files written (index excluded)."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    with atomic_output_dir(path, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_original(), indent=2))
        if fmt == "safetensors":
            names = write_sharded_safetensors(tmp, state_plan(params, cfg, dtype), iter_state(params, cfg, dtype),
                                              max_shard_bytes or 2 ** 62)
            names = [n for n in names if not n.endswith(".json")]
        else:
            names = _write_bin_shards(tmp, iter_state(params, cfg, dtype), max_shard_bytes)
    return [os.path.join(os.fspath(path), n) for n in names]


def _write_bin_shards(folder, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int | None) -> list[str]:
    """`pytorch_model.bin`, or `pytorch_model-0000i-of-0000n.bin` + index (the released layout);
    streamed: at most one shard is held in memory."""
    import torch
    shards: list[list[str]] = []
    batch: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal batch, size
        if batch:
            torch.save({k: _to_torch(x) for k, x in batch.items()}, folder / f".shard-{len(shards):05d}.tmp")
            shards.append(list(batch))
            batch, size = {}, 0

    for key, x in tensors:
        if max_shard_bytes and batch and size + x.nbytes > max_shard_bytes:
            flush()
        batch[key] = x
        size += x.nbytes
        total += x.nbytes
    flush()
    n = len(shards)
    names = ["pytorch_model.bin"] if n == 1 else [f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin" for i in range(n)]
    for i, name in enumerate(names):
        os.replace(folder / f".shard-{i:05d}.tmp", folder / name)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for i, ks in enumerate(shards) for k in ks}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return names


def _to_torch(x: np.ndarray):
    import torch
    x = np.ascontiguousarray(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)
