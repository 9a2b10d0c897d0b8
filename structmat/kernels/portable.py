"""What the portable ``pallas_call`` kernels (``blockdiag``, ``monarch``,
``sltrain``: Triton on GPUs, Mosaic on TPUs, the interpreter on the CPU)
share: the call prologue, Triton's shared-memory budgets and pipeline depth,
each backend's compiler parameters, the launch order of a grid and how a
weight-gradient kernel splits its tokens. (``mosaic_tpu`` holds the Mosaic
TPU kernels' counterparts.)"""
import dataclasses

from structmat.kernels import mosaic_tpu, target, triton_backend
from structmat.kernels.triton_backend import GPU_PLATFORMS, plt


def prepare(x, block_tokens: int, interpret, platform):
  """Shared wrapper prologue: (x as 2-D, block_tokens, interpret, platform)."""
  platform = platform or target.platform()
  if interpret is None:
    interpret = platform == "cpu"
  x2 = x.reshape(-1, x.shape[-1])
  return x2, min(block_tokens, x2.shape[0]), interpret, platform


def pow2(n: int) -> bool:
  """Whether n is a power of two (Triton's block sizes must be)."""
  return n > 0 and n & (n - 1) == 0


# Shared memory a Triton program may plan for: below the 227 KiB an H100/H200
# block can have, leaving room for what the estimate does not count.
SMEM_BUDGET = 160 * 1024
TRITON_STAGES = 3  # compiler_params' num_stages: buffers per operand in loops
# For estimates that bound what Triton asks for from above, checked against
# its compiler offline (tools/triton_smem.py): the Monarch kernels' pipelined
# loops, SLTrain's. They may come this close to the 227 KiB.
LOOP_SMEM_BUDGET = 224 * 1024


def compiler_params(platform: str | None, n_grid_axes: int, num_warps: int = 4):
  """The backend's compiler parameters: Triton on GPUs, Mosaic on TPUs."""
  if platform in GPU_PLATFORMS:
    if why := triton_backend.problem(platform):
      raise ValueError(why)
    return plt.CompilerParams(num_warps=num_warps, num_stages=TRITON_STAGES)
  if platform == "tpu":   # the Mosaic TPU kernels' raised VMEM limit
    return mosaic_tpu.compiler_params(("parallel",) * n_grid_axes, False)
  return None


def launch_order(platform: str, grid: tuple[int, ...], in_specs, out_specs):
  """(grid, in_specs, out_specs) for ``platform``, given as a TPU runs them:
  Mosaic TPU steps through a grid row-major (the last axis fastest) and does
  not fetch again a block whose index did not change, so kernels put last
  the axis whose programs share an input block. Triton launches program_id
  0, the first axis, fastest: elsewhere (GPUs, and interpret mode, which
  tests that code) the grid and the index maps' arguments are reversed, so
  those programs run together and re-read the shared block from L2 rather
  than memory. Only for kernels that do not read ``pl.program_id``."""
  if platform == "tpu":
    return grid, in_specs, out_specs
  flip = lambda s: dataclasses.replace(
      s, index_map=lambda *ids, f=s.index_map: f(*ids[::-1]))
  return (tuple(grid[::-1]), [flip(s) for s in in_specs], flip(out_specs))


def split_count(n_tiles: int, programs: int, most: int = 264) -> int:
  """How many token chunks a weight-gradient kernel splits its n_tiles into:
  the largest power-of-two divisor of n_tiles up to most / programs (two
  programs per multiprocessor on a 132-SM Hopper), at least 1."""
  chunks = 1
  while (n_tiles % (2 * chunks) == 0 and 2 * chunks * programs <= most):
    chunks *= 2
  return chunks
