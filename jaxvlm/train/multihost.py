"""What a run of several processes (hosts) needs beyond jit: gathering values to every host and waiting
for each other. Each function is a collective: every process must call it, in the same order, or the run
hangs. With one process they reduce to `jax.device_get` and no-ops.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def host_tree(tree: Any) -> Any:
    """Global arrays -> numpy arrays of their full shape, on every process.

    `jax.device_get` cannot read an array whose shards live on other hosts (it hangs or fails), which
    is what an fsdp-sharded parameter is on a pod. The gather puts the whole tree in each host's memory,
    as writing a checkpoint file needs anyway.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


def allgather_json(obj: Any) -> list:
    """Each process's JSON-serialisable `obj` -> the list of all of them, in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[: raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(everyone, lengths)]


def barrier(name: str) -> None:
    """Wait until every process gets here (e.g. so none exits before process 0 has written a file)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
