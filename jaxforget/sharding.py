"""The device mesh and the one place where logical axis names become mesh axes.

Model code tags every parameter with ``logical_axes`` metadata (see models/layers.py). The rules
below (overridable from config) map each logical name to a mesh axis. A dimension that the mesh
axis does not divide stays replicated, and one mesh axis is used at most once per array, so the
same rules serve a tiny test model and SDXL.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxforget.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (None = replicated). FSDP shards the "input" side of weights,
# tensor parallelism the heads / MLP side. Convolutions are FSDP-only: with conv output channels
# on "tensor" and the batch on data x fsdp, XLA's CPU SPMD partitioner returned wrong values for
# some batch shards (tests/test_sharding.py caught it; see NOTES.md), and tensor-parallel convs
# buy little for SD-class UNets, whose FLOPs sit in attention and 3x3 convs of modest width.
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "conv_in": "fsdp",
    "conv_out": None,
    "vocab": None,
    "positions": None,
    "norm": None,
    "time": None,
}

# activations: batch over data (and fsdp, as in ZeRO-3 data parallelism)
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Build a (data, fsdp, tensor) mesh; one size may be -1 (fill with the remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"mesh: unknown axis {sorted(unknown)[0]!r} (axes are {', '.join(MESH_AXES)})")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices cannot fill {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, found {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] | None = None,
) -> P:
    rules = DEFAULT_RULES if rules is None else rules
    if not logical_axes:
        return P()
    used: set[str] = set()
    spec: list[str | None] = []
    for name, dim in zip(logical_axes, shape):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis] != 0 or mesh.shape[axis] == 1:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_shardings(
    module_or_state, mesh: Mesh, rules: Mapping[str, str | None] | None = None
) -> nnx.State:
    """A State of NamedShardings, one per variable, from each variable's logical_axes."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)

    def one(var):
        axes = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
        return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] | None = None) -> nnx.Module:
    """Place a module's variables on the mesh according to the rules (in place); returns it."""
    state = nnx.state(module)
    shardings = param_shardings(state, mesh, rules)
    sharded = jax.tree.map(
        lambda var, sh: var.replace(jax.device_put(var[...], sh)),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    nnx.update(module, sharded)
    return module


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) dimension over data x fsdp; replicate the rest."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
