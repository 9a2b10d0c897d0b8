"""WeLore (Jaiswal et al. 2024): rank reduction from normalized singular spectra.

For each selected weight: singular values s, normalized s' = (s - min) / (max -
min); with one global threshold tau, ``dropped = #{s' < tau}`` and the kept rank
is ``min(m, n) - dropped``. A matrix is a low-rank component (LRC) iff
``dropped / min(m, n) > min_ratio`` (0.4999 in the official fine-tuning
script); LRCs become two factors, the rest stay dense (and frozen when
fine-tuning). The official code ships tau tables for LLaMA-2 7B/13B only;
``find_tau`` bisects tau for any model and target parameter reduction.
"""
import dataclasses

import numpy as np

from structmat.utils.timing import format_table


def normalized_spectrum(s: np.ndarray) -> np.ndarray:
  s = np.asarray(s, np.float64)
  span = s.max() - s.min()
  return (s - s.min()) / span if span > 0 else np.ones_like(s)


@dataclasses.dataclass
class MatrixPlan:
  path: str
  shape: tuple[int, int]
  kept_rank: int
  lrc: bool

  @property
  def params_after(self) -> int:
    m, n = self.shape
    return self.kept_rank * (m + n) if self.lrc else m * n


def plan(spectra: dict, tau: float, min_ratio: float = 0.4999) -> list[MatrixPlan]:
  """Per-matrix decisions for a threshold tau.

  Args:
    spectra: path -> (shape, singular values).
  """
  out = []
  for path, (shape, s) in spectra.items():
    full = min(shape)
    dropped = int(np.sum(normalized_spectrum(s) < tau))
    lrc = dropped / full > min_ratio
    out.append(MatrixPlan(path, tuple(shape), max(1, full - dropped), lrc))
  return out


def reduction(plans: list[MatrixPlan]) -> float:
  """Fraction of the selected matrices' parameters removed."""
  before = sum(p.shape[0] * p.shape[1] for p in plans)
  return 1.0 - sum(p.params_after for p in plans) / before


def find_tau(spectra: dict, target: float, min_ratio: float = 0.4999,
             iters: int = 60) -> float:
  """Smallest tau whose plan removes at least ``target`` of the parameters.

  The reduction is non-decreasing in tau (a larger tau drops more singular
  values, and a matrix only turns LRC where that saves parameters), so
  bisection on [0, 1] converges.
  """
  if not 0.0 < target < 1.0:
    raise ValueError(f"reduction={target} must be in (0, 1).")
  best = reduction(plan(spectra, 1.0 + 1e-9, min_ratio))
  if best < target:
    raise ValueError(f"reduction={target} is not reachable: dropping all but "
                     f"one singular value everywhere removes {best:.3f}; "
                     "lower the target or min_ratio.")
  lo, hi = 0.0, 1.0 + 1e-9
  for _ in range(iters):
    mid = (lo + hi) / 2
    if reduction(plan(spectra, mid, min_ratio)) >= target:
      hi = mid
    else:
      lo = mid
  return hi


def report(plans: list[MatrixPlan]) -> tuple[str, list[dict]]:
  """A text table and JSON rows: path, shape, kept rank, LRC."""
  rows = [{"path": p.path, "shape": f"{p.shape[0]}x{p.shape[1]}",
           "kept_rank": p.kept_rank, "lrc": p.lrc,
           "params_before": p.shape[0] * p.shape[1],
           "params_after": p.params_after} for p in plans]
  text = format_table(rows, ["path", "shape", "kept_rank", "lrc",
                             "params_before", "params_after"])
  n_lrc = sum(p.lrc for p in plans)
  return (text + f"\n{n_lrc}/{len(plans)} LRCs, parameter reduction "
          f"{reduction(plans):.4f}"), rows
