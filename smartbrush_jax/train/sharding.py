"""Mesh and shardings from the config: logical axis names -> mesh axes, as data.

The mesh has three named axes, `data`, `fsdp` and `tensor` (`-1` in `mesh.shape` fills
the remaining devices). Parameters carry logical axis names (`models/layers.py`); the
rules map them to mesh axes: all replicated by default (data parallel), or, with
`mesh.fsdp = True`, the `out_features` dimension of every kernel split over `fsdp`. The
batch is split over `data` and `fsdp` together.

Multi-slice TPU (`mesh.dcn_shape`, e.g. `{"data": 2}` for two slices) builds a hybrid
ICI x DCN mesh, so only the data axis crosses the slower data-centre network.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from smartbrush_jax.settings import AXES, resolve_shape

BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (("out_features", None), ("in_features", None), ("norm", None), ("vocab", None),
                 ("kernel_h", None), ("kernel_w", None))
FSDP_RULES = (("out_features", "fsdp"),) + DEFAULT_RULES[1:]


def make_mesh(shape: Dict[str, int], dcn_shape: Dict[str, int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out by the physical
    topology (`mesh_utils.create_device_mesh`: neighbouring mesh positions are ICI
    neighbours on a TPU torus); with `dcn_shape`, a hybrid mesh whose DCN factor spans the
    slices (`create_hybrid_device_mesh`), so only those axes cross the data-centre network."""
    from jax.experimental import mesh_utils

    devices = list(devices if devices is not None else jax.devices())
    if dcn_shape and any(v != 1 for v in dcn_shape.values()):
        dcn = resolve_shape(dcn_shape, math.prod(int(v) for v in dcn_shape.values()))
        ici = resolve_shape(shape, len(devices) // math.prod(dcn))
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    elif devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh(resolve_shape(shape, len(devices)), devices,
                                             allow_split_physical_axes=True)
    else:  # CPU and GPU devices: in order (GPU: NVLink within a host comes first)
        grid = np.asarray(devices).reshape(resolve_shape(shape, len(devices)))
    return Mesh(grid, AXES)


def rules_from_config(fsdp: bool, extra: Sequence[Sequence[str]] = ()) -> Tuple[Tuple[str, Any], ...]:
    base = FSDP_RULES if fsdp else DEFAULT_RULES
    extra = tuple((a, b) for a, b in extra)
    names = {a for a, _ in extra}
    return extra + tuple(r for r in base if r[0] not in names)


def param_shardings(mesh: Mesh, logical_specs: Any, rules, shapes: Any = None) -> Any:
    """Tree of NamedShardings for a tree of logical PartitionSpecs. With `shapes` (the same
    tree of arrays/ShapeDtypeStructs), a dimension the mesh axes do not divide evenly (a
    4-channel bias over 8 devices) stays replicated instead of failing."""
    def one(spec, shape=None):
        axes = list(nn.logical_to_mesh_axes(spec, rules))
        if shape is not None:
            for i, ax in enumerate(axes):
                names = (ax,) if isinstance(ax, str) else tuple(ax or ())
                size = math.prod(mesh.shape[n] for n in names)
                if names and shape.shape[i] % size:
                    axes[i] = None
        return NamedSharding(mesh, PartitionSpec(*axes))

    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    if shapes is None:
        return jax.tree_util.tree_map(one, logical_specs, is_leaf=is_spec)
    return jax.tree_util.tree_map(one, logical_specs, shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(mesh: Mesh, local_batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    """Per-host numpy batch -> global jax arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        if v.dtype.kind in "US":
            continue  # strings stay on the host
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
