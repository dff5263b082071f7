"""Parameter trees: initialise, abstract shapes, logical axes. Params are plain nested dicts."""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import serialization


def _is_boxed(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def init_params(model: nn.Module, rng: jax.Array, *args, **kwargs) -> dict:
    """Initialise and strip the logical-axis boxes: a plain nested dict of arrays."""
    return nn.unbox(model.init(rng, *args, **kwargs)["params"])


def abstract_params(model: nn.Module, *args, **kwargs) -> dict:
    """`jax.ShapeDtypeStruct` tree of the params, without allocating (works for 7B+ on a laptop)."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]
    return jax.tree.map(lambda x: x.unbox() if _is_boxed(x) else x, boxed, is_leaf=_is_boxed)


def logical_axes(model: nn.Module, *args, **kwargs) -> Any:
    """Logical axis names of every parameter (a PartitionSpec per leaf, same tree as the params)."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]
    return nn.get_partition_spec(boxed)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def save_param_tree(path: str | os.PathLike, params: dict) -> str:
    """Write a params (sub)tree as msgpack, atomically: a failed write leaves no partial file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):          # no half-written file left beside the (untouched) old one
            os.remove(tmp)
        raise
    return path


def load_param_tree(path: str | os.PathLike, like: dict, what: str = "params") -> dict:
    """Read `save_param_tree`'s file; every array must match `like` in path and shape, else a
    ValueError names the first mismatch (`what` names the tree in messages, e.g. "vision")."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} params file not found: {path}")
    with open(path, "rb") as f:
        loaded = serialization.msgpack_restore(f.read())
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(like)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    for k in sorted(set(want) | set(got)):
        if k not in got:
            raise ValueError(f"{path}: missing {what} tensor {k} (expected shape {want[k]})")
        if k not in want:
            raise ValueError(f"{path}: unexpected {what} tensor {k} (shape {got[k]}); built for another model?")
        if tuple(want[k]) != tuple(got[k]):
            raise ValueError(f"{path}: {what} tensor {k} has shape {tuple(got[k])}, the model expects {tuple(want[k])}")
    return jax.tree.map(lambda ref, x: np.asarray(x, dtype=ref.dtype), like, loaded)
