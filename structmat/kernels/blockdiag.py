"""Block-diagonal product as a portable Pallas kernel (Triton on GPU, Mosaic on TPU).

Forward: grid (token tiles, blocks, output tiles); program (i, j, c) computes
``y[i-tile, j-block, c-tile] = x[i-tile, j-block] @ w[j, c-tile]^T`` with a
float32 accumulator, looping over chunks of the block's inputs. Backward: dx is
the same kernel with the transposed blocks; dw tiles sum ``dy^T x`` over token
steps in a loop inside one program per (block, tile, token chunk) and XLA adds
the chunks' float32 partials (on Triton, programs run in parallel, so
accumulating across a grid axis would race). Reference:
``structmat.ops.blockdiag_matmul``.

Shared memory: Triton stages both operands of every dot in shared memory
(``num_stages`` buffers when the dot sits in a loop) and converts the
accumulator through it for the store; an H100/H200 block gets 227 KiB. Whole
blocks overflowed it on an H200 (256-wide blocks with 128-token tiles asked
for 352 KiB), so on GPUs the output tile and input chunk are cut to fit
``SMEM_BUDGET`` (``tiling``). Mosaic TPU keeps whole blocks in VMEM.

Constraints checked by ``supported``: on Triton every loaded block needs
power-of-two sizes; on TPU the last two block dims must be multiples of
(8, 128) or the full dims. On the CPU, ``interpret=True`` runs the kernel.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from structmat.kernels import triton_backend
from structmat.kernels.portable import (SMEM_BUDGET, TRITON_STAGES,
                                        compiler_params, launch_order, pow2,
                                        prepare, split_count)
from structmat.kernels.shared_trace import traced_once
from structmat.kernels.triton_backend import GPU_PLATFORMS


def smem_estimate(m: int, n: int, k: int, itemsize: int, looped: bool) -> int:
  """Bytes of shared memory a Triton (m x k) @ (k x n) dot step plans for.

  Both operand tiles, ``TRITON_STAGES`` times when the dot is pipelined in a
  loop, plus the float32 (m x n) accumulator's store conversion. On an H200
  this separated what compiled from what overflowed the 227 KiB: whole
  256-wide blocks with 128-token tiles in bfloat16 (320 KiB here) overflowed,
  64-wide ones (56 KiB forward, 112 KiB weight gradient) compiled.
  """
  operands = (m + n) * k * itemsize * (TRITON_STAGES if looped else 1)
  return operands + m * n * 4


def _fit(size: int, cap: int) -> int:
  """Largest power of two <= min(size, cap) dividing size (>= 1)."""
  t = 1
  while t * 2 <= min(size, cap) and size % (t * 2) == 0:
    t *= 2
  return t


def tiling(rows: int, out: int, inner: int, itemsize: int,
           platform: str | None) -> tuple[int, int]:
  """(out_tile, inner_chunk) for a (rows x inner) @ (inner x out) block.

  Mosaic TPU: the whole block. Elsewhere (Triton, and interpret mode, which
  then runs the loop the GPU runs): output tiles of at most 128 and the
  largest input chunk (at most 128) that keeps ``smem_estimate`` within
  ``SMEM_BUDGET``; never below 16 (Triton's smallest dot).
  """
  if platform == "tpu":
    return out, inner
  tile = _fit(out, 128)
  chunk = _fit(inner, 128)
  while (chunk > 16 and
         smem_estimate(rows, tile, chunk, itemsize, chunk < inner)
         > SMEM_BUDGET):
    chunk //= 2
  return tile, chunk


def supported(batch: int, w_shape, block_tokens: int, platform: str) -> str | None:
  """None if the kernel can run these shapes on ``platform``, else why not."""
  k, q, p = w_shape
  if batch % block_tokens:
    return f"tokens {batch} not a multiple of block_tokens {block_tokens}"
  if platform in GPU_PLATFORMS:
    if why := triton_backend.problem(platform):
      return why
    sizes = dict(block_tokens=block_tokens, q=q, p=p)
    bad = {name: n for name, n in sizes.items() if not pow2(n)}
    if bad:
      return f"Triton needs power-of-two block sizes, got {bad}"
    small = {name: n for name, n in sizes.items() if n < 16}
    if small:
      return f"Triton dots need sizes >= 16, got {small}: use fewer blocks"
  if platform == "tpu":
    if p % 128 or q % 128 or block_tokens % 8:
      return (f"Mosaic TPU needs blocks (q, p) = ({q}, {p}) in multiples of "
              f"128 and block_tokens={block_tokens} a multiple of 8")
  return None


def slower_than_xla(platform: str) -> str | None:
  """Why ``impl="auto"`` keeps XLA on ``platform`` although the kernel runs.

  On GPUs XLA's einsum already runs a block-diagonal product near the copy
  roofline. H200, bf16, forward / forward+backward ms, kernel vs XLA:
  n=4096, 16384 tokens, 16 blocks 0.133/0.241 vs 0.093/0.189 (session 8;
  0.134/0.236 vs 0.092/0.174 in session 14), 64 blocks 0.103/0.185 vs
  0.095/0.168 (0.107/0.179 vs 0.099/0.176); 16 blocks, 512 tokens
  0.045/0.058 vs 0.046/0.057. At n=1024, 16384 tokens (session 11) it won
  in 16 blocks of 64, 0.041/0.057 vs 0.055/0.070, and tied in 4 (0.039/
  0.072 vs 0.064/0.069): one shape, 13 microseconds, no rule.
  """
  if platform in GPU_PLATFORMS:
    return ("the Triton block-diagonal kernel was measured up to 1.4x slower "
            "than XLA on an H200 (ahead at one shape, n=1024 in 16 blocks, by "
            "13 us); impl='pallas' runs it")
  return None


def _fwd_kernel(x_ref, w_ref, y_ref, *, chunk):
  """y tile = x block @ w tile^T, looping over input chunks."""
  rows, inner = x_ref.shape
  tile = w_ref.shape[0]

  def body(c, acc):
    cols = pl.ds(c * chunk, chunk)
    return acc + jax.lax.dot_general(
        x_ref[:, cols], w_ref[:, cols], (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, inner // chunk, body,
                          jnp.zeros((rows, tile), jnp.float32))
  y_ref[...] = acc.astype(y_ref.dtype)


def _call_fwd(x, w, block_tokens, interpret, platform):
  b = x.shape[0]
  k, q, p = w.shape
  tile, chunk = tiling(block_tokens, q, p, x.dtype.itemsize, platform)
  n_tiles = q // tile
  # The n_tiles programs of one x block last (fastest), then the blocks k.
  grid, in_specs, out_specs = launch_order(
      platform, (b // block_tokens, k, n_tiles),
      [pl.BlockSpec((block_tokens, p), lambda i, j, c: (i, j)),
       pl.BlockSpec((None, tile, p), lambda i, j, c: (j, c, 0))],
      pl.BlockSpec((block_tokens, tile), lambda i, j, c: (i, j * n_tiles + c)))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, chunk=chunk),
      out_shape=jax.ShapeDtypeStruct((b, k * q), x.dtype),
      grid=grid, in_specs=in_specs, out_specs=out_specs,
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(platform, 3),
      name="blockdiag_fwd",
  )(x, w)


def _dw_kernel(dy_ref, x_ref, dw_ref, *, step, n_steps):
  """dw tile = sum over token steps of dy tile^T @ x tile."""
  tq, tp = dw_ref.shape

  def body(t, acc):
    rows = pl.ds(t * step, step)
    return acc + jax.lax.dot_general(
        dy_ref[rows, :], x_ref[rows, :], (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)

  dw_ref[...] = jax.lax.fori_loop(0, n_steps, body,
                                  jnp.zeros((tq, tp), jnp.float32))


def _call_dw(dy, x, w_shape, dtype, block_tokens, interpret, platform):
  """dw: one program per (block, dw tile, token chunk) writes a float32
  partial that XLA sums (accumulating across programs would race on
  Triton)."""
  b = x.shape[0]
  k, q, p = w_shape
  itemsize = x.dtype.itemsize
  if platform == "tpu":
    tq, tp, step = q, p, block_tokens
  else:  # (step x tq)^T @ (step x tp) per loop step, pipelined
    tq, tp = _fit(q, 128), _fit(p, 128)
    step = block_tokens
    while (step > 16 and step % 2 == 0 and
           smem_estimate(tq, tp, step, itemsize, True) > SMEM_BUDGET):
      step //= 2
  nq, np_ = q // tq, p // tp
  chunks = split_count(b // block_tokens, k * nq * np_)
  rows = b // chunks
  kernel = functools.partial(_dw_kernel, step=step, n_steps=rows // step)
  dw = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((chunks, k, q, p), jnp.float32),
      # Axis 1 enumerates the (tq, tp) tiles of a block: t -> (t // np_, t % np_).
      grid=(k, nq * np_, chunks),
      in_specs=[pl.BlockSpec((rows, tq), lambda j, t, c: (c, j * nq + t // np_)),
                pl.BlockSpec((rows, tp), lambda j, t, c: (c, j * np_ + t % np_))],
      out_specs=pl.BlockSpec((None, None, tq, tp),
                             lambda j, t, c: (c, j, t // np_, t % np_)),
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(platform, 3),
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
_blockdiag_once = traced_once(_blockdiag, (2, 3, 4))


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
  # Interpreted, any block sizes run (the CPU); compiled, the backend's.
  if why := supported(x2.shape[0], w.shape, block_tokens,
                      "cpu" if interpret else platform):
    raise ValueError(f"the block-diagonal kernel cannot run these shapes: "
                     f"{why}")
  y = _blockdiag_once(x2, w.astype(x.dtype), block_tokens, interpret, platform)
  return y.reshape(*x.shape[:-1], y.shape[-1])
