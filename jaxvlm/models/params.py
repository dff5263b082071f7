"""Parameter trees: initialise, abstract shapes, logical axes. Params are plain nested dicts."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


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
