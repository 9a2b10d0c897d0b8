"""Fused Monarch forward for Mosaic GPU (Hopper): factors resident in shared memory.

The portable (Triton) kernel gives every (token tile, output block l)
program its own pass over l's factors, which it streams from L2 again for
each tile; where tiles must be small that costs more than the activations
(``monarch.factor_rereads``). Mosaic GPU has what Triton lacks here: shared
memory that outlives a tile. So one CTA per (l, token chunk) copies l's
factors into shared memory once (TMA) and then streams its token tiles:

    for each 64-token tile:      (one warpgroup; wgmma needs M = 64)
      for k:  x_k tile  --TMA (double-buffered)-->  SMEM
              h   = x_k @ A[l,k]^T          wgmma, f32 accumulator (64 x q/l)
              h   -> SMEM (16-bit)
              o_l += h @ B[l,k]^T           wgmma, f32 accumulator (64 x s)
      o_l -> SMEM --TMA--> y block-major (l, tokens, s)

with A, B the regrouped factors of ``monarch.gather_weights``, pre-transposed
in XLA (weight-sized) so both wgmma operands are K-major without transposed
views. The final permutation P2 is XLA's transpose, as in the portable kernel.

The kernel is block-wise generic, out_j = sum_i (in_i @ U[j,i]) @ V[j,i], and
dx is the same kernel on the transposed product: dx_k = sum_l (do_l @
B[l,k]) @ A[l,k], with dy's P2 undone first (an XLA transpose, as the
portable backward does).

With ``warpgroups=2`` two consumer warpgroups share a CTA's factors and take
turns at its tiles (each with its own buffers and barriers), so one computes
while the other waits on a TMA or a wgmma (session 12). Measured on an
H200 at 65536 tokens (the benchmark's "monarch mgpu 2wg" row): at 512 = 4 x
128, where every kernel takes two, 0.137 / 0.300 ms forward / forward+
backward against one warpgroup's 0.171 / 0.344 (session 15); at 768 = 4 x
192, where only the weight gradients do, 0.338 / 0.837 against 0.336 /
0.814 (session 14). So the default (``default_warpgroups``) is two where
the forward takes them, else one.
Tests run the kernels under the
interpreter's race detector (``DETECT_RACES``).

wgmma wants one shared-memory swizzle for both operands; the stage-1
result's row (q/l elements) is the narrowest operand row, so every buffer uses
the swizzle q/l allows (32 bytes at q/l = 16, 128 from 64 up).

Scope: forward and dx, 16-bit dtypes (float32 would run as TF32), and shapes
whose factors fit shared memory (``supported``); dw1 and dw2 are Mosaic GPU
kernels too (``monarch_mgpu_dw``; p and s multiples of 64), and what neither
takes goes through the portable kernels' backward where those take the
shapes, else XLA's VJP. Runs on
the CPU in Mosaic GPU's interpreter (which models TMA, barriers and wgmma) and
cross-lowers for an H100. Compiled and timed on an H200 (session 8, jax
0.11.2): it tied XLA at the 60M attention shape (512 in 4 blocks) and lost at
130M's (768 in 4 blocks); with its own weight gradients (session 14, all
within 2.6e-3 of float32 XLA) it trains 1.5x faster than the padded Triton
kernel at 768 but still 1.1x slower than XLA and 2.9x slower than the
materialized dense matmul there, so ``impl="auto"`` does not take it and
``impl="pallas"`` does where Triton would pad (``dispatch.mgpu_first``);
else call ``monarch_matmul_mgpu`` (or the benchmark's "monarch mgpu" row).
Numbers: WORKSPACE.md, "GPU measurements, session 8" and "session 14".
Reference: ``structmat.ops.monarch_matmul``.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from structmat.kernels import monarch as mk
from structmat.kernels import target
from structmat.kernels.portable import prepare
from structmat.kernels.shared_trace import traced_once

try:  # jax >= 0.11
  _InterpretParams = plgpu.InterpretGPUParams
except AttributeError:  # jax 0.10.2
  from jax._src.pallas.mosaic_gpu.interpret.params import (  # pylint: disable=g-import-not-at-top
      InterpretGPUParams as _InterpretParams)

# Tests set this: the interpreter's happens-before race detector (two
# warpgroups sharing a buffer they should not, a TMA into a busy slot).
DETECT_RACES = False


def interpret_params(interpret: bool):
  """``plgpu.kernel``'s ``interpret``: Mosaic GPU's interpreter or None."""
  return _InterpretParams(detect_races=DETECT_RACES) if interpret else None


TILE = 64              # tokens per wgmma: one warpgroup's M
SMEM_BUDGET = 220 * 1024  # of the 227 KiB a Hopper CTA may have
SMS = 132  # H100/H200 SXM streaming multiprocessors: interpreted and lowered
           # (a GPU reports its own count: an H100 PCIe has 114)


def _dims(w1_shape, w2_shape, transposed: bool = False):
  """(k, p, g, s) of the block-wise problem: inputs k blocks of p, inner
  g = q/l, outputs blocks of s; ``transposed``: dx's (l, s, g, p)."""
  k, q, p = w1_shape
  l, s, _ = w2_shape
  return (l, s, q // l, p) if transposed else (k, p, q // l, s)


def _smem(k, p, g, s, itemsize: int, slots: int, wgs: int = 1) -> int:
  """Shared memory one CTA holds: its output block's factors and, for each
  of ``wgs`` warpgroups, ``slots`` input tiles, the stage-1 result and the
  output tile (barriers aside)."""
  return (k * p * g + k * g * s
          + wgs * (slots * TILE * p + TILE * g + TILE * s)) * itemsize


def _slots(k, p, g, s, itemsize: int, wgs: int = 1) -> int:
  """Two input buffers (the next block loads during the wgmmas) where shared
  memory allows, else one (LLaMA-130M's 768 = 4 x 192 attention)."""
  return 2 if _smem(k, p, g, s, itemsize, 2, wgs) <= SMEM_BUDGET else 1


def smem_bytes(w1_shape, w2_shape, itemsize: int, x_slots: int = 2,
               transposed: bool = False) -> int:
  return _smem(*_dims(w1_shape, w2_shape, transposed), itemsize, x_slots)


def x_slots(w1_shape, w2_shape, itemsize: int, transposed: bool = False) -> int:
  return _slots(*_dims(w1_shape, w2_shape, transposed), itemsize)


def operand_problem(tokens: int, w1_shape, w2_shape, dtype,
                    transposed: bool = False) -> str | None:
  """Why wgmma cannot take these shapes' tiles (dtype, token tile, block
  dims), or None; what ``supported`` and the weight gradients share."""
  if why := mk.layout_problem(w1_shape, w2_shape):
    return why
  _, p, g, s = _dims(w1_shape, w2_shape, transposed)
  dtype = jnp.dtype(dtype)
  if dtype.itemsize != 2:
    return (f"dtype {dtype.name}: wgmma runs 16-bit operands here (float32 "
            "would be TF32); use bfloat16 or the portable kernel")
  if tokens % TILE:
    return f"tokens {tokens} not a multiple of the {TILE}-token tile"
  bad = {name: v for name, v in dict(p=p, g=g, s=s).items() if v % 16}
  if bad:
    return f"block dims {bad} must be multiples of 16 (wgmma's K and N steps)"
  row = _swizzle(g, dtype.itemsize) // dtype.itemsize
  if p % row or s % row:
    return (f"p={p} and s={s} must be multiples of {row}: every buffer is "
            f"tiled by the swizzle q/l={g} allows ({row} elements)")
  return None


def supported(tokens: int, w1_shape, w2_shape, dtype,
              transposed: bool = False) -> str | None:
  """None if the Mosaic GPU kernel runs these shapes (``transposed``: dx's
  problem), else why not."""
  if why := operand_problem(tokens, w1_shape, w2_shape, dtype, transposed):
    return why
  _, p, g, s = _dims(w1_shape, w2_shape, transposed)
  dtype = jnp.dtype(dtype)
  if max(g, s) > 256:
    return f"q/l={g} and s={s} must be <= 256 (wgmma's N)"
  need = smem_bytes(w1_shape, w2_shape, dtype.itemsize, 1, transposed)
  if need > SMEM_BUDGET:
    return (f"an output block's factors and tiles need {need // 1024} KiB of "
            f"shared memory (budget {SMEM_BUDGET // 1024} KiB): use more, "
            "smaller blocks")
  return None


def hardware_problem(platform: str) -> str | None:
  """Why this platform cannot run the kernels (wgmma is Hopper's: sm_90
  exactly), or None; the CPU runs them in Mosaic GPU's interpreter."""
  if platform == "cpu":
    return None
  if platform not in ("gpu", "cuda"):
    return f"platform {platform}: Mosaic GPU kernels run on NVIDIA GPUs"
  if target.abstract():  # cross-lowering for an abstract H100
    return None
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if cc is None or not str(cc).startswith("9."):
    return f"compute capability {cc}: wgmma needs a Hopper GPU (9.0)"
  return None


def _swizzle(g: int, itemsize: int) -> int:
  """Bytes of the swizzle a row of q/l elements allows (32, 64 or 128)."""
  return plgpu.find_swizzle(g * itemsize * 8)


def _transforms(g: int, itemsize: int):
  """Tiling and swizzle for every buffer: the swizzle rows of q/l allow."""
  swizzle = _swizzle(g, itemsize)
  return (plgpu.TilingTransform((8, swizzle // itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _chunks(tiles: int, l: int) -> int:
  """Token chunks per output block: the largest divisor of ``tiles`` with
  l * chunks <= the SM count (one CTA per SM, each streaming its tiles)."""
  device = jax.devices()[0]
  sms = getattr(device, "core_count", None) if device.platform == "gpu" else None
  best = 1
  for c in range(1, tiles + 1):
    if tiles % c == 0 and l * c <= (sms or SMS):
      best = c
  return best


def once_per_cta(wgs: int, wg, fn) -> None:
  """``fn()`` (a TMA issue) by the first of ``wgs`` warpgroups only."""
  if wgs > 1:
    pl.when(wg == 0)(fn)
  else:
    fn()


def has_tile(step, per_chunk: int, wgs: int, wg):
  """Whether warpgroup ``wg`` has a tile at turn ``step``: warpgroup w takes
  tiles w, w + wgs, ... of a chunk's ``per_chunk``."""
  return step * wgs + wg < per_chunk


def each_turn(per_chunk: int, wgs: int, wg, tile) -> None:
  """``tile(step)`` for every turn at which warpgroup ``wg`` has a tile (the
  last turn may have none when ``per_chunk`` is not a multiple of ``wgs``)."""
  def turn(step, carry):
    if per_chunk % wgs:
      pl.when(has_tile(step, per_chunk, wgs, wg))(lambda: tile(step))
    else:
      tile(step)
    return carry
  jax.lax.fori_loop(0, -(-per_chunk // wgs), turn, 0)


def warpgroups_fit(w1_shape, w2_shape, itemsize: int,
                   transposed: bool = False) -> bool:
  """Whether two consumer warpgroups' tiles fit beside the factors (one x
  buffer each at least)."""
  return _smem(*_dims(w1_shape, w2_shape, transposed), itemsize, 1,
               2) <= SMEM_BUDGET


def default_warpgroups(w1_shape, w2_shape, itemsize: int,
                       interpret: bool) -> int:
  """``monarch_matmul_mgpu``'s warpgroups when not given, as an H200
  measured them (module docstring): 2 where the forward holds two
  warpgroups' tiles, else 1 (then only the weight gradients would take
  two, which was slower). Interpreted: 1 (two nested warpgroup
  computations can hang under ``jit`` on few cores)."""
  if interpret:
    return 1
  return 2 if warpgroups_fit(w1_shape, w2_shape, itemsize) else 1


def _blockwise(x, at, bt, interpret: bool, wgs: int = 1):
  """out_j = sum_i (x_i @ at[j, i]) @ bt[j, i]: x (tokens, k*p), at
  (l, k, p, g), bt (l, k, g, s) -> block-major (l, tokens, s).

  ``wgs`` consumer warpgroups per CTA share its factors and take turns at
  its token tiles (warpgroup w: tiles w, w + wgs, ...), each with its own x
  buffers, stage-1 tile and output tile: while one waits on a TMA or a
  wgmma, the other computes (session 8 measured one)."""
  tokens = x.shape[0]
  l, k, p, g = at.shape
  s = bt.shape[3]
  dtype = x.dtype
  chunks = _chunks(tokens // TILE, l)
  per_chunk = tokens // TILE // chunks
  tr = _transforms(g, dtype.itemsize)
  slots = _slots(k, p, g, s, dtype.itemsize, wgs)

  def body(x_g, at_g, bt_g, o_g, at_s, bt_s, x_s, h_s, o_s, wbar, xbar):
    li = jax.lax.axis_index("l")
    ci = jax.lax.axis_index("c")
    wg = jax.lax.axis_index("wg") if wgs > 1 else 0
    # l's factors, once per CTA (by the first warpgroup); one copy per block
    # (TMA strides at most 5 dims and the tiled layout adds 2), each on its
    # own barrier, which every warpgroup waits on once.
    def load_factors():
      for ki in range(k):
        plgpu.copy_gmem_to_smem(at_g.at[li, ki], at_s.at[ki], wbar.at[2 * ki])
        plgpu.copy_gmem_to_smem(bt_g.at[li, ki], bt_s.at[ki],
                                wbar.at[2 * ki + 1])
    once_per_cta(wgs, wg, load_factors)
    for i in range(2 * k):
      plgpu.barrier_wait(wbar.at[i])
    xw, hw, ow = x_s.at[wg], h_s.at[wg], o_s.at[wg]

    def tile(step):
      rows = pl.ds((ci * per_chunk + step * wgs + wg) * TILE, TILE)
      load = lambda ki: plgpu.copy_gmem_to_smem(
          x_g.at[rows, pl.ds(ki * p, p)], xw.at[ki % slots],
          xbar.at[wg * slots + ki % slots])
      load(0)

      def accumulate(acc):
        for ki in range(k):
          if ki and slots == 1:   # the one buffer is free: wgmma_wait below
            load(ki)
          if ki + 1 < k and slots == 2:  # loads while this block multiplies
            load(ki + 1)
          plgpu.barrier_wait(xbar.at[wg * slots + ki % slots])

          def stage1(h_acc):
            plgpu.wgmma(h_acc, xw.at[ki % slots], at_s.at[ki])
            plgpu.wgmma_wait(0)
            hw[...] = h_acc[...].astype(dtype)

          pl.run_scoped(stage1, plgpu.ACC((TILE, g), jnp.float32))
          plgpu.commit_smem()  # h is read by the async proxy next
          plgpu.wgmma(acc, hw, bt_s.at[ki])
          plgpu.wgmma_wait(0)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o is free again
        ow[...] = acc[...].astype(dtype)

      pl.run_scoped(accumulate, plgpu.ACC((TILE, s), jnp.float32))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(ow, o_g.at[li, rows])

    each_turn(per_chunk, wgs, wg, tile)
    plgpu.wait_smem_to_gmem(0)

  threads = dict(num_threads=wgs, thread_name="wg") if wgs > 1 else {}
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((l, tokens, s), dtype),
      scratch_types=[plgpu.SMEM((k, p, g), dtype, transforms=tr),
                     plgpu.SMEM((k, g, s), dtype, transforms=tr),
                     plgpu.SMEM((wgs, slots, TILE, p), dtype, transforms=tr),
                     plgpu.SMEM((wgs, TILE, g), dtype, transforms=tr),
                     plgpu.SMEM((wgs, TILE, s), dtype, transforms=tr),
                     plgpu.Barrier(num_barriers=2 * k),
                     plgpu.Barrier(num_barriers=wgs * slots)],
      grid=(l, chunks), grid_names=("l", "c"), **threads,
      interpret=interpret_params(interpret),
  )(x, at.astype(dtype), bt.astype(dtype))


class Options(NamedTuple):
  """Static choices of ``monarch_matmul_mgpu`` (A/B rows of the benchmark)."""
  interpret: bool
  platform: str        # what the backward's portable kernels compile for
  own_dw: bool = True  # dw1, dw2 through monarch_mgpu_dw where it fits
  warpgroups: int = 1  # consumer warpgroups per CTA where they fit


def _wgs(opts: Options, w1_shape, w2_shape, itemsize: int,
         transposed: bool = False) -> int:
  fits = warpgroups_fit(w1_shape, w2_shape, itemsize, transposed)
  return opts.warpgroups if fits else 1


def _forward(x, w1, w2, opts: Options):
  """x (tokens, k*p) -> y (tokens, l*s)."""
  a, b = mk.gather_weights(w1, w2)           # (l, k, g, p), (l, k, s, g)
  o = _blockwise(x, a.transpose(0, 1, 3, 2), b.transpose(0, 1, 3, 2),
                 opts.interpret,             # K-major operands
                 _wgs(opts, w1.shape, w2.shape, x.dtype.itemsize))
  l, tokens, s = o.shape      # P2: output index s_idx*l + l_idx (TMA
  return o.transpose(1, 2, 0).reshape(tokens, s * l)  # stores no strides)


def _undo_p2(dy, l: int):
  """dy (tokens, s*l) -> do (tokens, l*s): block-major columns."""
  tokens, n = dy.shape
  return dy.reshape(tokens, n // l, l).transpose(0, 2, 1).reshape(tokens, n)


def _dx(do, w1, w2, opts: Options):
  """do (tokens, l*s) -> dx (tokens, k*p):
  dx_k = sum_l (do_l @ B[l,k]) @ A[l,k]."""
  tokens = do.shape[0]
  k, _, p = w1.shape
  a, b = mk.gather_weights(w1, w2)
  o = _blockwise(do, b.transpose(1, 0, 2, 3), a.transpose(1, 0, 2, 3),
                 opts.interpret,             # (k, tokens, p)
                 _wgs(opts, w1.shape, w2.shape, do.dtype.itemsize, True))
  return o.transpose(1, 0, 2).reshape(tokens, k * p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _monarch(x, w1, w2, opts: Options):
  return _forward(x, w1, w2, opts)


def _vjp_fwd(x, w1, w2, opts):
  return _monarch(x, w1, w2, opts), (x, w1, w2)


def _vjp_bwd(opts, res, dy):
  """dx and dw here where the shapes fit (``supported`` with transposed=True,
  ``monarch_mgpu_dw.supported``); the rest through the portable kernels
  where those take the shapes, else XLA's VJP."""
  from structmat.kernels import monarch_mgpu_dw as mdw  # pylint: disable=import-outside-toplevel
  from structmat.ops.monarch import monarch_matmul  # pylint: disable=import-outside-toplevel
  x, w1, w2 = res
  tokens, dtype = x.shape[0], x.dtype
  interpret, platform = opts.interpret, opts.platform
  do = _undo_p2(dy, w2.shape[0])
  dx = dw = None
  if supported(tokens, w1.shape, w2.shape, dtype, transposed=True) is None:
    dx = _dx(do, w1, w2, opts)
  if opts.own_dw and mdw.supported(tokens, w1.shape, w2.shape, dtype) is None:
    dw = mdw.weight_grads(x, do, w1, w2, interpret, opts.warpgroups)
  elif mk.supported(tokens, w1.shape, w2.shape, bt := mk.fit_block_tokens(
      tokens, w1.shape, w2.shape, dtype.itemsize, platform), platform,
                    dtype.itemsize) is None:
    dx_p, *dw = mk.backward(x, w1, w2, dy, bt, interpret, platform,
                            dx=dx is None)
    dx = dx if dx is not None else dx_p
  else:
    dx_x, *dw = jax.vjp(monarch_matmul, x, w1, w2)[1](dy)
    dx = dx if dx is not None else dx_x
  if dx is None:  # dw here, dx's transposed problem too big for the kernel
    dx = jax.vjp(lambda v: monarch_matmul(v, w1, w2), x)[1](dy)[0]
  return dx, dw[0].astype(w1.dtype), dw[1].astype(w2.dtype)


_monarch.defvjp(_vjp_fwd, _vjp_bwd)
_monarch_once = traced_once(_monarch, (3,))


def monarch_matmul_mgpu(x, w1, w2, *, interpret: bool | None = None,
                        platform: str | None = None, own_dw: bool = True,
                        warpgroups: int | None = None):
  """Monarch product through the Mosaic GPU kernel; ``ops.monarch_matmul``'s
  contract without bias.

  Args:
    x: (..., k*p), 16-bit. w1: (k, q, p). w2: (l, s, r), l*r = k*q, q % l == 0.
    interpret: run in Mosaic GPU's interpreter (default: on the CPU).
    platform: what the backward's portable (Triton) kernels compile for
      (default: the default backend; "cuda" when cross-lowering).
    own_dw: dw1, dw2 through ``monarch_mgpu_dw`` where it takes the shapes;
      False sends them to the portable kernels (the benchmark's A/B).
    warpgroups: 1 or 2 consumer warpgroups per CTA, taking turns at its
      token tiles, in every kernel whose shared memory holds two
      warpgroups' tiles (the others run one); default
      ``default_warpgroups`` (2 where the forward takes them, as measured;
      1 when interpreted). Interpreted, jax runs each warpgroup as a nested
      computation on a thread; under ``jit`` they can starve XLA:CPU's
      thread pool (``jit(grad)`` hung on two cores): interpret two
      warpgroups eagerly.

  Returns:
    (..., l*s), in x's dtype.
  """
  from structmat.ops.monarch import _check  # pylint: disable=import-outside-toplevel
  _check(x.shape[-1], w1, w2)
  x2, _, interpret, platform = prepare(x, TILE, interpret, platform)
  if why := supported(x2.shape[0], w1.shape, w2.shape, x.dtype):
    raise ValueError(f"the Mosaic GPU Monarch kernel cannot run these shapes: "
                     f"{why}")
  if warpgroups is None:
    warpgroups = default_warpgroups(w1.shape, w2.shape, x.dtype.itemsize,
                                    interpret)
  if warpgroups not in (1, 2):
    raise ValueError(f"warpgroups={warpgroups}: use 1 or 2 (or None: "
                     "default_warpgroups)")
  y = _monarch_once(x2, w1.astype(x.dtype), w2.astype(x.dtype), Options(
      interpret, "cpu" if interpret else platform, own_dw, warpgroups))
  return y.reshape(*x.shape[:-1], y.shape[-1])
