"""Low-rank, PHM, sparse-plus-low-rank and NOLA ops against explicit references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.ops import nola
from tests.helpers import assert_close


@pytest.mark.parametrize("shape,rank", [((40, 24), 5), ((24, 40), 24), ((32, 32), 1)])
def test_lowrank_project_is_eckart_young(shape, rank):
  kernel = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  u, v = ops.lowrank_project(kernel, rank)
  assert u.shape == (shape[0], rank) and v.shape == (rank, shape[1])
  s = np.linalg.svd(kernel.astype(np.float64), compute_uv=False)
  err = np.linalg.norm(np.asarray(u @ v, np.float64) - kernel)
  np.testing.assert_allclose(err, np.sqrt(np.sum(s[rank:] ** 2)), atol=1e-3)
  # sqrt(S) split: both factors carry the same singular values.
  np.testing.assert_allclose(np.linalg.norm(u, axis=0), np.linalg.norm(v, axis=1),
                             rtol=1e-4)


def test_lowrank_project_bad_rank():
  with pytest.raises(ValueError, match="rank"):
    ops.lowrank_project(np.ones((4, 6)), 5)


def phm_reference(rule, w):
  return sum(np.kron(np.asarray(rule[i], np.float64), np.asarray(w[i], np.float64))
             for i in range(rule.shape[0]))


@pytest.mark.parametrize("n,d_in,d_out", [(2, 6, 4), (4, 8, 12), (3, 9, 6)])
def test_phm_kernel_and_matmul(n, d_in, d_out):
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(n), 5)
  rule = jax.random.normal(k1, (n, n, n))
  w = jax.random.normal(k2, (n, d_in // n, d_out // n))
  x = jax.random.normal(k3, (2, 3, d_in))
  ref = phm_reference(rule, w)
  assert_close(ops.phm_kernel(rule, w), ref, atol=1e-5)
  assert_close(ops.phm_matmul(x, rule, w), np.asarray(x, np.float64) @ ref,
               atol=1e-4)
  s = jax.random.normal(k4, (n, d_in // n, 2))
  t = jax.random.normal(k5, (n, 2, d_out // n))
  ref_f = phm_reference(rule, np.einsum("ibr,ird->ibd", s, t))
  assert_close(ops.phm_kernel(rule, (s, t)), ref_f, atol=1e-4)
  assert_close(ops.phm_matmul(x, rule, (s, t)), np.asarray(x, np.float64) @ ref_f,
               atol=1e-4)


def test_sltrain_ops():
  key = jax.random.key(3)
  idx = ops.draw_support(key, 12, 10, 0.1)
  assert idx.dtype == jnp.int32 and idx.shape == (12,)
  assert np.all(np.diff(np.asarray(idx)) > 0)  # sorted, without replacement
  assert np.array_equal(idx, ops.draw_support(key, 12, 10, 0.1))
  k1, k2, k3, k4 = jax.random.split(key, 4)
  a = jax.random.normal(k1, (12, 3))
  b = jax.random.normal(k2, (3, 10))
  vals = jax.random.normal(k3, (12,))
  x = jax.random.normal(k4, (4, 12))
  dense = np.zeros(120)
  dense[np.asarray(idx)] = np.asarray(vals)
  ref = 0.5 * np.asarray(a, np.float64) @ np.asarray(b) + dense.reshape(12, 10)
  assert_close(ops.sltrain_kernel(a, b, vals, idx, 0.5), ref, atol=1e-5)
  assert_close(ops.sltrain_matmul(x, a, b, vals, idx, 0.5),
               np.asarray(x, np.float64) @ ref, atol=1e-4)


@pytest.mark.parametrize("shape,thresholded", [
    ((100, 100, 0.03), True), ((48, 200, 0.2), True), ((7, 300, 0.011), True),
    ((30, 30, 0.5), False)])
def test_draw_support_threshold_path_equals_a_full_sort(monkeypatch, shape,
                                                        thresholded):
  """The support is the nnz smallest keys whichever way they are found: the
  thresholded candidates, the fallback when the threshold kept too few or
  too many (forced here), and a sort of every key (dense supports go there
  directly)."""
  from structmat.ops import sparse_lowrank as sl  # pylint: disable=import-outside-toplevel
  nnz = max(1, int(shape[2] * shape[0] * shape[1]))
  size = shape[0] * shape[1]
  real = sl._candidates  # pylint: disable=protected-access
  forms = {"threshold": real,
           "full sort": lambda n, s: (s, s),
           "too few kept": lambda n, s: (max(1, n // 2), s - 1),
           "too many kept": lambda n, s: (real(n, s)[0], n)}
  assert (real(nnz, size)[1] < size) == thresholded
  for seed in range(4):
    got = {}
    for name, form in forms.items():
      monkeypatch.setattr(sl, "_candidates", form)
      got[name] = np.asarray(sl.draw_support(jax.random.key(seed), *shape))
    ref = got["full sort"]
    assert ref.shape == (nnz,) and np.all(np.diff(ref) > 0)
    assert 0 <= ref[0] and ref[-1] < size
    for name, idx in got.items():
      assert np.array_equal(idx, ref), (name, seed)


def test_draw_support_is_uniform():
  """Every position is drawn with probability density, independently of
  where it lies (a chi-square over 10,000 positions and 2,000 supports)."""
  draws, d_in, d_out, density = 2000, 100, 100, 0.03
  keys = jax.random.split(jax.random.key(7), draws)
  idx = jax.jit(jax.vmap(lambda k: ops.draw_support(k, d_in, d_out, density)))(
      keys)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=d_in * d_out)
  nnz = int(density * d_in * d_out)
  assert counts.sum() == draws * nnz
  p = nnz / (d_in * d_out)
  mean, var = draws * p, draws * p * (1 - p)
  chi2 = ((counts - mean) ** 2 / var).sum()
  dof = d_in * d_out
  assert abs(chi2 - dof) < 8 * np.sqrt(2 * dof), chi2
  # No drift across the matrix: the first and last thousand positions.
  for part in (counts[:1000], counts[-1000:]):
    assert abs(part.mean() - mean) < 8 * np.sqrt(var / 1000), part.mean()


@pytest.mark.parametrize("k,chunk", [(7, 3), (8, 8), (5, 32), (1, 1)])
def test_nola_combine_matches_stacked_bases(k, chunk):
  key_data = jax.random.key_data(jax.random.key(11))
  shape = (6, 3)
  coeffs = jax.random.normal(jax.random.key(1), (k,))
  bases = nola.nola_bases_dense(key_data, k, shape)
  assert float(jnp.abs(bases).max()) <= 1 / np.sqrt(k) + 1e-6
  assert_close(ops.combine_bases(coeffs, key_data, shape, chunk),
               jnp.tensordot(coeffs, bases, 1), atol=1e-5)
  g = jax.random.normal(jax.random.key(2), shape)
  grad = jax.grad(lambda c: jnp.sum(ops.combine_bases(c, key_data, shape, chunk) * g))(coeffs)
  assert_close(grad, jnp.tensordot(bases, g, 2), atol=1e-5)


def test_nola_residuals_hold_no_basis():
  key_data = jax.random.key_data(jax.random.key(0))
  k, shape = 64, (32, 8)
  coeffs = jax.random.normal(jax.random.key(1), (k,))
  _, vjp = jax.vjp(lambda c: ops.combine_bases(c, key_data, shape, 16), coeffs)
  sizes = [leaf.size for leaf in jax.tree.leaves(vjp)]
  basis_size = shape[0] * shape[1]
  assert sizes and max(sizes) < basis_size, sizes
