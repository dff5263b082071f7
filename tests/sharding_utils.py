"""Helpers shared by the sharded-train-step tests (LLaVA in test_train_sharding, Qwen2.5-VL in test_train_qwen)."""
from __future__ import annotations

import jax
import numpy as np

from jaxvlm.train import mesh as M
from jaxvlm.train import sharding as S
from jaxvlm.train import state as ST
from jaxvlm.train.step import StepShardings, make_train_step

FAST = {"xla_backend_optimization_level": 0}   # CPU compile time; numerics are unaffected


def run_steps(setup: dict, shape, accum: int = 1, n: int = 2) -> dict:
    """`n` train steps of `setup` (params, logical, abstract, opt, loss_fn, batch) on a mesh of `shape`
    (data, fsdp, tensor) with `accum` micro-batches; returns the mesh, state, losses, step, batch, metrics."""
    mesh = M.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    rules = S.make_rules("fsdp_tp")
    p_sh = S.param_shardings(setup["logical"], setup["abstract"], mesh, rules)
    st_sh = ST.state_shardings(p_sh, setup["abstract"], setup["opt"], mesh)
    state = jax.device_put(ST.create_train_state(jax.tree.map(np.array, setup["params"]), setup["opt"],
                                                 jax.random.key(1)), st_sh)
    step = make_train_step(setup["loss_fn"], setup["opt"], StepShardings(mesh, rules, st_sh), accum_steps=accum,
                           compiler_options=FAST)
    batch = S.shard_batch(setup["batch"], mesh)
    losses = []
    for _ in range(n):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return dict(mesh=mesh, state=state, losses=losses, step=step, batch=batch, metrics=m, st_sh=st_sh)


def assert_no_replication_fallback(stderr: str) -> None:
    """The SPMD partitioner logs (to stderr, while compiling) each reshard it can only do by
    replicating the whole tensor first: on a pod that is an all-gather of a full activation. (The
    check needs XLA's C++ warnings on stderr: with TF_CPP_MIN_LOG_LEVEL >= 2 it passes vacuously.)"""
    hits = [ln for ln in stderr.splitlines() if "Involuntary full rematerialization" in ln]
    assert not hits, f"{len(hits)} reshards replicate a whole tensor, e.g. {hits[0][:400]}"
