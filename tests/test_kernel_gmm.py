"""Block-diagonal product through megablox gmm: interpret mode against the XLA
reference (forward and gradients) and cross-lowering for a TPU v5e."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.kernels.blockdiag_gmm import (blockdiag_matmul_gmm,
                                             default_tiling)
from structmat.kernels.lowering import cross_lower


@pytest.mark.parametrize("tokens,wshape,dtype,tol", [
    (64, (2, 128, 128), jnp.float32, 1e-5),
    (48, (3, 256, 128), jnp.float32, 1e-5),    # rectangular, 3 blocks
    (32, (4, 16, 8), jnp.float32, 1e-5),       # blocks below a TPU tile
    (64, (2, 128, 128), jnp.bfloat16, 1e-2),
])
def test_gmm_blockdiag_matches_reference(tokens, wshape, dtype, tol):
  k1, k2, k3 = jax.random.split(jax.random.key(tokens + sum(wshape)), 3)
  k, q, p = wshape
  x = jax.random.normal(k1, (tokens, k * p)).astype(dtype)
  w = (jax.random.normal(k2, wshape) / np.sqrt(p)).astype(dtype)
  g = jax.random.normal(k3, (tokens, k * q))
  ref = lambda x, w: ops.blockdiag_matmul(x.astype(jnp.float32),
                                          w.astype(jnp.float32))
  y = blockdiag_matmul_gmm(x, w)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), ref(x, w), rtol=tol,
                             atol=tol * 4)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g)
  for a, b, name in zip(jax.grad(loss(blockdiag_matmul_gmm), (0, 1))(x, w),
                        jax.grad(loss(ref), (0, 1))(x, w), ("dx", "dw")):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol,
                               atol=tol * 4 * float(jnp.abs(b).max()),
                               err_msg=name)


def test_tiling_and_errors():
  assert default_tiling(16384, 256, 1024) == (512, 256, 512)
  assert default_tiling(1536, 640, 96) == (512, 128, 96)
  with pytest.raises(ValueError, match="tiling"):
    blockdiag_matmul_gmm(jnp.ones((48, 64)), jnp.ones((2, 32, 32)),
                         tiling=(32, 32, 32))


@pytest.mark.parametrize("grad", [False, True])
def test_cross_lowering_for_tpu(grad):
  fwd = lambda x, w: blockdiag_matmul_gmm(x, w, interpret=False)
  args = (jax.ShapeDtypeStruct((1024, 4 * 256), jnp.bfloat16),
          jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16))
  text = cross_lower(fwd, args, "tpu", (0, 1) if grad else None)
  assert "tpu_custom_call" in text
