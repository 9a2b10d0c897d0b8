"""Pallas kernels: interpret mode against the XLA reference, and cross-lowering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.kernels import blockdiag as bd
from structmat.kernels import blockdiag_matmul_pallas, supported

SHAPES = [  # (tokens, block_tokens, (k, q, p))
    (64, 16, (4, 32, 32)),
    (32, 32, (2, 8, 16)),      # rectangular blocks
    (128, 64, (2, 128, 64)),
    (48, 16, (3, 16, 8)),      # awkward: 3 blocks, 48 tokens
]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("tokens,bt,wshape", SHAPES)
def test_blockdiag_kernel_matches_reference(tokens, bt, wshape, dtype, tol):
  k1, k2, k3 = jax.random.split(jax.random.key(sum(wshape) + tokens), 3)
  k, q, p = wshape
  x = jax.random.normal(k1, (tokens, k * p)).astype(dtype)
  w = (jax.random.normal(k2, wshape) / np.sqrt(p)).astype(dtype)
  g = jax.random.normal(k3, (tokens, k * q)).astype(dtype)
  ref = lambda x, w: ops.blockdiag_matmul(x.astype(jnp.float32),
                                          w.astype(jnp.float32))
  ker = lambda x, w: blockdiag_matmul_pallas(x, w, block_tokens=bt,
                                             interpret=True)
  y = ker(x, w)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), ref(x, w),
                             rtol=tol, atol=tol * 4)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g)
  ga = jax.grad(loss(ker), argnums=(0, 1))(x, w)
  gb = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  for a, b, name in zip(ga, gb, ("dx", "dw")):
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b),
                               rtol=tol, atol=tol * 4 * scale, err_msg=name)


def test_every_output_element_is_written():
  x = jax.random.normal(jax.random.key(0), (64, 4 * 16))
  w = jax.random.normal(jax.random.key(1), (4, 32, 16))
  poisoned = jnp.full((64, 4 * 32), jnp.nan)
  y = bd._call_fwd(x, w, 16, True, "cpu", poisoned=poisoned)  # pylint: disable=protected-access
  assert not np.isnan(np.asarray(y)).any()
  np.testing.assert_allclose(y, ops.blockdiag_matmul(x, w), atol=1e-4)


def _lower(platform, kind, x_shape, w_shape, bt, grad):
  ad = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1,
                                   platform=platform)
  mesh = jax.sharding.AbstractMesh((1,), ("x",),
                                   (jax.sharding.AxisType.Explicit,),
                                   abstract_device=ad)
  fwd = lambda x, w: blockdiag_matmul_pallas(x, w, block_tokens=bt,
                                             interpret=False, platform=platform)
  f = fwd
  if grad:
    f = jax.grad(lambda x, w: jnp.sum(fwd(x, w).astype(jnp.float32)),
                 argnums=(0, 1))
  args = (jax.ShapeDtypeStruct(x_shape, jnp.bfloat16),
          jax.ShapeDtypeStruct(w_shape, jnp.bfloat16))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("platform,kind,x_shape,w_shape,bt", [
    ("cuda", "NVIDIA H100 80GB HBM3", (256, 4 * 32), (4, 32, 32), 64),
    ("cuda", "NVIDIA H100 80GB HBM3", (512, 8 * 64), (8, 128, 64), 128),
    ("tpu", "TPU v5 lite", (256, 2 * 128), (2, 128, 128), 64),
    ("tpu", "TPU v5 lite", (128, 4 * 128), (4, 256, 128), 32),
])
@pytest.mark.parametrize("grad", [False, True])
def test_cross_lowering(platform, kind, x_shape, w_shape, bt, grad):
  assert supported(x_shape[0], w_shape, bt, platform) is None
  lowered = _lower(platform, kind, x_shape, w_shape, bt, grad)
  assert lowered.as_text()


def test_supported_names_the_constraint():
  assert "power-of-two" in supported(256, (4, 24, 32), 64, "gpu")
  assert "(8, 128)" in supported(256, (4, 64, 64), 64, "tpu")
  assert "multiple" in supported(100, (4, 32, 32), 64, "gpu")
  assert supported(100, (4, 24, 32), 4, "cpu") is None
