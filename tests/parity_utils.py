"""Helpers shared by the parity tests (torch is imported lazily by the callers' fixtures)."""
from __future__ import annotations

import numpy as np


def rel_err(ours, ref, mask=None) -> float:
    """max |ours - ref| / max |ref| over the (optionally masked) positions."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def torch_state(model) -> dict:
    """A torch module's state dict as fp32/bf16-preserving numpy arrays (bf16 via ml_dtypes)."""
    import ml_dtypes
    import torch
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            out[k] = v.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = v.numpy()
    return out
