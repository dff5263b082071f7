"""The train-step factory every method trains through, and the standard VLM LM loss.

`make_train_step(loss_fn, optimizer, shardings)` returns `step(state, batch) -> (state, metrics)`:
jitted with in/out shardings and the state donated; gradient accumulation over micro-batches
(token-weighted when the loss reports `num_tokens`); only trainable leaves are differentiated
(frozen ones cost no backward matmuls and hold no optimizer state); global-norm clipping lives in
the optimizer chain; a non-finite loss or gradient leaves the state unchanged and reports
`finite = False` (the loop stops with a message and keeps the last good checkpoint).

Example:
    >>> loss_fn = vlm_lm_loss(model)
    >>> step = make_train_step(loss_fn, opt, StepShardings(mesh, rules, state_sh), accum_steps=2)
    >>> state, metrics = step(state, batch)       # metrics: loss, grad_norm, lr/<group>, finite, ...
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvlm.models.llava import real_first
from jaxvlm.train import sharding as S
from jaxvlm.train.optim import Optimizer
from jaxvlm.train.state import TrainState

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class StepShardings:
    mesh: Mesh
    rules: S.Rules
    state: TrainState          # TrainState of NamedShardings (see `state.state_shardings`)

    @property
    def batch(self) -> NamedSharding:
        return S.batch_sharding(self.mesh)


# ----------------------------------------------------------------------------- the LM loss


def next_token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Shifted cross-entropy: position t predicts `labels[t+1]`; positions with label -100 are
    ignored; averaged over supervised tokens. logits `[B, T, V]`, labels `[B, T]`."""
    return token_loss(logits[:, :-1], labels[:, 1:])


def token_loss(logits: jax.Array, target: jax.Array) -> tuple[jax.Array, dict]:
    """Cross-entropy of `logits [B, T, V]` against `target [B, T]` at the same positions (-100 ignored),
    averaged over supervised tokens."""
    logits = logits.astype(jnp.float32)
    mask = target != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, target, 0))
    n = jnp.sum(mask)
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(mask, ce, 0.0)) / denom
    acc = jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == target, False)) / denom
    return loss, {"num_tokens": n, "accuracy": acc}


def real_images_first(pixel_values: jax.Array, image_mask: jax.Array | None) -> jax.Array:
    """Fixed image slots: move the real images (mask True) to the front, in order, so that the
    model's splice (features taken in order of the image tokens) never reads a padding slot."""
    if image_mask is None:
        return pixel_values
    return pixel_values[real_first(image_mask)]


def vlm_lm_loss(model: nn.Module, apply_params: Callable[[Any, jax.Array], Any] | None = None) -> LossFn:
    """Standard VLM SFT loss: `loss_fn(params, batch, rng) -> (loss, metrics)`.

    batch: input_ids `[B, T]`, labels `[B, T]` (-100 = unsupervised), attention_mask `[B, T]`, and,
    as `jaxvlm.data.pipeline` produces them, either LLaVA's pixel_values `[N, C, H, W]` with
    image_valid `[N]` (real image slots), or Qwen2/2.5-VL's per-slot patches `[N, M, C*T*P*P]` with
    image_grid_thw `[N, 3]` and mm_token_type_ids `[B, T]` (the tower runs one row per slot, so it
    shards over the batch like the LM).
    apply_params: maps the trainable tree to model params (e.g. a LoRA merge); default identity.
    """
    def loss_fn(params, batch, rng):
        p = apply_params(params, rng) if apply_params is not None else params
        pix = batch.get("pixel_values")
        if "image_grid_thw" in batch:
            out = model.apply({"params": p}, batch["input_ids"], pix, batch["image_grid_thw"],
                              mm_token_type_ids=batch.get("mm_token_type_ids"),
                              attention_mask=batch.get("attention_mask"))
        else:
            if pix is not None:
                pix = real_images_first(pix, batch.get("image_valid"))
            out = model.apply({"params": p}, batch["input_ids"], pix, attention_mask=batch.get("attention_mask"))
        return next_token_loss(out.logits, batch["labels"])
    return loss_fn


# ----------------------------------------------------------------------------- the step


def _split_micro(x: jax.Array, batch_size: int, accum: int) -> jax.Array:
    """`[B*k, ...]` -> `[accum, B/accum*k, ...]`, strided over samples so that every micro-batch
    has rows on every data-parallel device; per-sample groups (k images per sample) stay together."""
    k = x.shape[0] // batch_size
    x = x.reshape((batch_size // accum, accum, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((accum, (batch_size // accum) * k) + x.shape[3:])


def make_train_step(loss_fn: LossFn, optimizer: Optimizer, shardings: StepShardings, *, accum_steps: int = 1,
                    donate: bool = True, compiler_options: dict | None = None
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """See the module docstring. `loss_fn(params, batch, rng)` sees the full (merged) param tree.
    compiler_options: XLA options for this jit (e.g. `{"xla_backend_optimization_level": 0}` to
    halve CPU compile time in tests)."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    tx = optimizer.tx
    batch_spec = P(S.BATCH_AXES)

    def step(state: TrainState, batch):
        leaves, treedef = jax.tree.flatten(state.params)
        mask = treedef.flatten_up_to(optimizer.trainable)
        idx = [i for i, m in enumerate(mask) if m]
        key, sub = jax.random.split(state.key)

        def loss_of(train_leaves, mb, rng):
            full = list(leaves)
            for i, x in zip(idx, train_leaves):
                full[i] = x
            return loss_fn(jax.tree.unflatten(treedef, full), mb, rng)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        train_leaves = [leaves[i] for i in idx]
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(train_leaves, batch, sub)
        else:
            b = batch["input_ids"].shape[0]
            if b % accum_steps:
                raise ValueError(f"batch size {b} is not divisible by accum_steps={accum_steps}")
            micro = {k: _split_micro(v, b, accum_steps) for k, v in batch.items()}

            def body(carry, xs):
                mb, i = xs
                mb = {k: jax.lax.with_sharding_constraint(v, NamedSharding(shardings.mesh, batch_spec))
                      for k, v in mb.items()}
                (l, m), g = grad_fn(train_leaves, mb, jax.random.fold_in(sub, i))
                w = m["num_tokens"].astype(jnp.float32) if "num_tokens" in m else jnp.float32(1)
                g_acc, l_acc, m_acc, w_acc = carry
                g_acc = jax.tree.map(lambda a, x: a + w * x.astype(jnp.float32), g_acc, g)
                m_acc = {k: m_acc[k] + (v if k == "num_tokens" else w * v) for k, v in m.items()}
                return (g_acc, l_acc + w * l, m_acc, w_acc + w), None

            m_shape = jax.eval_shape(lambda: grad_fn(train_leaves, jax.tree.map(lambda v: v[0], micro), sub)[0][1])
            init = (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), train_leaves), jnp.float32(0),
                    {k: jnp.zeros(v.shape, jnp.float32 if k != "num_tokens" else v.dtype) for k, v in m_shape.items()},
                    jnp.float32(0))
            (g_sum, l_sum, m_sum, w_sum), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum_steps)))
            denom = jnp.maximum(w_sum, 1e-12)
            grads = [(g / denom).astype(leaves[i].dtype) for g, i in zip(g_sum, idx)]
            loss = l_sum / denom
            metrics = {k: (v if k == "num_tokens" else v / denom) for k, v in m_sum.items()}

        grad_norm = optax.tree.norm(grads)
        full_grads = [jnp.zeros_like(x) for x in leaves]   # frozen leaves: zeros, never read (DCE)
        for i, g in zip(idx, grads):
            full_grads[i] = g
        full_grads = jax.tree.unflatten(treedef, full_grads)
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=jax.random.key_data(key))
        # A bad step changes nothing, so the caller can stop with the last good state intact.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        out = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite)
        for name, sched in optimizer.schedules.items():
            out[f"lr/{name}"] = sched(state.step)
        return new, out

    rep = NamedSharding(shardings.mesh, P())
    jitted = jax.jit(step, in_shardings=(shardings.state, shardings.batch), out_shardings=(shardings.state, rep),
                     donate_argnums=(0,) if donate else (), compiler_options=compiler_options)

    def run(state: TrainState, batch: Mapping[str, jax.Array]):
        with S.sharding_context(shardings.mesh, shardings.rules):
            return jitted(state, batch)
    run.jitted = jitted
    return run
