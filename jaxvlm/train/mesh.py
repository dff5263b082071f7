"""Device mesh with axes (data, fsdp, tensor), built from sizes where -1 means "infer".

Multi-slice TPU / multi-node GPU: `dcn_*` sizes split each axis into an inner ICI part (fast links
inside a slice / node) and an outer DCN part (between slices / nodes); the mesh is then built by
`mesh_utils.create_hybrid_device_mesh` so that collectives on the inner axes stay on ICI.

Example:
    >>> mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))   # 8 devices -> (2, 2, 2)
    >>> mesh.shape                                                  # {'data': 2, 'fsdp': 2, 'tensor': 2}
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Total size of each axis (ICI x DCN); one of them may be -1 (filled from the device count).
    `dcn_*`: how many slices / nodes each axis spans (1 = single slice)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> "MeshConfig":
        if len(shape) != 3:
            raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {tuple(shape)}")
        return cls(*map(int, shape))


def resolve_shape(sizes: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Fill a single -1 so that the product equals `n_devices`; check the result fits."""
    sizes = [int(s) for s in sizes]
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1 (infer), got {dict(zip(AXES, sizes))}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (infer), got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"cannot infer the mesh: {n_devices} devices are not divisible by the fixed axes "
                             f"{dict(zip(AXES, sizes))} (product {known})")
        sizes[sizes.index(-1)] = n_devices // known
    total = math.prod(sizes)
    if total > n_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {total} devices but only {n_devices} are available")
    if total != n_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} uses {total} of {n_devices} devices; every device must be "
                         f"in the mesh (set one axis to -1 to infer it)")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig | Sequence[int] = MeshConfig(), devices: Sequence | None = None) -> Mesh:
    """A `Mesh` over all (or the given) devices with axes `AXES`.

    Axes are `AxisType.Auto` (GSPMD: shardings come from `jit` in/out shardings and logical
    constraints), not the `Explicit` default of `jax.make_mesh` in jax 0.10.
    """
    if not isinstance(cfg, MeshConfig):
        cfg = MeshConfig.from_shape(cfg)
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape((cfg.data, cfg.fsdp, cfg.tensor), len(devices))
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    for ax, total, d in zip(AXES, shape, dcn):
        if d < 1 or total % d:
            raise ValueError(f"mesh axis {ax!r} of size {total} cannot span dcn_{ax}={d} slices/nodes")
    if math.prod(dcn) > 1:
        ici = tuple(t // d for t, d in zip(shape, dcn))
        # TPU devices know their slice; on GPU the granule between DCN groups is the process (node).
        by_process = not hasattr(devices[0], "slice_index")
        try:
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                        allow_split_physical_axes=True)
        except ValueError as e:
            raise ValueError(f"cannot split the mesh into ICI {ici} x DCN {dcn} over "
                             f"{'processes' if by_process else 'slices'}: {e}") from e
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError, AssertionError):
            # Device kinds without a topology model (e.g. some GPU / CPU setups): plain order.
            grid = np.asarray(devices).reshape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    return Mesh(grid, AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (data x fsdp)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])
