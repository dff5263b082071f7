"""Helpers shared by the parity tests (torch is imported lazily by the callers' fixtures)."""
from __future__ import annotations

import numpy as np

from jaxvlm.conversion.api import torch_state  # noqa: F401  (re-exported for the tests)


def rel_err(ours, ref, mask=None) -> float:
    """max |ours - ref| / max |ref| over the (optionally masked) positions."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
