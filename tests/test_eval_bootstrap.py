"""Bootstrap: REVERSE's resampling (default_rng(42), rng.choice over indices), mean / std / 95% CI."""
from __future__ import annotations

import numpy as np
import pytest

from jaxvlm.eval import bootstrap, evaluate


def test_bootstrap_matches_reverse_resampling():
    samples = [{"h": h, "m": m} for h, m in [(0, 3), (1, 2), (2, 4), (0, 1), (1, 1), (0, 0), (3, 5)]]

    def ratio(xs):
        return sum(x["h"] for x in xs) / (sum(x["m"] for x in xs) or 1)

    # REVERSE eval_chair.py, written out independently: rng.choice(list of indices, size=n, replace=True)
    rng = np.random.default_rng(42)
    idx = list(range(len(samples)))
    vals = np.array([ratio([samples[i] for i in rng.choice(idx, size=len(samples), replace=True)])
                     for _ in range(100)])
    got = bootstrap(samples, ratio, rounds=100, seed=42)
    assert got["mean"] == pytest.approx(float(np.mean(vals)), abs=0)
    assert got["std"] == pytest.approx(float(np.std(vals)), abs=0)
    assert got["ci95"] == [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]
    assert got["rounds"] == 100 and got["seed"] == 42


def test_bootstrap_constant_and_dict_statistics():
    r = bootstrap([0.5] * 10, rounds=7, seed=1)
    assert r["mean"] == 0.5 and r["std"] == 0.0 and r["ci95"] == [0.5, 0.5]
    r = bootstrap([1, 2, 3], lambda xs: {"a": 1.0, "b": float(len(xs))}, rounds=5)
    assert r["a"]["mean"] == 1.0 and r["b"]["mean"] == 3.0
    assert bootstrap([1.0, 0.0], rounds=50, seed=3) == bootstrap([1.0, 0.0], rounds=50, seed=3)
    with pytest.raises(ValueError):
        bootstrap([], rounds=5)


def test_harness_bootstrap_for_pope():
    labels = [{"question_id": i, "label": "yes" if i % 2 else "no"} for i in range(20)]
    preds = [{"question_id": i, "text": "Yes" if i % 3 else "No"} for i in range(20)]
    r = evaluate("pope", preds, labels, bootstrap=30, seed=0)
    assert set(r["bootstrap"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    b = r["bootstrap"]["accuracy"]
    assert b["rounds"] == 30 and b["ci95"][0] <= b["mean"] <= b["ci95"][1]
