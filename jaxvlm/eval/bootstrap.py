"""Bootstrap confidence intervals, the way REVERSE reports its CHAIR / AMBER numbers.

REVERSE (scripts/eval/eval_chair.py) draws ``rounds`` resamples of the per-sample records with
replacement from ``np.random.default_rng(42)``, recomputes the *aggregate* metric on each
resample (e.g. CHAIR-i = sum hallucinated / sum mentions, not a mean of per-caption ratios),
and reports mean, std and the 2.5 / 97.5 percentiles of the resampled values.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np


def bootstrap(
    samples: Sequence[Any],
    statistic: Callable[[Sequence[Any]], float | Mapping[str, float]] | None = None,
    rounds: int = 100,
    seed: int = 42,
    ci: float = 0.95,
) -> dict:
    """Bootstrap mean / std / CI of ``statistic`` over resamples of ``samples``.

    ``statistic`` maps a list of samples to a number or a dict of numbers; the default is the
    mean (for per-sample scores such as VQA accuracy). A dict statistic gives one entry per key.

    Example:
        >>> r = bootstrap([0.0, 1.0, 1.0, 1.0], rounds=200, seed=0)
        >>> sorted(r), 0.5 <= r["mean"] <= 1.0
        (['ci95', 'mean', 'rounds', 'seed', 'std'], True)
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    n = len(samples)
    if n == 0:
        raise ValueError("cannot bootstrap zero samples")
    stat = statistic or (lambda xs: float(np.mean(np.asarray(xs, dtype=np.float64))))
    rng = np.random.default_rng(seed)
    values: list = []
    for _ in range(rounds):
        # Same draw as REVERSE: rng.choice over all indices, size n, with replacement.
        idx = rng.choice(n, size=n, replace=True)
        values.append(stat([samples[i] for i in idx]))
    # (100 - 95) / 2, not 100 * (1 - 0.95) / 2 = 2.5000000000000022: REVERSE asks for exactly 2.5 / 97.5.
    lo_q, hi_q = (100 - 100 * ci) / 2, (100 + 100 * ci) / 2
    key = f"ci{round(ci * 100)}"

    def summarise(v: np.ndarray) -> dict:
        return {"mean": float(np.mean(v)), "std": float(np.std(v)),
                key: [float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))],
                "rounds": rounds, "seed": seed}

    if isinstance(values[0], Mapping):
        return {k: summarise(np.array([v[k] for v in values], dtype=np.float64))
                for k, x in values[0].items() if isinstance(x, (int, float))}
    return summarise(np.array(values, dtype=np.float64))
