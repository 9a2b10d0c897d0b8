"""Pallas' Triton backend, where this JAX still has it.

JAX 0.12 deprecates the Pallas Triton lowering ("will be removed in a future
JAX version"; Mosaic GPU is its successor). The portable kernels
(``monarch``, ``blockdiag``, ``sltrain``) need it on GPUs, and in interpret
mode where they use Triton's masked loads and stores; nothing else should:
the TPU kernels, the Mosaic GPU kernel and every XLA path import the portable
modules' layout helpers, so the import is optional here and its absence one
more reason ``impl="auto"`` gives for running XLA.
"""
try:
  from jax.experimental.pallas import triton as plt
  _MISSING = None
except ImportError as e:  # a JAX without the Pallas Triton backend
  plt = None
  _MISSING = f"this JAX has no Pallas Triton backend ({e})"

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def problem(platform: str, masked: bool = False) -> str | None:
  """Why a portable kernel cannot run on ``platform`` for want of Triton.

  ``masked``: the kernel uses Triton's masked loads/stores, which interpret
  mode (``platform="cpu"``) takes from the Triton backend too.
  """
  if _MISSING and (platform in GPU_PLATFORMS or masked):
    return (f"{_MISSING}, through which the portable kernels lower (jax "
            "0.10 to 0.12 ship it)")
  return None
