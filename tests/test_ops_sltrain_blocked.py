"""SLTrain's product through a kernel materialized block by block: the same
values and gradients as the whole-kernel reference, and (XLA's own memory
accounting) no kernel-sized buffers per layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.layers import make_linear
from tests.helpers import assert_close

SHAPES = [  # (d_in, d_out, rank, block)
    (48, 80, 4, 16),     # blocks divide both widths
    (96, 40, 8, 28),     # neither: the last block overlaps the one before
    (40, 24, 3, 64),     # one block wider than the layer: the whole kernel
    (33, 50, 2, 1),      # one row / column at a time
]


def _inputs(d_in, d_out, rank, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed + d_in * d_out), 6)
  idx = ops.draw_support(k[0], d_in, d_out, 0.1)
  return (jax.random.normal(k[1], (2, 5, d_in)).astype(dtype),
          jax.random.normal(k[2], (d_in, rank)),
          jax.random.normal(k[3], (rank, d_out)),
          jax.random.normal(k[4], idx.shape), idx,
          jax.random.normal(k[5], (2, 5, d_out)))


@pytest.mark.parametrize("d_in,d_out,rank,block", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5),
                                       (jnp.bfloat16, 1e-2)])
def test_blocked_matches_whole_kernel(d_in, d_out, rank, block, dtype, tol):
  x, a, b, v, idx, g = _inputs(d_in, d_out, rank, dtype)
  whole = lambda *p: ops.sltrain_matmul(*p, idx, 0.5)
  blocked = lambda *p: ops.sltrain_matmul_blocked(*p, idx, 0.5, block)
  y = blocked(x, a, b, v)
  assert y.dtype == dtype and y.shape == (2, 5, d_out)
  f32 = lambda t: t.astype(jnp.float32)
  ref = f32(whole(x, a, b, v))
  assert_close(f32(y), ref, rtol=tol, atol=tol * float(jnp.abs(ref).max()))
  loss = lambda f: lambda *p: jnp.sum(f32(f(*p)) * g)
  want = jax.grad(loss(whole), argnums=(0, 1, 2, 3))(x, a, b, v)
  got = jax.grad(loss(blocked), argnums=(0, 1, 2, 3))(x, a, b, v)
  for u, w, name in zip(got, want, ("dx", "da", "db", "dvalues")):
    assert u.dtype == w.dtype, name
    assert_close(f32(u), f32(w), rtol=tol, atol=tol * float(jnp.abs(w).max()),
                 what=name)


def test_ops_and_layer_route_block():
  x, a, b, v, idx, _ = _inputs(40, 24, 3, jnp.float32)
  # ops.sltrain_matmul(block=...) is the blocked form (a scan in its jaxpr).
  jaxpr = str(jax.make_jaxpr(
      lambda x: ops.sltrain_matmul(x, a, b, v, idx, 0.5, block=8))(x))
  assert "scan" in jaxpr
  layer = make_linear("sltrain", features=24, rank=3, kernel_block=8)
  whole = make_linear("sltrain", features=24, rank=3)
  variables = layer.init(jax.random.key(0), x)
  # lora_b starts at zero: give it values so the low-rank path counts.
  variables = jax.tree_util.tree_map(
      lambda t: t + 0.1 if t.dtype == jnp.float32 else t, variables)
  assert_close(layer.apply(variables, x), whole.apply(variables, x),
               atol=1e-5)
  with pytest.raises(ValueError, match="kernel_block=-1"):
    make_linear("sltrain", features=24, rank=3, kernel_block=-1).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match="block=0"):
    ops.sltrain_matmul_blocked(x, a, b, v, idx, 0.5, 0)


def test_blocks_bound_the_step_memory():
  """XLA's memory analysis of a jitted gradient through six layers: the
  whole-kernel path holds about two kernels per layer (W kept for the
  backward, dW), the blocked one a fixed few blocks."""
  d, rank, layers = 512, 8, 6
  k = jax.random.split(jax.random.key(2), 4)
  idx = ops.draw_support(k[0], d, d, 0.03)
  params = [(jax.random.normal(k[1], (d, rank)) * 0.1,
             jax.random.normal(k[2], (rank, d)) * 0.1,
             jax.random.normal(k[3], idx.shape) * 0.1)] * layers
  x = jnp.ones((16, d))

  def temp_kernels(matmul):
    def loss(params):
      h = x
      for a, b, v in params:
        h = jnp.tanh(matmul(h, a, b, v))
      return h.sum()
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (d * d * 4)

  whole = temp_kernels(lambda h, a, b, v: ops.sltrain_matmul(h, a, b, v, idx,
                                                             0.5))
  blocked = temp_kernels(lambda h, a, b, v: ops.sltrain_matmul(
      h, a, b, v, idx, 0.5, block=64))
  assert whole >= layers, whole          # at least one kernel per layer
  assert blocked < 2, blocked            # a few 64-wide blocks in all
  np.testing.assert_array_less(4 * blocked, whole)
