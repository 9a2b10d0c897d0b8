"""Block-diagonal products: the building block of Monarch and BTT.

Layout convention (the same as HazyResearch/fly): a block-diagonal weight is
``w`` of shape (nblocks, out_block, in_block); block ``k`` maps the input slice
``x[..., k*in_block:(k+1)*in_block]`` like a linear layer with an
(out_block, in_block) weight.
"""
import jax
import jax.numpy as jnp


def bmm(a, b, contract_a: int, contract_b: int):
  """Batched matmul over leading axis 0 of both operands (block-major layout)."""
  return jax.lax.dot_general(
      a, b, (((contract_a,), (contract_b,)), ((0,), (0,))))


def to_block_major(x, nblocks: int):
  """(batch, nblocks*p) -> (nblocks, batch, p)."""
  return x.reshape(x.shape[0], nblocks, -1).transpose(1, 0, 2)


def from_block_major(h):
  """(nblocks, batch, q) -> (batch, nblocks*q)."""
  return h.transpose(1, 0, 2).reshape(h.shape[1], -1)


def check_blockdiag(x_features: int, w, name: str = "w"):
  if w.ndim != 3:
    raise ValueError(f"{name} must have shape (nblocks, out_block, in_block), "
                     f"got {w.shape}.")
  k, _, p = w.shape
  if k * p != x_features:
    raise ValueError(
        f"{name} has {k} blocks of input size {p} ({k * p} inputs) but x has "
        f"{x_features} features; pad x or choose blocks with nblocks*in_block "
        f"== {x_features}.")


def blockdiag_matmul(x, w, impl: str = "xla"):
  """Block-diagonal product y[..., k, q] = sum_p w[k, q, p] x[..., k, p].

  Args:
    x: (..., nblocks * in_block) input.
    w: (nblocks, out_block, in_block) blocks.
    impl: "xla", "pallas" or "auto" (``structmat.kernels.dispatch``).

  Returns:
    (..., nblocks * out_block).
  """
  check_blockdiag(x.shape[-1], w)
  if impl != "xla":
    from structmat.kernels import dispatch  # pylint: disable=import-outside-toplevel
    return dispatch.blockdiag(x, w, impl)
  batch_shape = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  h = bmm(to_block_major(x2, w.shape[0]), w, 2, 2)  # [k, batch, q]
  return from_block_major(h).reshape(*batch_shape, -1)


def blockdiag_to_dense(w):
  """The (nblocks*in_block, nblocks*out_block) kernel (flax layout) of ``w``."""
  k, q, p = w.shape
  eye = jnp.eye(k, dtype=w.dtype)
  # dense[k*p + i, j*q + o] = delta_kj w[k, o, i]
  return jnp.einsum("kj,koi->kijo", eye, w).reshape(k * p, k * q)
