"""Sharding in one place: the mesh, the logical-axis rules, and helpers that apply them.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")) and the model constrains its
main activations with `constrain(x, ("batch", "length", "act_embed"))`. One rules table maps those
logical names onto the physical mesh axes (data, fsdp, tensor). The same model code therefore runs
unsharded on one device (no mesh active: constraints are no-ops) or sharded on any mesh shape.

A logical axis maps to a mesh axis (or a tuple of them) only when the dimension divides evenly by
the mesh size along those axes; otherwise that dimension is replicated. This keeps tiny test models
and odd vocabulary sizes working on any mesh without special cases.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Parameters shard their model dimension over fsdp (ZeRO-3 style) and
# their head / mlp / vocab dimensions over tensor; activations shard the batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),  # the leading axis of scanned layers' parameters and of the KV cache
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_qkv", "tensor"),
    ("patch", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES


_ACTIVE: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
    "eureka_jax_sharding", default=None
)


def make_mesh(
    shape: Sequence[int] = (1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh. A -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh dimension may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) > len(devices) or math.prod(shape) < 1:
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} are "
            "available; set mesh.shape so that its product is at most the device count"
        )
    # A smaller mesh than the machine uses the first devices (e.g. (1, 1, 1) for one device).
    device_grid = np.asarray(devices[: math.prod(shape)]).reshape(shape)
    return Mesh(device_grid, MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[ShardingContext]:
    """Within this block, `constrain` and `logical_sharding` use this mesh and these rules."""
    context = ShardingContext(mesh, tuple(rules))
    token = _ACTIVE.set(context)
    try:
        with jax.set_mesh(mesh):
            yield context
    finally:
        _ACTIVE.reset(token)


def active() -> ShardingContext | None:
    return _ACTIVE.get()


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], context: ShardingContext
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec, replicating dimensions that do not divide."""
    rules = dict(context.rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        target = rules.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and context.mesh.shape[a] > 1)
        ways = math.prod(context.mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or size % ways:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op when no mesh is active."""
    context = _ACTIVE.get()
    if context is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, context)
    return jax.lax.with_sharding_constraint(x, NamedSharding(context.mesh, spec))


def logical_sharding(
    logical_axes: Sequence[str | None], shape: Sequence[int], context: ShardingContext | None = None
) -> NamedSharding:
    context = context or _ACTIVE.get()
    if context is None:
        raise RuntimeError("no mesh is active: wrap the call in `with sharding.activate(mesh):`")
    return NamedSharding(context.mesh, logical_to_spec(logical_axes, shape, context))


def state_shardings(state: nnx.State, context: ShardingContext | None = None):
    """NamedShardings for an nnx.State (or abstract state) from each variable's logical_axes."""
    context = context or _ACTIVE.get()
    if context is None:
        raise RuntimeError("no mesh is active: wrap the call in `with sharding.activate(mesh):`")

    def sharding_of(variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        return variable.replace(logical_sharding(axes, variable.shape, context))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def mirror_shardings(tree, reference, default: NamedSharding):
    """Shardings for `tree` whose leaves copy those of `reference` (arrays or abstract arrays with
    `.sharding`) wherever a leaf's key path ends with a reference leaf's path and the shapes agree;
    `default` elsewhere. An optimizer state holds copies of the parameter tree (Adam's moments)
    under extra keys, so this shards each copy like the
    parameters, and leaves the step counts on `default`.

        opt_shardings = mirror_shardings(jax.eval_shape(tx.init, params), params, replicated)
    """
    by_path = {path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(reference)}
    longest = max((len(path) for path in by_path), default=0)

    def sharding_of(path, leaf):
        for start in range(max(len(path) - longest, 0), len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and tuple(match.shape) == tuple(leaf.shape):
                return match.sharding
        return default

    return jax.tree_util.tree_map_with_path(sharding_of, tree)
