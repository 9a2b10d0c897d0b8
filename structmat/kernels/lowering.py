"""Cross-lowering: compile-free checks of a kernel for hardware this host lacks.

Lowering ``fn`` for an abstract H100 ("cuda": Triton and Mosaic GPU kernels)
or TPU v5e ("tpu": Mosaic TPU kernels) on a CPU runs every kernel's shape
checks and its Pallas lowering, so a shape or lowering error shows up before a
GPU or TPU is lent (the tests do this for every kernel; ``tools/triton_smem.py``
feeds the Triton modules it yields to the offline Triton compiler). Nothing is
compiled or run: numerics need interpret mode or the hardware.
``kernel_modules`` counts the kernels in a lowered module's text: calls, and
distinct modules (what the device compiles).

Example::

    text = cross_lower(lambda x, w1, w2: monarch_matmul(x, w1, w2,
                                                        impl="pallas"),
                       (x, w1, w2), "cuda", grad_argnums=(0, 1, 2))
"""
import collections
import re

import jax
import jax.numpy as jnp

from structmat.kernels import target

DEVICE_KINDS = {"cuda": "NVIDIA H100 80GB HBM3", "tpu": "TPU v5 lite"}


def cross_lower(fn, args, platform: str, grad_argnums=None) -> str:
  """Lower ``fn(*args)`` (or the gradient of its float32 sum over
  ``grad_argnums``) for an abstract H100 (``platform="cuda"``) or TPU v5e
  (``"tpu"``) on this host, choosing kernels as that device would
  (``target.targeting``: ``impl`` dispatch, interpret mode off). Returns
  the lowered module's text."""
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
  with jax.sharding.use_abstract_mesh(mesh), target.targeting(platform):
    return jax.jit(f).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()


# custom_call targets of Pallas kernels -> kind.
KERNEL_TARGETS = {"mosaic_gpu_v2": "mosaic_gpu", "mosaic_gpu": "mosaic_gpu",
                  "__gpu$xla.gpu.triton": "triton",
                  "tpu_custom_call": "mosaic_tpu"}
_CALL = re.compile(r"custom_call @(\S+?)\((.*)")


def kernel_modules(text: str) -> dict[str, dict[str, int]]:
  """The Pallas kernels in a lowered module's text (``cross_lower``'s, or
  ``jax.jit(f).lower(...).as_text()``): {"calls": {kind: n}, "distinct":
  {kind: n}}, kind "mosaic_gpu", "triton" or "mosaic_tpu". A call is one
  custom call in the text (a function that several sites call holds its
  kernels once); calls whose kernel and shapes are the same (their
  attributes, source locations aside) count as one distinct module, which
  the device compiles once."""
  calls, bodies = collections.Counter(), collections.defaultdict(set)
  for target, rest in _CALL.findall(text):
    kind = KERNEL_TARGETS.get(target)
    if kind:
      calls[kind] += 1
      # Past the operand list: attributes, types, then the location ref.
      bodies[kind].add(re.sub(r"loc\(#[^)]*\)", "", rest.split(")", 1)[1]))
  return {"calls": dict(calls),
          "distinct": {k: len(v) for k, v in bodies.items()}}
