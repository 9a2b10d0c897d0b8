"""What the Mosaic TPU kernels (``monarch_tpu``, ``sltrain_tpu``, the TPU
path of ``blockdiag``) share: the lane width, the VMEM budget and limit of
the chip they are built for, compiler parameters, whole-array blocks and a
float32-accumulating 2-D matmul."""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from structmat.kernels import target

LANES = 128
MIB = 1 << 20
# VMEM per TensorCore by chip (jax's Pallas tpu_info, which libtpu's
# compiles agree with: tools/tpu_compile.py prints it).
VMEM_BY_KIND = {"TPU v4": 16 * MIB, "TPU v4 lite": 16 * MIB,
                "TPU v5 lite": 128 * MIB, "TPU v5e": 128 * MIB,
                "TPU v5": 64 * MIB, "TPU v5p": 64 * MIB,
                "TPU v6 lite": 128 * MIB, "TPU v6e": 128 * MIB}
# Mosaic's default scoped limit (16-32 MiB) is raised to at most this for
# these kernels (all of a v5p core's VMEM, half of a v5e's).
LIMIT_CAP = 64 * MIB
# tools/tpu_compile.py sets this to plan tiles past the budget (calibration).
budget_override: int | None = None


def vmem_capacity() -> int:
  """VMEM of a TensorCore of the chip the kernels are built for
  (``target.device_kind``); chips the table lacks ask jax's Pallas TPU
  info, else count as a v5e's (128 MiB, where the estimates were
  calibrated; also off TPUs, for interpret mode)."""
  kind = target.device_kind()
  if kind in VMEM_BY_KIND:
    return VMEM_BY_KIND[kind]
  try:
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=import-outside-toplevel
    version = tpu_info.chip_version_from_device_kind(kind)
    if version is not None:
      return tpu_info.get_tpu_info_for_chip(version, 1).vmem_capacity_bytes
  except Exception:  # pylint: disable=broad-except
    pass
  return 128 * MIB


def vmem_limit() -> int:
  """The scoped-VMEM limit the kernels compile with: 64 MiB, or the whole
  core's VMEM where it has less (v4: 16 MiB)."""
  return min(LIMIT_CAP, vmem_capacity())


def vmem_budget() -> int:
  """VMEM a program may plan for: the limit less an eighth (at least 4 MiB).
  The kernels' estimates bound their worst case as libtpu compiled it for
  a v5e within ~3 MiB (tools/tpu_compile.py, sessions 21 and 26); at its
  own limit libtpu gave some kernels up to 4 MiB more, which the margin
  covers. 56 MiB on v5e, v5p and v6e; 12 MiB on v4 (before session 26 the
  kernels planned 56 there too, and did not compile)."""
  if budget_override is not None:
    return budget_override
  limit = vmem_limit()
  return limit - max(limit // 8, 4 * MIB)


def matmul(a, b, contract=((1,), (0,))):
  """2-D dot_general with float32 accumulation (``contract``: the
  contracting dims of a and b; the default is a @ b)."""
  return jax.lax.dot_general(a, b, (contract, ((), ())),
                             preferred_element_type=jnp.float32)


def lane_chunks(bt: int) -> list[slice]:
  """Static 128-token slices of a token tile."""
  return [slice(c * LANES, (c + 1) * LANES) for c in range(bt // LANES)]


def compiler_params(semantics: tuple[str, ...], interpret):
  """Mosaic parameters with the raised VMEM limit; None in plain interpret
  mode (``interpret=True``), which has no TPU semantics to keep (a
  ``pltpu.InterpretParams`` keeps them)."""
  if interpret is True:
    return None
  return pltpu.CompilerParams(dimension_semantics=semantics,
                              vmem_limit_bytes=vmem_limit())


def whole(shape) -> pl.BlockSpec:
  """A whole-array VMEM block that never moves: copied in once for the
  whole grid (and single-buffered by Pallas)."""
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))
