"""Block-diagonal product through megablox ``gmm`` (TPU grouped matmul).

A block-diagonal product is a grouped matmul with equal groups: in the
block-major layout (k*tokens, p), rows [j*tokens, (j+1)*tokens) are block j's
inputs and multiply w[j]^T. megablox ships its own custom VJP (``gmm`` for dx,
``tgmm`` for dw), so gradients come with it. The layout passes around it are
the XLA path's (``ops.blockdiag``). It is the TPU comparison the kernel issue
asks for (``experiments.benchmark_kernels`` times it on TPUs); ``impl="auto"``
keeps the portable kernel until a TPU has measured which wins. On the CPU it
runs in interpret mode (tests).
"""
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from structmat.kernels import target
from structmat.ops.blockdiag import (check_blockdiag, from_block_major,
                                     to_block_major)


def _tile(size: int, cap: int) -> int:
  """``size`` when it is <= cap, else the largest multiple of 128 <= cap
  dividing it (Mosaic TPU tiles), else ``cap`` (megablox masks a ragged
  last tile)."""
  if size <= cap:
    return size
  for t in range(cap - cap % 128, 0, -128):
    if size % t == 0:
      return t
  return cap


def default_tiling(tokens: int, p: int, q: int) -> tuple[int, int, int]:
  """(tm, tk, tn) for (k*tokens, p) @ (p, q) groups: at most 512 each."""
  return _tile(tokens, 512), _tile(p, 512), _tile(q, 512)


def blockdiag_matmul_gmm(x, w, *, tiling: tuple[int, int, int] | None = None,
                         interpret: bool | None = None):
  """``ops.blockdiag_matmul`` through megablox ``gmm``.

  Args:
    x: (..., k*p). w: (k, q, p) (fly layout; gmm reads it transposed).
    tiling: gmm's (tm, tk, tn); default ``default_tiling``. tm must divide
      the flattened token count so that no tile straddles two blocks.
    interpret: interpret mode (default: off on TPUs, on elsewhere).

  Returns:
    (..., k*q) in x's dtype (float32 accumulation).
  """
  check_blockdiag(x.shape[-1], w)
  k, q, p = w.shape
  x2 = x.reshape(-1, x.shape[-1])
  tokens = x2.shape[0]
  tiling = tiling or default_tiling(tokens, p, q)
  if tokens % tiling[0]:
    raise ValueError(f"tiling[0]={tiling[0]} must divide the {tokens} tokens "
                     "(a row tile may not straddle two blocks); pick a "
                     "divisor.")
  if interpret is None:
    interpret = target.platform() != "tpu"
  lhs = to_block_major(x2, k).reshape(k * tokens, p)
  sizes = jnp.full((k,), tokens, jnp.int32)
  # Positional: gmm is a custom_vjp whose static arguments are positions
  # (preferred_element_type, tiling, transpose_rhs, interpret).
  y = megablox.gmm(lhs, w.astype(x.dtype), sizes, x.dtype, tuple(tiling),
                   None, None, True, interpret)
  return from_block_major(y.reshape(k, tokens, q)).reshape(*x.shape[:-1],
                                                           k * q)
