"""SLTrain's product materializing its kernel one block at a time.

``sltrain_matmul`` (XLA) builds the whole (in, out) kernel W = scale a b + S,
and autodiff keeps it from the forward to the backward pass: per layer a
dense copy of the weights in the compute dtype, plus a float32 dW in the
backward, which SLTrain's parameter savings exist to avoid (the official code
at least rebuilds W in its backward). Here the forward scans over column
blocks W[:, J] (y[:, J] = x W[:, J]) and the backward over row blocks W[I, :]
(dx[:, I] = dy W[I, :]^T, and dW[I, :] = x[:, I]^T dy read off into the
factor and value gradients), rebuilding each block from the factors; only
x and the factors are kept between the passes. So at most one block of W
and one of dW exist at a time, inside a loop, where no scheduler can hoist
them (a rebuild of the whole W in the backward got hoisted into the forward
by XLA:CPU's scheduler, saving nothing).

Blocks have ``block`` columns (rows); when that does not divide the width,
the last block starts early and overlaps the one before it (the overlap is
written twice with equal values and counted once in the gradients). Each
block's sparse part scatters the entries inside it (the others are dropped),
so a step costs the dense product, the block builds, and nnz per block.
"""
import functools

import jax
import jax.numpy as jnp


def _starts(n: int, block: int):
  """Block i covers [start_i, start_i + block) with start_i = min(i * block,
  n - block); the true (non-overlapping) part begins at i * block."""
  count = -(-n // block)
  lo = jnp.arange(count) * block
  return jnp.minimum(lo, n - block), lo


def _kernel_block(a, b, values, r, c, scale, start, block, axis):
  """W's columns (axis=1) or rows (axis=0) [start, start + block): (in,
  block) or (block, out), in float32 or the factors' dtype. ``r``, ``c``:
  the support's rows and columns."""
  d_out = b.shape[1]
  if axis == 1:
    low = a @ jax.lax.dynamic_slice_in_dim(b, start, block, 1)
    local, inside = r * block + (c - start), (c >= start) & (c < start + block)
  else:
    low = jax.lax.dynamic_slice_in_dim(a, start, block, 0) @ b
    local, inside = (r - start) * d_out + c, (r >= start) & (r < start + block)
  size = low.size
  # Entries outside the block go to an out-of-range index and are dropped
  # (one shared in-range target would serialize the scatter on GPUs).
  sparse = jnp.zeros((size,), values.dtype).at[
      jnp.where(inside, local, size)].add(values, mode="drop")
  return scale * low + sparse.reshape(low.shape)


def _identity(x):
  return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7))
def _blocked(fn, args, a, b, values, indices, scale, blocks):
  """y = fn(*args) @ W, W built a column block at a time; fn is elementwise
  (``_identity`` for a plain input)."""
  x = fn(*args)
  d_out = b.shape[1]
  block = blocks[0]
  starts, _ = _starts(d_out, block)
  row, col = indices // d_out, indices % d_out

  def body(y, start):
    w = _kernel_block(a, b, values, row, col, scale, start, block, 1)
    return jax.lax.dynamic_update_slice_in_dim(
        y, x @ w.astype(x.dtype), start, 1), None

  y, _ = jax.lax.scan(body, jnp.zeros((x.shape[0], d_out), x.dtype), starts)
  return y


def _fwd(fn, args, a, b, values, indices, scale, blocks):
  # Only the args are kept: the backward rebuilds fn(*args) a block at a time.
  return (_blocked(fn, args, a, b, values, indices, scale, blocks),
          (args, a, b, values, indices))


def _bwd(fn, scale, blocks, res, dy):
  args, a, b, values, indices = res
  d_out = b.shape[1]
  block = blocks[1]
  row, col = indices // d_out, indices % d_out
  starts, los = _starts(a.shape[0], block)

  def body(carry, start_lo):
    dargs, da, db, dv = carry
    start, lo = start_lo
    w = _kernel_block(a, b, values, row, col, scale, start, block, 0)
    # x[:, I] = fn(args[:, I]); its gradient dy W[I, :]^T goes to the args.
    xi, pull = jax.vjp(fn, *[jax.lax.dynamic_slice_in_dim(v, start, block, 1)
                             for v in args])
    parts = pull((dy @ w.astype(dy.dtype).T).astype(xi.dtype))
    dargs = tuple(jax.lax.dynamic_update_slice_in_dim(d, p.astype(d.dtype),
                                                      start, 1)
                  for d, p in zip(dargs, parts))
    dw = jnp.dot(xi.T, dy, preferred_element_type=jnp.float32)  # (block, out)
    # Rows before lo belong to the previous block (an overlapping last one).
    own = (jnp.arange(block) + start >= lo)[:, None]
    da = jax.lax.dynamic_update_slice_in_dim(
        da, scale * (dw @ b.astype(jnp.float32).T), start, 0)
    ai = jax.lax.dynamic_slice_in_dim(a, start, block, 0).astype(jnp.float32)
    db = db + scale * (ai.T @ jnp.where(own, dw, 0.0))
    mine = (row >= lo) & (row < start + block)
    dv = dv + jnp.where(mine, dw[jnp.clip(row - start, 0, block - 1), col], 0.0)
    return (dargs, da, db, dv), None

  init = (tuple(jnp.zeros(v.shape, dy.dtype) for v in args),
          jnp.zeros(a.shape, jnp.float32), jnp.zeros(b.shape, jnp.float32),
          jnp.zeros(values.shape, jnp.float32))
  (dargs, da, db, dv), _ = jax.lax.scan(body, init, (starts, los))
  return (tuple(d.astype(v.dtype) for d, v in zip(dargs, args)),
          da.astype(a.dtype), db.astype(b.dtype), dv.astype(values.dtype),
          None)


_blocked.defvjp(_fwd, _bwd)


def sltrain_matmul_blocked(x, a, b, values, indices, scale: float, block: int):
  """``sltrain_matmul`` with at most a ``block``-wide slice of the kernel
  (and of its gradient) in memory at a time, none kept between the passes.

  Args:
    x: (..., in). a: (in, r). b: (r, out). values: (nnz,). indices: (nnz,)
      int32 flat indices into (in, out). scale: alpha / r.
    block: columns per forward block and rows per backward block (at most
      the width; the last block overlaps when it does not divide it).

  Returns:
    (..., out) in x's dtype (each kernel block is cast to it, as
    ``sltrain_matmul`` casts the whole kernel).
  """
  if x.shape[-1] != a.shape[0]:
    raise ValueError(f"x has {x.shape[-1]} features, the kernel "
                     f"{a.shape[0]} rows.")
  return sltrain_matmul_blocked_of(_identity, (x,), a, b, values, indices,
                                   scale, block)


def sltrain_matmul_blocked_of(fn, args, a, b, values, indices, scale: float,
                              block: int):
  """``sltrain_matmul_blocked(fn(*args), ...)`` without keeping fn(*args).

  For an input that is an elementwise function of other activations (the
  LLaMA MLP's down projection takes silu(gate) * up): the backward rebuilds
  each row block's x[:, I] = fn(*args[:, I]) from the args, which the model
  keeps anyway, instead of keeping x as a residual (a (tokens, in) buffer
  per layer that XLA's own autodiff of the whole-kernel path avoids by
  recomputing the product in its backward fusions).

  Args:
    fn: elementwise in its arguments (column blocks independent).
    args: arrays of shape (..., in), fn(*args) has shape (..., in).
    Others: as ``sltrain_matmul_blocked``.

  Returns:
    (..., out) in fn's output dtype.
  """
  d_in, d_out = a.shape[0], b.shape[1]
  shape = args[0].shape
  if any(v.shape != shape for v in args) or shape[-1] != d_in:
    raise ValueError(f"args must all have shape (..., {d_in}), got "
                     f"{[v.shape for v in args]}.")
  if block < 1:
    raise ValueError(f"block={block}: use a positive number of columns.")
  y = _blocked(fn, tuple(v.reshape(-1, d_in) for v in args), a, b, values,
               indices, float(scale), (min(block, d_out), min(block, d_in)))
  return y.reshape(*shape[:-1], d_out)
