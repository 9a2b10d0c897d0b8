"""Monarch in two passes: XLA's block-diagonal stage 1, a Pallas stage 2 that
takes P1 through its loads and P2 through its stores.

The fused kernel (``monarch``) keeps the intermediate on chip, but each
(token tile, output block l) program then recomputes its slice of stage 1
from the whole x row, with dots only q/l wide: on an H200 at n=4096 in 16
blocks, 16384 bf16 tokens, it ran the forward in 0.781 ms against XLA's
0.392 (session 14). XLA's path moves each activation 8 times (two batched
matmuls, the block-major transposes around them, P1 and P2), and XLA's
block-diagonal product alone runs at the copy roofline (0.092 ms there,
two passes). So this form writes the intermediate once and reads it once,
four passes in all (0.19 ms at the copy rate there):

  stage 1 (XLA): h = blockdiag(x, w1'), w1' = w1 with each block's q rows
    regrouped from (q/l, l) to (l, q/l) order (weight-sized), so block k of
    h is (l, g) with g = q/l: h[t, k, l, :] = x_k @ A[l, k]^T;
  stage 2 (kernel): one program per (token tile, output block l) sums
    h[t, k, l, :] @ B[l, k]^T over k, reading each (bt, g) slice where it
    lies (P1: g contiguous elements, 32 bytes at g = 16 in bf16) and
    storing its (bt, s) tile strided by l into y's (tokens, s, l) view (P2,
    as ``monarch.strides_p2``), so every dot is (bt, g) @ (g, s): s wide
    where the fused kernel's stage 1 is g wide.

Backward: dy's P2 undone by XLA (``monarch.strides_p2`` says why the
kernels read dy block-major), dz = dy_l @ w2[l] as XLA's block-diagonal
product, dx = sum_l dz[t, l, k, :] @ A[l, k] by the same stage-2 kernel
(contiguous stores), and the weight gradients as XLA contractions over the
tokens of (dz, x) and (dy, h), or with ``dw_kernel`` as token-reduction
kernels that read h and dz in place (``monarch_two_pass_dw``). Residuals: x
and h, as XLA's VJP keeps x and its stage-1 product.

Triton only (GPUs, and interpret mode, which tests that code): its loads
take any strided (bt, g) slice, while Mosaic TPU blocks need (8, 128)-
aligned trailing dims (TPUs have ``monarch_tpu``). Reference:
``structmat.ops.monarch_matmul``.
"""
import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from jax.experimental import pallas as pl

from structmat.kernels import monarch as mk
from structmat.kernels import monarch_two_pass_dw as dwk
from structmat.kernels import shards
from structmat.kernels import triton_backend
from structmat.kernels.portable import (LOOP_SMEM_BUDGET, TRITON_STAGES,
                                        compiler_params, launch_order, pow2)
from structmat.kernels.shared_trace import traced_once
from structmat.kernels.triton_backend import GPU_PLATFORMS, plt
from structmat.ops.blockdiag import blockdiag_matmul
from structmat.ops.monarch import gather_weights

# The fused kernel's helpers: column chunks of a block, masked stores, a @ b^T.
_chunks, _store, _dot_t, _next_pow2 = (  # pylint: disable=protected-access
    mk._chunks, mk._store, mk._dot_t, mk._next_pow2)

K_STEP = 64       # inner-dim elements per dot step where g is wider
OUT_TILE = mk.MAX_TRITON_BLOCK  # output columns per accumulator
# float32 accumulator elements a program holds by default (64 KB: 64
# registers a thread on eight warps). Compiled offline (Triton 3.6, sm_90,
# bf16, 16384 tokens): 128-token tiles of 256 outputs spilled 140-152 bytes
# a thread at n=4096 in 16 blocks and 580 in 4 blocks; 64-token tiles
# spilled nothing there, nor at LLaMA-60M's and 130M's shapes.
ACC_ELEMENTS = 16384


def stage1_weights(w1, l: int):
  """w1 (k, q, p) with each block's rows regrouped from (q/l, l) to (l, q/l)
  order: block k of ``blockdiag(x, w1')`` is then (l, g), [l] = x_k @ A[l,
  k]^T (``gather_weights``), ready for stage 2 without a permutation."""
  k, q, p = w1.shape
  return w1.reshape(k, q // l, l, p).transpose(0, 2, 1, 3).reshape(k, q, p)


def _k_dims(g: int) -> tuple[int, int, int]:
  """(G, kc, steps) of the inner dim g: the loaded width (a power of two >=
  16 where g <= K_STEP, masked past g), the dot step and steps per block."""
  if g <= K_STEP:
    gg = max(16, _next_pow2(g))
    return gg, gg, 1
  return g, K_STEP, g // K_STEP


def _out_chunks(s: int):
  """Static (start, size, valid) output chunks: ``monarch._chunks``'s."""
  ss = max(16, _next_pow2(s))
  return ss, _chunks(s, ss, OUT_TILE)


def _widest(s: int) -> int:
  """The widest output chunk (accumulator columns) of an s-wide block."""
  return max(c[1] for c in _out_chunks(s)[1])


def smem_estimate(block_tokens: int, g: int, s: int, itemsize: int) -> int:
  """Shared memory of a stage-2 program: the larger of its loop's
  ``TRITON_STAGES`` buffers of each step's (bt, kc) input slice and (size,
  kc) weight slice, and the (bt, size) accumulator, which Triton converts
  through shared memory before a contiguous store (float32 dx at n=4096 in
  16 blocks asked 128 KiB so, its loop 72). Exact or above what Triton 3.6
  asked at every shape ``tools/triton_smem.py --kernel=monarch2`` lists."""
  _, kc, _ = _k_dims(g)
  size = _widest(s)
  return max(TRITON_STAGES * (block_tokens + size) * kc * itemsize,
             block_tokens * size * itemsize)


def supported(tokens: int, w1_shape, w2_shape, block_tokens: int,
              platform: str, itemsize: int = 2) -> str | None:
  """None if the two-pass kernels (forward and dx) run these shapes on
  ``platform``, else why not."""
  if why := mk.layout_problem(w1_shape, w2_shape):
    return why
  if platform == "tpu":
    return ("the two-pass Monarch kernel is Triton-only (strided (bt, q/l) "
            "loads); TPUs run structmat.kernels.monarch_tpu")
  if why := triton_backend.problem(platform, masked=True):
    return why
  if tokens % block_tokens:
    return (f"tokens={tokens} is not a multiple of block_tokens="
            f"{block_tokens}")
  p, g, s = mk.block_dims(w1_shape, w2_shape)
  if g > K_STEP and g % K_STEP:
    return (f"q/l={g}: above {K_STEP} it must be a multiple of {K_STEP} "
            "(the dot steps)")
  if platform not in GPU_PLATFORMS:
    return None
  if block_tokens < 16 or not pow2(block_tokens):
    return f"block_tokens={block_tokens}: Triton needs a power of two >= 16"
  need = max(smem_estimate(block_tokens, g, w, itemsize) for w in (s, p))
  if need > LOOP_SMEM_BUDGET:
    return (f"block_tokens={block_tokens} needs ~{need // 1024} KiB of "
            f"shared memory (budget {LOOP_SMEM_BUDGET // 1024} KiB): use "
            "fewer tokens per tile")
  return None


def fit_block_tokens(tokens: int, w1_shape, w2_shape, itemsize: int,
                     platform: str, block_tokens: int = 128) -> int:
  """The largest of block_tokens, block_tokens/2, ... (>= 16) dividing
  tokens whose accumulators hold at most ``ACC_ELEMENTS`` and whose stage-2
  loops fit shared memory; block_tokens (or tokens) when none does
  (``supported`` then says why)."""
  p, _, s = mk.block_dims(w1_shape, w2_shape)
  bt = min(block_tokens, tokens)
  while bt > 16 and bt % 2 == 0 and bt * max(_widest(s), _widest(p)) > (
      ACC_ELEMENTS):
    bt //= 2
  while bt >= 16:
    if supported(tokens, w1_shape, w2_shape, bt, platform, itemsize) is None:
      return bt
    if bt % 2:
      break
    bt //= 2
  return min(block_tokens, tokens)


def _stage2_kernel(h_ref, w_ref, o_ref, *, n_in, g, out_chunks):
  """o = sum_i h[:, i, :g] @ w[i]^T for one (token tile, output block).

  h_ref: (bt, n_in, G) this block's slice of every input block (strided);
  w_ref: (n_in, S, G); o_ref: (bt, S) (strided for P2 or contiguous)."""
  gg, kc, n_kc = _k_dims(g)
  mask = None
  if g < gg:
    mask = jax.lax.broadcasted_iota(jnp.int32, (h_ref.shape[0], gg), 1) < g

  def load(i, kk):
    if n_kc == 1:
      ref = h_ref.at[:, i, :]
      return ref[...] if mask is None else plt.load(ref, mask=mask, other=0)
    return h_ref[:, i, pl.ds(kk * kc, kc)]

  for c, size, valid in out_chunks:
    def step(t, acc, c=c, size=size):
      # lax's C-style division: jnp's floor // and % lower to a select that
      # the Triton lowering of jax 0.10.2 rejects (i32 against i1).
      i, kk = (t, 0) if n_kc == 1 else (jax.lax.div(t, n_kc),
                                         jax.lax.rem(t, n_kc))
      w = w_ref[i, pl.ds(c, size), pl.ds(kk * kc, kc)]
      return acc + _dot_t(load(i, kk), w)
    acc = jax.lax.fori_loop(0, n_in * n_kc, step,
                            jnp.zeros((h_ref.shape[0], size), jnp.float32))
    _store(o_ref.at[:, pl.ds(c, size)], acc.astype(o_ref.dtype), valid)


def _call_stage2(h4, w, s: int, strided: bool, block_tokens: int, interpret,
                 platform, name: str):
  """out[:, j] = sum_i h4[:, i, j, :] @ w[j, i]^T for every output block j.

  h4: (tokens, n_in, n_out, g), the input read in place; w: (n_out, n_in,
  S, G) zero-padded; returns (tokens, n_out*s), block-major (j*s + c), or
  with ``strided`` in P2 order (c*n_out + j)."""
  tokens, n_in, n_out, g = h4.shape
  ss, chunks = _out_chunks(s)
  gg = _k_dims(g)[0]
  if strided:
    out = (jax.ShapeDtypeStruct((tokens, s, n_out), h4.dtype),
           pl.BlockSpec((block_tokens, ss, None), lambda i, j: (i, 0, j)))
  else:
    out = (jax.ShapeDtypeStruct((tokens, n_out, s), h4.dtype),
           pl.BlockSpec((block_tokens, None, ss), lambda i, j: (i, j, 0)))
  # Output block j fastest on GPUs (``launch_order``): a token tile's
  # programs write interleaved columns of y (P2), which then meet in L2.
  grid, in_specs, out_spec = launch_order(
      platform, (tokens // block_tokens, n_out),
      [pl.BlockSpec((block_tokens, n_in, None, gg),
                    lambda i, j: (i, 0, j, 0)),
       pl.BlockSpec((None, n_in, ss, w.shape[-1]), lambda i, j: (j, 0, 0, 0))],
      out[1])
  size = _widest(s)
  y = pl.pallas_call(
      functools.partial(_stage2_kernel, n_in=n_in, g=g, out_chunks=chunks),
      out_shape=out[0], grid=grid, in_specs=in_specs, out_specs=out_spec,
      interpret=interpret,
      # 8 warps from a 64 KB float32 accumulator on, as the fused kernel.
      compiler_params=None if interpret else compiler_params(
          platform, 2, 8 if block_tokens * size >= ACC_ELEMENTS else 4),
      name=name,
  )(h4, w)
  return y.reshape(tokens, -1)


def _pad(w, s_axis_size: int, g: int):
  """(.., s, g) weights zero-padded to (.., S, G) as the kernel loads them."""
  ss, gg = _out_chunks(s_axis_size)[0], _k_dims(g)[0]
  pads = [(0, 0)] * (w.ndim - 2) + [(0, ss - w.shape[-2]), (0, gg - g)]
  return jnp.pad(w, pads) if any(p for _, p in pads) else w


def _forward(x, w1, w2, block_tokens, interpret, platform, strided):
  k, q, p = w1.shape
  l, s, _ = w2.shape
  g = q // l
  h = blockdiag_matmul(x, stage1_weights(w1, l))          # (tokens, k*q)
  _, b = gather_weights(w1, w2)                            # (l, k, s, g)
  y = _call_stage2(h.reshape(-1, k, l, g), _pad(b, s, g), s, strided,
                   block_tokens, interpret, platform, "monarch2_fwd")
  if not strided:   # block-major (l, s) columns: P2 by XLA
    y = y.reshape(-1, l, s).transpose(0, 2, 1).reshape(-1, s * l)
  return y, h


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _two_pass(x, w1, w2, block_tokens, interpret, platform, strided,
              dw_kernel):
  del dw_kernel
  return _forward(x, w1, w2, block_tokens, interpret, platform, strided)[0]


def _vjp_fwd(x, w1, w2, block_tokens, interpret, platform, strided,
             dw_kernel):
  del dw_kernel
  y, h = _forward(x, w1, w2, block_tokens, interpret, platform, strided)
  # Named: kept across shards.per_shard's checkpoint, not recomputed.
  return y, (x, checkpoint_name(h, shards.RESIDUAL), w1, w2)


def _vjp_bwd(block_tokens, interpret, platform, strided, dw_kernel, res, dy):
  del strided   # the backward reads dy block-major either way
  x, h, w1, w2 = res
  k, q, p = w1.shape
  l, s, r = w2.shape
  g = q // l
  tokens = x.shape[0]
  do = dy.reshape(tokens, s, l).transpose(0, 2, 1)         # (tokens, l, s)
  dz = blockdiag_matmul(do.reshape(tokens, l * s),
                        w2.transpose(0, 2, 1))             # (tokens, l*r)
  h4, dz4, x3 = (h.reshape(tokens, k, l, g), dz.reshape(tokens, l, k, g),
                 x.reshape(tokens, k, p))
  a, _ = gather_weights(w1, w2)                            # (l, k, g, p)
  dx = _call_stage2(dz4, _pad(a.transpose(1, 0, 3, 2), p, g), p, False,
                    block_tokens, interpret, platform, "monarch2_dx")
  tiles = (lambda *dims: dwk.plan(tokens, *dims, x.dtype.itemsize, platform)
           if dw_kernel else None)
  if t2 := tiles(l, s, k, g):
    dw2 = dwk.token_sum(do, h4, t2, interpret, platform, "monarch2_dw2")
  else:
    dw2 = jnp.einsum("tls,tklg->lskg", do, h4,
                     preferred_element_type=jnp.float32)
  if t1 := tiles(k, p, l, g):   # (k, p, l, g) to w1's (k, g, l, p)
    dw1 = dwk.token_sum(x3, dz4, t1, interpret, platform,
                        "monarch2_dw1").transpose(0, 3, 2, 1)
  else:
    dw1 = jnp.einsum("tlkg,tkp->kglp", dz4, x3,
                     preferred_element_type=jnp.float32)
  return (dx, dw1.reshape(k, q, p).astype(w1.dtype),
          dw2.reshape(l, s, r).astype(w2.dtype))


_two_pass.defvjp(_vjp_fwd, _vjp_bwd)
_two_pass_once = traced_once(_two_pass, (3, 4, 5, 6, 7))


def monarch_matmul_two_pass(x, w1, w2, *, block_tokens: int = 128,
                            interpret: bool | None = None,
                            platform: str | None = None,
                            strided_p2: bool = True,
                            dw_kernel: bool = False):
  """Monarch product in two passes (module docstring), same contract as
  ``ops.monarch_matmul`` (no bias).

  Args:
    x: (..., k*p). w1: (k, q, p). w2: (l, s, r) with l*r = k*q, q % l == 0.
    block_tokens: tokens per stage-2 program (``fit_block_tokens`` picks
      one that fits registers and shared memory).
    interpret: interpret mode (default: on the CPU).
    platform: backend to compile for (default: the default backend).
    strided_p2: whether stage 2 stores the output permutation itself
      (l-strided stores), else it writes (l, s) blocks and XLA permutes
      them (two more passes over y; the benchmark's A/B).
    dw_kernel: whether the weight gradients run as token-reduction kernels
      reading h and dz in place (``monarch_two_pass_dw``, where its tiles
      fit) instead of XLA's contractions, which may copy h and dz first.

  Returns:
    (..., l*s).
  """
  x2, block_tokens, interpret, platform, _ = mk.checked_call(
      x, w1, w2, block_tokens, interpret, platform, supported,
      "the two-pass Monarch kernel")
  y = _two_pass_once(x2, w1.astype(x.dtype), w2.astype(x.dtype), block_tokens,
                     interpret, platform, bool(strided_p2), bool(dw_kernel))
  return y.reshape(*x.shape[:-1], y.shape[-1])
