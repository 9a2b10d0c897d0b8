"""Monarch and block-diagonal ops against independent references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from tests.helpers import assert_close


def block_diag(blocks):
  """Independent numpy block_diag of (nb, rows, cols) blocks."""
  nb, r, c = blocks.shape
  out = np.zeros((nb * r, nb * c))
  for i in range(nb):
    out[i * r:(i + 1) * r, i * c:(i + 1) * c] = blocks[i]
  return out


def perm_matrix(rows, cols):
  """P with (P v) = v viewed as (rows, cols), transposed, flattened."""
  n = rows * cols
  p = np.zeros((n, n))
  for i in range(rows):
    for j in range(cols):
      p[j * rows + i, i * cols + j] = 1.0
  return p


def monarch_reference(w1, w2):
  """fly's product as explicit matrices: y = P2 R2 P1 R1 x, returned (out, in)."""
  w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
  k, q, _ = w1.shape
  l, s, r = w2.shape
  r1 = block_diag(w1)          # (k*q, k*p)
  p1 = perm_matrix(r, l)       # flat (r, l) -> (l, r)
  r2 = block_diag(w2)          # (l*s, l*r)
  p2 = perm_matrix(l, s)       # (l, s) -> (s, l)
  return p2 @ r2 @ p1 @ r1


SHAPES = [  # (w1 shape, w2 shape)
    ((4, 4, 4), (4, 4, 4)),          # square, nb = sqrt(n)
    ((2, 8, 8), (2, 8, 8)),
    ((4, 6, 10), (3, 7, 8)),         # awkward: k != l
    ((8, 2, 3), (4, 5, 4)),
    ((3, 5, 7), (5, 3, 3)),
]


@pytest.mark.parametrize("s1,s2", SHAPES)
def test_monarch_matches_explicit_permutations(s1, s2):
  k1, k2, k3 = jax.random.split(jax.random.key(sum(s1) + sum(s2)), 3)
  w1 = jax.random.normal(k1, s1)
  w2 = jax.random.normal(k2, s2)
  n = s1[0] * s1[2]
  x = jax.random.normal(k3, (2, 3, n))
  m = monarch_reference(w1, w2)
  y = ops.monarch_matmul(x, w1, w2)
  assert y.shape == (2, 3, s2[0] * s2[1])
  assert_close(y, np.asarray(x, np.float64) @ m.T, rtol=1e-5, atol=1e-5)
  assert_close(ops.monarch_to_dense(w1, w2), m.T, atol=1e-5)


@pytest.mark.parametrize("s1,s2", SHAPES)
def test_monarch_gradients_match_dense(s1, s2):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
  w1 = jax.random.normal(k1, s1)
  w2 = jax.random.normal(k2, s2)
  x = jax.random.normal(k3, (5, s1[0] * s1[2]))
  g = jax.random.normal(k4, (5, s2[0] * s2[1]))

  def dense_ref(x, w1, w2):
    # Independent dense path: explicit permutation matrices built in jnp.
    k, q, p = w1.shape
    l, s, r = w2.shape
    r1 = jax.scipy.linalg.block_diag(*w1)
    r2 = jax.scipy.linalg.block_diag(*w2)
    m = (jnp.asarray(perm_matrix(l, s), jnp.float32) @ r2 @
         jnp.asarray(perm_matrix(r, l), jnp.float32) @ r1)
    return x @ m.T

  ga = jax.grad(lambda *a: jnp.sum(ops.monarch_matmul(*a) * g),
                argnums=(0, 1, 2))(x, w1, w2)
  gb = jax.grad(lambda *a: jnp.sum(dense_ref(*a) * g), argnums=(0, 1, 2))(
      x, w1, w2)
  for a, b, name in zip(ga, gb, ("dx", "dw1", "dw2")):
    assert_close(a, b, rtol=1e-4, atol=1e-4, what=name)


@pytest.mark.parametrize("s1,s2", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_materialized_monarch_matches_structured(s1, s2, dtype, tol):
  """The materialized form impl="auto" takes on GPUs at small widths: same
  values and gradients (factors and bias included) as the structured path."""
  k = jax.random.split(jax.random.key(sum(s1) * 3 + sum(s2)), 5)
  n_out = s2[0] * s2[1]
  args = (jax.random.normal(k[0], (2, 5, s1[0] * s1[2]), dtype),
          jax.random.normal(k[1], s1, dtype), jax.random.normal(k[2], s2, dtype),
          jax.random.normal(k[3], (n_out,), dtype))
  g = jax.random.normal(k[4], (2, 5, n_out), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * g)
  f32 = lambda a: a.astype(jnp.float32)
  assert_close(f32(ops.monarch_matmul_dense(*args)),
               f32(ops.monarch_matmul(*args)), rtol=tol, atol=tol)
  ga = jax.grad(loss(ops.monarch_matmul_dense), argnums=(0, 1, 2, 3))(*args)
  gb = jax.grad(loss(ops.monarch_matmul), argnums=(0, 1, 2, 3))(*args)
  for a, b, name in zip(ga, gb, ("dx", "dw1", "dw2", "dbias")):
    assert a.dtype == b.dtype == dtype
    assert_close(f32(a), f32(b), rtol=tol, atol=tol, what=name)
  assert ops.monarch_matmul_dense(args[0], *args[1:3]).shape == (2, 5, n_out)


def test_monarch_jit_matches_eager_and_bf16():
  w1 = jax.random.normal(jax.random.key(1), (4, 8, 8))
  w2 = jax.random.normal(jax.random.key(2), (4, 8, 8))
  x = jax.random.normal(jax.random.key(3), (16, 32))
  y = ops.monarch_matmul(x, w1, w2)
  assert_close(jax.jit(ops.monarch_matmul)(x, w1, w2), y)
  yb = ops.monarch_matmul(x.astype(jnp.bfloat16), w1.astype(jnp.bfloat16),
                          w2.astype(jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16
  assert_close(yb, y, rtol=5e-2, atol=5e-2)


def test_monarch_shape_errors():
  with pytest.raises(ValueError, match="w1"):
    ops.monarch_matmul(jnp.ones((2, 10)), jnp.ones((4, 4, 4)), jnp.ones((4, 4, 4)))
  with pytest.raises(ValueError, match="w2"):
    ops.monarch_matmul(jnp.ones((2, 16)), jnp.ones((4, 4, 4)), jnp.ones((3, 4, 4)))
  with pytest.raises(ValueError, match="nblocks"):
    ops.monarch_shapes(8, 4, 5)
  with pytest.raises(ValueError, match="bias must have shape"):
    ops.monarch_matmul(jnp.ones((2, 16)), jnp.ones((4, 4, 4)),
                       jnp.ones((4, 4, 4)), jnp.ones((3,)), impl="auto")


@pytest.mark.parametrize("shape", [(3, 4, 5), (8, 16, 8), (1, 7, 3)])
def test_blockdiag(shape):
  w = jax.random.normal(jax.random.key(0), shape)
  x = jax.random.normal(jax.random.key(1), (2, 3, shape[0] * shape[2]))
  ref = np.asarray(x, np.float64) @ block_diag(np.asarray(w, np.float64)).T
  assert_close(ops.blockdiag_matmul(x, w), ref, atol=1e-5)
  assert_close(ops.blockdiag_to_dense(w), block_diag(np.asarray(w)).T)


def _random_monarch_kernel(d_in, d_out, nb, inner=None, seed=0):
  (s1, s2, _, _) = ops.monarch_shapes(d_in, d_out, nb, inner)
  rng = np.random.default_rng(seed)
  w1, w2 = rng.normal(size=s1), rng.normal(size=s2)
  return np.asarray(ops.monarch_to_dense(jnp.asarray(w1, jnp.float32),
                                         jnp.asarray(w2, jnp.float32)),
                    np.float64)[:d_in, :d_out]


PROJ_CASES = [(64, 64, 2), (64, 64, 4), (64, 64, 8), (16, 16, 4),
              (48, 80, 4), (80, 48, 4), (50, 70, 4), (70, 50, 8), (33, 65, 2),
              (100, 36, 6)]


@pytest.mark.parametrize("d_in,d_out,nb", PROJ_CASES)
def test_projection_recovers_any_monarch(d_in, d_out, nb):
  kernel = _random_monarch_kernel(d_in, d_out, nb, seed=d_in + nb)
  w1, w2 = ops.monarch_project(kernel, nb)
  (s1, s2, _, _) = ops.monarch_shapes(d_in, d_out, nb)
  assert w1.shape == s1 and w2.shape == s2
  rec = np.asarray(ops.monarch_to_dense(w1, w2), np.float64)[:d_in, :d_out]
  err = np.linalg.norm(rec - kernel) / np.linalg.norm(kernel)
  assert err < 1e-5, err


@pytest.mark.parametrize("nb,rank", [(4, 1), (4, 2), (8, 1), (3, 2)])
def test_projection_recovers_btt(nb, rank):
  kernel = _random_monarch_kernel(48, 40, nb, inner=nb * rank, seed=nb)
  w1, w2 = ops.monarch_project(kernel, nb, inner=nb * rank)
  rec = np.asarray(ops.monarch_to_dense(w1, w2), np.float64)[:48, :40]
  assert np.linalg.norm(rec - kernel) / np.linalg.norm(kernel) < 1e-5


@pytest.mark.parametrize("d_in,d_out,nb", [(64, 64, 4), (48, 80, 4), (50, 70, 4)])
def test_projection_is_optimal(d_in, d_out, nb):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(d_in, d_out)).astype(np.float32)
  w1, w2 = ops.monarch_project(kernel, nb)

  def sq_err(w1, w2):
    rec = ops.monarch_to_dense(w1, w2)[:d_in, :d_out]
    return jnp.sum((rec - kernel) ** 2)

  def err(w1, w2):
    return float(sq_err(w1, w2))

  base = err(w1, w2)
  assert 0 < base < float(np.sum(kernel ** 2))
  for i in range(20):
    k1, k2 = jax.random.split(jax.random.key(i))
    eps = 1e-2 if i % 2 else 1e-1
    e = err(w1 + eps * jax.random.normal(k1, w1.shape),
            w2 + eps * jax.random.normal(k2, w2.shape))
    assert e >= base * (1 - 1e-5), (i, e, base)
  # And the gradient of the error vanishes at the projection (a stationary point).
  g = jax.grad(sq_err, argnums=(0, 1))(w1, w2)
  assert max(float(jnp.abs(a).max()) for a in g) < 1e-2 * np.sqrt(base)


def test_projection_error_matches_methods_note():
  # METHODS.md: a random dense 64->256 matrix keeps relative error ~0.755.
  kernel = np.random.default_rng(0).normal(size=(64, 256))
  w1, w2 = ops.monarch_project(kernel, 4)
  rec = np.asarray(ops.monarch_to_dense(w1, w2))[:64, :256]
  rel = np.linalg.norm(rec - kernel) / np.linalg.norm(kernel)
  assert 0.70 < rel < 0.80, rel
