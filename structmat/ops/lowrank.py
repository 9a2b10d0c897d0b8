"""Low-rank factorization W = U V and its optimal projection."""
import jax.numpy as jnp
import numpy as np


def lowrank_matmul(x, u, v):
  """x @ u @ v.

  Args:
    x: (..., in). u: (in, rank). v: (rank, out).

  Returns:
    (..., out).
  """
  return (x @ u) @ v


def lowrank_project(kernel, rank: int):
  """Truncated SVD of a (in, out) kernel with sqrt(S) split over both factors.

  Returns:
    (u, v): u (in, rank) = U_r sqrt(S_r), v (rank, out) = sqrt(S_r) Vt_r, the
    Eckart-Young optimal rank-``rank`` approximation u @ v.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D (in, out), got shape {kernel.shape}.")
  if not 1 <= rank <= min(kernel.shape):
    raise ValueError(f"rank={rank} must be in [1, {min(kernel.shape)}] for a "
                     f"kernel of shape {kernel.shape}; lower rank.")
  work = kernel.astype(np.float64 if kernel.dtype == np.float64 else np.float32)
  uu, s, vt = np.linalg.svd(work, full_matrices=False)
  root = np.sqrt(s[:rank])
  return (jnp.asarray((uu[:, :rank] * root).astype(kernel.dtype)),
          jnp.asarray((root[:, None] * vt[:rank]).astype(kernel.dtype)))
