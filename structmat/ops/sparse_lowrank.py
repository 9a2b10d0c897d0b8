"""Sparse plus low-rank weights (SLTrain; Han et al. 2024).

W = B (A * alpha / r) + S in the paper's (out, in) orientation. structmat keeps
flax's (in, out) layout: kernel = scale * (a @ b) + S with a (in, r), b (r, out),
and S given by ``values`` at flat row-major ``indices`` into (in, out).
"""
import math

import jax
import jax.numpy as jnp

from structmat.ops.sltrain_blocked import sltrain_matmul_blocked


def draw_support(key, in_features: int, out_features: int, density: float):
  """Sorted int32 flat indices of a random support without replacement.

  nnz = int(density * in * out), at least 1. The support is the nnz
  positions of the (in, out) matrix with the smallest of i.i.d. random
  64-bit keys (position breaks the, vanishingly rare, ties): a uniformly
  random nnz-subset that depends only on ``key``, identical on every backend
  (threefry). Only the few positions whose key falls under a threshold are
  sorted (about nnz + 8 sqrt(nnz)), not all in*out of them: a full sort
  (what ``jax.random.permutation`` does, a few rounds over) took 45 s per
  4096 x 11008 matrix on a 2-core CPU, this takes 1.9 s. Where the
  threshold misses (probability ~1e-15) a full sort gives the same answer.
  """
  size = in_features * out_features
  if size >= 2**31:
    raise ValueError(f"{in_features}x{out_features} is too large for int32 "
                     "support indices.")
  nnz = max(1, int(density * size))
  hi, lo = jax.random.bits(key, (2, size), jnp.uint32)
  pos = jnp.arange(size, dtype=jnp.int32)
  want, cap = _candidates(nnz, size)
  if cap >= size:  # dense enough that the threshold would keep nearly all
    return _smallest(hi, lo, pos, nnz)
  threshold = jnp.uint32(min(2**32 - 1, int(want / size * 2**32) + 1))
  under = hi < threshold
  count = jnp.sum(under, dtype=jnp.int32)

  def few():
    (where,) = jnp.nonzero(under, size=cap, fill_value=0)
    # Slots past `count` are fill: key them past every candidate.
    fill = jnp.arange(cap) >= count
    top = jnp.uint32(2**32 - 1)
    return _smallest(jnp.where(fill, top, hi[where]),
                     jnp.where(fill, top, lo[where]),
                     jnp.where(fill, size, where), nnz)

  return jax.lax.cond((count >= nnz) & (count <= cap), few,
                      lambda: _smallest(hi, lo, pos, nnz))


def _candidates(nnz: int, size: int):
  """(expected, most) positions under the threshold: 8 sigma either side."""
  margin = 8 * math.isqrt(nnz) + 64
  return nnz + margin, nnz + 2 * margin


def _smallest(hi, lo, pos, nnz: int):
  """The positions of the nnz smallest (hi, lo, pos) keys, ascending."""
  _, _, pos = jax.lax.sort((hi, lo, pos), num_keys=3)
  return jnp.sort(pos[:nnz]).astype(jnp.int32)


def sparse_to_dense(values, indices, in_features: int, out_features: int):
  """Scatter ``values`` at flat ``indices`` into a (in, out) matrix."""
  flat = jnp.zeros((in_features * out_features,), values.dtype)
  return flat.at[indices].add(values).reshape(in_features, out_features)


def sltrain_kernel(a, b, values, indices, scale: float):
  """The dense (in, out) kernel scale * a @ b + S."""
  dense = sparse_to_dense(values, indices, a.shape[0], b.shape[1])
  return scale * (a @ b) + dense


def sltrain_matmul(x, a, b, values, indices, scale: float, impl: str = "xla",
                   orders=None, block: int = 0):
  """y = x (scale * a @ b + S) (XLA reference path: materializes the kernel).

  Args:
    x: (..., in). a: (in, r). b: (r, out). values: (nnz,). indices: (nnz,)
    int32 flat indices into (in, out). scale: alpha / r.
    impl: "xla" (this function), "pallas" (the reconstruct-and-multiply
      kernel, never writing the dense kernel; interpret mode on the CPU) or
      "auto" (``structmat.kernels.dispatch``).
    orders: optional (2, nnz) int32 tile orders of the support
      (``structmat.kernels.sltrain.support_orders``) so the kernel skips its
      sorts; the XLA path ignores them.
    block: 0 materializes the whole kernel (kept by autodiff for the
      backward, as a dense copy of the weights); > 0 materializes it
      ``block`` columns (rows, in the backward) at a time and keeps none of
      it between the passes (``ops.sltrain_blocked``). XLA paths only: the
      kernels never materialize it.

  Returns:
    (..., out).
  """
  if impl != "xla":
    from structmat.kernels import dispatch  # pylint: disable=import-outside-toplevel
    return dispatch.sltrain(x, a, b, values, indices, scale, impl, orders,
                            block=block)
  if block:
    return sltrain_matmul_blocked(x, a, b, values, indices, scale, block)
  return x @ sltrain_kernel(a, b, values, indices, scale).astype(x.dtype)
