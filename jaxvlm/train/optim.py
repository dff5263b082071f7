"""Optimizer groups: AdamW with warmup-cosine / warmup-stable-decay / constant schedules, per-group learning rates and
freezing chosen by regexes over '/'-joined parameter paths (first matching group wins).

Frozen parameters get `optax.set_to_zero()` inside `optax.multi_transform`, so they hold no Adam
moments; the train step does not even differentiate them (see `jaxvlm.train.step`).

Example (REVERSE: LoRA 2e-4, projector 2e-5, everything else frozen):
    >>> cfg = OptimConfig(groups=(Group("lora", r"lora/.*", 2e-4),
    ...                           Group("projector", r"base/multi_modal_projector/.*", 2e-5)),
    ...                   default_lr=None, total_steps=1000, warmup_steps=30)
    >>> opt = make_optimizer(cfg, {"base": params, "lora": lora})
    >>> opt.tx, opt.labels, opt.trainable
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

FROZEN = "frozen"
SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "constant")


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    pattern: str            # regex, full-matched against the '/'-joined parameter path
    lr: float | None        # None = frozen
    weight_decay: float | None = None   # None = OptimConfig.weight_decay


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    groups: tuple[Group, ...] = ()
    default_lr: float | None = 1e-4       # params no group matches; None = frozen
    schedule: str = "warmup_cosine"       # "warmup_cosine" | "warmup_stable_decay" | "constant"
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_ratio: float = 0.0             # cosine / the final decay end at peak * end_lr_ratio
    decay_fraction: float = 0.1           # warmup_stable_decay: the last fraction of total_steps decays linearly
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0             # decoupled (AdamW); applied to params with ndim >= 2
    clip_norm: float | None = 1.0         # global-norm clipping over trainable grads; None = off
    frozen_rows: tuple[tuple[str, int, tuple[int, ...]], ...] = ()  # (path regex, axis, row ids) kept fixed

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(g if isinstance(g, Group) else Group(**g) for g in self.groups))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What `make_train_step` needs: the optax transform, which leaves are trained, group schedules."""

    tx: optax.GradientTransformation
    labels: Any                       # tree of group names (FROZEN for frozen leaves)
    trainable: Any                    # tree of bools
    schedules: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def make_schedule(cfg: OptimConfig, peak: float) -> optax.Schedule:
    """Step -> learning rate. warmup_stable_decay (as in MiniCPM): linear warmup, the peak held, then a
    linear decay over the last `decay_fraction` of `total_steps` (never into the warmup) to
    `peak * end_lr_ratio`; unlike cosine it keeps the rate high for most of the run."""
    if cfg.schedule == "warmup_stable_decay":
        total = max(cfg.total_steps, cfg.warmup_steps + 1)
        decay = max(1, min(round(total * cfg.decay_fraction), total - cfg.warmup_steps))
        stable_end = total - decay
        parts = [optax.constant_schedule(peak), optax.linear_schedule(peak, peak * cfg.end_lr_ratio, decay)]
        if not cfg.warmup_steps:
            return optax.join_schedules(parts, [stable_end])
        return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), *parts],
                                    [cfg.warmup_steps, stable_end])
    if cfg.schedule == "constant":
        if cfg.warmup_steps:
            return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps),
                                         optax.constant_schedule(peak)], [cfg.warmup_steps])
        return optax.constant_schedule(peak)
    return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, max(cfg.total_steps, cfg.warmup_steps + 1),
                                              end_value=peak * cfg.end_lr_ratio)


def group_labels(cfg: OptimConfig, params: Any) -> Any:
    """Each parameter's group name (the first group whose pattern full-matches its path), FROZEN, or
    "default". A group that takes no parameter is an error: a mistyped pattern (or one shadowed by
    an earlier group) would otherwise silently leave the default learning rate (or no freeze)."""
    compiled = [(g, re.compile(g.pattern)) for g in cfg.groups]
    taken: set[int] = set()

    def label(path, _):
        p = path_str(path)
        for i, (g, rx) in enumerate(compiled):
            if rx.fullmatch(p):
                taken.add(i)
                return g.name if g.lr is not None else FROZEN
        return "default" if cfg.default_lr is not None else FROZEN
    labels = jax.tree.map_with_path(label, params)
    missed = [(g.name, g.pattern) for i, g in enumerate(cfg.groups) if i not in taken]
    if missed:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        example = path_str(flat[0][0]) if flat else None
        raise ValueError(f"optimizer group(s) {missed} match no parameter, or only ones an earlier group takes "
                         f"(patterns are full-matched against '/'-joined paths such as {example!r})")
    return labels


def mask_rows(masks: Mapping[str, tuple[int, np.ndarray]]) -> optax.GradientTransformation:
    """Zero the updates of chosen rows (e.g. frozen new-token embeddings); stateless.
    masks: '/'-joined path -> (axis, bool keep-vector along that axis)."""
    def update(updates, state, params=None):
        def one(path, u):
            m = masks.get(path_str(path))
            if m is None:
                return u
            axis, keep = m
            shape = [1] * u.ndim
            shape[axis] = -1
            return u * jnp.asarray(keep, u.dtype).reshape(shape)
        return jax.tree.map_with_path(one, updates), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _row_masks(cfg: OptimConfig, params) -> dict:
    out = {}
    for pattern, axis, rows in cfg.frozen_rows:
        hit = False
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            p = path_str(path)
            if re.fullmatch(pattern, p):
                keep = np.ones(x.shape[axis], bool)
                keep[list(rows)] = False
                out[p] = (axis, keep)
                hit = True
        if not hit:
            raise ValueError(f"frozen_rows pattern {pattern!r} matches no parameter")
    return out


def make_optimizer(cfg: OptimConfig, params: Any) -> Optimizer:
    """params: the trainable-state tree (or its abstract shapes) the optimizer will see."""
    labels = group_labels(cfg, params)
    names = set(jax.tree.leaves(labels))
    if names == {FROZEN}:
        raise ValueError("every parameter is frozen: no optimizer group matched with a learning rate "
                         f"(groups={[(g.name, g.pattern) for g in cfg.groups]}, default_lr={cfg.default_lr})")
    by_name = {g.name: g for g in cfg.groups}
    schedules, txs = {}, {FROZEN: optax.set_to_zero()}
    for name in sorted(names - {FROZEN}):
        g = by_name.get(name)
        peak = g.lr if g else cfg.default_lr
        wd = cfg.weight_decay if g is None or g.weight_decay is None else g.weight_decay
        schedules[name] = make_schedule(cfg, peak)
        txs[name] = optax.adamw(schedules[name], b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd,
                                mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    rows = _row_masks(cfg, params)
    parts = []
    if rows:
        parts.append(mask_rows(rows))            # before clipping: frozen rows do not count in the norm
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.multi_transform(txs, labels))
    if rows:
        parts.append(mask_rows(rows))            # after AdamW: weight decay must not move them either
    trainable = jax.tree.map(lambda l: l != FROZEN, labels)
    return Optimizer(optax.chain(*parts), labels, trainable, schedules)


def describe(opt: Optimizer, params: Any) -> str:
    """One line per group: how many tensors / parameters it trains (for the run log)."""
    counts: dict[str, list[int]] = {}
    for l, x in zip(jax.tree.leaves(opt.labels), jax.tree.leaves(params)):
        c = counts.setdefault(l, [0, 0])
        c[0] += 1
        c[1] += int(np.prod(x.shape))
    return "\n".join(f"  {k:<12} {v[0]:>5} tensors {v[1]:>14,} params" for k, v in sorted(counts.items()))
