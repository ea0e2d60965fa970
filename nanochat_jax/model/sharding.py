"""Device mesh from a `--mesh` spec and the placement of parameters on it.

The mesh has the axes ('data', 'fsdp'); a spec such as 'data:8', 'fsdp:8' or 'data:2,fsdp:4' sets their sizes (an axis
left out has size 1; the default puts every device on 'data'). Parameters carry logical axis names (see gpt.py) that
RULES maps onto mesh axes. The batch is split over both axes.
"""
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # each example lives on exactly one device


@dataclass(frozen=True)
class ShardingRules:
    """Logical parameter axis -> mesh axis or axes (None: replicated). FSDP splits every matrix on its model width;
    the stacked blocks' 'layers' axis is never split (the layer scan reads one slice at a time)."""
    layers: str | tuple | None = None
    embed: str | tuple | None = "fsdp"
    vocab: str | tuple | None = None
    heads: str | tuple | None = None
    kv_heads: str | tuple | None = None
    mlp: str | tuple | None = None


RULES = ShardingRules()
# Optimizer state, touched only by the update, is split over every device, data parallel ones too (ZeRO-1)
OPT_STATE_RULES = ShardingRules(embed=MESH_AXES)


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    if not spec:
        return {"data": num_devices, "fsdp": 1}
    sizes = {}
    for part in spec.split(","):
        name, sep, size = part.strip().partition(":")
        if not sep or name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(f"bad --mesh entry {part!r} in {spec!r}: expected axis:size with axis in {MESH_AXES}, "
                             "e.g. 'data:8', 'fsdp:8' or 'data:2,fsdp:4'")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        sizes[name] = int(size)
    sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if (n := int(np.prod(list(sizes.values())))) != num_devices:
        raise ValueError(f"--mesh {spec!r} has {n} devices but this run has {num_devices}")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = tuple(parse_mesh_spec(spec, len(devices)).values())
    # Auto axes: GSPMD propagates shardings through matmuls over sharded dims (Explicit axes would refuse them)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def axes_size(mesh, axes) -> int:
    """How many devices the mesh axes `axes` (a name, a tuple of names, or None) span."""
    return int(np.prod([mesh.shape[a] for a in np.atleast_1d(axes)])) if axes else 1


def logical_to_spec(axes, shape, mesh: Mesh, rules: ShardingRules = RULES) -> P:
    """A dim is sharded only when the mesh axis divides it (e.g. a single MQA kv head stays replicated)."""
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = getattr(rules, name) if name else None
        n_shards = axes_size(mesh, mesh_axes)
        spec.append(mesh_axes if n_shards > 1 and size % n_shards == 0 else None)
    return P(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules = RULES):
    def one(variable):
        axes = variable.get_metadata().get("axes") or (None,) * variable.ndim
        return variable.replace(NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, rules)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def target_platform() -> str:
    """The platform the current trace compiles for: the context mesh's (jax.sharding.use_abstract_mesh, which may be
    a TPU topology compiled ahead of time on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def context_batch_axes() -> tuple:
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(a for a in mesh.axis_names if a in BATCH_AXES and mesh.shape[a] > 1)


def shard_rows(x):
    """Pin an activation's rows (dim 0) to the context mesh's batch axes: under FSDP the compiler may otherwise split
    activations on width too, like the weights, and gather whole batches instead of each weight."""
    axes = context_batch_axes()
    if not axes or x.shape[0] % axes_size(jax.sharding.get_abstract_mesh(), axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def abstract_params(make_model, mesh: Mesh, rules: ShardingRules = RULES):
    """(graphdef, params) of make_model()'s model, unbuilt: params a pure dict of ShapeDtypeStructs with shardings."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    shardings = nnx.to_pure_dict(param_shardings(abstract, mesh, rules))
    return graphdef, jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  nnx.to_pure_dict(abstract), shardings)


def shardings_of(tree):
    return jax.tree.map(lambda leaf: leaf.sharding, tree)


def create_sharded(make_model, mesh: Mesh, rules: ShardingRules = RULES):
    """(graphdef, params): make_model()'s parameters (a pure dict) made in their shards, never whole on one device."""
    graphdef, abstract = abstract_params(make_model, mesh, rules)
    return graphdef, jax.jit(lambda: nnx.to_pure_dict(nnx.state(make_model())), out_shardings=shardings_of(abstract))()
