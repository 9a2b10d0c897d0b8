"""Lower a config's train step for hardware this host lacks, before a run.

``python -m experiments.pretrain --config=... --dry_run --cross_lower=cuda,tpu``
lowers the step (the config's model, optimizer and global batch, on one
abstract device) for an H100 and a TPU v5e, choosing kernels as each would
(``kernels.target``), and reports the Pallas kernels it holds, or why a
kernel refuses the config's shapes: a shape or lowering error shows up here,
in seconds, instead of after a GPU or TPU is lent and the data is built.
Nothing is compiled: numerics and speed need the device.
"""
import functools
import time

import jax
import jax.numpy as jnp

from structmat.kernels.lowering import cross_lower, kernel_modules
from structmat.models import build_model
from structmat.optim import make_optimizer
from structmat.train import steps
from structmat.train.loop import (config_vocab, frozen_dtype, model_config,
                                  validate_config)
from structmat.train.state import create_state


def lower_step(model, tx, batch_shape, platform: str, **state_kwargs) -> dict:
  """Lower ``steps.train_step`` of ``model`` and ``tx`` on an int32 batch of
  ``batch_shape`` (rows, length + 1) for ``platform`` ("cuda" or "tpu"),
  the state built abstractly (``create_state``'s ``state_kwargs``):
  {"platform", "lower_s", "module_mb", "calls", "distinct"} (kernel calls
  and distinct kernel modules by kind, ``lowering.kernel_modules``). Raises
  the ValueError of a kernel that cannot take the shapes."""
  example = jnp.ones((1, batch_shape[1] - 1), jnp.int32)
  state = jax.eval_shape(lambda: create_state(model, tx, example_tokens=example,
                                              **state_kwargs))
  batch = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
  t0 = time.perf_counter()
  text = cross_lower(functools.partial(steps.train_step, model=model, tx=tx,
                                       pad_id=-1), (state, batch), platform)
  return {"platform": platform, "lower_s": time.perf_counter() - t0,
          "module_mb": len(text) / 1e6, **kernel_modules(text)}


def lower_train_step(config, platform: str) -> dict:
  """``lower_step`` of ``config``'s model, optimizer and global batch."""
  validate_config(config)
  return lower_step(build_model(model_config(config, config_vocab(config))),
                    make_optimizer(config),
                    (config.batch_size, config.seq_len + 1), platform,
                    seed=config.seed, trainable=config.trainable,
                    frozen_dtype=frozen_dtype(config))


def report(config, platforms) -> bool:
  """Print one line per platform (its kernels, or why it fails); True if
  every platform lowered."""
  ok = True
  for platform in platforms:
    try:
      r = lower_train_step(config, platform)
    except ValueError as e:
      ok = False
      print(f"{platform}: FAILS: {e}", flush=True)
      continue
    kinds = ", ".join(f"{k} {n} ({r['distinct'][k]} distinct)"
                      for k, n in sorted(r["calls"].items())) or "none (XLA)"
    print(f"{platform}: lowered in {r['lower_s']:.1f} s, "
          f"{r['module_mb']:.1f} MB; kernel calls: {kinds}", flush=True)
  return ok
