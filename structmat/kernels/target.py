"""The platform kernels are chosen and built for.

Normally the default backend. ``lowering.cross_lower`` targets hardware this
host lacks (an abstract H100 or TPU v5e): inside ``targeting`` every choice
that asks ``platform()`` (``impl`` dispatch, interpret mode, Mosaic GPU's
Hopper check) is made as that hardware would make it, so a lowered train
step holds the kernels the device would run (on a TPU target attention's
"auto" too: the Pallas flash kernel; its GPU choice, cuDNN, still asks the
host, which looks cuDNN up while tracing, so a step cross-lowered for a GPU
on a CPU attends through XLA). Before this, the tests monkeypatched
``jax.default_backend`` to the same end.
"""
import contextlib

import jax

_TARGET: list[str] = []   # a stack: targeting() nests


def platform() -> str:
  """The targeted platform ("gpu" for "cuda"), else the default backend."""
  return _TARGET[-1] if _TARGET else jax.default_backend()


def abstract() -> bool:
  """Whether the platform is a cross-lowering target, not this host's
  devices (whose properties, a GPU's compute capability, say, are then
  the abstract device's)."""
  return bool(_TARGET)


@contextlib.contextmanager
def targeting(name: str):
  """Choose and build kernels for ``name`` ("cuda" or "gpu", "tpu") inside."""
  _TARGET.append("gpu" if name == "cuda" else name)
  try:
    yield
  finally:
    _TARGET.pop()


def device_kind() -> str:
  """The kind of chip kernels are built for ("TPU v5 lite", ...): the
  abstract mesh's device while cross-lowering (``lowering.cross_lower``),
  else the default device (a slice's chip in a ``--tpu_topology`` dry run,
  which sets it), else this host's first device."""
  abstract_device = getattr(jax.sharding.get_abstract_mesh(),
                            "abstract_device", None)
  if abstract_device is not None:
    return abstract_device.device_kind
  default = jax.config.jax_default_device
  if hasattr(default, "device_kind"):
    return default.device_kind
  return jax.devices()[0].device_kind
