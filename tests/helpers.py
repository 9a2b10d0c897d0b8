"""Test helpers shared by the test modules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def randomize(tree, seed=0, scale=0.5):
  """Replace every float leaf with fresh normals (never zeros), keep int leaves."""
  leaves, treedef = jax.tree.flatten(nn.unbox(tree))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [scale * jax.random.normal(k, l.shape, l.dtype)
         if jnp.issubdtype(l.dtype, jnp.floating) else l
         for k, l in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def assert_close(a, b, rtol=1e-5, atol=1e-5, what=""):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.abs(b).max()))
  np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)
