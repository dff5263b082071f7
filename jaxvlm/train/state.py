"""Train state: a pytree of step, params (fp32 master weights), optimizer state and rng key data,
plus the shardings of each part (derived from the logical-axis rules).

The rng is stored as raw key data (`uint32[2]`, threefry) so orbax can checkpoint it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvlm.train import sharding as S
from jaxvlm.train.optim import Optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: number of applied updates
    params: Any              # trainable-state tree (e.g. params, or {"base": params, "lora": lora})
    opt_state: Any
    rng: jax.Array           # uint32 key data

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def create_train_state(params: Any, optimizer: Optimizer, rng: jax.Array) -> TrainState:
    """rng: a typed key (`jax.random.key`) or raw key data."""
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.tx.init(params),
                      rng=jnp.asarray(data, jnp.uint32))


def state_shardings(param_shardings: Any, abstract_params: Any, optimizer: Optimizer, mesh: Mesh) -> TrainState:
    """TrainState-shaped tree of NamedShardings."""
    rep = NamedSharding(mesh, P())
    return TrainState(step=rep, params=param_shardings,
                      opt_state=S.opt_state_shardings(optimizer.tx, abstract_params, param_shardings, mesh),
                      rng=rep)


def init_state_sharded(init_params: Callable[[], Any], optimizer: Optimizer, shardings: TrainState,
                       rng: jax.Array) -> TrainState:
    """Build the state directly in its sharded layout (no full copy on one device): `init_params`
    runs under `jit` with the parameter shardings as output shardings."""
    def init():
        return create_train_state(init_params(), optimizer, rng)
    return jax.jit(init, out_shardings=shardings)()


def abstract_state(state_shardings_: TrainState, abstract_params: Any, optimizer: Optimizer) -> TrainState:
    """ShapeDtypeStructs with shardings attached (restore target for orbax)."""
    shapes = jax.eval_shape(lambda p: create_train_state(p, optimizer, jnp.zeros((2,), jnp.uint32)),
                            abstract_params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings_)
