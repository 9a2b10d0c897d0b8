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
``SMEM_BUDGET`` (``tiling``).

VMEM: Mosaic TPU copies every block whole into VMEM (double-buffered), so
whole weight blocks did not compile there once they were wide: libtpu
(``tools/tpu_compile.py``, a v5e) refused n=8192 in 4 blocks of 2048 (a
2048 x 2048 weight block, twice) and the weight gradient of 4096 in 4 blocks
(whose program held a whole token chunk of dy and x and a 1024 x 1024 float32
tile, twice). On TPUs the forward's output tile and the gradient's
(tq, tp) tiles are therefore at most 512 wide (multiples of 128, as megablox
``gmm`` tiles), cut further to fit ``vmem_estimate`` within the budget, and
the weight gradient steps through the tokens on a sequential grid axis,
accumulating into its resident float32 tile, instead of loading a chunk of
them at once.

Constraints checked by ``supported``: on Triton every loaded block needs
power-of-two sizes; on TPU the last two block dims must be multiples of
(8, 128) or the full dims. On the CPU, ``interpret=True`` runs the kernel.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from structmat.kernels import mosaic_tpu, triton_backend
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

  Mosaic TPU: the widest output tile of at most TPU_TILE (``tpu_tile``)
  whose ``vmem_estimate`` fits, the whole input. Elsewhere (Triton, and
  interpret mode, which then runs the loop the GPU runs): output tiles of at
  most 128 and the largest input chunk (at most 128) that keeps
  ``smem_estimate`` within ``SMEM_BUDGET``; never below 16 (Triton's
  smallest dot).
  """
  if platform == "tpu":
    fits = lambda t: vmem_estimate(rows, t, inner, itemsize)
    return tpu_tile(out, fits), inner
  tile = _fit(out, 128)
  chunk = _fit(inner, 128)
  while (chunk > 16 and
         smem_estimate(rows, tile, chunk, itemsize, chunk < inner)
         > SMEM_BUDGET):
    chunk //= 2
  return tile, chunk


TPU_TILE = 512   # widest output (and weight-gradient) tile on TPUs


def tpu_tile(size: int, vmem=lambda tile: 0) -> int:
  """The widest tile of ``size`` (a multiple of 128, as ``supported``
  requires on TPUs) that divides it, is at most TPU_TILE and whose
  ``vmem(tile)`` fits ``mosaic_tpu.vmem_budget()``; 128 at least."""
  for tile in range(min(size, TPU_TILE) // 128 * 128, 128, -128):
    if size % tile == 0 and vmem(tile) <= mosaic_tpu.vmem_budget():
      return tile
  return min(size, 128)


def vmem_estimate(rows: int, tile: int, inner: int, itemsize: int) -> int:
  """VMEM bytes of a TPU forward program: its (rows, inner) input block,
  (tile, inner) weight block and (rows, tile) output block, each
  double-buffered, and two float32 (rows, tile) temporaries (accumulator,
  product). libtpu 0.0.42 (v5e) allocated 5.70 MiB for 8192 in 4 blocks,
  bf16, 128 tokens (5.75 here), 10.5 in float32 (11.0)."""
  return 2 * (rows + tile) * inner * itemsize + rows * tile * (
      2 * itemsize + 8)


def dw_vmem_estimate(step: int, tq: int, tp: int, itemsize: int) -> int:
  """VMEM bytes of a TPU weight-gradient program: a token step's dy and x
  tiles, double-buffered, the resident float32 (tq, tp) tile (buffered
  twice) and the step's float32 product (libtpu 0.0.42: 2.5 MiB at 512 x
  512, bf16, 128 tokens; 3.5 here)."""
  return 2 * step * (tq + tp) * itemsize + 3 * tq * tp * 4


def dw_tiles_tpu(q: int, p: int, step: int, itemsize: int) -> tuple[int, int]:
  """(tq, tp): a TPU weight-gradient program's tile of a (q, p) block, the
  widest (``tpu_tile``) whose ``dw_vmem_estimate`` fits, q's side first."""
  tq = tpu_tile(q, lambda t: dw_vmem_estimate(step, t, 128, itemsize))
  return tq, tpu_tile(p, lambda t: dw_vmem_estimate(step, tq, t, itemsize))


def supported(batch: int, w_shape, block_tokens: int, platform: str,
              itemsize: int = 4) -> str | None:
  """None if the kernel can run these shapes on ``platform`` (``itemsize``:
  the activations' bytes, float32 by default), else why not."""
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
    need = max(vmem_estimate(block_tokens, 128, max(p, q), itemsize),
               dw_vmem_estimate(block_tokens, 128, 128, itemsize))
    if need > (budget := mosaic_tpu.vmem_budget()):
      return (f"block_tokens={block_tokens} with {max(p, q)}-wide blocks needs "
              f"~{need >> 20} MiB of VMEM even in 128-wide tiles (budget "
              f"{budget >> 20} MiB): use fewer tokens per "
              "tile or more, narrower blocks")
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
  if platform == "tpu":
    return _call_dw_tpu(dy, x, w_shape, dtype, block_tokens, interpret)
  b = x.shape[0]
  k, q, p = w_shape
  itemsize = x.dtype.itemsize
  # (step x tq)^T @ (step x tp) per loop step, pipelined
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


def _dw_tpu_kernel(dy_ref, x_ref, dw_ref):
  """dw tile += dy step^T @ x step; the tile stays in VMEM over the steps
  (the grid's last, sequential axis)."""
  @pl.when(pl.program_id(2) == 0)
  def _():
    dw_ref[...] = jnp.zeros_like(dw_ref)

  dw_ref[...] += jax.lax.dot_general(
      dy_ref[...], x_ref[...], (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32)


def _call_dw_tpu(dy, x, w_shape, dtype, block_tokens, interpret):
  """dw on TPUs: one program per (block, (tq, tp) tile, token step), the
  steps in order, accumulating into the resident float32 tile."""
  b = x.shape[0]
  k, q, p = w_shape
  itemsize = x.dtype.itemsize
  tq, tp = dw_tiles_tpu(q, p, block_tokens, itemsize)
  nq, np_ = q // tq, p // tp
  dw = pl.pallas_call(
      _dw_tpu_kernel,
      out_shape=jax.ShapeDtypeStruct((k, q, p), jnp.float32),
      # Axis 1 enumerates the (tq, tp) tiles of a block: t -> (t // np_, t % np_).
      grid=(k, nq * np_, b // block_tokens),
      in_specs=[pl.BlockSpec((block_tokens, tq),
                             lambda j, t, i: (i, j * nq + t // np_)),
                pl.BlockSpec((block_tokens, tp),
                             lambda j, t, i: (i, j * np_ + t % np_))],
      out_specs=pl.BlockSpec((None, tq, tp),
                             lambda j, t, i: (j, t // np_, t % np_)),
      interpret=interpret,
      compiler_params=mosaic_tpu.compiler_params(
          ("parallel", "parallel", "arbitrary"), interpret),
      name="blockdiag_dw",
  )(dy, x)
  return dw.astype(dtype)


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
                      "cpu" if interpret else platform, x2.dtype.itemsize):
    raise ValueError(f"the block-diagonal kernel cannot run these shapes: "
                     f"{why}")
  y = _blockdiag_once(x2, w.astype(x.dtype), block_tokens, interpret, platform)
  return y.reshape(*x.shape[:-1], y.shape[-1])
