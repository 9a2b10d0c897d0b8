"""NOLA random-basis combinations (Koohpayegani et al. 2024), memory-lean.

A = sum_i c_i A_i over k frozen random bases A_i ~ U(-1, 1) / sqrt(k). Basis i
is drawn from ``fold_in(key, i)`` (threefry: identical on every backend and
independent of the chunk size). Forward and backward regenerate the bases chunk
by chunk inside a custom VJP, so neither parameters nor saved residuals hold
them and peak memory stays near one chunk of ``chunk`` bases.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def basis(key_data, index, shape, num_basis: int, dtype=jnp.float32):
  """Basis ``index`` of ``num_basis``: U(-1, 1) / sqrt(num_basis), of ``shape``."""
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), index)
  return (jax.random.uniform(key, shape, dtype, -1.0, 1.0)
          / math.sqrt(num_basis))


def _chunks(num_basis: int, chunk: int):
  chunk = max(1, min(chunk, num_basis))
  return chunk, -(-num_basis // chunk)


def _chunk_bases(key_data, c, chunk, shape, num_basis):
  idx = c * chunk + jnp.arange(chunk)
  return jax.vmap(lambda i: basis(key_data, i, shape, num_basis))(idx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def combine_bases(coeffs, key_data, shape, chunk):
  """sum_i coeffs[i] * basis(key_data, i, shape, len(coeffs)).

  Args:
    coeffs: (k,) float coefficients.
    key_data: uint32 key data (``jax.random.key_data``) of this layer's key.
    shape: static shape of each basis.
    chunk: how many bases are generated at once.

  Returns:
    float32 array of ``shape``.
  """
  return _combine(coeffs, key_data, shape, chunk)


def _combine(coeffs, key_data, shape, chunk):
  k = coeffs.shape[0]
  chunk, n = _chunks(k, chunk)
  padded = jnp.zeros((n * chunk,), jnp.float32).at[:k].set(
      coeffs.astype(jnp.float32))

  def body(c, acc):
    bases = _chunk_bases(key_data, c, chunk, shape, k)
    w = jax.lax.dynamic_slice(padded, (c * chunk,), (chunk,))
    return acc + jnp.tensordot(w, bases, axes=1)

  return jax.lax.fori_loop(0, n, body, jnp.zeros(shape, jnp.float32))


def _fwd(coeffs, key_data, shape, chunk):
  # Residuals: the key and the coefficients' dtype/size only, never a basis.
  return _combine(coeffs, key_data, shape, chunk), (key_data, coeffs)


def _bwd(shape, chunk, res, g):
  key_data, coeffs = res
  k = coeffs.shape[0]
  chunk, n = _chunks(k, chunk)

  def body(c, grads):
    bases = _chunk_bases(key_data, c, chunk, shape, k)
    gc = jnp.tensordot(bases, g.astype(jnp.float32), axes=len(shape))
    return jax.lax.dynamic_update_slice(grads, gc, (c * chunk,))

  grads = jax.lax.fori_loop(0, n, body, jnp.zeros((n * chunk,), jnp.float32))
  key_ct = np.zeros(key_data.shape, dtype=jax.dtypes.float0)
  return grads[:k].astype(coeffs.dtype), key_ct


combine_bases.defvjp(_fwd, _bwd)


def nola_bases_dense(key_data, num_basis: int, shape):
  """All bases stacked (num_basis, *shape): a test reference, never used in training."""
  return jnp.stack([basis(key_data, i, shape, num_basis)
                    for i in range(num_basis)])
