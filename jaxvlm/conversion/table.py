"""Declarative HF <-> jaxvlm parameter tables. One table per family drives both directions.

A `Rule` names one HF tensor (a template with `{i}` for per-layer tensors), the jaxvlm parameter
path it becomes, and a `Transform` (a pair of exact, inverse array maps). Per-layer tensors are
stacked on the leading `layers` axis of the scanned parameter. Because import and export read the
same rules, a round trip is exact by construction; tests check it bit for bit.

Example:
    >>> rules = llava_rules(cfg)
    >>> params = import_params(rules, reader)            # reader: key -> np.ndarray
    >>> for key, array in export_params(rules, params): ...
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

# ----------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear stores [out, in]; jaxvlm kernels are [in, out].
LINEAR = Transform("linear", lambda x: np.ascontiguousarray(x.T), lambda x: np.ascontiguousarray(x.T))


def conv_as_matmul(in_shape: tuple[int, ...]) -> Transform:
    """Conv weight `[D, *in_shape]` (no overlap, stride = kernel) <-> matmul kernel `[prod(in_shape), D]`."""
    def to_jax(x):
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)

    def to_hf(x):
        return np.ascontiguousarray(x.T.reshape((x.shape[1],) + tuple(in_shape)))
    return Transform(f"conv{tuple(in_shape)}", to_jax, to_hf)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str                 # HF key (canonical layout); "{i}" marks a per-layer tensor
    path: str               # jaxvlm parameter path, "/"-separated
    transform: Transform = IDENTITY
    num_layers: int = 0     # > 0 for per-layer rules

    def hf_keys(self) -> list[str]:
        if self.num_layers:
            return [self.hf.format(i=i) for i in range(self.num_layers)]
        return [self.hf]


def linear_rules(hf_prefix: str, path_prefix: str, bias: bool, num_layers: int = 0) -> list[Rule]:
    rules = [Rule(f"{hf_prefix}.weight", f"{path_prefix}/kernel", LINEAR, num_layers)]
    if bias:
        rules.append(Rule(f"{hf_prefix}.bias", f"{path_prefix}/bias", IDENTITY, num_layers))
    return rules


def norm_rules(hf_prefix: str, path_prefix: str, bias: bool, num_layers: int = 0) -> list[Rule]:
    rules = [Rule(f"{hf_prefix}.weight", f"{path_prefix}/scale", IDENTITY, num_layers)]
    if bias:
        rules.append(Rule(f"{hf_prefix}.bias", f"{path_prefix}/bias", IDENTITY, num_layers))
    return rules


# ----------------------------------------------------------------------------- family tables


def lm_rules(cfg, hf_prefix: str = "model.", head_key: str = "lm_head.weight", path: str = "") -> list[Rule]:
    """Llama / Qwen2 decoder (`jaxvlm.models.llama.DecoderLM`)."""
    n, p = cfg.num_layers, (path + "/" if path else "")
    lay = f"{hf_prefix}layers.{{i}}."
    rules = [Rule(f"{hf_prefix}embed_tokens.weight", f"{p}embed_tokens/embedding")]
    for proj in ("q_proj", "k_proj", "v_proj"):
        rules += linear_rules(f"{lay}self_attn.{proj}", f"{p}layers/self_attn/{proj}", cfg.qkv_bias, n)
    rules += linear_rules(f"{lay}self_attn.o_proj", f"{p}layers/self_attn/o_proj", cfg.o_bias, n)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules += linear_rules(f"{lay}mlp.{proj}", f"{p}layers/mlp/{proj}", cfg.mlp_bias, n)
    rules += norm_rules(f"{lay}input_layernorm", f"{p}layers/input_layernorm", False, n)
    rules += norm_rules(f"{lay}post_attention_layernorm", f"{p}layers/post_attention_layernorm", False, n)
    rules += norm_rules(f"{hf_prefix}norm", f"{p}norm", False)
    if not cfg.tie_word_embeddings:
        rules.append(Rule(head_key, f"{p}lm_head/kernel", LINEAR))
    return rules


def clip_rules(cfg, hf_prefix: str = "vision_model.", path: str = "") -> list[Rule]:
    """CLIP vision tower (`jaxvlm.models.clip.CLIPVision`)."""
    n, p = cfg.num_layers, (path + "/" if path else "")
    lay = f"{hf_prefix}encoder.layers.{{i}}."
    rules = [
        Rule(f"{hf_prefix}embeddings.class_embedding", f"{p}embeddings/class_embedding"),
        Rule(f"{hf_prefix}embeddings.patch_embedding.weight", f"{p}embeddings/patch_embedding/kernel",
             conv_as_matmul((cfg.num_channels, cfg.patch_size, cfg.patch_size))),
        Rule(f"{hf_prefix}embeddings.position_embedding.weight", f"{p}embeddings/position_embedding"),
    ]
    rules += norm_rules(f"{hf_prefix}pre_layrnorm", f"{p}pre_layrnorm", True)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear_rules(f"{lay}self_attn.{proj}", f"{p}layers/self_attn/{proj}", True, n)
    rules += norm_rules(f"{lay}layer_norm1", f"{p}layers/layer_norm1", True, n)
    rules += norm_rules(f"{lay}layer_norm2", f"{p}layers/layer_norm2", True, n)
    rules += linear_rules(f"{lay}mlp.fc1", f"{p}layers/mlp/fc1", True, n)
    rules += linear_rules(f"{lay}mlp.fc2", f"{p}layers/mlp/fc2", True, n)
    rules += norm_rules(f"{hf_prefix}post_layernorm", f"{p}post_layernorm", True)
    return rules


def llava_rules(cfg) -> list[Rule]:
    """LLaVA in the llava-hf hub layout (what `save_pretrained` writes; transformers 4.4x and 5.x read it)."""
    rules = clip_rules(cfg.vision, "vision_tower.vision_model.", "vision_tower")
    rules += linear_rules("multi_modal_projector.linear_1", "multi_modal_projector/linear_1", cfg.projector_bias)
    rules += linear_rules("multi_modal_projector.linear_2", "multi_modal_projector/linear_2", cfg.projector_bias)
    rules += lm_rules(cfg.text, "language_model.model.", "language_model.lm_head.weight", "language_model")
    return rules


# ----------------------------------------------------------------------------- driving the table


def _get(tree: Mapping, path: str):
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def _set(tree: dict, path: str, value) -> None:
    parts = path.split("/")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _leaf_paths(tree: Mapping, prefix: str = "") -> Iterator[str]:
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, Mapping):
            yield from _leaf_paths(v, p)
        else:
            yield p


class ConversionError(ValueError):
    """A checkpoint that does not fit the model: names the tensors and shapes involved."""


def import_params(rules: Iterable[Rule], get: Callable[[str], np.ndarray], keys: Iterable[str],
                  expected: Mapping | None = None, dtype=None, ignore: Callable[[str], bool] = lambda k: False,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Build the jaxvlm param tree, reading one HF tensor at a time.

    get(key) -> array (canonical key names); keys: every key the checkpoint holds.
    expected: abstract params (shape/dtype tree, e.g. from `jax.eval_shape`) to check shapes and
    coverage against. dtype: cast each tensor on the way in (None keeps the checkpoint's dtype).
    Raises ConversionError naming missing keys, unexpected keys and shape mismatches.
    """
    rules = list(rules)
    available = set(keys)
    needed = [k for r in rules for k in r.hf_keys()]
    missing = [k for k in needed if k not in available]
    if missing:
        raise ConversionError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:8]}"
                              + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(available - set(needed))
    unexpected = [k for k in unexpected if not ignore(k)]
    if unexpected:
        raise ConversionError(f"checkpoint has {len(unexpected)} tensor(s) the model does not use: "
                              f"{unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
    params: dict = {}
    for rule in rules:
        want = _get(expected, rule.path) if expected is not None else None
        if rule.num_layers:
            stacked = None
            for i, key in enumerate(rule.hf_keys()):
                x = rule.transform.to_jax(get(key))
                if want is not None and tuple(x.shape) != tuple(want.shape[1:]):
                    raise ConversionError(f"shape mismatch for {key}: checkpoint gives {tuple(x.shape)} "
                                          f"(after {rule.transform.name}), model expects {tuple(want.shape[1:])} "
                                          f"at {rule.path}[{i}]")
                if stacked is None:
                    stacked = np.empty((rule.num_layers,) + x.shape, dtype or x.dtype)
                stacked[i] = x
                if progress:
                    progress(x.nbytes)
            _set(params, rule.path, stacked)
        else:
            x = rule.transform.to_jax(get(rule.hf))
            if want is not None and tuple(x.shape) != tuple(want.shape):
                raise ConversionError(f"shape mismatch for {rule.hf}: checkpoint gives {tuple(x.shape)} "
                                      f"(after {rule.transform.name}), model expects {tuple(want.shape)} "
                                      f"at {rule.path}")
            _set(params, rule.path, x.astype(dtype) if dtype is not None else x)
            if progress:
                progress(x.nbytes)
    if expected is not None:
        uncovered = sorted(set(_leaf_paths(expected)) - {r.path for r in rules})
        if uncovered:
            raise ConversionError(f"the conversion table leaves model parameters unset: {uncovered[:8]}")
    return params


def export_params(rules: Iterable[Rule], params: Mapping, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_key, array)` one tensor at a time (inverse of `import_params`)."""
    for rule in rules:
        value = np.asarray(_get(params, rule.path))
        if rule.num_layers:
            if value.shape[0] != rule.num_layers:
                raise ConversionError(f"{rule.path} has {value.shape[0]} layers, the table expects {rule.num_layers}")
            for i, key in enumerate(rule.hf_keys()):
                x = rule.transform.to_hf(value[i])
                yield key, (x.astype(dtype) if dtype is not None else x)
        else:
            x = rule.transform.to_hf(value)
            yield rule.hf, (x.astype(dtype) if dtype is not None else x)
