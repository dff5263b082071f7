"""Orbax checkpoints of the train state + data-iterator state + run metadata.

Async save, keep the last N, save every K steps (and at the end with `force=True`). A save runs in
a temporary directory that orbax renames only once complete, so a process killed mid-save leaves
the previous checkpoint as the latest usable one. Restoring onto a different mesh just means
passing an abstract state whose shardings belong to the new mesh (orbax reshards on read).

Example:
    >>> ckpt = Checkpointer(workdir / "checkpoints", keep=3, every=1000)
    >>> ckpt.save(step, state, data_state=it.get_state(), meta={"config": cfg})
    >>> state, data_state, meta = ckpt.restore(ckpt.latest_step(), abstract_state(...))
"""
from __future__ import annotations

import base64
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxvlm.train.multihost import allgather_json

log = logging.getLogger(__name__)


def _jsonable_data_state(s: Any) -> Any:
    # grain's DataLoader iterators give bytes, dataset iterators give dicts.
    if isinstance(s, bytes):
        return {"__bytes__": base64.b64encode(s).decode()}
    return s


def _data_state_from_json(s: Any) -> Any:
    if isinstance(s, dict) and set(s) == {"__bytes__"}:
        return base64.b64decode(s["__bytes__"])
    return s


def _own_data_state(s: Any, directory: str, step: int) -> Any:
    """A checkpoint of several processes holds each one's iterator state (orbax writes JSON from process 0
    only, so they are gathered there first); this process takes its own."""
    if not (isinstance(s, dict) and set(s) == {"__per_process__"}):
        return s
    states, n, i = s["__per_process__"], jax.process_count(), jax.process_index()
    if len(states) == n:
        return states[i]
    if all(x == states[0] for x in states):
        log.warning("checkpoint %s step %d was written by %d processes and is resumed by %d: the data "
                    "shards differ, so the data order is not the one the run would have seen", directory,
                    step, len(states), n)
        return states[0]
    raise ValueError(f"checkpoint {directory} step {step} holds the data-iterator states of {len(states)} "
                     f"processes, which differ, and this run has {n}: resume with {len(states)} processes "
                     f"(or start a new workdir)")


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, every: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(int(every), 1),
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Newest *complete* checkpoint (partial saves of a killed process are ignored)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Starts an (async) save if `step` is due (or `force`); returns whether it did.

        With several processes every one must call this at every step (the data states are gathered)."""
        data = _jsonable_data_state(data_state)
        if jax.process_count() > 1 and (force or self.manager.should_save(int(step))):
            data = {"__per_process__": allgather_json(data)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data),
                                  meta=ocp.args.JsonSave(meta or {}))
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
        """abstract_state: ShapeDtypeStructs with the target shardings (see `state.abstract_state`)."""
        if step not in self.manager.all_steps():
            raise ValueError(f"no complete checkpoint for step {step} in {self.directory} "
                             f"(available: {self.all_steps()})")
        out = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        data = _own_data_state(out["data"], self.directory, step)
        return out["state"], _data_state_from_json(data), out["meta"] or {}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
