"""Fused Monarch product for Mosaic TPU: tokens in lanes, blocks in sublanes.

On a TPU the whole product fits on chip: a token tile's stage-1 result
(n x tile) and both factors sit in VMEM, and the factors, whose block index
never changes, are copied in once for the whole grid. What TPUs cannot do
cheaply is move data across lanes, and fly's permutations (P1 between the
stages, P2 on the output) cut activations into pieces of q/l and 1 features.
So the kernel keeps activations transposed, (features, tokens): a permutation
of features is then a permutation of sublane rows, which aligned slices and
strided row stores do, and the only lane work is one 2-D transpose of each
input and output tile.

Layout: w1's rows are permuted once (weight-sized, in XLA) so that block k's
stage-1 output comes out l-major, ``w1p[k][li*g + j] = w1[k][j*l + li]`` with
g = q/l. The stage-1 result ``ht`` (k, q, tile) then holds stage-2 block li's
input at ``ht[:, li*g:(li+1)*g, :]``, which reshapes to (r, tile) in w2's own
r order (r = k*g + j), and stage 2 is a plain (s, r) @ (r, tile) matmul. P2
(output index s*l + li) is a strided store of those s rows into the
transposed output tile.

Forward: one program per token tile ("parallel"). Backward: one program per
token tile ("arbitrary": the grid runs in order and the float32 weight
gradients stay resident in VMEM, accumulated over tiles); it recomputes the
stage-1 result, so nothing activation-sized is saved besides x.

Where that fused backward cannot fit VMEM (whole factors, their transposes
and float32 gradients: LLaMA-7B's 1024-wide blocks need 71-142 MiB at 128
tokens), the split backward runs three kernels, none holding more than one
block's gradient: dx (the fused backward less its weight gradients: the
forward's footprint), dw2 on a (stage-2 block, token tile) grid, which
recomputes its block's stage-1 rows from that block's rows of w1 (1/l of
it), and dw1 on an (input block, token tile) grid, which recomputes its
block's stage-1 gradient from its rows of w2 (1/k of it). None writes an
intermediate to HBM; the price is reading dy l + k + 1 times and x l + 1
times (x's block once more), against once each.

Feature counts that are not multiples of 128 (GaLore's MLP widths: 1376 at
60M, 2736 at 350M, 5464 at 1B) are zero-padded per block (``padded_blocks``)
in VMEM only: the factors are padded in XLA (weight-sized); extra output
rows s of every w2 block land past the real outputs (P2 puts output
s_idx*l + li at the end for s_idx >= s), which are never stored; x's blocks
are read at unaligned lane offsets into the padded transposed tile (zero
rows between them), and dx written back the same way. Before session 24 x
was copied into the padded layout and y sliced in XLA: activation-sized
HBM copies at every layer. ``impl="auto"`` declines padded shapes
(``padding_problem``; unmeasured), ``impl="pallas"`` runs them.

Reference: ``structmat.ops.monarch_matmul``. ``structmat.kernels.monarch`` is
the portable (Triton) version.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from structmat.kernels import target
from structmat.kernels.monarch import layout_problem
from structmat.kernels.mosaic_tpu import (LANES, compiler_params,
                                          lane_chunks, matmul as _mm,
                                          vmem_budget, whole)
from structmat.kernels.shared_trace import traced_once


def permute_w1(w1, l: int):
  """(k, q, p) -> (k, q, p) with rows l-major: out[k][li*g + j] = w1[k][j*l + li]."""
  k, q, p = w1.shape
  return w1.reshape(k, q // l, l, p).transpose(0, 2, 1, 3).reshape(k, q, p)


def unpermute_w1(w1p, l: int):
  """Inverse of ``permute_w1`` (for gradients)."""
  k, q, p = w1p.shape
  return w1p.reshape(k, l, q // l, p).transpose(0, 2, 1, 3).reshape(k, q, p)


def _sublanes(itemsize: int) -> int:
  """Rows per VMEM tile: 8 for 32-bit, 16 for 16-bit (packed) dtypes."""
  return 8 * max(1, 4 // itemsize)


def vmem_estimate(block_tokens: int, w1_shape, w2_shape, itemsize: int,
                  backward: bool) -> int:
  """Bytes of VMEM the forward (or backward) program can need: its worst
  case, where XLA leaves every operand in HBM for the kernel to copy in.

  Token tiles of x / y (and dy / dx) are double-buffered by the pipeline;
  the factors and the backward's float32 weight gradients, whose window
  never moves, are single-buffered; scratch holds the transposed input, the
  stage-1 result and a float32 transposed output (backward: the transposed
  dy and dx in float32, the stage-1 gradient); plus one float32 128-token
  chunk of a transpose's temporaries and one float32 (block, tile) product.
  Checked against libtpu 0.0.42 for a v5e (``tools/tpu_compile.py``, which
  compiles with every operand left in HBM) at n = 1024, 2048, 4096 in 4 and
  16 blocks, 128-512 tokens, both dtypes: within 0.4-2.3 MiB above what
  libtpu allocated. n=4096 in 16 blocks, bf16: 12.0 / 29.0 MiB forward /
  backward at 128 tokens (14.1 / 31.1 here), 20.0 / 42.0 at 256 (22.3 /
  44.3); before session 21 this said 14 / 33 and 24 / 50, which kept the
  tile at 128 tokens and refused float32 (46.0 MiB backward, 50 said).
  """
  k, q, p = w1_shape
  l, s, r = w2_shape
  n_in, n_mid, n_out = k * p, k * q, l * s
  bt = block_tokens
  weights = (k * q * p + l * s * r) * itemsize
  temps = (LANES * max(n_in, n_out) + bt * max(p, s)) * 4
  if not backward:
    return (2 * bt * (n_in + n_out) * itemsize + weights
            + bt * (n_in + n_mid) * itemsize + bt * n_out * 4 + temps)
  return (2 * bt * (2 * n_in + n_out) * itemsize      # x, dy, dx tiles
          + weights + k * q * p * itemsize            # w1, w1^T, w2^T
          + (k * q * p + l * s * r) * 4               # weight gradients
          + bt * (n_in + 2 * n_mid) * itemsize        # x^T, stage 1, its grad
          + bt * (n_out + n_in) * 4 + temps)          # dy^T, dx^T


def split_vmem_estimates(block_tokens: int, w1_shape, w2_shape,
                         itemsize: int, padded: bool = False
                         ) -> dict[str, int]:
  """``vmem_estimate``'s worst case for each kernel of the split backward,
  by kernel name (``padded``: p was padded, so dw1 reads all of x). The
  weight blocks and gradient blocks of dw1 / dw2 move with the grid's
  first axis, so the pipeline double-buffers them."""
  k, q, p = w1_shape
  l, s, r = w2_shape
  n_in, n_mid, n_out = k * p, k * q, l * s
  bt, it, g = block_tokens, itemsize, q // l
  own = p % LANES == 0 and not padded
  x_cols = p if own else n_in                # dw1 reads its block, or all
  temps = (LANES * max(n_in, n_out) + bt * max(p, s)) * 4
  dyt = bt * n_out * 4
  return {
      "monarch_tpu_dx": (2 * bt * (n_in + n_out) * it
                         + (k * q * p + l * s * r) * it     # w1^T, w2^T
                         + dyt + bt * n_mid * it + bt * n_in * 4 + temps),
      "monarch_tpu_dw2": (2 * bt * (n_in + n_out) * it
                          + 2 * k * g * p * it + 2 * s * r * 4
                          + bt * (n_in + k * g) * it + dyt + temps),
      "monarch_tpu_dw1": (2 * bt * (x_cols + n_out) * it
                          + 2 * l * g * s * it + 2 * q * p * 4
                          + bt * (x_cols + q) * it + dyt + temps),
  }


def backward_form(block_tokens: int, w1_shape, w2_shape,
                  itemsize: int) -> str | None:
  """"fused" where the one-kernel backward fits the VMEM budget, else
  "split" where the three kernels each do, else None (the factors' shapes;
  estimated as the kernels run them, ``padded_blocks`` applied)."""
  padded = _padded(w1_shape, w2_shape, itemsize)
  budget = vmem_budget()
  if vmem_estimate(block_tokens, *padded, itemsize, True) <= budget:
    return "fused"
  split = split_vmem_estimates(block_tokens, *padded, itemsize,
                               padded[0] != tuple(w1_shape))
  return "split" if max(split.values()) <= budget else None


def padded_blocks(w1_shape, w2_shape, itemsize: int) -> tuple[int, int]:
  """(P, S): the block dims p and s zero-padded so that k*P and l*S are
  multiples of 128 lanes and P, S of a VMEM tile's rows (LLaMA-60M's MLP,
  4 blocks of 344: 352). Unpadded shapes give (p, s)."""
  k, _, p = w1_shape
  l, s, _ = w2_shape
  rows = _sublanes(itemsize)

  def up(v: int, blocks: int) -> int:   # blocks * v whole lanes, v whole rows
    step = math.lcm(rows, LANES // math.gcd(blocks, LANES))
    return -(-v // step) * step
  return up(p, k), up(s, l)


def padding_problem(w1_shape, w2_shape, itemsize: int) -> str | None:
  """Why ``impl="auto"`` keeps XLA for shapes the kernel runs padded."""
  p, s = w1_shape[2], w2_shape[1]
  pp, ss = padded_blocks(w1_shape, w2_shape, itemsize)
  if (pp, ss) != (p, s):
    return (f"blocks ({p=}, {s=}) pad to ({pp}, {ss}) for whole lanes "
            "(unaligned block reads and writes): never timed on a TPU; "
            "impl='pallas' runs them")
  return None


def supported(tokens: int, w1_shape, w2_shape, block_tokens: int,
              itemsize: int = 2) -> str | None:
  """None if the TPU kernel runs these shapes (p and s padded by
  ``padded_blocks``), else why not."""
  q, l = w1_shape[1], w2_shape[0]
  if why := layout_problem(w1_shape, w2_shape):
    return why
  if block_tokens % LANES:
    return (f"block_tokens={block_tokens}: tokens sit in lanes, so tiles "
            f"must be multiples of {LANES}")
  if tokens % block_tokens:
    return f"tokens {tokens} not a multiple of block_tokens {block_tokens}"
  rows = _sublanes(itemsize)
  dims = dict(q=q, g=q // l)
  bad = {name: v for name, v in dims.items() if v % rows}
  if bad:
    return (f"block dims {bad} must be multiples of {rows} (rows of a VMEM "
            f"tile for {itemsize}-byte elements; p and s are padded, q is not)")
  pw1, pw2 = _padded(w1_shape, w2_shape, itemsize)
  fwd = vmem_estimate(block_tokens, pw1, pw2, itemsize, False)
  budget = vmem_budget()
  if fwd > budget or not backward_form(block_tokens, w1_shape,
                                            w2_shape, itemsize):
    need = max(fwd, min(
        vmem_estimate(block_tokens, pw1, pw2, itemsize, True),
        max(split_vmem_estimates(block_tokens, pw1, pw2, itemsize,
                                 pw1 != tuple(w1_shape)).values())))
    fix = (f"fewer tokens per tile (>= {LANES}) or " if block_tokens > LANES
           else "16-bit activations or " if itemsize > 2 else "")
    return (f"block_tokens={block_tokens} needs ~{need >> 20} MiB of VMEM "
            f"(budget {budget >> 20} MiB): use {fix}smaller blocks "
            "(more of them)")
  return None


def _padded(w1_shape, w2_shape, itemsize: int):
  """The factor shapes as the kernels run them (``padded_blocks``)."""
  (k, q, _), (l, _, r) = w1_shape, w2_shape
  pp, ss = padded_blocks(w1_shape, w2_shape, itemsize)
  return (k, q, pp), (l, ss, r)


def fit_block_tokens(tokens: int, w1_shape, w2_shape, itemsize: int,
                     block_tokens: int = 512) -> int:
  """The largest tile of at most ``block_tokens`` (multiples of 128,
  halving) that ``supported`` accepts with the fused backward, else with
  the split one (a smaller tile keeps the fused backward: the split one
  reads activations more often); 128 when none does (``supported`` then
  says why)."""
  for form in ("fused", "split"):
    bt = block_tokens
    while bt >= LANES:
      if (supported(tokens, w1_shape, w2_shape, bt, itemsize) is None
          and backward_form(bt, w1_shape, w2_shape, itemsize) == form):
        return bt
      bt //= 2
  return LANES


def _transpose_in(v_ref, out_ref, dtype, blocks: int = 1):
  """out[features, tokens] = v[tokens, features]^T, per 128-token chunk;
  ``out_ref`` is (features, tile) or (tile/128, features, 128): Mosaic's
  strided row accesses need a base whose last dim is exactly 128 lanes, so
  the transposed output and dy live in that chunked form.

  Where out has more feature rows than v (``padded_blocks``), v's columns
  are ``blocks`` equal blocks, each landing at the start of one of out's
  and followed by zero rows: scratch starts undefined, and the zero
  weights facing the pad would turn NaN garbage into NaN (0 * NaN).
  Unaligned slices (1366 of LLaMA-1B's 5464 columns a block) cost lane
  shifts here, not an XLA copy of x into the padded layout in HBM.

  Transposes run in float32 (the XLU's 32-bit path; packed 16-bit
  transposes are not supported by every Mosaic version)."""
  bt, n = v_ref.shape
  width, padded = n // blocks, out_ref.shape[-2] // blocks
  for c, cols in enumerate(lane_chunks(bt)):
    def put(rows, value):
      if out_ref.ndim == 3:
        out_ref.at[c][rows, :] = value.astype(dtype)
      else:
        out_ref[rows, cols] = value.astype(dtype)
    if padded == width:
      put(slice(None), v_ref[cols, :].astype(jnp.float32).T)
      continue
    for b in range(blocks):
      put(pl.ds(b * padded, width), v_ref[cols, pl.ds(b * width, width)]
          .astype(jnp.float32).T)
      put(pl.ds(b * padded + width, padded - width),
          jnp.zeros((padded - width, LANES), jnp.float32))


def _transpose_out(vt_ref, out_ref, cols, blocks: int = 1):
  """out[cols, :] = vt[:, cols]^T, of vt's (features, tile) rows the first
  width of each of its ``blocks`` blocks where they are padded as
  ``_transpose_in`` pads."""
  n = out_ref.shape[1]
  width, padded = n // blocks, vt_ref.shape[0] // blocks
  if padded == width:
    out_ref[cols, :] = vt_ref[:, cols].T.astype(out_ref.dtype)
    return
  for b in range(blocks):
    out_ref[cols, pl.ds(b * width, width)] = (
        vt_ref[pl.ds(b * padded, width), cols].T.astype(out_ref.dtype))


def _stage1(w1p_ref, xt_ref, ht_ref, k: int, p: int):
  """ht[ki] = w1p[ki] @ x_ki^T for every input block (tokens in lanes)."""
  def body(ki, carry):
    rows = pl.ds(pl.multiple_of(ki * p, p), p)
    ht_ref[ki] = _mm(w1p_ref[ki], xt_ref[rows, :]).astype(ht_ref.dtype)
    return carry
  jax.lax.fori_loop(0, k, body, 0)


def _block_input(ht_ref, li, g: int, cols=slice(None)):
  """Stage-2 block li's input (r, tokens): rows li*g..(li+1)*g of every ht[k]."""
  k = ht_ref.shape[0]
  v = ht_ref[:, pl.ds(pl.multiple_of(li * g, g), g), cols]
  return v.reshape(k * g, v.shape[-1])


def _fwd_kernel(x_ref, w1p_ref, w2_ref, y_ref, xt_ref, ht_ref, yt_ref):
  k, q, p = w1p_ref.shape
  l, s, _ = w2_ref.shape
  g = q // l
  chunks = lane_chunks(x_ref.shape[0])
  _transpose_in(x_ref, xt_ref, xt_ref.dtype, blocks=k)
  _stage1(w1p_ref, xt_ref, ht_ref, k, p)

  def stage2(li, carry):
    o = _mm(w2_ref[li], _block_input(ht_ref, li, g))            # (s, tile)
    for c, cols in enumerate(chunks):                           # P2: s*l + li
      yt_ref.at[c][pl.ds(li, s, stride=l), :] = o[:, cols]
    return carry
  jax.lax.fori_loop(0, l, stage2, 0)
  for c, cols in enumerate(chunks):   # padded outputs (s_idx >= s) are last
    y_ref[cols, :] = yt_ref[c, :y_ref.shape[1], :].T.astype(y_ref.dtype)


def _backward(dyt_ref, w1pt_ref, w2t_ref, dht_ref, dxt_ref, chunks, dtype,
              xt_ref=None, ht_ref=None, dw1p_ref=None, dw2_ref=None):
  """dx^T (into dxt) from dy^T through both stages, the stage-1 gradient
  kept in dht (k, q, tile) l-major as ``ht``. With x^T, the stage-1 result
  and the weight gradients' refs, it accumulates those on the way."""
  dw = dw1p_ref is not None
  k, pp, q = w1pt_ref.shape
  l, _, ss = w2t_ref.shape
  g = q // l

  def stage2(li, carry):
    rows = pl.ds(pl.multiple_of(li * g, g), g)
    for c, cols in enumerate(chunks):
      do = dyt_ref.at[c][pl.ds(li, ss, stride=l), :].astype(dtype)  # P2^T
      if dw:
        dw2_ref[li] += _mm(do, _block_input(ht_ref, li, g, cols),
                           ((1,), (1,)))
      dh = _mm(w2t_ref[li], do).astype(dtype)                   # (r, 128)
      dht_ref[:, rows, cols] = dh.reshape(k, g, LANES)
    return carry
  jax.lax.fori_loop(0, l, stage2, 0)

  def stage1(ki, carry):
    rows = pl.ds(pl.multiple_of(ki * pp, pp), pp)
    dh = dht_ref[ki]                                            # (q, tile)
    if dw:
      dw1p_ref[ki] += _mm(dh, xt_ref[rows, :], ((1,), (1,)))
    dxt_ref[rows, :] = _mm(w1pt_ref[ki], dh)                    # (p, tile)
    return carry
  jax.lax.fori_loop(0, k, stage1, 0)


def _zero_on_first_tile(axis: int, *refs):
  """Zero the float32 gradients that the grid accumulates over its token
  tiles (grid axis ``axis``, run in order) at the first tile."""
  @pl.when(pl.program_id(axis) == 0)
  def _():
    for ref in refs:
      ref[...] = jnp.zeros_like(ref)


def _bwd_kernel(x_ref, dy_ref, w1p_ref, w1pt_ref, w2t_ref,
                dx_ref, dw1p_ref, dw2_ref,
                xt_ref, ht_ref, dyt_ref, dht_ref, dxt_ref):
  k, _, pp = w1p_ref.shape
  dtype = x_ref.dtype
  chunks = lane_chunks(x_ref.shape[0])
  _zero_on_first_tile(0, dw1p_ref, dw2_ref)
  _transpose_in(x_ref, xt_ref, dtype, blocks=k)
  _transpose_in(dy_ref, dyt_ref, jnp.float32)      # padded outputs: last
  _stage1(w1p_ref, xt_ref, ht_ref, k, pp)           # recomputed, not saved
  _backward(dyt_ref, w1pt_ref, w2t_ref, dht_ref, dxt_ref, chunks, dtype,
            xt_ref, ht_ref, dw1p_ref, dw2_ref)
  for cols in chunks:
    _transpose_out(dxt_ref, dx_ref, cols, blocks=k)


def _dx_kernel(dy_ref, w1pt_ref, w2t_ref, dx_ref, dyt_ref, dht_ref, dxt_ref):
  """The split backward's dx: ``_bwd_kernel`` without weight gradients."""
  k = w1pt_ref.shape[0]
  chunks = lane_chunks(dy_ref.shape[0])
  _transpose_in(dy_ref, dyt_ref, jnp.float32)
  _backward(dyt_ref, w1pt_ref, w2t_ref, dht_ref, dxt_ref, chunks,
            dx_ref.dtype)
  for cols in chunks:
    _transpose_out(dxt_ref, dx_ref, cols, blocks=k)


def _dw2_kernel(x_ref, dy_ref, w1p_ref, dw2_ref, xt_ref, ht_ref, dyt_ref):
  """dw2[li] over the token tiles, li = program_id(0): w1p_ref holds rows
  li*g..(li+1)*g of every permuted w1 block (k, g, p), so ``_stage1`` gives
  just block li's input (k, g, tile), i.e. (r, tile)."""
  k, _, pp = w1p_ref.shape
  _, ss, r = dw2_ref.shape
  l = dyt_ref.shape[1] // ss
  li = pl.program_id(0)
  _zero_on_first_tile(1, dw2_ref)
  _transpose_in(x_ref, xt_ref, x_ref.dtype, blocks=k)
  _transpose_in(dy_ref, dyt_ref, jnp.float32)
  _stage1(w1p_ref, xt_ref, ht_ref, k, pp)
  for c, cols in enumerate(lane_chunks(x_ref.shape[0])):
    do = dyt_ref.at[c][pl.ds(li, ss, stride=l), :].astype(x_ref.dtype)
    dw2_ref[0] += _mm(do, ht_ref[:, :, cols].reshape(r, LANES),
                      ((1,), (1,)))


def _dw1_kernel(x_ref, dy_ref, w2t_ref, dw1p_ref, xt_ref, dyt_ref, dht_ref):
  """dw1p[ki] over the token tiles, ki = program_id(0): w2t_ref holds rows
  ki*g..(ki+1)*g of every transposed w2 block (l, g, s), the ones that
  give block ki's stage-1 gradient (q, tile), l-major as ``ht``. x_ref is
  block ki's columns where they are whole lanes, else every block's."""
  l, g, ss = w2t_ref.shape
  pp = dw1p_ref.shape[2]
  dtype = x_ref.dtype
  ki = pl.program_id(0)
  chunks = lane_chunks(x_ref.shape[0])
  _zero_on_first_tile(1, dw1p_ref)
  blocks = xt_ref.shape[0] // pp
  _transpose_in(x_ref, xt_ref, dtype, blocks=blocks)
  _transpose_in(dy_ref, dyt_ref, jnp.float32)

  def stage2(li, carry):
    rows = pl.ds(pl.multiple_of(li * g, g), g)
    for c, cols in enumerate(chunks):
      do = dyt_ref.at[c][pl.ds(li, ss, stride=l), :].astype(dtype)
      dht_ref[rows, cols] = _mm(w2t_ref[li], do).astype(dtype)  # (g, 128)
    return carry
  jax.lax.fori_loop(0, l, stage2, 0)
  xk = xt_ref[pl.ds(pl.multiple_of(ki * pp, pp), pp), :] if blocks > 1 \
      else xt_ref[...]
  dw1p_ref[0] += _mm(dht_ref[...], xk, ((1,), (1,)))


def _call_fwd(x, w1p, w2, n_out, block_tokens, interpret):
  tokens, n_in = x.shape
  k, q, pp = w1p.shape
  l, ss, _ = w2.shape
  bt = block_tokens
  return pl.pallas_call(
      _fwd_kernel,
      out_shape=jax.ShapeDtypeStruct((tokens, n_out), x.dtype),
      grid=(tokens // bt,),
      in_specs=[pl.BlockSpec((bt, n_in), lambda i: (i, 0)),
                whole(w1p.shape), whole(w2.shape)],
      out_specs=pl.BlockSpec((bt, n_out), lambda i: (i, 0)),
      scratch_shapes=[pltpu.VMEM((k * pp, bt), x.dtype),
                      pltpu.VMEM((k, q, bt), x.dtype),
                      pltpu.VMEM((bt // LANES, l * ss, LANES), jnp.float32)],
      compiler_params=compiler_params(("parallel",), interpret),
      interpret=interpret,
      name="monarch_tpu_fwd",
  )(x, w1p, w2)


def _call_bwd(x, dy, w1p, w2, block_tokens, interpret):
  tokens, n_in = x.shape
  k, q, pp = w1p.shape
  l, ss, r = w2.shape
  bt = block_tokens
  w1pt = w1p.transpose(0, 2, 1)                      # (k, pp, q)
  w2t = w2.transpose(0, 2, 1)                        # (l, r, ss)
  f32 = jnp.float32
  return pl.pallas_call(
      _bwd_kernel,
      out_shape=(jax.ShapeDtypeStruct((tokens, n_in), x.dtype),
                 jax.ShapeDtypeStruct((k, q, pp), f32),
                 jax.ShapeDtypeStruct((l, ss, r), f32)),
      grid=(tokens // bt,),
      in_specs=[pl.BlockSpec((bt, n_in), lambda i: (i, 0)),
                pl.BlockSpec((bt, dy.shape[1]), lambda i: (i, 0)),
                whole(w1p.shape), whole(w1pt.shape), whole(w2t.shape)],
      out_specs=(pl.BlockSpec((bt, n_in), lambda i: (i, 0)),
                 whole((k, q, pp)), whole((l, ss, r))),
      scratch_shapes=[pltpu.VMEM((k * pp, bt), x.dtype),
                      pltpu.VMEM((k, q, bt), x.dtype),
                      pltpu.VMEM((bt // LANES, l * ss, LANES), f32),
                      pltpu.VMEM((k, q, bt), x.dtype),
                      pltpu.VMEM((k * pp, bt), f32)],
      # The weight gradients accumulate across token tiles: in order.
      compiler_params=compiler_params(("arbitrary",), interpret),
      interpret=interpret,
      name="monarch_tpu_bwd",
  )(x, dy, w1p, w1pt, w2t)


def _call_split_bwd(x, dy, w1p, w2, block_tokens, interpret):
  """The split backward's three kernels (module docstring): dx, dw1p, dw2."""
  tokens, n_in = x.shape
  n_out = dy.shape[1]
  k, q, pp = w1p.shape
  l, ss, r = w2.shape
  g, bt, f32 = q // l, block_tokens, jnp.float32
  w1pt = w1p.transpose(0, 2, 1)                      # (k, pp, q)
  w2t = w2.transpose(0, 2, 1)                        # (l, r, ss)
  tiles = tokens // bt
  by_tile = lambda b, t: (t, 0)                      # a whole token tile
  dyt = pltpu.VMEM((bt // LANES, l * ss, LANES), f32)
  dx = pl.pallas_call(
      _dx_kernel,
      out_shape=jax.ShapeDtypeStruct((tokens, n_in), x.dtype),
      grid=(tiles,),
      in_specs=[pl.BlockSpec((bt, n_out), lambda t: (t, 0)),
                whole(w1pt.shape), whole(w2t.shape)],
      out_specs=pl.BlockSpec((bt, n_in), lambda t: (t, 0)),
      scratch_shapes=[dyt, pltpu.VMEM((k, q, bt), x.dtype),
                      pltpu.VMEM((k * pp, bt), f32)],
      compiler_params=compiler_params(("parallel",), interpret),
      interpret=interpret,
      name="monarch_tpu_dx",
  )(dy, w1pt, w2t)
  # Gradient blocks accumulate over the token tiles (the inner axis, in
  # order); different blocks are independent.
  params = compiler_params(("parallel", "arbitrary"), interpret)
  dw2 = pl.pallas_call(
      _dw2_kernel,
      out_shape=jax.ShapeDtypeStruct((l, ss, r), f32),
      grid=(l, tiles),
      in_specs=[pl.BlockSpec((bt, n_in), by_tile),
                pl.BlockSpec((bt, n_out), by_tile),
                pl.BlockSpec((k, g, pp), lambda li, t: (0, li, 0))],
      out_specs=pl.BlockSpec((1, ss, r), lambda li, t: (li, 0, 0)),
      scratch_shapes=[pltpu.VMEM((k * pp, bt), x.dtype),
                      pltpu.VMEM((k, g, bt), x.dtype), dyt],
      compiler_params=params, interpret=interpret, name="monarch_tpu_dw2",
  )(x, dy, w1p)
  # dw1 reads only its input block of x where blocks are whole lanes.
  own = pp % LANES == 0 and pp * k == n_in
  x_spec = (pl.BlockSpec((bt, pp), lambda ki, t: (t, ki)) if own
            else pl.BlockSpec((bt, n_in), by_tile))
  dw1p = pl.pallas_call(
      _dw1_kernel,
      out_shape=jax.ShapeDtypeStruct((k, q, pp), f32),
      grid=(k, tiles),
      in_specs=[x_spec, pl.BlockSpec((bt, n_out), by_tile),
                pl.BlockSpec((l, g, ss), lambda ki, t: (0, ki, 0))],
      out_specs=pl.BlockSpec((1, q, pp), lambda ki, t: (ki, 0, 0)),
      scratch_shapes=[pltpu.VMEM((pp if own else k * pp, bt), x.dtype),
                      dyt, pltpu.VMEM((q, bt), x.dtype)],
      compiler_params=params, interpret=interpret, name="monarch_tpu_dw1",
  )(x, dy, w2t)
  return dx, dw1p, dw2


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _monarch(x, w1, w2, n_out, block_tokens, backward, interpret):
  del backward
  w1p = permute_w1(w1, w2.shape[0])
  return _call_fwd(x, w1p, w2, n_out, block_tokens, interpret)


def _vjp_fwd(x, w1, w2, n_out, block_tokens, backward, interpret):
  y = _monarch(x, w1, w2, n_out, block_tokens, backward, interpret)
  return y, (x, w1, w2)


def _vjp_bwd(n_out, block_tokens, backward, interpret, res, dy):
  del n_out   # dy's width
  x, w1, w2 = res
  l = w2.shape[0]
  call = _call_bwd if backward == "fused" else _call_split_bwd
  dx, dw1p, dw2 = call(x, dy, permute_w1(w1, l), w2, block_tokens, interpret)
  return dx, unpermute_w1(dw1p, l).astype(w1.dtype), dw2.astype(w2.dtype)


_monarch.defvjp(_vjp_fwd, _vjp_bwd)
_monarch_once = traced_once(_monarch, (3, 4, 5, 6))


def monarch_matmul_tpu(x, w1, w2, *, block_tokens: int = 512,
                       backward: str | None = None,
                       interpret: bool | None = None):
  """Fused Monarch product for TPUs, same contract as ``ops.monarch_matmul``
  (no bias).

  Args:
    x: (..., k*p). w1: (k, q, p). w2: (l, s, r) with l*r = k*q and q % l == 0.
    block_tokens: tokens per program, a multiple of 128 (lanes).
    backward: "fused" (one kernel) or "split" (three, for factors whose
      fused backward exceeds VMEM); None: ``backward_form``'s choice.
    interpret: interpret mode (default: off a TPU).

  Returns:
    (..., l*s), in x's dtype (intermediate rounded to it, as the reference).
  """
  from structmat.ops.monarch import _check  # the reference's shape checks
  _check(x.shape[-1], w1, w2)
  if interpret is None:
    interpret = target.platform() != "tpu"
  x2 = x.reshape(-1, x.shape[-1])
  why = supported(x2.shape[0], w1.shape, w2.shape, block_tokens,
                  x2.dtype.itemsize)
  if why:
    raise ValueError(f"the TPU Monarch kernel cannot run these shapes: {why}")
  (_, _, p), (l, s, _) = w1.shape, w2.shape
  pp, ss = padded_blocks(w1.shape, w2.shape, x2.dtype.itemsize)
  if backward is None:
    backward = backward_form(block_tokens, w1.shape, w2.shape,
                             x2.dtype.itemsize)
  if backward not in ("fused", "split"):
    raise ValueError(f"backward={backward!r}: use 'fused', 'split' or None")
  w1, w2 = w1.astype(x.dtype), w2.astype(x.dtype)
  # x and y keep their widths: the kernel pads blocks in VMEM. The weights
  # are padded here (weight-sized copies).
  if pp != p:   # zero columns after every input block
    w1 = jnp.pad(w1, ((0, 0), (0, 0), (0, pp - p)))
  if ss != s:   # zero rows: outputs s_idx*l + li >= l*s, never stored
    w2 = jnp.pad(w2, ((0, 0), (0, ss - s), (0, 0)))
  y = _monarch_once(x2, w1, w2, l * s, block_tokens, backward, interpret)
  return y.reshape(*x.shape[:-1], l * s)
