"""Cross-lowering: compile-free checks of a kernel for hardware this host lacks.

Lowering ``fn`` for an abstract H100 ("cuda": Triton and Mosaic GPU kernels)
or TPU v5e ("tpu": Mosaic TPU kernels) on a CPU runs every kernel's shape
checks and its Pallas lowering, so a shape or lowering error shows up before a
GPU or TPU is lent (the tests do this for every kernel; ``tools/triton_smem.py``
feeds the Triton modules it yields to the offline Triton compiler). Nothing is
compiled or run: numerics need interpret mode or the hardware.

Example::

    text = cross_lower(lambda x, w1, w2: monarch_matmul(x, w1, w2,
                                                        impl="pallas"),
                       (x, w1, w2), "cuda", grad_argnums=(0, 1, 2))
"""
import jax
import jax.numpy as jnp

DEVICE_KINDS = {"cuda": "NVIDIA H100 80GB HBM3", "tpu": "TPU v5 lite"}


def cross_lower(fn, args, platform: str, grad_argnums=None) -> str:
  """Lower ``fn(*args)`` (or the gradient of its float32 sum over
  ``grad_argnums``) for an abstract H100 (``platform="cuda"``) or TPU v5e
  (``"tpu"``) on this host. Returns the lowered module's text."""
  if platform not in DEVICE_KINDS:
    raise ValueError(f"platform={platform!r}; use one of {tuple(DEVICE_KINDS)}")
  ad = jax.sharding.AbstractDevice(device_kind=DEVICE_KINDS[platform],
                                   num_cores=1, platform=platform)
  mesh = jax.sharding.AbstractMesh((1,), ("x",),
                                   (jax.sharding.AxisType.Explicit,),
                                   abstract_device=ad)
  f = fn
  if grad_argnums is not None:
    f = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                 argnums=grad_argnums)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(f).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
