"""LoRA as a pure parameter transform: the model code never changes.

`init_lora(params, spec, rng)` builds a small tree with, for every targeted linear kernel
`W [..., in, out]` (scanned kernels keep their leading `layers` axis), `lora_a [..., in, r]` and
`lora_b [..., r, out]`. Inside the loss, `merge_lora(params, lora, spec)` returns
`W + (alpha / r) * A @ B` for those kernels and the untouched params elsewhere; gradients flow to
A and B only (freeze the base with an optimizer group). `export_peft` / `import_peft` read and write
the PEFT adapter format (adapter_model.safetensors + adapter_config.json) that `peft` loads.

Dropout: PEFT drops *input activations* of the LoRA branch per token; a weight-space transform
cannot, so `dropout` here drops rows of A (input features of the LoRA branch), one mask per step
shared by all tokens. Equal in expectation, different in variance; 0 reproduces PEFT exactly.

Example:
    >>> spec = LoraSpec(rank=8, alpha=16, targets=(r"language_model/layers/.*",))
    >>> lora = init_lora(params, spec, jax.random.key(0))
    >>> def loss(trainable, batch, rng):
    ...     merged = merge_lora(trainable["base"], trainable["lora"], spec, rng)
    ...     return base_loss(merged, batch, rng)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.conversion import table

# Every linear layer of the LM except lm_head (QLoRA-style "all linear").
LM_ALL_LINEAR = (r"language_model/layers/(self_attn|mlp)/\w+_proj",)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LM_ALL_LINEAR   # regexes, full-matched against '/'-joined *module* paths
    exclude: tuple[str, ...] = (r".*lm_head",)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, module_path: str) -> bool:
        return (any(re.fullmatch(t, module_path) for t in self.targets)
                and not any(re.fullmatch(e, module_path) for e in self.exclude))


def target_paths(params: Mapping, spec: LoraSpec) -> list[str]:
    """'/'-joined module paths (parent of a `kernel` of rank >= 2) that the spec targets."""
    out = []

    def walk(node, prefix):
        for k, v in node.items():
            p = f"{prefix}/{k}" if prefix else k
            if isinstance(v, Mapping):
                walk(v, p)
            elif k == "kernel" and np.ndim(v) >= 2 and spec.matches(prefix):
                out.append(prefix)
    walk(params, "")
    return out


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set(tree, path, value):
    parts = path.split("/")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def init_lora(params: Mapping, spec: LoraSpec, rng: jax.Array) -> dict:
    """A `[..., in, r]` ~ kaiming-uniform (bound 1/sqrt(in), PEFT's default), B `[..., r, out]` = 0,
    so the adapted model starts equal to the base. Raises if nothing matches."""
    paths = target_paths(params, spec)
    if not paths:
        raise ValueError(f"LoRA targets {spec.targets} match no linear kernel; example module paths: "
                         f"{target_paths(params, LoraSpec(targets=('.*',), exclude=()))[:6]}")
    lora: dict = {}
    for i, p in enumerate(paths):
        w = _get(params, p)["kernel"]
        *lead, d_in, d_out = w.shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, d_in, spec.rank), jnp.float32, -bound, bound)
        _set(lora, p, {"lora_a": a.astype(w.dtype), "lora_b": jnp.zeros((*lead, spec.rank, d_out), w.dtype)})
    return lora


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`scale * A @ B`, batched over leading (layer) axes: `[..., in, r] x [..., r, out] -> [..., in, out]`."""
    return scale * jnp.einsum("...ir,...ro->...io", a, b, preferred_element_type=jnp.float32)


def merge_lora(params: Mapping, lora: Mapping, spec: LoraSpec, rng: jax.Array | None = None) -> dict:
    """Params with `W + scale * A @ B` at every LoRA module (a new tree; inputs untouched).
    `rng` enables dropout (training); None = deterministic (eval / export)."""
    counter = [0]

    def walk(p_node, l_node):
        out = dict(p_node)
        for k, v in l_node.items():
            if "lora_a" in v and not isinstance(v["lora_a"], Mapping):
                a = v["lora_a"]
                if rng is not None and spec.dropout > 0:
                    keep = jax.random.bernoulli(jax.random.fold_in(rng, counter[0]), 1 - spec.dropout,
                                                a.shape[:-1] + (1,))
                    a = jnp.where(keep, a / (1 - spec.dropout), 0).astype(a.dtype)
                counter[0] += 1
                w = p_node[k]["kernel"]
                out[k] = dict(p_node[k], kernel=(w + lora_delta(a, v["lora_b"], spec.scale)).astype(w.dtype))
            else:
                out[k] = walk(p_node[k], v)
        return out
    return walk(params, lora)


# ----------------------------------------------------------------------------- PEFT format

def _hf_module_names(rules: Sequence[table.Rule], module_path: str, to_hf_name) -> tuple[list[str], table.Rule]:
    for r in rules:
        if r.path == module_path + "/kernel":
            if r.transform.name != "linear":
                raise ValueError(f"LoRA export supports linear layers only; {module_path} uses {r.transform.name}")
            return [to_hf_name(k[: -len(".weight")]) for k in r.hf_keys()], r
    raise ValueError(f"no conversion rule maps {module_path}/kernel to a Hugging Face tensor")


def hf_memory_name(canonical: str) -> str:
    """LLaVA canonical (hub) module name -> the module name in a transformers 5 model in memory, which
    is what PEFT keys are built from (`base_model.model.<name>.lora_A.weight`)."""
    for pat, rep in ((r"^language_model\.model\.", "model.language_model."),
                     (r"^language_model\.lm_head", "lm_head"),
                     (r"^vision_tower\.vision_model\.", "model.vision_tower."),
                     (r"^multi_modal_projector\.", "model.multi_modal_projector.")):
        if re.match(pat, canonical):
            return re.sub(pat, rep, canonical, count=1)
    return canonical


def export_peft(out_dir: str | os.PathLike, lora: Mapping, spec: LoraSpec, rules: Sequence[table.Rule],
                base_model_name: str | None = None, to_hf_name=hf_memory_name) -> list[str]:
    """Write `adapter_model.safetensors` + `adapter_config.json`; returns the HF module names.

    rules: the family's conversion table (e.g. `table.llava_rules(cfg)`), which names the HF
    module of each kernel; per-layer kernels are split into one adapter per layer.
    """
    from safetensors.numpy import save_file
    tensors, modules = {}, []
    for path in target_paths_of(lora):
        node = _get(lora, path)
        names, rule = _hf_module_names(rules, path, to_hf_name)
        a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
        if not rule.num_layers:
            a, b = a[None], b[None]
        for i, name in enumerate(names):
            # torch Linear layout: lora_A.weight [r, in], lora_B.weight [out, r]
            tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
            modules.append(name)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    # One full-match regex over the exact module names: a short-name list (["q_proj"]) would also
    # hit the vision tower's q_proj.
    pattern = "|".join(sorted({re.sub(r"\\\.\d+\\\.", lambda _: r"\.\d+\.", re.escape(m)) for m in modules}))
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
        "target_modules": pattern, "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "revision": None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return modules


def target_paths_of(lora: Mapping) -> list[str]:
    out = []

    def walk(node, prefix):
        for k, v in node.items():
            p = f"{prefix}/{k}" if prefix else k
            if "lora_a" in v and not isinstance(v["lora_a"], Mapping):
                out.append(p)
            else:
                walk(v, p)
    walk(lora, "")
    return out


def import_peft(adapter_dir: str | os.PathLike, params: Mapping, rules: Sequence[table.Rule],
                to_hf_name=hf_memory_name) -> tuple[dict, LoraSpec]:
    """Read a PEFT LoRA adapter written for this model family -> (lora tree, spec)."""
    from safetensors.numpy import load_file
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    except OSError as e:
        raise ValueError(f"cannot read a PEFT adapter from {adapter_dir}: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError(f"only plain LoRA adapters are supported, got {cfg.get('peft_type')} "
                         f"(use_dora={cfg.get('use_dora')}, use_rslora={cfg.get('use_rslora')})")
    spec = LoraSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0)),
                    targets=(".*",), exclude=())
    lora: dict = {}
    used = set()
    for path in target_paths(params, spec):
        try:
            names, rule = _hf_module_names(rules, path, to_hf_name)
        except ValueError:
            continue
        keys = [f"base_model.model.{n}.lora_{{}}.weight" for n in names]
        if not all(k.format("A") in tensors for k in keys):
            continue
        a = np.stack([tensors[k.format("A")].T for k in keys])
        b = np.stack([tensors[k.format("B")].T for k in keys])
        if not rule.num_layers:
            a, b = a[0], b[0]
        _set(lora, path, {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)})
        used.update(k.format(x) for k in keys for x in "AB")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"adapter has {len(unused)} tensor(s) that match no module of this model: {unused[:6]}")
    targets = tuple(re.escape(p) for p in target_paths_of(lora))
    return lora, dataclasses.replace(spec, targets=targets)
