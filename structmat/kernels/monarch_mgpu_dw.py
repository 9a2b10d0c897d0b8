"""Monarch weight gradients for Mosaic GPU (Hopper): dw1 and dw2 with wgmma.

In the block-wise form of ``monarch_mgpu`` (out_l = sum_k (x_k @ U[l,k]) @
V[l,k], U = A^T (p, g), V = B^T (g, s), g = q/l) the weight gradients of one
block pair are two independent chains:

    dU[l,k]   = x_k^T  @ (do_l @ B[l,k])     (p, g)
    dV^T[l,k] = do_l^T @ (x_k  @ U[l,k])     (s, g)  = dB[l,k]

Both are one generic kernel, out[a, b] = sum_tokens pt_a^T-tile @ (q_b-tile @
w[a, b]), run twice with the roles swapped (pt = x^T, q = do, w = B for dU;
pt = do^T, q = x, w = U for dB). One CTA per (a, b, token chunk) holds w[a, b]
in shared memory (TMA, once) and streams 64-token tiles:

    h   = q_b tile @ w[a,b]   wgmma (64 x n) @ (n x g), f32 -> SMEM (16 bit)
    acc += pt_a tile @ h      wgmma (m x 64) @ (64 x g): the tokens are K

with the next tile's two loads in flight during the wgmmas where shared
memory allows (and, with ``warpgroups=2``, two consumer warpgroups taking
turns at the tiles, each accumulating its own partial). Each chunk writes a
float32 partial that XLA sums (no races; the chunks keep the GPU busy when
l*k is small), as the portable kernel does.

The pt operand is the activation transposed, (features, tokens): its M is a
block's features, its K the tokens. Compiled, and in jax >= 0.12's
interpreter, the kernel loads the (tokens, features) tile and hands wgmma its
transposed shared-memory view (``views``); jax 0.10.2's interpreter has no
transposed views, so there XLA transposes x and do once (one pass over each)
and the kernel loads (features, tokens) tiles. Both forms cross-lower for an
H100. Splitting dU and dB into two kernels costs no recomputation (each chain
needs only its own stage-1 product) and halves the accumulators' registers.
Scope (``supported``): 16-bit dtypes, tokens a multiple of 64, p and s
multiples of 64 (wgmma's M), q/l as ``monarch_mgpu`` takes it.
Reference: the VJP of ``structmat.ops.monarch_matmul``.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from structmat.kernels import monarch as mk
from structmat.kernels import monarch_mgpu as mg

TILE = mg.TILE
# f32 accumulator registers a thread may hold (128 threads per warpgroup; 255
# registers at most, the rest for addresses and the loop).
ACC_REGS = 160


def _smem(m: int, n: int, g: int, itemsize: int, slots: int,
          wgs: int = 1) -> int:
  """Shared memory of one CTA: w[a, b] and, per warpgroup, ``slots`` pairs of
  (pt, q) tiles, the stage-1 tile and the float32 output staging."""
  return (n * g * itemsize
          + wgs * ((slots * (m * TILE + TILE * n) + TILE * g) * itemsize
                   + m * g * 4))


def _slots(m: int, n: int, g: int, itemsize: int, wgs: int = 1) -> int:
  return 2 if _smem(m, n, g, itemsize, 2, wgs) <= mg.SMEM_BUDGET else 1


def _fit_wgs(m: int, n: int, g: int, itemsize: int, wgs: int) -> int:
  """``wgs`` where shared memory holds their tiles (one pair each), else 1."""
  return wgs if _smem(m, n, g, itemsize, 1, wgs) <= mg.SMEM_BUDGET else 1


def _problems(w1_shape, w2_shape):
  """The two chains' (m, n, g): dU has m=p, n=s; dB has m=s, n=p."""
  _, q, p = w1_shape
  l, s, _ = w2_shape
  g = q // l
  return (p, s, g), (s, p, g)


def supported(tokens: int, w1_shape, w2_shape, dtype) -> str | None:
  """None if the Mosaic GPU weight-gradient kernels run these shapes, else
  why not (the caller then takes the portable kernels or XLA)."""
  if why := mg.operand_problem(tokens, w1_shape, w2_shape, dtype):
    return why
  (p, s, g), _ = _problems(w1_shape, w2_shape)
  if g > 256:
    return f"q/l={g} must be <= 256 (wgmma's N)"
  if p % 64 or s % 64:
    return f"p={p} and s={s} must be multiples of 64 (wgmma's M)"
  for m, n, _ in _problems(w1_shape, w2_shape):
    regs = (m + TILE) * g // 128
    if regs > ACC_REGS:
      return (f"a {m} x {g} float32 accumulator and the 64 x {g} stage-1 "
              f"product need {regs} registers per thread (at most "
              f"{ACC_REGS})")
    need = _smem(m, n, g, jnp.dtype(dtype).itemsize, 1)
    if need > mg.SMEM_BUDGET:
      return (f"a {n} x {g} factor, {m}- and {n}-wide token tiles need "
              f"{need // 1024} KiB of shared memory (budget "
              f"{mg.SMEM_BUDGET // 1024} KiB)")
  return None


def views(interpret: bool) -> bool:
  """Whether wgmma may take a transposed shared-memory view here: compiled
  always; jax 0.10.2's interpreter cannot (jax 0.12's can)."""
  return not interpret or jax.__version_info__ >= (0, 12)


def _chain(pt, q, w, interpret: bool, transposed: bool, wgs: int = 1):
  """out[a, b] = sum_t pt_a^T[:, t] @ (q[t, b-block] @ w[a, b]).

  pt: (tokens, A*m), or with ``transposed`` (A*m, tokens) already in XLA;
  q (tokens, B*n), w (A, B, n, g) -> (chunks * wgs, A, B, m, g) float32
  partial sums over token chunks (and, with ``wgs`` consumer warpgroups
  taking turns at a chunk's tiles, over warpgroups).
  """
  tokens = q.shape[0]
  na, nb, n, g = w.shape
  m = (pt.shape[0] if transposed else pt.shape[1]) // na
  dtype = q.dtype
  chunks = mg._chunks(tokens // TILE, na * nb)  # pylint: disable=protected-access
  per_chunk = tokens // TILE // chunks
  tr = mg._transforms(g, dtype.itemsize)  # pylint: disable=protected-access
  wgs = _fit_wgs(m, n, g, dtype.itemsize, wgs)
  slots = _slots(m, n, g, dtype.itemsize, wgs)

  def body(pt_g, q_g, w_g, o_g, w_s, pt_s, q_s, h_s, o_s, wbar, tbar):
    a = jax.lax.axis_index("a")
    b = jax.lax.axis_index("b")
    c = jax.lax.axis_index("c")
    wg = jax.lax.axis_index("wg") if wgs > 1 else 0
    pt_w, q_w, h_w, o_w = pt_s.at[wg], q_s.at[wg], h_s.at[wg], o_s.at[wg]
    bar = lambda slot, i: tbar.at[(wg * slots + slot) * 2 + i]

    # one copy of the factor block, every warpgroup waits on it
    mg.once_per_cta(wgs, wg, lambda: plgpu.copy_gmem_to_smem(
        w_g.at[a, b], w_s, wbar.at[0]))

    def load(step, slot):
      cols = pl.ds((c * per_chunk + step * wgs + wg) * TILE, TILE)
      plgpu.copy_gmem_to_smem(q_g.at[cols, pl.ds(b * n, n)], q_w.at[slot],
                              bar(slot, 0))
      feats = pl.ds(a * m, m)
      plgpu.copy_gmem_to_smem(
          pt_g.at[feats, cols] if transposed else pt_g.at[cols, feats],
          pt_w.at[slot], bar(slot, 1))

    # the next tile's loads, where this warpgroup has one at turn t
    prefetch = lambda t, slot: pl.when(mg.has_tile(t, per_chunk, wgs, wg))(
        lambda: load(t, slot))
    prefetch(0, 0)
    plgpu.barrier_wait(wbar.at[0])

    def run(acc):
      def tile(t):
        slot = t % slots if slots > 1 else 0
        if slots > 1:  # the other slot's wgmmas finished last iteration
          prefetch(t + 1, 1 - slot)
        plgpu.barrier_wait(bar(slot, 0))

        def stage1(h_acc):
          plgpu.wgmma(h_acc, q_w.at[slot], w_s)
          plgpu.wgmma_wait(0)
          h_w[...] = h_acc[...].astype(dtype)

        pl.run_scoped(stage1, plgpu.ACC((TILE, g), jnp.float32))
        plgpu.commit_smem()  # h is read by the async proxy next
        plgpu.barrier_wait(bar(slot, 1))
        plgpu.wgmma(acc, pt_w.at[slot] if transposed else pt_w.at[slot].T,
                    h_w)
        plgpu.wgmma_wait(0)
        if slots == 1:  # the one buffer is free now
          prefetch(t + 1, 0)

      mg.each_turn(per_chunk, wgs, wg, tile)
      o_w[...] = acc[...]

    pl.run_scoped(run, plgpu.ACC((m, g), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_w, o_g.at[c * wgs + wg, a, b])
    plgpu.wait_smem_to_gmem(0)

  threads = dict(num_threads=wgs, thread_name="wg") if wgs > 1 else {}
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((chunks * wgs, na, nb, m, g), jnp.float32),
      scratch_types=[plgpu.SMEM((n, g), dtype, transforms=tr),
                     plgpu.SMEM((wgs, slots, *((m, TILE) if transposed else
                                               (TILE, m))), dtype,
                                transforms=tr),
                     plgpu.SMEM((wgs, slots, TILE, n), dtype, transforms=tr),
                     plgpu.SMEM((wgs, TILE, g), dtype, transforms=tr),
                     plgpu.SMEM((wgs, m, g), jnp.float32),
                     plgpu.Barrier(num_barriers=1),
                     plgpu.Barrier(num_barriers=2 * wgs * slots)],
      grid=(na, nb, chunks), grid_names=("a", "b", "c"), **threads,
      interpret=mg.interpret_params(interpret),
  )(pt, q, w.astype(dtype))


def weight_grads(x, do, w1, w2, interpret: bool, warpgroups: int = 1):
  """(dw1, dw2) in float32.

  Args:
    x: (tokens, k*p). do: (tokens, l*s), dy with P2 undone (block-major
      columns, as ``monarch_mgpu``'s dx takes it). w1: (k, q, p). w2: (l, s, r).
    interpret: Mosaic GPU's interpreter. warpgroups: consumer warpgroups per
      CTA where shared memory holds their tiles (1 or 2).
  """
  a, b = mk.gather_weights(w1, w2)          # (l, k, g, p), (l, k, s, g)
  tr = not views(interpret)
  pt = (lambda v: v.T) if tr else (lambda v: v)
  # dU[l, k] = x_k^T @ (do_l @ B[l, k]): rows indexed by k first.
  du = _chain(pt(x), do, b.transpose(1, 0, 2, 3), interpret, tr,
              warpgroups).sum(0)
  # dB[l, k] = do_l^T @ (x_k @ U[l, k]), U = A^T.
  db = _chain(pt(do), x, a.transpose(0, 1, 3, 2), interpret, tr,
              warpgroups).sum(0)
  # du (k, l, p, g) -> dA (l, k, g, p); db is dB (l, k, s, g).
  return mk.scatter_weight_grads(du.transpose(1, 0, 3, 2), db)
