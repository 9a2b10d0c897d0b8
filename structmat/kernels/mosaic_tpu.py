"""What the Mosaic TPU kernels (``monarch_tpu``, ``sltrain_tpu``) share: the
lane width, the VMEM budget and limit, compiler parameters, whole-array
blocks and a float32-accumulating 2-D matmul."""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
# VMEM a program may plan for. TPU v5e/v6e cores have 128 MiB and v5p 95
# MiB; Mosaic's default scoped limit (16-32 MiB) is raised to VMEM_LIMIT for
# these kernels. Older chips (v4: 32 MiB) would need smaller token tiles.
# The kernels' estimates bound their worst case as libtpu 0.0.42 compiled
# it for a v5e (tools/tpu_compile.py, session 21) within ~2 MiB, so the
# budget keeps 8 MiB under the limit for other libtpu versions.
VMEM_BUDGET = 56 * 1024 * 1024
VMEM_LIMIT = 64 * 1024 * 1024


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
                              vmem_limit_bytes=VMEM_LIMIT)


def whole(shape) -> pl.BlockSpec:
  """A whole-array VMEM block that never moves: copied in once for the
  whole grid (and single-buffered by Pallas)."""
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))
