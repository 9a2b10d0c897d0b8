"""Monarch products (Dao et al. 2022), exactly as fly's ``blockdiag_butterfly_multiply``.

Factor layout (fly): ``w1`` (k, q, p) with k*p = n inputs; ``w2`` (l, s, r) with
l*r = k*q; the output has l*s features. Stage 1 maps each input block with
``w1[k]``; the k*q intermediate is flattened, viewed as (r, l) and transposed to
(l, r) (permutation P1); stage 2 maps each of the l blocks with ``w2[l]``; the
output index is ``s_idx * l + l_idx`` (permutation P2). Skipping either
permutation silently breaks checkpoint and projection compatibility.

The XLA path keeps activations block-major between the two batched matmuls and
uses a hand-written VJP whose residuals are already block-major: on the CPU the
transposes, not the matmuls, dominate, and autodiff re-derives them.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from structmat.ops.blockdiag import bmm, check_blockdiag


def monarch_shapes(in_features: int, out_features: int, nblocks: int,
                   inner: int | None = None):
  """Factor shapes fly's MonarchLinear uses for (in, out, nblocks).

  Block sizes are ceil(in/nb) and ceil(out/nb); the input is zero-padded and
  the output truncated. ``inner`` overrides the per-block intermediate size q
  (BTT uses q = nblocks * rank).

  Returns:
    (w1_shape, w2_shape, in_extended, out_extended).
  """
  if nblocks < 1:
    raise ValueError(f"nblocks must be >= 1, got {nblocks}.")
  if nblocks > min(in_features, out_features):
    raise ValueError(
        f"nblocks={nblocks} does not fit a {in_features}->{out_features} "
        f"layer: every block needs at least one input and one output; use "
        f"nblocks <= {min(in_features, out_features)}.")
  in_blk = math.ceil(in_features / nblocks)
  out_blk = math.ceil(out_features / nblocks)
  in_ext, out_ext = in_blk * nblocks, out_blk * nblocks
  if inner is None:
    inner = in_blk if in_ext < out_ext else out_blk
  return ((nblocks, inner, in_blk), (nblocks, out_blk, inner), in_ext, out_ext)


def _check(n: int, w1, w2):
  check_blockdiag(n, w1, "w1")
  if w2.ndim != 3:
    raise ValueError(f"w2 must have shape (l, s, r), got {w2.shape}.")
  k, q, _ = w1.shape
  l, _, r = w2.shape
  if l * r != k * q:
    raise ValueError(f"w2 {w2.shape} needs l*r == k*q = {k * q} (w1 {w1.shape}).")


def _perm(h, l: int, r: int):
  """P1 on block-major activations: [k, B, q] -> [l, B, r]."""
  _, b, _ = h.shape
  return h.transpose(1, 0, 2).reshape(b, r, l).transpose(2, 0, 1)


def _perm_t(z, k: int, q: int):
  """P1^T: [l, B, r] -> [k, B, q]."""
  _, b, _ = z.shape
  return z.transpose(1, 2, 0).reshape(b, k, q).transpose(1, 0, 2)


def _fwd(x, w1, w2, bias):
  k, q, p = w1.shape
  l, s, r = w2.shape
  b = x.shape[0]
  xt = x.reshape(b, k, p).transpose(1, 0, 2)        # [k, B, p]
  z = _perm(bmm(xt, w1, 2, 2), l, r)                 # [l, B, r]
  o = bmm(z, w2, 2, 2)                               # [l, B, s]
  # The bias is added block-major, before P2: fused with the output
  # transpose it costs an extra pass over y on the CPU.
  o = o + bias.reshape(s, l).T[:, None, :]
  y = o.transpose(1, 2, 0).reshape(b, s * l)         # P2: index s*l + l
  return y, (xt, z, w1, w2)


def _bwd(res, dy):
  xt, z, w1, w2 = res
  k, q, p = w1.shape
  l, s, _ = w2.shape
  b = dy.shape[0]
  do = dy.reshape(b, s, l).transpose(2, 0, 1)       # [l, B, s]
  dbias = jnp.sum(do, axis=1).T.reshape(s * l)
  dw2 = bmm(do, z, 1, 1)                             # [l, s, r]
  dh = _perm_t(bmm(do, w2, 2, 1), k, q)              # [k, B, q]
  dw1 = bmm(dh, xt, 1, 1)                            # [k, q, p]
  dx = bmm(dh, w1, 2, 1).transpose(1, 0, 2).reshape(b, k * p)
  return dx, dw1, dw2, dbias


@jax.custom_vjp
def _monarch_2d(x, w1, w2, bias):
  return _fwd(x, w1, w2, bias)[0]


_monarch_2d.defvjp(_fwd, _bwd)


def monarch_matmul(x, w1, w2, bias=None, impl: str = "xla"):
  """Monarch product, fly's ``blockdiag_butterfly_multiply(x, w1, w2)``.

  Args:
    x: (..., n) input, n = k*p.
    w1: (k, q, p) first block-diagonal factor.
    w2: (l, s, r) second factor, l*r = k*q.
    bias: optional (l*s,) added to the output (fused, cheaper than adding it
      afterwards).
    impl: "xla" (this function), "pallas" (the fused kernel, interpret mode on
      the CPU), "pallas:two_pass" / "pallas:fused" / "pallas:mgpu" (that
      kernel, off TPUs) or "auto" (on GPUs the materialized product where it
      is predicted faster, else the kernel on GPU/TPU where the shapes fit
      and measurements favor it, else this function); see
      ``structmat.kernels.dispatch``.

  Returns:
    (..., l*s). Differentiable in all arguments (reverse mode).
  """
  _check(x.shape[-1], w1, w2)
  n_out = w2.shape[0] * w2.shape[1]
  if bias is not None and bias.shape != (n_out,):
    raise ValueError(f"bias must have shape ({n_out},), got {bias.shape}.")
  if impl != "xla":
    from structmat.kernels import dispatch  # pylint: disable=import-outside-toplevel
    return dispatch.monarch(x, w1, w2, bias, impl)
  dtype = jnp.result_type(x, w1, w2)
  batch_shape = x.shape[:-1]
  if bias is None:
    bias = jnp.zeros((n_out,), dtype)
  y = _monarch_2d(x.reshape(-1, x.shape[-1]).astype(dtype), w1.astype(dtype),
                  w2.astype(dtype), bias.astype(dtype))
  return y.reshape(*batch_shape, y.shape[-1])


def gather_weights(w1, w2):
  """The factors regrouped by (output block l, input block k), q % l == 0.

  Output block l and input block k couple only through g = q/l intermediate
  indices: rows gi*l + l of w1[k] and columns k*g + gi of w2[l]. So

    A (l, k, g, p): A[l, k] = w1[k, l::l]
    B (l, k, s, g): B[l, k] = w2[l][:, k*g:(k+1)*g]

  and block (l, k) of the (out, in) Monarch matrix is B[l, k] @ A[l, k]; the
  product is y_l = sum_k (x_k @ A[l, k]^T) @ B[l, k]^T (the fused kernels'
  form).
  """
  k, q, p = w1.shape
  l, s, _ = w2.shape
  g = q // l
  a = w1.reshape(k, g, l, p).transpose(2, 0, 1, 3)
  b = w2.reshape(l, s, k, g).transpose(0, 2, 1, 3)
  return a, b


def monarch_to_dense(w1, w2):
  """The (n, l*s) kernel in flax (in, out) layout computed by ``monarch_matmul``.

  With q % l == 0 (every preset), one batched matmul of the regrouped
  factors (``gather_weights``: block (l, k) is B[l, k] @ A[l, k], contraction
  q/l; weight-sized, and autodiff gives its backward as two more), laid out
  (k, p) x (s, l) as the structured path orders inputs and outputs. Else the
  structured product of the identity (n x the per-token FLOPs).
  """
  k, q, p = w1.shape
  l, s, _ = w2.shape
  if q % l:
    return monarch_matmul(jnp.eye(k * p, dtype=w1.dtype), w1, w2)
  a, b = gather_weights(w1, w2)
  return jnp.einsum("lksg,lkgp->kpsl", b, a).reshape(k * p, s * l)


def monarch_matmul_dense(x, w1, w2, bias=None):
  """``monarch_matmul`` through the materialized matrix: W is built from the
  factors (a structured product of the identity), then one dense matmul.

  The same function (gradients included, through W's construction); faster
  on GPUs at small widths, where the structured path's permutations cost more
  than the dense FLOPs (``structmat.kernels.roofline``). Shapes as
  ``monarch_matmul``.
  """
  _check(x.shape[-1], w1, w2)
  dtype = jnp.result_type(x, w1, w2)
  y = x.astype(dtype) @ monarch_to_dense(w1.astype(dtype), w2.astype(dtype))
  return y if bias is None else y + bias.astype(dtype)


@functools.lru_cache(maxsize=None)
def _block_assignment(k: int, q: int, l: int, r: int):
  """Which (w1 row, w2 column) pairs form the (output block, input block) grid.

  Output row t*l + li and input column kk*p + i of the Monarch matrix couple
  only through the r-indices with (r*l + li) // q == kk; each such r pairs
  column r of w2[li] with row (r*l + li) % q of w1[kk]. Every w1 row and w2
  column belongs to exactly one block, so blocks are independent low-rank
  factorizations.

  Returns:
    dict (li, kk) -> (r indices, q indices) as int arrays.
  """
  del k
  out = {}
  for li in range(l):
    flat = np.arange(r) * l + li
    kk, qi = np.divmod(flat, q)
    for block in np.unique(kk):
      sel = kk == block
      out[(li, int(block))] = (np.nonzero(sel)[0], qi[sel])
  return out


def monarch_project(kernel, nblocks: int, inner: int | None = None):
  """Closed-form Frobenius-optimal projection of a dense kernel onto Monarch factors.

  Works for rectangular kernels and any ``nblocks`` (fly handles only square
  matrices with nblocks = sqrt(n)). The dense (out, in) matrix, indexed by
  strided rows (t*nb + li) and contiguous columns (kk*p + i), splits into an
  nb x nb grid of blocks; in a Monarch matrix block (li, kk) has rank at most
  the number of intermediate indices that connect them, and each factor row /
  column belongs to one block only, so a truncated SVD per block is optimal.
  Rows and columns that padding adds are "don't care": the SVD is taken on the
  valid part and the padded factor entries are zero.

  Args:
    kernel: (in_features, out_features) dense kernel (flax layout).
    nblocks: number of blocks of both factors.
    inner: per-block intermediate size q (default: fly's rule; BTT uses
      nblocks * rank).

  Returns:
    (w1, w2) with the shapes of ``monarch_shapes(in, out, nblocks, inner)``,
    in the kernel's dtype (the SVD runs in float32 or float64).
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D (in, out), got shape {kernel.shape}.")
  d_in, d_out = kernel.shape
  (k, q, p), (l, s, r), _, _ = monarch_shapes(d_in, d_out, nblocks, inner)
  work = kernel.astype(np.float64 if kernel.dtype == np.float64 else np.float32)
  m = work.T  # (out, in): y = M x
  w1 = np.zeros((k, q, p), work.dtype)
  w2 = np.zeros((l, s, r), work.dtype)
  for (li, kk), (r_idx, q_idx) in _block_assignment(k, q, l, r).items():
    rows = np.arange(s) * l + li
    rows = rows[rows < d_out]
    cols = np.arange(kk * p, min((kk + 1) * p, d_in))
    if rows.size == 0 or cols.size == 0:
      continue
    u, sv, vt = np.linalg.svd(m[np.ix_(rows, cols)], full_matrices=False)
    rank = min(len(r_idx), sv.size)
    root = np.sqrt(sv[:rank])
    # w2[li] and w1[kk] are views; index them separately so numpy keeps the
    # (rows, rank) / (rank, cols) axis order.
    w2[li][:rows.size, r_idx[:rank]] = u[:, :rank] * root
    w1[kk][q_idx[:rank], :cols.size] = root[:, None] * vt[:rank]
  return jnp.asarray(w1.astype(kernel.dtype)), jnp.asarray(w2.astype(kernel.dtype))
