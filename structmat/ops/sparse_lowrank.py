"""Sparse plus low-rank weights (SLTrain; Han et al. 2024).

W = B (A * alpha / r) + S in the paper's (out, in) orientation. structmat keeps
flax's (in, out) layout: kernel = scale * (a @ b) + S with a (in, r), b (r, out),
and S given by ``values`` at flat row-major ``indices`` into (in, out).
"""
import jax
import jax.numpy as jnp

from structmat.ops.sltrain_blocked import sltrain_matmul_blocked


def draw_support(key, in_features: int, out_features: int, density: float):
  """Sorted int32 flat indices of a random support without replacement.

  nnz = int(density * in * out), at least 1.
  """
  size = in_features * out_features
  if size >= 2**31:
    raise ValueError(f"{in_features}x{out_features} is too large for int32 "
                     "support indices.")
  nnz = max(1, int(density * size))
  # A permutation prefix: without replacement, and identical on every backend
  # (threefry), so a support depends only on its key.
  idx = jax.random.permutation(key, size)[:nnz]
  return jnp.sort(idx).astype(jnp.int32)


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
