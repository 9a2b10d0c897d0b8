"""Block-diagonal product as a portable Pallas kernel (Triton on GPU, Mosaic on TPU).

Forward: grid (token tiles, blocks); program (i, j) computes
``y[i-tile, j-block] = x[i-tile, j-block] @ w[j]^T`` with float32 accumulation.
Backward: dx is the same kernel with the transposed blocks; dw[j] sums
``dy_j^T x_j`` over token tiles in a loop inside one program per block (on
Triton, programs run in parallel, so accumulating across a grid axis would
race). Reference: ``structmat.ops.blockdiag_matmul``.

Constraints checked by ``supported``: on Triton every loaded block needs
power-of-two sizes; on TPU the last two block dims must be multiples of
(8, 128) or the full dims. On the CPU, ``interpret=True`` runs the kernel.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt


def prepare(x, block_tokens: int, interpret, platform):
  """Shared wrapper prologue: (x as 2-D, block_tokens, interpret, platform)."""
  platform = platform or jax.default_backend()
  if interpret is None:
    interpret = platform == "cpu"
  x2 = x.reshape(-1, x.shape[-1])
  return x2, min(block_tokens, x2.shape[0]), interpret, platform


def ignoring_poison(kernel):
  """kernel(*inputs, out) from kernel(*inputs[:-1], out): a NaN buffer
  aliased to the output arrives as a last input the kernel does not read
  (tests: an element the kernel forgets to write stays NaN)."""
  return lambda *refs: kernel(*refs[:-2], refs[-1])


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def split_count(n_tiles: int, programs: int, target: int = 264) -> int:
  """How many token chunks a weight-gradient kernel splits its n_tiles into:
  the largest power-of-two divisor of n_tiles up to target / programs (two
  programs per multiprocessor on a 132-SM Hopper), at least 1."""
  chunks = 1
  while (n_tiles % (2 * chunks) == 0 and 2 * chunks * programs <= target):
    chunks *= 2
  return chunks


def supported(batch: int, w_shape, block_tokens: int, platform: str) -> str | None:
  """None if the kernel can run these shapes on ``platform``, else why not."""
  k, q, p = w_shape
  if batch % block_tokens:
    return f"tokens {batch} not a multiple of block_tokens {block_tokens}"
  if platform in ("gpu", "cuda", "rocm"):
    bad = [n for n in (block_tokens, q, p) if not _pow2(n)]
    if bad:
      return f"Triton needs power-of-two block sizes, got {bad}"
    if min(q, p, block_tokens) < 16:
      return "Triton dots need sizes >= 16"
  if platform == "tpu":
    if p % 128 or q % 128 or block_tokens % 8:
      return "Mosaic TPU needs block dims multiple of (8, 128)"
  return None


def compiler_params(platform: str | None, n_grid_axes: int, num_warps: int = 4):
  """The backend's compiler parameters: Triton on GPUs, Mosaic on TPUs."""
  if platform in ("gpu", "cuda", "rocm"):
    return plt.CompilerParams(num_warps=num_warps, num_stages=3)
  if platform == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid_axes)
  return None


def _fwd_kernel(x_ref, w_ref, y_ref):
  acc = jax.lax.dot_general(x_ref[...], w_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
  y_ref[...] = acc.astype(y_ref.dtype)


def _call_fwd(x, w, block_tokens, interpret, platform, poisoned=None):
  """``poisoned``: a (tokens, k*q) NaN buffer the output is written into
  (tests: an element the kernel forgets to write stays NaN)."""
  b = x.shape[0]
  k, q, p = w.shape
  out_spec = pl.BlockSpec((block_tokens, q), lambda i, j: (i, j))
  in_specs = [pl.BlockSpec((block_tokens, p), lambda i, j: (i, j)),
              pl.BlockSpec((None, q, p), lambda i, j: (j, 0, 0))]
  kernel, args, aliases = _fwd_kernel, (x, w), {}
  if poisoned is not None:
    kernel = ignoring_poison(_fwd_kernel)
    args, aliases = (x, w, poisoned), {2: 0}
    in_specs.append(out_spec)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, k * q), x.dtype),
      grid=(b // block_tokens, k),
      in_specs=in_specs,
      out_specs=out_spec,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(platform, 2),
      name="blockdiag_fwd",
  )(*args)


def _dw_kernel(dy_ref, x_ref, dw_ref, *, block_tokens, n_tiles):
  q, p = dw_ref.shape

  def body(t, acc):
    rows = pl.ds(t * block_tokens, block_tokens)
    return acc + jax.lax.dot_general(
        dy_ref[rows, :], x_ref[rows, :], (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)

  dw_ref[...] = jax.lax.fori_loop(0, n_tiles, body,
                                  jnp.zeros((q, p), jnp.float32))


def _call_dw(dy, x, w_shape, dtype, block_tokens, interpret, platform):
  """dw: one program per (block, token chunk) writes a float32 partial that
  XLA sums (accumulating across programs would race on Triton)."""
  b = x.shape[0]
  k, q, p = w_shape
  chunks = split_count(b // block_tokens, k)
  rows = b // chunks
  kernel = functools.partial(_dw_kernel, block_tokens=block_tokens,
                             n_tiles=rows // block_tokens)
  dw = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((chunks, k, q, p), jnp.float32),
      grid=(k, chunks),
      in_specs=[pl.BlockSpec((rows, q), lambda j, c: (c, j)),
                pl.BlockSpec((rows, p), lambda j, c: (c, j))],
      out_specs=pl.BlockSpec((None, None, q, p), lambda j, c: (c, j, 0, 0)),
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(platform, 2),
      name="blockdiag_dw",
  )(dy, x)
  return dw.sum(0).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _blockdiag(x, w, block_tokens, interpret, platform):
  return _call_fwd(x, w, block_tokens, interpret, platform)


def _vjp_fwd(x, w, block_tokens, interpret, platform):
  return _call_fwd(x, w, block_tokens, interpret, platform), (x, w)


def _vjp_bwd(block_tokens, interpret, platform, res, dy):
  x, w = res
  dx = _call_fwd(dy, w.transpose(0, 2, 1), block_tokens, interpret, platform)
  dw = _call_dw(dy, x, w.shape, w.dtype, block_tokens, interpret, platform)
  return dx, dw


_blockdiag.defvjp(_vjp_fwd, _vjp_bwd)


def blockdiag_matmul_pallas(x, w, *, block_tokens: int = 128,
                            interpret: bool | None = None,
                            platform: str | None = None):
  """Pallas block-diagonal product, same contract as ``ops.blockdiag_matmul``.

  Args:
    x: (..., k*p). w: (k, q, p).
    block_tokens: tokens per program (the flattened batch must be a multiple).
    interpret: run in interpret mode (default: on the CPU).
    platform: the backend to compile for ("gpu" -> Triton, "tpu" -> Mosaic;
      default: the default backend); set it when cross-lowering.

  Returns:
    (..., k*q).
  """
  from structmat.ops.blockdiag import check_blockdiag  # the reference's checks
  check_blockdiag(x.shape[-1], w)
  x2, block_tokens, interpret, platform = prepare(x, block_tokens, interpret,
                                                  platform)
  if x2.shape[0] % block_tokens:
    raise ValueError(f"{x2.shape[0]} tokens are not a multiple of "
                     f"block_tokens={block_tokens}; pad the batch or pick a "
                     "divisor.")
  y = _blockdiag(x2, w.astype(x.dtype), block_tokens, interpret, platform)
  return y.reshape(*x.shape[:-1], y.shape[-1])
