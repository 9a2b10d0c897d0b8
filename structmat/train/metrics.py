"""Metrics: TensorBoard scalars, metrics.jsonl, and progress lines."""
import json
import os
import time

from absl import logging
import jax


class MetricWriter:
  """Writes {step, name: value} to metrics.jsonl and TensorBoard (process 0)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      logging.warning("tensorboardX not installed: metrics.jsonl only.")
      self._tb = None

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, int(step))

  def close(self):
    if self.active:
      self._jsonl.close()
      if self._tb:
        self._tb.close()


class Progress:
  """Progress lines: step, loss, tokens/s and ETA since this run started, or
  since its first step once ``first_step_done`` says it ended."""

  def __init__(self, total_steps: int, start_step: int, tokens_per_step: int):
    self.total, self.s0, self.tps = total_steps, start_step, tokens_per_step
    self.t0 = time.time()
    self.first_s = None

  def first_step_done(self, step: int) -> float:
    """Times later steps from now and returns the first step's seconds: it
    compiled the train step (minutes for kernel-laden models on a GPU),
    which would skew tokens/s and the ETA for the whole run."""
    now = time.time()
    self.first_s = now - self.t0
    self.s0, self.t0 = step, now
    return self.first_s

  def _step_seconds(self, step: int) -> float | None:
    """Seconds per step so far; None before any step ran."""
    if step == self.s0:  # only the first step so far, or none
      return self.first_s
    return max(time.time() - self.t0, 1e-9) / (step - self.s0)

  def tokens_per_sec(self, step: int) -> float:
    seconds = self._step_seconds(step)
    return self.tps / seconds if seconds else 0.0

  def line(self, step: int, loss: float) -> str:
    eta = (self._step_seconds(step) or 0.0) * (self.total - step)
    return (f"step {step}/{self.total}  loss {loss:.4f}  "
            f"{self.tokens_per_sec(step):,.0f} tokens/s  ETA {eta / 60:.1f} min")
