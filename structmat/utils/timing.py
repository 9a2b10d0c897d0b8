"""Wall-clock timing of jitted functions and plain-text tables."""
import statistics
import time

import jax


def time_samples(fn, *args, repeats: int = 5, warmup: int = 1,
                 inner: int = 1) -> list[float]:
  """Seconds per call of ``fn(*args)``, one sample per repeat, after
  compilation and ``warmup`` calls.

  ``inner`` > 1 times that many back-to-back calls per sample and divides:
  on an accelerator, asynchronous dispatch then hides the host's launch
  overhead, which would otherwise dominate sub-millisecond kernels.
  """
  for _ in range(warmup + 1):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner - 1):
      fn(*args)
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) / inner)
  return times


def time_fn(fn, *args, repeats: int = 5, warmup: int = 1,
            inner: int = 1) -> float:
  """Median seconds of ``fn(*args)``; see ``time_samples``."""
  return statistics.median(time_samples(fn, *args, repeats=repeats,
                                        warmup=warmup, inner=inner))


def format_table(rows: list[dict], columns: list[str]) -> str:
  """Left-aligned text table of ``rows`` (dicts) over ``columns``."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)
  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells))
            for i, c in enumerate(columns)]
  line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))
  return "\n".join([line(columns), line(["-" * w for w in widths])]
                   + [line(row) for row in cells])
