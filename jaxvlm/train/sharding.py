"""Logical-axis rules (the one table from model axis names to mesh axes) and the shardings derived
from them: parameters, optimizer state, batches; plus the context that makes the models' activation
constraints (`layers.constrain`) effective.

Rules are `(logical name, mesh axis | tuple of mesh axes | None)`, first match wins, and a mesh
axis is used at most once per array (flax semantics): so `batch -> (data, fsdp)` listed before
`embed -> fsdp` shards activations `[batch, seq, embed]` over the batch only, while weights
`[embed, mlp]` get `P('fsdp', 'tensor')`. Vision towers use their own names (`vision_*`), so the
vision tower can be sharded differently from the LM by changing only its rows.

Example:
    >>> rules = make_rules("fsdp_tp")
    >>> p_shard = param_shardings(logical_axes(model, *example), abstract, mesh, rules)
    >>> with sharding_context(mesh, rules):
    ...     step(state, batch)          # activation constraints follow the same rules
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, Any], ...]

BATCH_AXES = ("data", "fsdp")

# Activations first (batch takes data+fsdp), then weights: ZeRO-3 style FSDP over `embed`,
# Megatron-style tensor parallel over heads / mlp / vocab.
_ACTIVATIONS: Rules = (("batch", BATCH_AXES), ("seq", None), ("vision_seq", None))
_LM: Rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
              ("vocab", "tensor"), ("head_dim", None), ("layers", None))
_VISION_SHARDED: Rules = (("vision_embed", "fsdp"), ("vision_heads", "tensor"), ("vision_mlp", "tensor"),
                          ("vision_patch", None), ("vision_pos", None))
_VISION_REPLICATED: Rules = (("vision_embed", None), ("vision_heads", None), ("vision_mlp", None),
                             ("vision_patch", None), ("vision_pos", None))

PRESETS: dict[str, Rules] = {
    # everything sharded: FSDP over embed dims, tensor parallel over heads/mlp/vocab
    "fsdp_tp": _ACTIVATIONS + _LM + _VISION_SHARDED,
    # LM sharded, vision tower replicated (small towers: saves the all-gathers)
    "lm_only": _ACTIVATIONS + _LM + _VISION_REPLICATED,
    # pure data parallel: every weight replicated
    "replicated": _ACTIVATIONS + tuple((n, None) for n, _ in _LM + _VISION_SHARDED),
}


def make_rules(preset: str = "fsdp_tp", overrides: Mapping[str, Any] | None = None) -> Rules:
    """A preset with some rows replaced, e.g. `make_rules("fsdp_tp", {"vocab": None})`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown sharding rules preset {preset!r}; known: {sorted(PRESETS)}")
    rules = dict(PRESETS[preset])
    for k, v in (overrides or {}).items():
        rules[k] = tuple(v) if isinstance(v, list) else v
    return tuple(rules.items())


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Mesh + logical rules active: `nn.with_logical_constraint` in the models becomes a real
    sharding constraint while a step is traced under it."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _mesh_axes(spec: P | None, rules: Rules) -> tuple:
    if spec is None:
        return ()
    return tuple(nn.logical_to_mesh_axes(tuple(spec), rules))


def _fit(shape: Sequence[int], axes: Sequence, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the dimension (e.g. 17 CLIP positions over 8 devices)."""
    out = []
    for dim, ax in zip(shape, tuple(axes) + (None,) * (len(shape) - len(axes))):
        names = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
        kept, size = [], 1
        for n in names:
            if dim % (size * mesh.shape[n]) == 0:
                kept.append(n)
                size *= mesh.shape[n]
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(logical: Any, abstract: Any, mesh: Mesh, rules: Rules,
                    warn_replicated_bytes: int = 16 << 20) -> Any:
    """NamedSharding per parameter from its logical axes (`jaxvlm.models.params.logical_axes`).

    Parameters of at least `warn_replicated_bytes` that end up fully replicated on a multi-device
    mesh are reported in one warning (usually a rule set that forgot an axis name).
    """
    replicated = []

    def one(path, spec, x):
        pspec = _fit(x.shape, _mesh_axes(spec, rules), mesh)
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        if mesh.size > 1 and all(a is None for a in pspec) and nbytes >= warn_replicated_bytes:
            replicated.append(f"{_path_str(path)} {tuple(x.shape)} ({nbytes / 2**20:.1f} MiB)")
        return NamedSharding(mesh, pspec)

    out = jax.tree.map_with_path(one, logical, abstract, is_leaf=lambda s: isinstance(s, P) or s is None)
    if replicated:
        log.warning("sharding rules leave %d large parameter(s) replicated on every device:\n  %s",
                    len(replicated), "\n  ".join(replicated))
        import warnings
        warnings.warn(f"sharding rules leave {len(replicated)} large parameter(s) replicated: "
                      + "; ".join(replicated), stacklevel=2)
    return out


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, p_shardings: Any,
                        mesh: Mesh) -> Any:
    """Shardings for `tx.init(params)`: moments follow their parameter, everything else replicated.

    A state leaf follows the parameter whose dict path ends its own path and whose shape it has
    (Adam's `mu['language_model']['layers']...`). Matching by path rather than with
    `optax.tree_map_params` also serves `multi_transform` groups, whose masked inner states hold
    `MaskedNode`s where another group's parameters are.
    """
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    names = lambda path: tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_params)
    shardings = jax.tree.leaves(p_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = {names(path): (tuple(leaf.shape), s) for (path, leaf), s in zip(flat, shardings)}

    def follow(path, leaf):
        keys, shape = names(path), tuple(getattr(leaf, "shape", ()))
        for i in range(len(keys)):                # longest suffix first
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated
    return jax.tree_util.tree_map_with_path(follow, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Every batch array is split on its leading axis over (data, fsdp)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(batch: Mapping[str, Any], mesh: Mesh) -> None:
    """Clear error when a batch cannot be split over the data-parallel devices."""
    dp = int(mesh.shape["data"] * mesh.shape["fsdp"])
    for k, v in batch.items():
        n = np.shape(v)[0] if np.ndim(v) else None
        if n is None or n % dp:
            raise ValueError(f"batch[{k!r}] has leading size {n}, not divisible by the data-parallel size {dp} "
                             f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); choose a global batch "
                             f"size (and image slots) that is a multiple of {dp}")


def process_batch_rows(index_map: Mapping[Any, Any], process_of: Mapping[Any, int], rows: int) -> dict[int, set]:
    """Which rows of a `[rows, ...]` batch each process's devices hold: `index_map` is a sharding's
    `devices_indices_map((rows,))`, `process_of` each device's process. -> {process: {row, ...}}."""
    held: dict[int, set] = {}
    for dev, idx in index_map.items():
        sl = idx[0] if isinstance(idx, tuple) else idx
        held.setdefault(process_of[dev], set()).update(range(*sl.indices(rows)))
    return held


def check_process_batches(mesh: Mesh, global_batch: int, process_of: Mapping[Any, int] | None = None) -> None:
    """Each process reads `global_batch / process_count` rows of its own (its data shard); the mesh must then
    give each process's devices that many distinct rows, disjoint from the others'. A mesh whose tensor axis
    (or a part of data x fsdp) spans hosts breaks that: a clear error instead of a silently wrong batch.
    process_of: each device's process (default: the devices' own; a test can lay one process out as several)."""
    index_map = batch_sharding(mesh).devices_indices_map((global_batch,))
    process_of = process_of or {d: d.process_index for d in index_map}
    n = len(set(process_of.values()))
    if n == 1:
        return
    held = process_batch_rows(index_map, process_of, global_batch)
    want = global_batch // n
    bad = {p: len(r) for p, r in held.items() if len(r) != want}
    overlap = sum(len(r) for r in held.values()) != global_batch
    if bad or overlap:
        rows = sorted((p, len(r)) for p, r in held.items())
        raise ValueError(f"the mesh {dict(mesh.shape)} gives the {n} processes {rows} (process, rows) of the global "
                         f"batch of {global_batch}, but each process reads {want} rows of its own: put the data/fsdp "
                         f"axes across hosts (mesh.dcn_data / mesh.dcn_fsdp) and keep the tensor axis within a host")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Host numpy batch (this process's part of the global batch) -> global sharded jax arrays."""
    check_batch(batch, mesh) if jax.process_count() == 1 else None
    s = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in batch.items()}


def lora_logical_axes(base_logical: Any, lora_tree: Any) -> Any:
    """Logical axes of a LoRA tree (see `jaxvlm.train.lora`): A `[..., in, r]` keeps the kernel's
    `in` name, B `[..., r, out]` its `out` name; the rank axis is never sharded."""
    def walk(base, lora):
        out = {}
        for k, v in lora.items():
            if "lora_a" in v and not isinstance(v["lora_a"], Mapping):
                spec = tuple(base[k]["kernel"])
                lead, (ain, aout) = spec[:-2], spec[-2:]
                out[k] = {"lora_a": P(*lead, ain, None), "lora_b": P(*lead, None, aout)}
            else:
                out[k] = walk(base[k], v)
        return out
    return walk(base_logical, lora_tree)
