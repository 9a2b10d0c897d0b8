"""SLTrain reconstruct-and-multiply: y = x (scale * a @ b + S) without ever
writing the dense (in, out) kernel to device memory.

Every program owns one (token tile, output tile); a token tile's programs
launch together (the output tile is the grid's first axis, which Triton
launches fastest), so they read its x rows from L2. The low-rank part enters
once, as scale * u_tile @ b[:, j-tile] with u = x a (rank r, an XLA matmul:
rebuilding a @ b per input tile cost r/bt of a dense product again). Then
the program loops over input tiles and rebuilds each (bk, bn) sparse tile of
S on chip from that tile's entries only, which the support lists
contiguously once it is sorted by tile
(``tile_support``: per-tile offsets plus an argsort, which ``support_orders``
computes once per support, at the layer's init, for the default tiles, so no
training step sorts). The sparse entries are placed with one-hot matmuls
(rows x entries) @ (entries x cols * values), which Triton and Mosaic both
lower (neither can scatter into a register tile), in chunks of ``chunk``
entries with a data-dependent trip count, which Triton software-pipelines
(each step's indices and values are fetched while the previous step
multiplies); the next input tile's x block and offsets are loaded before
the current tile's placement loop (Triton pipelines innermost loops only).

Backward: dx is the same kernel on the transposed problem (W^T = scale b^T a^T
+ S^T with u = dy b^T, the support re-sorted for W^T's tiles); the factor
gradients are
low-rank XLA matmuls; dvalues is a sampled dense-dense product: one program per
kernel tile accumulates x_k^T dy_j over token tiles on chip and reads off its
own entries. Reference: ``structmat.ops.sltrain_matmul`` (which materializes W,
as the official code does every step).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from structmat.kernels import triton_backend
from structmat.kernels.portable import (LOOP_SMEM_BUDGET, TRITON_STAGES,
                                        compiler_params, pow2, prepare)
from structmat.kernels.shared_trace import traced_once
from structmat.kernels.triton_backend import GPU_PLATFORMS, plt


class TiledSupport(NamedTuple):
  """A support sorted by (bk, bn) kernel tile (row-major tiles)."""
  order: jax.Array     # (nnz,) permutation: tile-sorted position -> entry
  rows: jax.Array      # (nnz + chunk,) row within the tile (padded)
  cols: jax.Array      # (nnz + chunk,) column within the tile (padded)
  offsets: jax.Array   # (tiles + 1,) start of each tile's entries


DEFAULT_TILE = 64   # block_in / block_out cap
DEFAULT_CHUNK = 32  # sparse entries placed per step
# Bytes of rank per row in each step of the forward's low-rank term: 128 of
# the rank in 16-bit, 64 in float32 (LLaMA-1B's rank 512 asked for 144 KiB
# of shared memory either way, compiled offline; whole, 384 KiB in float32).
RANK_CHUNK_BYTES = 256


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _tile_of(indices, out_features: int, bk: int, bn: int):
  """Row-major (bk, bn) tile of each flat (in, out) index; a partial last
  tile counts as a whole one (ids as in the layer ``padded_dim`` pads to
  whole tiles, whose tile order is the unpadded one)."""
  r, c = indices // out_features, indices % out_features
  return (r // bk) * _cdiv(out_features, bn) + c // bn


def tile_order(indices, in_features: int, out_features: int, bk: int,
               bn: int):
  """(nnz,) int32 permutation sorting flat (in, out) ``indices`` by
  (bk, bn) kernel tile (stable: row-major within a tile)."""
  del in_features  # the tile index needs only the row length
  return jnp.argsort(_tile_of(indices, out_features, bk, bn),
                     stable=True).astype(jnp.int32)


def transposed_indices(indices, in_features: int, out_features: int):
  """Flat indices into W^T (out, in) of the entries ``indices`` of W."""
  return (indices % out_features) * in_features + indices // out_features


def support_orders(indices, in_features: int, out_features: int):
  """(2, nnz) int32: the tile orders of W and W^T for the default tiles.

  The forward uses the first, dx (the same kernel on W^T) the second. The
  SLTrain layer stores them next to its support at init; the kernel then
  never sorts.
  """
  bk = tile_for(in_features, DEFAULT_TILE)
  bn = tile_for(out_features, DEFAULT_TILE)
  t_idx = transposed_indices(indices, in_features, out_features)
  return jnp.stack([tile_order(indices, in_features, out_features, bk, bn),
                    tile_order(t_idx, out_features, in_features, bn, bk)])


def tile_support(indices, in_features: int, out_features: int, bk: int,
                 bn: int, chunk: int, order=None) -> TiledSupport:
  """Sort flat (in, out) ``indices`` by kernel tile; ``order`` (from
  ``tile_order`` with the same tiles) skips the sort. Once per call: the
  forward and backward passes reuse it."""
  r, c = indices // out_features, indices % out_features
  tile = _tile_of(indices, out_features, bk, bn)
  if order is None:
    order = tile_order(indices, in_features, out_features, bk, bn)
  pad = lambda v: jnp.concatenate([v, jnp.zeros((chunk,), jnp.int32)])
  n_tiles = _cdiv(in_features, bk) * _cdiv(out_features, bn)
  offsets = jnp.searchsorted(tile[order], jnp.arange(n_tiles + 1),
                             side="left").astype(jnp.int32)
  return TiledSupport(order, pad((r % bk)[order].astype(jnp.int32)),
                      pad((c % bn)[order].astype(jnp.int32)), offsets)


def tile_for(size: int, cap: int) -> int:
  """The largest power-of-two tile <= cap dividing size (size itself when it
  is <= cap); ``supported`` reports sizes no tile fits."""
  if size <= cap:
    return size
  t = cap
  while t >= 8 and size % t:
    t //= 2
  return t if t >= 8 else cap


def padded_rank(rank: int, platform: str) -> int:
  """The rank the Triton kernel multiplies: a power of two >= 16 (its dots'
  shapes), the factors zero-padded to it (a @ b is unchanged); GPT-2's
  rank 192 pads to 256. Interpret mode ("cpu") pads as GPUs do; TPUs have
  their own kernel."""
  if platform not in GPU_PLATFORMS and platform != "cpu":
    return rank
  return max(16, 1 << (rank - 1).bit_length())


def padded_dim(size: int, cap: int, platform: str) -> tuple[int, int]:
  """(tile, padded size) of one kernel dim: ``tile_for``'s tile when it fits
  the platform (on GPUs a power of two >= 16 dividing the size; interpret
  mode takes any divisor >= 8), else the dim zero-padded to whole tiles of
  ``cap`` (LLaMA-1B's 5461-wide MLP: 5504 in 64-wide tiles, 0.8% more work)
  or, below ``cap``, to one power-of-two tile. Padding with ``cap`` keeps
  ``support_orders`` valid: ``tile_for`` also returns ``cap`` when no tile
  divides."""
  tile = tile_for(size, cap)
  gpu = platform in GPU_PLATFORMS
  if size % tile == 0 and tile >= (16 if gpu else 8) and (pow2(tile) or not gpu):
    return tile, size
  if size > cap:
    return cap, _cdiv(size, cap) * cap
  tile = max(16, 1 << (size - 1).bit_length())
  return tile, tile


def rank_chunk(rank: int, itemsize: int) -> int:
  """The rank slice each step of the forward's low-rank term multiplies."""
  return min(rank, max(1, RANK_CHUNK_BYTES // itemsize))


def smem_estimate(bt: int, bk: int, bn: int, rank: int, itemsize: int) -> int:
  """Bytes of shared memory the Triton kernels plan for, per program: the
  largest of the forward's low-rank loop (``TRITON_STAGES`` buffers of a
  (bt, rc) slice of u and an (rc, bn) slice of b, once when a single slice
  covers the rank), its input-tile loop (buffers of the (bt, bk) x tiles),
  the same for dx (the forward on W^T: bk and bn swapped) and dvalues'
  token loop (buffers of (bt, bk) x and (bt, bn) dy tiles, and the float32
  (bk, bn) tile it accumulates). Triton 3.6 compiling for sm_90
  (``tools/triton_smem.py``) never asked for more at the presets' shapes in
  bfloat16 and float32, and exactly this at most of them."""
  rc = rank_chunk(rank, itemsize)
  wide = max(bk, bn)      # the forward's or dx's output (and input) tile
  low = (TRITON_STAGES if rank > rc else 1) * (bt + wide) * rc
  return max(low * itemsize, TRITON_STAGES * bt * wide * itemsize,
             TRITON_STAGES * bt * (bk + bn) * itemsize + bk * bn * 4)


def supported(tokens: int, in_features: int, out_features: int, rank: int,
              bt: int, bk: int, bn: int, chunk: int,
              platform: str, itemsize: int = 2) -> str | None:
  """None if the kernel runs these shapes on ``platform``, else why not
  (``itemsize``: bytes per element of x; shared memory depends on it)."""
  for name, size, tile in (("tokens", tokens, bt), ("in_features", in_features, bk),
                           ("features", out_features, bn)):
    if size % tile:
      return f"{name}={size} is not a multiple of its tile {tile}"
  if platform == "tpu":
    # dvalues writes each tile's entries with masked stores, which only the
    # Triton lowering offers; TPUs have their own kernel (sltrain_tpu).
    return ("this SLTrain kernel is Triton-only (masked stores); TPUs use "
            "structmat.kernels.sltrain_tpu")
  if why := triton_backend.problem(platform, masked=True):
    return why
  if platform in GPU_PLATFORMS:
    bad = [v for v in (bt, bk, bn, rank, chunk) if not pow2(v) or v < 16]
    if bad:
      return f"Triton needs power-of-two tiles and rank >= 16, got {bad}"
    smem = smem_estimate(bt, bk, bn, rank, itemsize)
    if smem > LOOP_SMEM_BUDGET:
      return (f"block_tokens={bt} needs ~{smem // 1024} KiB of shared memory "
              f"(budget {LOOP_SMEM_BUDGET // 1024} KiB): use fewer tokens per "
              "tile")
  return None


def slower_than_xla(platform: str) -> str | None:
  """Why ``impl="auto"`` keeps XLA on ``platform`` although the kernel runs.

  Each (token tile, output tile) program rebuilds its sparse tiles, so the
  one-hot placement is repeated once per token tile (c/bt of a dense product
  on top of the dense-sized tile GEMM), while XLA materializes W once and
  runs one dense matmul (writing W costs a few microseconds of HBM). H200,
  bf16, n=4096, rank 128, 3% support, 16384 tokens, forward ms: 13.3 with
  the low-rank term rebuilt per input tile (session 8; forward+backward
  15.7), 9.04 with it hoisted (session 11; 2.87 with no sparse entries at
  all), against XLA's 0.84 (forward+backward 1.68) and dense's 0.76.
  """
  if platform in GPU_PLATFORMS:
    return ("the Triton SLTrain kernel rebuilds W's tiles per token tile: "
            "11x slower than XLA's materialize-and-multiply on an H200 "
            "(9.04 vs 0.84 ms); impl='pallas' runs it (it never writes the "
            "dense W)")
  return None


# float32 accumulator registers per thread the forward (and dx) may hold: at
# 256-token tiles of 64 outputs, four warps spilled 564 bytes a thread
# (Triton 3.6 offline, n=4096, rank 128, bf16), eight none (220 registers).
ACC_REGISTERS = 64


def fwd_warps(bt: int, bn: int) -> int:
  """Warps per forward (and dx) program: 4, or more where the (bt, bn) float32
  accumulator would exceed ``ACC_REGISTERS`` a thread."""
  return max(4, bt * bn // (32 * ACC_REGISTERS))


def _sparse_tile(rows_ref, cols_ref, vals_ref, start, end, bk, bn, chunk,
                 dtype):
  """The (bk, bn) sparse tile from entries [start, end) of the sorted lists.

  The one-hot operands are in ``dtype`` (x's): 0, 1 and each value are exact
  there, and a tile holds each (row, col) at most once, so every element of
  the float32 result is exactly one value or 0 (16-bit dots run at the
  tensor cores' full rate). The row one-hot is built (bk, chunk), the dot's
  own orientation (built (chunk, bk), Triton transposed it through shared
  memory every step), and both select in ``dtype`` (an int32 select cost a
  conversion per element). The values come as float32: 4-byte loads Triton
  prefetches with the indices (cp.async), where 2-byte ones stalled each
  step."""
  rid = jax.lax.broadcasted_iota(jnp.int32, (bk, chunk), 0)
  cid = jax.lax.broadcasted_iota(jnp.int32, (chunk, bn), 1)
  pos = jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
  one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)

  def body(c, acc):
    s = start + c * chunk
    sl = pl.ds(s, chunk)
    valid = (s + pos) < end                                  # (1, chunk)
    one_r = jnp.where((rows_ref[sl][None, :] == rid) & valid, one,
                      zero)                                  # (bk, chunk)
    one_c = jnp.where(cols_ref[sl][:, None] == cid,
                      vals_ref[sl][:, None].astype(dtype), zero)  # (chunk, bn)
    return acc + jax.lax.dot_general(one_r, one_c, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  trips = (end - start + chunk - 1) // chunk
  return jax.lax.fori_loop(0, trips, body, jnp.zeros((bk, bn), jnp.float32))


def _fwd_kernel(off_ref, x_ref, u_ref, b_ref, rows_ref, cols_ref, vals_ref,
                o_ref, *, scale, bk, bn, n_k, n_tn, chunk, rc):
  """y tile = scale * (x a)_tile @ b[:, j] + sum_k x_k @ S_kj.

  The low-rank term enters once per program from u = x a (rank-r, XLA), so
  only the sparse tiles are rebuilt per input tile; it is summed over
  ``rc``-wide slices of the rank (``rank_chunk``; one (bt, r) @ (r, bn) dot
  staged both operands whole in shared memory: 384 KiB at LLaMA-1B's rank
  512 in float32, which no GPU block has)."""
  j = pl.program_id(0)
  rank = u_ref.shape[1]

  def loads(k):
    t = k * n_tn + j
    return x_ref[:, pl.ds(k * bk, bk)], off_ref[t], off_ref[t + 1]

  def body(k, carry):
    acc, (x_k, start, end) = carry
    # The next input tile's loads before this one's placement loop, which
    # hides their latency (Triton pipelines only innermost loops).
    nxt = loads(jnp.minimum(k + 1, n_k - 1))
    w = _sparse_tile(rows_ref, cols_ref, vals_ref, start, end, bk, bn, chunk,
                     x_ref.dtype)
    return acc + jax.lax.dot_general(
        x_k, w.astype(x_ref.dtype), (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32), nxt

  def low_body(c, acc):
    cols = pl.ds(c * rc, rc)
    return acc + jax.lax.dot_general(u_ref[:, cols], b_ref[cols, :],
                                     (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  low = scale * jax.lax.fori_loop(
      0, rank // rc, low_body,
      jnp.zeros((x_ref.shape[0], bn), jnp.float32))
  acc, _ = jax.lax.fori_loop(0, n_k, body, (low, loads(0)))
  o_ref[...] = acc.astype(o_ref.dtype)


def _call_fwd(x, u, b, vals_sorted, ts: TiledSupport, scale, bt, bk, bn, chunk,
              interpret, platform):
  """x (tokens, in) @ (scale a b + S) given u = x a (tokens, r)."""
  tokens, d_in = x.shape
  d_out, rank = b.shape[1], b.shape[0]
  nnz_p = ts.rows.shape[0]
  vals = jnp.concatenate([vals_sorted.astype(jnp.float32),
                          jnp.zeros((chunk,), jnp.float32)])
  kernel = functools.partial(_fwd_kernel, scale=scale, bk=bk, bn=bn,
                             n_k=d_in // bk, n_tn=d_out // bn, chunk=chunk,
                             rc=rank_chunk(rank, x.dtype.itemsize))
  full = lambda n: pl.BlockSpec((n,), lambda *_: (0,))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((tokens, d_out), x.dtype),
      # The output tile j varies fastest (Triton launches program_id 0
      # first), so the d_out/bn programs of a token tile run together and
      # re-read its x and u rows from L2; tile-fastest, a 65,536-token x
      # larger than L2 was streamed from memory once per output tile (22x at
      # LLaMA-60M's 512 -> 1376 in 64-wide tiles).
      grid=(d_out // bn, tokens // bt),
      in_specs=[full(ts.offsets.shape[0]),
                pl.BlockSpec((bt, d_in), lambda j, i: (i, 0)),
                pl.BlockSpec((bt, rank), lambda j, i: (i, 0)),
                pl.BlockSpec((rank, bn), lambda j, i: (0, j)),
                full(nnz_p), full(nnz_p), full(nnz_p)],
      out_specs=pl.BlockSpec((bt, bn), lambda j, i: (i, j)),
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(
          platform, 2, num_warps=fwd_warps(bt, bn)),
      name="sltrain_fwd",
  )(ts.offsets, x, u, b, ts.rows, ts.cols, vals)


def _project(x, a):
  """x @ a in x's dtype with float32 accumulation: the rank-r activations."""
  return jnp.dot(x, a, preferred_element_type=jnp.float32).astype(x.dtype)


def _dvals_kernel(off_ref, x_ref, dy_ref, rows_ref, cols_ref, dv_ref, *, bt,
                  n_t, bk, bn, n_tn, chunk):
  """dvalues of one kernel tile: its entries of x_k^T dy_j, which is
  accumulated over token tiles on chip and never written out."""
  k, j = pl.program_id(0), pl.program_id(1)

  def acc_body(t, g):
    rows = pl.ds(t * bt, bt)
    return g + jax.lax.dot_general(x_ref[rows, :], dy_ref[rows, :],
                                   (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

  g = jax.lax.fori_loop(0, n_t, acc_body, jnp.zeros((bk, bn), jnp.float32))
  t = k * n_tn + j
  start, end = off_ref[t], off_ref[t + 1]
  rid = jax.lax.broadcasted_iota(jnp.int32, (chunk, bk), 1)
  cid = jax.lax.broadcasted_iota(jnp.int32, (chunk, bn), 1)
  pos = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)

  def body(c, carry):
    s = start + c * chunk
    sl = pl.ds(s, chunk)
    one_r = jnp.where(rows_ref[sl][:, None] == rid, 1.0, 0.0)   # (chunk, bk)
    one_c = jnp.where(cols_ref[sl][:, None] == cid, 1.0, 0.0)   # (chunk, bn)
    # HIGHEST: Triton runs float32 dots as TF32 otherwise, which would round
    # the accumulated G to 10 mantissa bits; IEEE picks its entries exactly.
    picked = jnp.sum(jax.lax.dot_general(
        one_r, g, (((1,), (0,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32) * one_c, axis=1)
    # Masked: the chunk's tail belongs to the next tile (another program).
    plt.store(dv_ref.at[sl], picked.astype(dv_ref.dtype), mask=s + pos < end)
    return carry

  jax.lax.fori_loop(0, (end - start + chunk - 1) // chunk, body, 0)


def _call_dvals(x, dy, ts: TiledSupport, bt, bk, bn, chunk, interpret,
                platform):
  tokens, d_in = x.shape
  d_out = dy.shape[1]
  nnz_p = ts.rows.shape[0]
  kernel = functools.partial(_dvals_kernel, bt=bt, n_t=tokens // bt, bk=bk,
                             bn=bn, n_tn=d_out // bn, chunk=chunk)
  full = lambda n: pl.BlockSpec((n,), lambda k, j: (0,))
  # Every program writes only its own tile's (disjoint, masked) entries of
  # the one output vector.
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((nnz_p,), jnp.float32),
      grid=(d_in // bk, d_out // bn),
      in_specs=[full(ts.offsets.shape[0]),
                pl.BlockSpec((tokens, bk), lambda k, j: (0, k)),
                pl.BlockSpec((tokens, bn), lambda k, j: (0, j)),
                full(nnz_p), full(nnz_p)],
      out_specs=full(nnz_p),
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(platform, 2),
      name="sltrain_dvalues",
  )(ts.offsets, x, dy, ts.rows, ts.cols)


def lowrank_grads(x, dy, a, b, scale: float, dyb=None):
  """(da, db) of y = scale x a b, through rank-r XLA matmuls (float32).

  ``dyb``: dy b^T in float32 when the caller already has it."""
  f32 = lambda v: v.astype(jnp.float32)
  if dyb is None:
    dyb = f32(dy) @ f32(b).T
  da = scale * (f32(x).T @ dyb)                              # (in, r)
  db = scale * ((f32(x) @ f32(a)).T @ f32(dy))               # (r, out)
  return da, db


class _Static(NamedTuple):
  scale: float
  bt: int
  bk: int
  bn: int
  chunk: int
  interpret: bool
  platform: str


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _sltrain(x, a, b, values, fwd_ts, bwd_ts, st: _Static):
  return _call_fwd(x, _project(x, a), b, values[fwd_ts.order], fwd_ts,
                   st.scale, st.bt, st.bk, st.bn, st.chunk, st.interpret,
                   st.platform)


def _vjp_fwd(x, a, b, values, fwd_ts, bwd_ts, st):
  # u = x a is not kept for db: a (tokens, r) residual per layer costs memory,
  # the kernel's one advantage, to save a rank-r matmul; db recomputes it in
  # float32 (u itself is rounded to x's dtype).
  return _sltrain(x, a, b, values, fwd_ts, bwd_ts, st), (x, a, b, values,
                                                          fwd_ts, bwd_ts)


def _vjp_bwd(st, res, dy):
  x, a, b, values, fwd_ts, bwd_ts = res
  # dx = dy W^T: the same kernel on W^T = scale b^T a^T + S^T (tiles bn x bk),
  # with dy b^T as its rank-r activations. The barrier materializes the
  # transposed factors: in interpret mode XLA:CPU would fold them into the
  # kernel's bfloat16 dots, a form it cannot run.
  bt_, at_ = jax.lax.optimization_barrier((b.T, a.T))
  # dy b^T once, in float32: dx's rank-r activations and da's factor.
  dyb = jnp.dot(dy, bt_, preferred_element_type=jnp.float32)
  dx = _call_fwd(dy, dyb.astype(dy.dtype), at_, values[bwd_ts.order], bwd_ts,
                 st.scale, st.bt, st.bn, st.bk, st.chunk, st.interpret,
                 st.platform)
  da, db = lowrank_grads(x, dy, a, b, st.scale, dyb)
  dv_sorted = _call_dvals(x, dy, fwd_ts, st.bt, st.bk, st.bn, st.chunk,
                          st.interpret, st.platform)[:values.shape[0]]
  dv = jnp.zeros_like(dv_sorted).at[fwd_ts.order].set(dv_sorted)
  zero = lambda ts: jax.tree.map(jnp.zeros_like, ts)
  return (dx, da.astype(a.dtype), db.astype(b.dtype), dv.astype(values.dtype),
          zero(fwd_ts), zero(bwd_ts))


_sltrain.defvjp(_vjp_fwd, _vjp_bwd)
_sltrain_once = traced_once(_sltrain, (6,))


def zero_padded(x, a, b, indices, d_in: int, d_out: int, rank=None):
  """x (tokens, in), a (in, r), b (r, out) zero-padded to ``d_in`` inputs,
  ``d_out`` outputs and ``rank`` (default: r), and the support's flat
  indices into the padded (d_in, d_out) kernel (each entry keeps its row and
  column, so its tile order). The pads' and the caller's slice's gradients
  drop the padding. x may be None (kernels that pad it themselves)."""
  n_in, n_out, r = a.shape[0], b.shape[1], a.shape[1]
  pad = lambda v, axis, n: v if n == 0 or v is None else jnp.pad(
      v, [(0, n if i == axis else 0) for i in range(v.ndim)])
  extra = (rank or r) - r
  return (pad(x, 1, d_in - n_in), pad(pad(a, 0, d_in - n_in), 1, extra),
          pad(pad(b, 1, d_out - n_out), 0, extra),
          (indices // n_out) * d_out + indices % n_out)


def sltrain_matmul_pallas(x, a, b, values, indices, scale: float, *,
                          orders=None, block_tokens: int = 128,
                          block_in: int = DEFAULT_TILE,
                          block_out: int = DEFAULT_TILE,
                          chunk: int = DEFAULT_CHUNK,
                          interpret: bool | None = None,
                          platform: str | None = None):
  """``ops.sltrain_matmul`` without the dense kernel in device memory.

  Args:
    x: (..., in). a: (in, r). b: (r, out). values: (nnz,). indices: (nnz,)
      int32 flat indices into (in, out). scale: alpha / r.
    orders: optional (2, nnz) ``support_orders(indices, in, out)``; used when
      the kernel tiles are the default ones (else the support is sorted here).
    block_tokens, block_in, block_out: the token tile and the (in, out)
      kernel tile rebuilt on chip. chunk: sparse entries placed per step.
    interpret: interpret mode (default: on the CPU). platform: the backend to
      compile for (default: the default backend).

  Returns:
    (..., out).
  """
  d_in, d_out = a.shape[0], b.shape[1]
  x2, bt, interpret, platform = prepare(x, block_tokens, interpret, platform)
  plat = "cpu" if interpret else platform
  (bk, d_in_p), (bn, d_out_p) = (padded_dim(d_in, block_in, plat),
                                 padded_dim(d_out, block_out, plat))
  rank = padded_rank(a.shape[1], plat)
  why = supported(x2.shape[0], d_in_p, d_out_p, rank, bt, bk, bn, chunk,
                  plat, x2.dtype.itemsize)
  if why:
    raise ValueError(f"the SLTrain kernel cannot run these shapes: {why}")
  default = (tile_for(d_in, DEFAULT_TILE), tile_for(d_out, DEFAULT_TILE))
  if orders is not None and orders.shape != (2, indices.shape[0]):
    raise ValueError(f"orders must have shape (2, {indices.shape[0]}) (from "
                     f"support_orders), got {orders.shape}.")
  fwd_o, bwd_o = (orders[0], orders[1]) if (
      orders is not None and (bk, bn) == default) else (None, None)
  x2, a, b, idx = zero_padded(x2, a.astype(x.dtype), b.astype(x.dtype),
                              indices, d_in_p, d_out_p, rank)
  fwd_ts = tile_support(idx, d_in_p, d_out_p, bk, bn, chunk, fwd_o)
  t_idx = transposed_indices(idx, d_in_p, d_out_p)
  bwd_ts = tile_support(t_idx, d_out_p, d_in_p, bn, bk, chunk, bwd_o)
  st = _Static(float(scale), bt, bk, bn, chunk, interpret, platform)
  y = _sltrain_once(x2, a, b, values.astype(x.dtype), fwd_ts, bwd_ts, st)
  return y[:, :d_out].reshape(*x.shape[:-1], d_out)
