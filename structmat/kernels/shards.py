"""Kernels on each device's share of the tokens.

XLA's SPMD partitioner cannot split a Pallas kernel: to it a ``pallas_call``
is an opaque custom call, so inside a ``jit`` whose activations are sharded
over devices it gathers the kernel's operands onto every device and runs the
whole product on each (jax-ml/jax#19748: Pallas kernels "are not
automatically partitioned"), which multiplies a data-parallel step's layer
time and activation memory by the number of token shards. So while a train
step is traced for a mesh (``over``, which the train loop enters), dispatch
runs each kernel under ``shard_map`` (``per_shard``): every device
multiplies its own tokens (split over every mesh axis, "tensor" too:
``_kernel_axes``); the weights enter whole (XLA gathers fsdp- or
tensor-sharded ones, as it does for any matmul; what the backward keeps:
``SAVED_POLICY``) and shard_map's transpose sums their gradients over the
token shards. Outside ``over`` (one device, or a mesh whose batch axes
have size 1) kernels run as they are.

On TPUs this is not only speed: lowering a Mosaic kernel for a multi-device
mesh outside a shard_map raises ("Mosaic kernels cannot be automatically
partitioned"), so before this a TPU-pod step with ``impl="pallas"`` (or
"auto" where it takes a kernel) did not compile.

``over`` acts while a function is traced, which ``jax.jit`` does at its
first call and caches regardless of ``over``: enter it around that first
call (the train loop wraps its steps so, ``loop.Placement.on_mesh``), not
around a function already traced without it.

The same context pins the models' residual stream to the token shards
(``constrain``), which fsdp needs whatever the impl.
"""
import contextlib
import math

import jax
from jax.sharding import PartitionSpec as P

_MESHES: list = []   # a stack of (mesh, batch axes, kernel axes): nests


@contextlib.contextmanager
def over(mesh, axes):
  """Trace kernel calls inside to run per shard of the tokens, which the
  mesh's ``axes`` split (a name, a tuple of names or None: the "batch"
  logical axis's mesh axes) and, for the kernels, its other axes too."""
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  batch = tuple(a for a in axes if mesh.shape[a] > 1)
  rest = tuple(a for a in mesh.shape if a not in batch and mesh.shape[a] > 1)
  _MESHES.append((mesh, batch, batch + rest))
  try:
    yield
  finally:
    _MESHES.pop()


def _kernel_axes(tokens: int) -> tuple:
  """The mesh axes a kernel call on ``tokens`` rows splits them over.

  Every axis of the mesh where they divide: the batch's, then the rest
  ("tensor"), whose devices hold the same tokens (the kernels are not
  tensor-parallel: on a data 4 x tensor 4 mesh each of 4 chips would run
  the whole product on the same rows). Sliced there, each computes a
  quarter, and the output leaves split over tensor too (XLA gathers it
  where the next op wants it whole). Else the batch's axes alone, else
  none (the call as it is)."""
  if not _MESHES:
    return ()
  mesh, batch, every = _MESHES[-1]
  for axes in (every, batch):
    if tokens % math.prod(mesh.shape[a] for a in axes) == 0:
      return axes
  return ()


def splits(rows: int) -> bool:
  """Whether ``per_shard`` / ``per_batch`` split ``rows`` over the mesh
  (True outside ``over``: nothing to split). Where they cannot, a Mosaic
  kernel meets XLA's partitioner, which refuses it."""
  return not _MESHES or token_shards() == 1 or bool(_kernel_axes(rows))


def token_shards() -> int:
  """How many token shards kernels traced here run on where the tokens
  divide (1: no ``over``): every mesh axis of size > 1."""
  if not _MESHES:
    return 1
  mesh, _, every = _MESHES[-1]
  return math.prod(mesh.shape[a] for a in every)


def local_tokens(tokens: int) -> int:
  """The tokens each kernel call sees: its shard's (``_kernel_axes``)."""
  if not _MESHES:
    return tokens
  mesh = _MESHES[-1][0]
  return tokens // math.prod(mesh.shape[a] for a in _kernel_axes(tokens))


def _heads_spec(arrays):
  """P(batch axes, other axes) for (batch, heads, ...) arrays whose batch
  divides over the batch's mesh axes and every array's heads over the
  others ("tensor", which the rules shard heads over); else None."""
  if not _MESHES:
    return None
  mesh, batch, every = _MESHES[-1]
  rest = tuple(a for a in every if a not in batch)
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  if (not rest or arrays[0].shape[0] % size(batch)
      or any(a.shape[1] % size(rest) for a in arrays)):
    return None
  return P(batch or None, rest)


def per_batch(kernel, *arrays, heads: bool = False):
  """``kernel(*arrays)`` on each device's share of their leading (batch)
  dimension, split over the mesh axes ``_kernel_axes`` gives for it (every
  axis where it divides), and the result split the same way; the call as it
  is without ``over`` or where nothing divides. For kernels whose rows are
  not independent tokens (attention: a sequence's tokens see each other).
  ``heads``: the arrays are (batch, heads, ...) with independent heads;
  on a mesh with a "tensor" axis their heads split over it (as the rules
  shard q, k and v there already, so XLA moves nothing) and the batch over
  the batch's axes, where both divide (the kernel then sees fewer heads).
  Nothing is rematerialized: such a kernel's residuals (flash attention's
  row statistics) are its own and small."""
  spec = _heads_spec(arrays) if heads else None
  if spec is None:
    axes = _kernel_axes(arrays[0].shape[0])
    if not axes:
      return kernel(*arrays)
    spec = P(axes)
  return jax.shard_map(kernel, mesh=_MESHES[-1][0],
                       in_specs=(spec,) * len(arrays), out_specs=spec,
                       check_vma=False)(*arrays)


def constrain(x):
  """``x`` (batch, ...) with its leading dimension sharded over the token
  shards and the rest replicated on each, inside ``over`` (else ``x``).

  The model pins its residual stream so at block boundaries. Without it,
  under fsdp (weights sharded over the batch's own mesh axis) XLA's
  sharding propagation may move the activations off the batch axis (onto
  the features, say) to meet the sharded weights, which gathers whole
  batches on each device: a LLaMA-60M step on 8 fsdp devices planned 6x
  the temporaries of the data-parallel one, 1B's ran a v5e-16 out of HBM
  with 109 GB per chip."""
  if not _MESHES:
    return x
  mesh, axes, _ = _MESHES[-1]
  shards = math.prod(mesh.shape[a] for a in axes)
  if shards == 1 or x.shape[0] % shards:
    return x
  spec = P(axes, *(None,) * (x.ndim - 1))
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, spec))


# What a kernel's backward keeps from its forward, across ``per_shard``.
# Its custom_vjp saves its operands; those a kernel computes inside the
# shard_map (x copied into a padded layout, weights cast or padded: the
# gathered copies of fsdp-sharded weights) would be kept from forward to
# backward by shard_map's differentiation, which forwards only untouched
# inputs (the TPU Monarch kernel kept the padded x and the gathered,
# padded factors: LLaMA-1B Monarch at fsdp 16, 0.67 GiB per v5e chip).
# Under this checkpoint the saved values are per_shard's operands as the
# caller holds them (x's shard, sharded weights) and what a kernel names
# ``RESIDUAL`` (the two-pass Monarch's stage-1 result); the backward redoes
# the copies (and the gathers: the barrier in per_shard, 0.34 GiB more),
# and the recomputed forward kernels, feeding nothing, are dropped (a
# kernel saving an unnamed computed residual would run its forward twice;
# tests/kernel_shards_check.py: residual_check, gather_check).
RESIDUAL = "kernel_residual"
SAVED_POLICY = jax.checkpoint_policies.save_only_these_names(RESIDUAL)


def per_shard(kernel, x, *args, **kwargs):
  """``kernel(x, *args, **kwargs)`` with x (..., n) split over the token
  shards (its leading dims flattened), every other array argument whole on
  each, and the (..., m) result split the same way. Non-array arguments
  (scales, None) are passed through. Without ``over``, or when the token
  count does not divide, the call as it is (XLA then replicates it)."""
  tokens = x.size // x.shape[-1]
  axes = _kernel_axes(tokens)
  if not axes:
    return kernel(x, *args, **kwargs)
  mesh = _MESHES[-1][0]
  is_array = lambda v: hasattr(v, "shape") and hasattr(v, "dtype")
  keys = list(kwargs)
  values = list(args) + [kwargs[k] for k in keys]
  arrays = [v for v in values if is_array(v)]

  def body(x2, *arrs):
    it = iter(arrs)
    filled = [next(it) if is_array(v) else v for v in values]
    return kernel(x2, *filled[:len(args)],
                  **dict(zip(keys, filled[len(args):])))

  x2 = x.reshape(tokens, x.shape[-1])
  call = jax.shard_map(body, mesh=mesh,
                       in_specs=(P(axes, None),) + (P(),) * len(arrays),
                       out_specs=P(axes, None),
                       # pallas_call has no replication rule (jax-ml/jax#21855)
                       check_vma=False)
  # The barrier, redone in the backward, makes its gathers new values:
  # without it XLA merged the backward's gathers of the sharded weights
  # with the forward's and kept the gathered copies in between. x goes
  # through it too, so no gather can start before the layer's input
  # exists: with the weights alone, the scheduler gathered every layer's
  # weights at the start of the step (7B Monarch, fsdp 32, remat=full:
  # ~0.15 GiB a layer kept).
  fenced = lambda *a: call(*jax.lax.optimization_barrier(a))
  y = jax.checkpoint(fenced, policy=SAVED_POLICY)(x2, *arrays)
  return y.reshape(*x.shape[:-1], y.shape[-1])
