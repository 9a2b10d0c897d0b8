"""Meshes and logical-axis sharding rules for the train state.

The mesh has axes ("data", "fsdp", "tensor"); sizes come from the config (-1
fills with the remaining devices). Parameters carry logical axis names from
their layers (``nn.with_logical_partitioning``); ``config.logical_rules`` maps
them to mesh axes. A dimension whose size the mesh axes do not divide is
replicated instead (uneven shardings are not allowed for jit outputs), or,
split over fsdp, split on another dimension that divides. Adam's
moments follow their parameter; GaLore's projected moments and projectors,
whose shapes differ from the parameter's, shard their larger dimension over
"fsdp" when it divides.
"""
import math

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes): the default rules, every logical name used by the
# model and the structured layers.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    # Monarch / BTT / block-diagonal factors split by each block's rows
    # over fsdp. Not by block over "tensor": XLA's partitioner (jax 0.10.2
    # and 0.12) then computed a wrong dx for the XLA Monarch product, 0.6
    # relative error (tests/test_sharding.py).
    ("monarch_blocks", None),
    ("monarch_rows", "fsdp"),
    ("rank", None),
    ("sparse", "fsdp"),             # SLTrain values and their int32 support
    ("nola_basis", None),
    ("nola_key", None),
    ("adapter", None),
    ("norm", None),
)


def mesh_shape(sizes: dict, n_devices: int) -> tuple[int, ...]:
  """Resolve one -1 among {data, fsdp, tensor} sizes to fill n_devices."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))}: at most one "
                     "axis may be -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"config.mesh: {n_devices} devices are not divisible "
                       f"by the fixed axes' product {known}.")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} needs "
                     f"{math.prod(shape)} devices, there are {n_devices}; "
                     "set one axis to -1.")
  return tuple(shape)


def make_mesh(sizes: dict, devices=None) -> Mesh:
  """Mesh over ``devices`` (default: all, or the first sizes["num_devices"])."""
  devices = jax.devices() if devices is None else devices
  if sizes.get("num_devices"):
    devices = devices[:int(sizes["num_devices"])]
  shape = mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


# Mesh axes that only split storage: a parameter split over them is gathered
# whole before use, so which of its dimensions they split changes nothing
# but whether it divides.
STORAGE_AXES = frozenset({"fsdp"})


def fit_spec(spec: P, shape, mesh) -> P:
  """Replicate the dimensions whose size the mesh axes do not divide; a
  storage-only split (``STORAGE_AXES``) moves instead to the largest
  unsplit dimension it divides (LLaMA-1B Monarch's up/gate w2, (4, 1366,
  512): rows over fsdp 16 do not divide, its 512 columns do). ``mesh``:
  a Mesh or AbstractMesh (only its axis sizes are read)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = list(spec)
  for i, (dim, axes) in enumerate(zip(shape, spec)):
    size = _axis_size(mesh, axes)
    if axes is None or dim % size == 0:
      continue
    out[i] = None
    names = {axes} if isinstance(axes, str) else set(axes)
    free = [j for j in range(len(shape))
            if spec[j] is None and out[j] is None and shape[j] % size == 0]
    if names <= STORAGE_AXES and free:
      j = max(free, key=lambda j: shape[j])
      out[j] = axes
      logging.info("splitting dimension %d (%d) of %s over %s instead of "
                   "dimension %d (%d: not divisible)", j, shape[j],
                   tuple(shape), axes, i, dim)
    else:
      logging.info("replicating a dimension of %d (not divisible by %s)",
                   dim, axes)
  return P(*out)


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree of (boxed) abstract values from ``init``."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      return NamedSharding(mesh, fit_spec(spec, leaf.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _path(p):
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
               for k in p)


def follow_params(tree, param_shardings, params, mesh: Mesh):
  """Shardings for an optimizer state: param-shaped leaves follow the param
  whose path ends theirs; others (counts, GaLore projections) get their own."""
  by_path = {}
  for (p, s), (_, leaf) in zip(
      jax.tree_util.tree_flatten_with_path(param_shardings)[0],
      jax.tree_util.tree_flatten_with_path(params)[0]):
    by_path[_path(p)] = (s, leaf.shape)

  def one(path, leaf):
    path = _path(path)
    for k in range(len(path)):
      hit = by_path.get(path[k:])
      if hit is not None:
        if tuple(hit[1]) == tuple(leaf.shape):
          return hit[0]
        break
    if leaf.ndim >= 1:  # GaLore moments / projectors: larger dim over fsdp
      axis = int(np.argmax(leaf.shape))
      spec = [None] * leaf.ndim
      spec[axis] = "fsdp"
      return NamedSharding(mesh, fit_spec(P(*spec), leaf.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(("batch", None), rules)
  return NamedSharding(mesh, spec)


def global_batch(local_batch, sharding: NamedSharding):
  """Assemble this process's rows into the global (sharded) batch array."""
  return jax.make_array_from_process_local_data(sharding, local_batch)
