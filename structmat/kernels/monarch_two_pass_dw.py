"""Weight gradients of the two-pass Monarch as token-reduction kernels.

The two-pass backward (``monarch_two_pass``) leaves them to XLA:

  dw2[l, s, (k, g)] = sum_t do[t, l, s] h[t, k, l, g]
  dw1[k, (g, l), p] = sum_t dz[t, l, k, g] x[t, k, p]

For a batch over l (or k), h's (k, g) columns (dz's (l, g)) are not one
stride apart, which a GEMM library cannot address: XLA copies h and dz into
batch-major order first, two more passes over an activation each (on paper,
session 20: 14-18 passes for the two-pass forward+backward against XLA's
measured 0.815 ms, about 17 at the copy rate; which form XLA picks on a GPU
is unmeasured). Both are one kernel,

  out[a, c, m, :] = sum_t u[t, a, c] v[t, m, a, :]

which reads v's (bt, m, g) slices where they lie, as stage 2 reads h:
  dw2: u = do (t, l, s), v = h (t, k, l, g)  -> (l, s, k, g);
  dw1: u = x (t, k, p),  v = dz (t, l, k, g) -> (k, p, l, g), transposed
       (weight-sized) to w1's (k, g, l, p).
One program per (c chunk, m chunk, a, token chunk) holds a (mc*G, cc)
float32 accumulator over its tokens, (bt, mc*G)^T @ (bt, cc) per step: the
wider side as the dot's rows, which Hopper's wgmma wants >= 64 (offline, at
4096 in 4 blocks, cc = 16 rows compiled to mma.sync). XLA sums the token
chunks' partials and transposes them (weight-sized), as the fused kernel's
dw does.
Columns of u past c's end and v's padding past g would land only in output
rows and columns that are sliced off, but are masked (read as zeros): on a
GPU the last block's would lie past the array's end. Triton only, like
stage 2.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from structmat.kernels import monarch as mk
from structmat.kernels.portable import (LOOP_SMEM_BUDGET, TRITON_STAGES,
                                        compiler_params, pow2, split_count)
from structmat.kernels.triton_backend import GPU_PLATFORMS, plt

# The fused kernel's helpers (_next_pow2, _dot_tn) are used below.
# pylint: disable=protected-access

# float32 accumulator elements per program: 64 KB, as stage 2's.
ACC_ELEMENTS = 16384
MAX_C_TILE = mk.MAX_TRITON_BLOCK   # accumulator rows (u's columns) at most
MAX_TOKEN_STEP = 64                # the dots' inner (token) dim at most


class Plan(NamedTuple):
  """Tiles of one token reduction: u's column chunk, v's m chunk, v's padded
  g, the token step and the token chunks (programs per output block)."""
  cc: int
  mc: int
  gg: int
  bt: int
  chunks: int


def plan(tokens: int, a: int, c: int, m: int, g: int, itemsize: int,
         platform: str | None) -> Plan | None:
  """The tiles for out (a, c, m, g) from ``tokens`` tokens, or None where the
  kernel cannot take them (then XLA's contraction runs)."""
  gg = max(16, mk._next_pow2(g))
  if not pow2(m) or 16 * gg > ACC_ELEMENTS:
    return None
  mc = m
  while mc > 1 and mc * gg * 16 > ACC_ELEMENTS:
    mc //= 2
  cc = min(MAX_C_TILE, max(16, mk._next_pow2(c)),
           ACC_ELEMENTS // (mc * gg))
  bt = MAX_TOKEN_STEP
  while bt >= 16 and (tokens % bt or (
      platform in GPU_PLATFORMS and smem_estimate(bt, cc, mc, gg, itemsize)
      > LOOP_SMEM_BUDGET)):
    bt //= 2
  if bt < 16:
    return None
  blocks = a * -(-c // cc) * (m // mc)
  return Plan(cc, mc, gg, bt, split_count(tokens // bt, blocks))


def smem_estimate(bt: int, cc: int, mc: int, gg: int, itemsize: int) -> int:
  """Shared memory of the token loop: ``TRITON_STAGES`` buffers of each
  step's (bt, cc) and (bt, mc*G) slices."""
  return TRITON_STAGES * bt * (cc + mc * gg) * itemsize


def _kernel(u_ref, v_ref, o_ref, *, bt: int, n_steps: int, c: int, g: int):
  """o = sum over this program's tokens of u^T @ v (one output block).

  u_ref: (rows, cc), u's columns [c0, c0 + cc) of one a; v_ref: (rows, mc,
  G), v's slices of one a (strided); o_ref: (mc*G, cc) float32."""
  cc = u_ref.shape[1]
  mc, gg = v_ref.shape[1:]
  # The grid runs c chunks fastest (axis 0): those programs share v's slices.
  u_cols = pl.program_id(0) * cc + jax.lax.broadcasted_iota(
      jnp.int32, (bt, cc), 1)
  u_mask = u_cols < c
  v_mask = None if g == gg else (
      jax.lax.broadcasted_iota(jnp.int32, (bt, mc, gg), 2) < g)

  def step(t, acc):
    rows = pl.ds(t * bt, bt)
    u = plt.load(u_ref.at[rows, :], mask=u_mask, other=0)
    v_at = v_ref.at[rows, :, :]
    v = v_at[...] if v_mask is None else plt.load(v_at, mask=v_mask, other=0)
    return acc + mk._dot_tn(v.reshape(bt, mc * gg), u)

  o_ref[...] = jax.lax.fori_loop(0, n_steps, step,
                                 jnp.zeros((mc * gg, cc), jnp.float32))


def token_sum(u, v, tiles: Plan, interpret: bool, platform: str | None,
              name: str):
  """out[a, c, m, :] = sum_t u[t, a, c] v[t, m, a, :], float32.

  u: (tokens, A, C); v: (tokens, M, A, g), read in place; returns (A, C, M,
  g)."""
  c, g = u.shape[2], v.shape[3]
  return padded_sum(u, v, tiles, interpret, platform, name)[:, :c, :, :g]


def padded_sum(u, v, tiles: Plan, interpret: bool, platform: str | None,
               name: str):
  """``token_sum`` before its padding is sliced off: (A, C rounded up to
  whole cc chunks, M, G), zero past C and g (the masks)."""
  tokens, n_a, c = u.shape
  m, g = v.shape[1], v.shape[3]
  cc, mc, gg, bt, chunks = tiles
  n_c, n_m = -(-c // cc), m // mc
  rows = tokens // chunks
  out = pl.pallas_call(
      functools.partial(_kernel, bt=bt, n_steps=rows // bt, c=c, g=g),
      out_shape=jax.ShapeDtypeStruct((chunks, n_a, m * gg, n_c * cc),
                                     jnp.float32),
      # Triton launches axis 0 fastest: a token chunk's c chunks together.
      grid=(n_c, n_m, n_a, chunks),
      in_specs=[
          pl.BlockSpec((rows, None, cc), lambda ci, mi, ai, ti: (ti, ai, ci)),
          pl.BlockSpec((rows, mc, None, gg),
                       lambda ci, mi, ai, ti: (ti, mi, ai, 0))],
      out_specs=pl.BlockSpec((None, None, mc * gg, cc),
                             lambda ci, mi, ai, ti: (ti, ai, mi, ci)),
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(
          platform, 4, 8 if cc * mc * gg >= ACC_ELEMENTS else 4),
      name=name,
  )(u, v)
  return out.sum(0).reshape(n_a, m, gg, n_c * cc).transpose(0, 3, 1, 2)
