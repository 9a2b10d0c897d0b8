"""SLTrain's reconstruct-and-multiply for Mosaic TPU: y = x (scale a @ b + S)
with each W column block rebuilt once in VMEM, never in device memory.

The grid is (column blocks J, token tiles i), token tiles innermost and in
order: at i == 0 the program builds W[:, J] (in x bn_block) on chip, the
low-rank part as ``scale * a @ b[:, J]`` and the sparse part from the block's
own entries, then every token tile multiplies by it. So W is built once per
step in total (about dense FLOPs x rank / tokens extra) rather than once per
token tile as in the portable (Triton) kernel, which has no scratch to keep
it in.

Sparse entries are placed with one-hot matmuls, entries in lanes:
(bk x chunk) row one-hots times the (bn_block x chunk) column one-hots
scaled by the values, contracted over the chunk. TPUs load lane vectors only
at 128-aligned offsets, so the support is laid out padded: the entries of
each default (bk, bn) tile (the tiles whose order the SLTrain layer stores
at init, ``sltrain.support_orders``) start at a fresh 128-entry chunk row of
(chunks, 128) arrays. That layout is a scatter computed from the stored
order (no sort in a training step); padding slots hold value 0.

Feature counts off whole lanes (LLaMA's 1376- and 5461-wide MLPs): the
factors and the support are laid out zero-padded to whole lanes (rank x
features, small), x and y are not. Each program copies x's tile into a
lane-padded VMEM scratch whose pad lanes it zeroes (stale VMEM there times
W's zero pad rows could be NaN), and the last column block of y lies
partly past its end: Pallas stores only the lanes inside (libtpu 0.0.42
compiles such blocks; the TPU interpreter runs them with NaN-filled memory
in the tests).

Backward: dx is the same kernel on W^T (support of W^T, its own stored
order); the factor gradients are low-rank XLA matmuls; dvalues accumulates
G_J = x^T dy[:, J] over token tiles in VMEM and reads off the block's
entries at the last tile (a sampled dense-dense product; G is never written).
Reference: ``structmat.ops.sltrain_matmul``; portable kernel:
``structmat.kernels.sltrain``.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from structmat.kernels import sltrain as sk
from structmat.kernels import target
from structmat.kernels.mosaic_tpu import (LANES, compiler_params,
                                          lane_chunks, matmul as _mm,
                                          vmem_budget, whole)
from structmat.kernels.shared_trace import traced_once

CHUNK = 128          # entries per one-hot placement step: one lane row
_SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)   # whole array, scalar memory


class PaddedSupport(NamedTuple):
  """A support laid out in 128-entry chunk rows, each default tile's entries
  starting a fresh row (tiles in row-major tile order)."""
  order: jax.Array    # (nnz,) tile-sorted position -> entry
  pos: jax.Array      # (nnz,) tile-sorted position -> padded slot
  rows: jax.Array     # (chunks, 128) row within the tile (padding: 0)
  cols: jax.Array     # (chunks, 128) column within the tile (padding: 0)
  start: jax.Array    # (tiles,) first chunk row of each tile
  count: jax.Array    # (tiles,) chunk rows of each tile


def num_chunks(nnz: int, tiles: int) -> int:
  """Static row count: each tile wastes less than one row."""
  return nnz // CHUNK + tiles + 1


def padded_dims(in_features: int, out_features: int):
  """(in, out, bk, bn): the feature counts zero-padded to whole lanes and
  the (bk, bn) tiles the support is grouped by. The tiles are the unpadded
  layer's default ones (``sltrain.tile_for``) wherever they divide the
  padded dims, so the tile orders the layer stores at init stay valid (a
  tile's order does not depend on how many tiles a row has)."""
  def dim(size):
    padded = -(-size // LANES) * LANES
    tile = sk.tile_for(size, sk.DEFAULT_TILE)
    return padded, (tile if padded % tile == 0
                    else sk.tile_for(padded, sk.DEFAULT_TILE))
  (d_in, bk), (d_out, bn) = dim(in_features), dim(out_features)
  return d_in, d_out, bk, bn


def padding_problem(in_features: int, out_features: int) -> str | None:
  """Why ``impl="auto"`` keeps XLA for feature counts the kernel pads."""
  d_in, d_out, _, _ = padded_dims(in_features, out_features)
  if (d_in, d_out) != (in_features, out_features):
    return (f"{in_features} -> {out_features} pads to {d_in} -> {d_out} for "
            "whole lanes (x's tiles in VMEM, the factors in device memory): "
            "never timed on a TPU; impl='pallas' runs it")
  return None


def _default_tiles(in_features: int, out_features: int):
  return (sk.tile_for(in_features, sk.DEFAULT_TILE),
          sk.tile_for(out_features, sk.DEFAULT_TILE))


def padded_support(indices, in_features: int, out_features: int,
                   order=None, tiles=None) -> PaddedSupport:
  """Lay the support out for the kernel at the (bk, bn) ``tiles`` (default:
  ``tile_for`` of the dims); ``order`` (``sltrain.tile_order`` at those
  tiles, as the layer stores it) skips the sort."""
  bk, bn = tiles or _default_tiles(in_features, out_features)
  ts = sk.tile_support(indices, in_features, out_features, bk, bn, CHUNK,
                       order)
  nnz = indices.shape[0]
  tiles = ts.offsets.shape[0] - 1
  counts = ts.offsets[1:] - ts.offsets[:-1]
  rows_per_tile = (counts + CHUNK - 1) // CHUNK
  start = (jnp.cumsum(rows_per_tile) - rows_per_tile).astype(jnp.int32)
  tile = sk._tile_of(indices[ts.order], out_features, bk, bn)  # pylint: disable=protected-access
  pos = (start[tile] * CHUNK + jnp.arange(nnz, dtype=jnp.int32)
         - ts.offsets[tile]).astype(jnp.int32)
  slots = num_chunks(nnz, tiles) * CHUNK
  lay = lambda v: (jnp.zeros((slots,), v.dtype).at[pos].set(v[:nnz])
                   .reshape(-1, CHUNK))
  return PaddedSupport(ts.order, pos, lay(ts.rows), lay(ts.cols), start,
                       rows_per_tile.astype(jnp.int32))


def _block_out(out_features: int) -> int:
  """Column block width: 256 where it divides (the v6e MXU width), else 128."""
  return 256 if out_features % 256 == 0 else LANES


def vmem_estimate(in_features: int, out_features: int, rank: int, nnz: int,
                  bt: int, itemsize: int, tiles=None,
                  padded: tuple = (False, False)) -> int:
  """Bytes of VMEM the larger of the forward (or dx) and dvalues programs
  plans for: the W block (float32 and x's dtype), the resident a and
  support, double-buffered tiles, one float32 tile of temporaries, and
  x's (dy's) tile padded to whole lanes where ``padded`` says the in (out)
  features are. ``tiles``: (bk, bn), default ``tile_for`` of the dims."""
  worst = 0
  bk, bn = tiles or _default_tiles(in_features, out_features)
  for d_in, d_out, tk, tn, pads in (
      (in_features, out_features, bk, bn, padded[0]),
      (out_features, in_features, bn, bk, padded[1])):
    nb = _block_out(d_out)
    tiles = (d_in // tk) * (d_out // tn)
    support = num_chunks(nnz, tiles) * CHUNK * 12
    w = d_in * nb * (4 + itemsize)
    x_pad = bt * d_in * itemsize if pads else 0
    fwd = (w + d_in * rank * itemsize + 2 * rank * nb * itemsize + support
           + 2 * bt * (d_in + nb) * itemsize + x_pad)
    # (dvalues runs in W's orientation only: x's padded tile if in pads)
    dvals = (d_in * nb * 4 + 2 * bt * (d_in + nb) * itemsize + support
             + bt * d_in * 4 + (bt * in_features * itemsize if padded[0]
                                else 0))
    worst = max(worst, fwd, dvals)
  return worst + bt * max(in_features, out_features) * 4


def supported(tokens: int, in_features: int, out_features: int, rank: int,
              nnz: int, bt: int, itemsize: int = 2) -> str | None:
  """None if the TPU kernel runs these shapes (feature counts padded to
  whole lanes by ``padded_dims``), else why not."""
  if bt % LANES:
    return f"block_tokens={bt} must be a multiple of {LANES}"
  if tokens % bt:
    return f"tokens={tokens} is not a multiple of block_tokens {bt}"
  d_in, d_out, bk, bn = padded_dims(in_features, out_features)
  need = vmem_estimate(d_in, d_out, rank, nnz, bt, itemsize, (bk, bn),
                       (d_in > in_features, d_out > out_features))
  budget = vmem_budget()
  if need > budget:
    fix = (f"fewer tokens per tile (>= {LANES})" if bt > LANES else
           "impl='xla' (or narrower layers): one column block of W does not "
           "fit even with the smallest tile")
    return (f"needs ~{need >> 20} MiB of VMEM (budget {budget >> 20} "
            f"MiB): use {fix}")
  return None


def _one_hots(rows_ref, cols_ref, m, col_offset, bk: int, nb: int):
  """(bk, CHUNK) row one-hots and (nb, CHUNK) column one-hots of chunk row m."""
  r = rows_ref[pl.ds(m, 1), :]                                  # (1, CHUNK)
  c = cols_ref[pl.ds(m, 1), :] + col_offset
  one_r = r == jax.lax.broadcasted_iota(jnp.int32, (bk, CHUNK), 0)
  one_c = c == jax.lax.broadcasted_iota(jnp.int32, (nb, CHUNK), 0)
  return one_r, one_c


def _for_each_tile(j, d_in: int, bk: int, bn: int, nb: int, n_tn: int, body):
  """``body(rows, t, c0)`` for the default tiles that make up column block
  j: ``rows`` the tile's row slice of the block, ``t`` its tile id, ``c0``
  its column offset in the block. Row tiles run in a loop (wide layers have
  dozens), the block's few sub-columns unrolled."""
  per = nb // bn

  def row_tile(k, carry):
    rows = pl.ds(pl.multiple_of(k * bk, bk), bk)
    for jj in range(per):
      body(rows, k * n_tn + j * per + jj, jj * bn)
    return carry
  jax.lax.fori_loop(0, d_in // bk, row_tile, 0)


def _padded_x(x_ref, xp_ref, i):
  """x's tile, (bt, n) with n off whole lanes, in the zero-padded (bt, d)
  VMEM scratch ``xp_ref`` (None: x_ref itself). The pad lanes are zeroed at
  each column block's first tile (a core's first use of its scratch) and
  never written after; x's lanes every tile."""
  if xp_ref is None:
    return x_ref
  n, d = x_ref.shape[1], xp_ref.shape[1]

  @pl.when(i == 0)
  def _():
    xp_ref[:, d - LANES:] = jnp.zeros((xp_ref.shape[0], LANES), xp_ref.dtype)
  xp_ref[:, :n] = x_ref[...]
  return xp_ref


def _fwd_kernel(start_ref, count_ref, x_ref, a_ref, b_ref, rows_ref, cols_ref,
                vals_ref, y_ref, w_ref, wd_ref, *xp, scale, bk, bn, n_tn):
  j, i = pl.program_id(0), pl.program_id(1)
  d_in, nb = w_ref.shape

  @pl.when(i == 0)
  def _build():
    # In float32: exact for 16-bit factors (their products fit float32's
    # mantissa), once per block; XLA:CPU (interpret mode) also lacks some
    # bfloat16 x bfloat16 -> float32 dot layouts.
    f32 = jnp.float32
    w_ref[...] = scale * _mm(a_ref[...].astype(f32), b_ref[...].astype(f32))

    def tile(rows, t, c0):
      def place(c, acc):
        m = start_ref[t] + c
        one_r, one_c = _one_hots(rows_ref, cols_ref, m, c0, bk, nb)
        v = vals_ref[pl.ds(m, 1), :]                             # float32
        return acc + _mm(one_r.astype(jnp.float32),
                         jnp.where(one_c, v, 0.0), ((1,), (1,)))
      w_ref[rows, :] += jax.lax.fori_loop(0, count_ref[t], place,
                                          jnp.zeros((bk, nb), jnp.float32))
    _for_each_tile(j, d_in, bk, bn, nb, n_tn, tile)
    wd_ref[...] = w_ref[...].astype(wd_ref.dtype)

  x = _padded_x(x_ref, xp[0] if xp else None, i)
  y_ref[...] = _mm(x[...], wd_ref[...]).astype(y_ref.dtype)


def _x_scratch(bt: int, n: int, d: int, dtype) -> list:
  """The VMEM scratch for x's tile padded from n to d lanes, if n < d."""
  return [pltpu.VMEM((bt, d), dtype)] if n < d else []


def _call_fwd(x, a, b, vals, ps: PaddedSupport, scale, bt, interpret,
              tiles, n_out):
  """x (tokens, n_in) @ W[:n_in, :n_out], W = scale a @ b + S (S given by
  ``ps``, ``vals`` laid out the same way): a (d_in, r) and b (r, d_out)
  zero-padded to whole lanes, x and the output not (x is padded per tile in
  VMEM; the last column block's lanes past n_out are not stored)."""
  tokens, n_in = x.shape
  d_in = a.shape[0]
  rank, d_out = b.shape
  bk, bn = tiles
  nb = _block_out(d_out)
  kernel = functools.partial(_fwd_kernel, scale=scale, bk=bk, bn=bn,
                             n_tn=d_out // bn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((tokens, n_out), x.dtype),
      grid=(d_out // nb, tokens // bt),
      in_specs=[_SMEM, _SMEM,
                pl.BlockSpec((bt, n_in), lambda j, i: (i, 0)),
                whole(a.shape),
                pl.BlockSpec((rank, nb), lambda j, i: (0, j)),
                whole(ps.rows.shape), whole(ps.cols.shape), whole(vals.shape)],
      out_specs=pl.BlockSpec((bt, nb), lambda j, i: (i, j)),
      scratch_shapes=[pltpu.VMEM((d_in, nb), jnp.float32),
                      pltpu.VMEM((d_in, nb), x.dtype),
                      *_x_scratch(bt, n_in, d_in, x.dtype)],
      compiler_params=compiler_params(("parallel", "arbitrary"), interpret),
      interpret=interpret,
      name="sltrain_tpu_fwd",
  )(ps.start, ps.count, x, a, b, ps.rows, ps.cols, vals)


def _dvals_kernel(start_ref, count_ref, x_ref, dy_ref, rows_ref, cols_ref,
                  dv_ref, g_ref, *xp, bk, bn, n_tn, n_i, n_out):
  j, i = pl.program_id(0), pl.program_id(1)
  d_in, nb = g_ref.shape
  bt = x_ref.shape[0]
  x_ref = _padded_x(x_ref, xp[0] if xp else None, i)

  def dy_rows(rows):
    dy = dy_ref[rows, :]
    if n_out % nb:
      # The last column block reads past dy's n_out columns (undefined
      # values): zeroed, as the read-off below contracts over G's columns.
      col = j * nb + jax.lax.broadcasted_iota(jnp.int32, dy.shape, 1)
      dy = jnp.where(col < n_out, dy, jnp.zeros_like(dy))
    return dy

  @pl.when((j == 0) & (i == 0))
  def _():
    dv_ref[...] = jnp.zeros_like(dv_ref)

  @pl.when(i == 0)
  def _():
    g_ref[...] = jnp.zeros_like(g_ref)

  # G_J += x_i^T dy_i: x transposed through the XLU in float32 (a transposed
  # left operand is not an MXU form), per 128-token chunk.
  for rows in lane_chunks(bt):
    xt = x_ref[rows, :].astype(jnp.float32).T.astype(x_ref.dtype)
    g_ref[...] += _mm(xt, dy_rows(rows))

  @pl.when(i == n_i - 1)
  def _read_off():
    def tile(rows, t, c0):
      g = g_ref[rows, :]                                        # (bk, nb)

      def pick(c, carry):
        m = start_ref[t] + c
        one_r, one_c = _one_hots(rows_ref, cols_ref, m, c0, bk, nb)
        at_cols = _mm(g, one_c.astype(jnp.float32))            # (bk, CHUNK)
        dv_ref[pl.ds(m, 1), :] = jnp.sum(jnp.where(one_r, at_cols, 0.0),
                                         axis=0, keepdims=True)
        return carry
      jax.lax.fori_loop(0, count_ref[t], pick, 0)
    _for_each_tile(j, d_in, bk, bn, nb, n_tn, tile)


def _call_dvals(x, dy, ps: PaddedSupport, bt, interpret, tiles, dims):
  """(chunks, 128) float32: G[row, col] for every slot of ``ps`` (padding
  slots hold G at the tile's corner; callers drop them). x (tokens, n_in)
  and dy (tokens, n_out) unpadded; ``dims``: (d_in, d_out), the padded
  feature counts ``ps`` is laid out for."""
  tokens, n_in = x.shape
  n_out = dy.shape[1]
  d_in, d_out = dims
  bk, bn = tiles
  nb = _block_out(d_out)
  kernel = functools.partial(_dvals_kernel, bk=bk, bn=bn, n_tn=d_out // bn,
                             n_i=tokens // bt, n_out=n_out)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(ps.rows.shape, jnp.float32),
      grid=(d_out // nb, tokens // bt),
      in_specs=[_SMEM, _SMEM,
                pl.BlockSpec((bt, n_in), lambda j, i: (i, 0)),
                pl.BlockSpec((bt, nb), lambda j, i: (i, j)),
                whole(ps.rows.shape), whole(ps.cols.shape)],
      out_specs=whole(ps.rows.shape),
      scratch_shapes=[pltpu.VMEM((d_in, nb), jnp.float32),
                      *_x_scratch(bt, n_in, d_in, x.dtype)],
      # One output array for every block: the whole grid runs in order on
      # one core.
      compiler_params=compiler_params(("arbitrary", "arbitrary"), interpret),
      interpret=interpret,
      name="sltrain_tpu_dvalues",
  )(ps.start, ps.count, x, dy, ps.rows, ps.cols)


def _layout_values(values, ps: PaddedSupport):
  """The values in ``ps``'s padded (chunks, 128) layout, in float32: the
  kernel reads one chunk row at a data-dependent index, which in a packed
  16-bit array (16 rows to a tile) Mosaic cannot prove aligned (libtpu
  refused the bfloat16 kernels so: "cannot statically prove that index in
  dimension 0 is a multiple of 8")."""
  slots = ps.rows.size
  return (jnp.zeros((slots,), jnp.float32)
          .at[ps.pos].set(values[ps.order].astype(jnp.float32))
          .reshape(ps.rows.shape))


class _Static(NamedTuple):
  scale: float
  bt: int
  interpret: object
  tiles: tuple   # (bk, bn) of W
  dims: tuple    # (in, out) unpadded; the factors are padded to whole lanes


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _sltrain(x, a, b, values, fwd_ps, bwd_ps, st: _Static):
  return _call_fwd(x, a, b, _layout_values(values, fwd_ps), fwd_ps, st.scale,
                   st.bt, st.interpret, st.tiles, st.dims[1])


def _vjp_fwd(x, a, b, values, fwd_ps, bwd_ps, st):
  return _sltrain(x, a, b, values, fwd_ps, bwd_ps, st), (x, a, b, values,
                                                          fwd_ps, bwd_ps)


def _vjp_bwd(st, res, dy):
  x, a, b, values, fwd_ps, bwd_ps = res
  # dx = dy W^T: the same kernel on W^T = scale b^T a^T + S^T.
  n_in, n_out = st.dims
  dx = _call_fwd(dy, b.T, a.T, _layout_values(values, bwd_ps), bwd_ps,
                 st.scale, st.bt, st.interpret, st.tiles[::-1], n_in)
  # Over the real rows of a and columns of b; zero for the pads (which the
  # wrapper's jnp.pad then drops).
  da, db = sk.lowrank_grads(x, dy, a[:n_in], b[:, :n_out], st.scale)
  da = jnp.pad(da, ((0, a.shape[0] - n_in), (0, 0)))
  db = jnp.pad(db, ((0, 0), (0, b.shape[1] - n_out)))
  dv_slots = _call_dvals(x, dy, fwd_ps, st.bt, st.interpret, st.tiles,
                         (a.shape[0], b.shape[1])).reshape(-1)
  dv = jnp.zeros(values.shape, jnp.float32).at[fwd_ps.order].set(
      dv_slots[fwd_ps.pos])
  zero = lambda ps: jax.tree.map(jnp.zeros_like, ps)
  return (dx, da.astype(a.dtype), db.astype(b.dtype), dv.astype(values.dtype),
          zero(fwd_ps), zero(bwd_ps))


_sltrain.defvjp(_vjp_fwd, _vjp_bwd)
_sltrain_once = traced_once(_sltrain, (6,))


def sltrain_matmul_tpu(x, a, b, values, indices, scale: float, *,
                       orders=None, block_tokens: int = 256,
                       interpret=None):
  """``ops.sltrain_matmul`` on a TPU without the dense kernel in device
  memory.

  Args:
    x: (..., in). a: (in, r). b: (r, out). values: (nnz,). indices: (nnz,)
      int32 flat indices into (in, out). scale: alpha / r.
    orders: optional (2, nnz) ``sltrain.support_orders(indices, in, out)``
      (stored by the layer at init): then nothing is sorted here.
    block_tokens: tokens per program, a multiple of 128.
    interpret: interpret mode (default: off a TPU); a
      ``pltpu.InterpretParams`` runs the TPU interpreter.

  Returns:
    (..., out).
  """
  d_in, d_out = a.shape[0], b.shape[1]
  if interpret is None:
    interpret = target.platform() != "tpu"
  x2 = x.reshape(-1, x.shape[-1])
  bt = min(block_tokens, x2.shape[0])
  why = supported(x2.shape[0], d_in, d_out, a.shape[1], indices.shape[0], bt,
                  x2.dtype.itemsize)
  if why:
    raise ValueError(f"the TPU SLTrain kernel cannot run these shapes: {why}")
  if orders is not None and orders.shape != (2, indices.shape[0]):
    raise ValueError(f"orders must have shape (2, {indices.shape[0]}) (from "
                     f"support_orders), got {orders.shape}.")
  d_in_p, d_out_p, bk, bn = padded_dims(d_in, d_out)
  fwd_o, bwd_o = (orders[0], orders[1]) if (
      orders is not None and (bk, bn) == _default_tiles(d_in, d_out)) else (
          None, None)
  # Feature counts off whole lanes: the factors are zero-padded here (rank
  # x features), x and y only in VMEM, per tile.
  _, a, b, idx = sk.zero_padded(None, a.astype(x.dtype), b.astype(x.dtype),
                                indices, d_in_p, d_out_p)
  fwd_ps = padded_support(idx, d_in_p, d_out_p, fwd_o, (bk, bn))
  bwd_ps = padded_support(sk.transposed_indices(idx, d_in_p, d_out_p),
                          d_out_p, d_in_p, bwd_o, (bn, bk))
  st = _Static(float(scale), bt, interpret, (bk, bn), (d_in, d_out))
  y = _sltrain_once(x2, a, b, values.astype(x.dtype), fwd_ps, bwd_ps, st)
  return y.reshape(*x.shape[:-1], d_out)
