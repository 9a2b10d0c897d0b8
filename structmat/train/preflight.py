"""Lower a config's train step for hardware this host lacks, before a run.

``python -m experiments.pretrain --config=... --dry_run --cross_lower=cuda,tpu``
lowers the step (the config's model, optimizer and global batch, on one
abstract device) for an H100 and a TPU v5e, choosing kernels as each would
(``kernels.target``), and reports the Pallas kernels it holds, or why a
kernel refuses the config's shapes: a shape or lowering error shows up here,
in seconds, instead of after a GPU or TPU is lent and the data is built.
Nothing is compiled: numerics and speed need the device.

``--dry_run --tpu_topology=v5e:4x4`` goes further for TPUs: libtpu (the TPU
compiler, installed beside structmat) compiles the step for a slice
described without hardware (``jax.experimental.topologies``): every chip
of it, the config's mesh and logical rules over them, kernels per token
shard as the train loop runs them. It reports the HBM XLA plans per chip
and each Mosaic kernel's VMEM, or libtpu's error (out of HBM: it says how
much the step needs). Whether a config fits a v5e-16 is then known before
one is lent.
"""
import functools
import time

import jax
import jax.numpy as jnp

from structmat.kernels import target
from structmat.kernels.lowering import cross_lower, kernel_modules, scoped_vmem
from structmat.models import build_model
from structmat.optim import make_optimizer
from structmat.train import steps
from structmat.train.loop import (Placement, config_vocab, model_config,
                                  state_factory, validate_config)
from structmat.train.state import create_state


def lower_step(model, tx, batch_shape, platform: str, new_state=None) -> dict:
  """Lower ``steps.train_step`` of ``model`` and ``tx`` on an int32 batch of
  ``batch_shape`` (rows, length + 1) for ``platform`` ("cuda" or "tpu"),
  the state built abstractly by ``new_state`` (model -> TrainState;
  default ``create_state`` with seed 0 on one example row):
  {"platform", "lower_s", "module_mb", "calls", "distinct"} (kernel calls
  and distinct kernel modules by kind, ``lowering.kernel_modules``). Raises
  the ValueError of a kernel that cannot take the shapes."""
  if new_state is None:
    new_state = functools.partial(
        create_state, tx=tx, seed=0,
        example_tokens=jnp.ones((1, batch_shape[1] - 1), jnp.int32))
  state = jax.eval_shape(lambda: new_state(model))
  batch = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
  t0 = time.perf_counter()
  text = cross_lower(functools.partial(steps.train_step, model=model, tx=tx,
                                       pad_id=-1), (state, batch), platform)
  return {"platform": platform, "lower_s": time.perf_counter() - t0,
          "module_mb": len(text) / 1e6, **kernel_modules(text)}


def lower_train_step(config, platform: str) -> dict:
  """``lower_step`` of ``config``'s model, optimizer and global batch, the
  state built as the train loop builds it (``loop.state_factory``)."""
  validate_config(config)
  tx = make_optimizer(config)
  _, new_state = state_factory(config, tx)
  return lower_step(build_model(model_config(config, config_vocab(config))),
                    tx, (config.batch_size, config.seq_len + 1), platform,
                    new_state)


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


LIBTPU_HINT = ("install the libtpu that jax's [tpu] extra pins beside "
               "structmat, not into its venv (with it there every jax "
               "process looks for a TPU): `.venv/bin/pip install --no-deps "
               "--target /tmp/libtpu libtpu==0.0.42.*` (jax 0.10.2; 0.11.2: "
               "0.0.48; 0.12: 0.0.50), then run with PYTHONPATH=/tmp/libtpu")


def topology_devices(name: str) -> list:
  """The chips of the TPU slice ``name`` (libtpu's names: "v5e:2x2",
  "v5e:4x4", "v6e:2x2", "v5p:2x2x1"), described without hardware.
  ValueError naming the fix when libtpu is missing or rejects the name."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return list(topologies.get_topology_desc(name, "tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    fix = (LIBTPU_HINT if "not installed" in first else
           "use a name libtpu knows, e.g. v5e:2x2, v5e:4x4, v6e:2x2, "
           "v5p:2x2x1")
    raise ValueError(f"--tpu_topology={name!r}: {first}; {fix}.") from e


def compile_step(config, devices) -> dict:
  """Compile ``config``'s train step as the train loop would on
  ``devices``: its model and optimizer, the global batch, ``config.mesh``
  and the logical rules over these devices, kernels per token shard and
  chosen for their platform. The devices may be a topology's, described
  without hardware (``topology_devices``). Returns the mesh, seconds to
  lower and compile, the Pallas kernels ({"calls", "distinct"} by kind),
  each Mosaic TPU kernel's scoped VMEM (MiB) and the per-device memory XLA
  plans, in GiB: arguments (state and batch shard), temporaries, outputs
  not aliased to arguments, and their sum, "total". Raises what the
  compiler raises (libtpu's out-of-HBM error, say)."""
  validate_config(config)
  model = build_model(model_config(config, config_vocab(config)))
  tx = make_optimizer(config)
  example, new_state = state_factory(config, tx)
  place = Placement(config, new_state, example, devices=list(devices))
  t0 = time.perf_counter()
  # default_device: Pallas' TPU lowering asks it which chip it lowers for.
  with target.targeting(devices[0].platform), jax.default_device(devices[0]):
    lowered = place.lower_train(model, tx)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  gib = lambda b: b / (1 << 30)
  outputs = m.output_size_in_bytes - m.alias_size_in_bytes
  return {"devices": len(devices), "kind": devices[0].device_kind,
          "mesh": dict(place.mesh.shape), "lower_s": t1 - t0,
          "compile_s": t2 - t1, **kernel_modules(lowered.as_text()),
          "vmem_mib": {k: v[0] for k, v in
                       scoped_vmem(compiled.as_text()).items()},
          "argument_gib": gib(m.argument_size_in_bytes),
          "temp_gib": gib(m.temp_size_in_bytes), "output_gib": gib(outputs),
          "total_gib": gib(m.argument_size_in_bytes + m.temp_size_in_bytes
                           + outputs)}


def report_topology(config, name: str) -> bool:
  """Compile ``config``'s train step for the TPU slice ``name`` with libtpu
  and print one line: per-chip HBM and the kernels' VMEM, or FAILS: with
  the compiler's message (the first lines of it). True if it compiled."""
  devices = topology_devices(name)
  head = f"{name} ({len(devices)} x {devices[0].device_kind})"
  try:
    r = compile_step(config, devices)
  except Exception as e:  # pylint: disable=broad-except
    # Out of HBM is an answer: libtpu says what the step needs (fewer rows
    # per chip, fsdp, or a larger slice).
    lines = [l for l in str(e).splitlines() if l.strip()][:3]
    print(f"{head}: FAILS: {type(e).__name__}: " + " | ".join(lines)[:800],
          flush=True)
    return False
  calls = r["calls"].get("mosaic_tpu", 0)
  vmem = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["vmem_mib"].items()))
  # Kernels that ask for no scoped VMEM (jax's splash attention) list none.
  vmem = vmem or ("none (XLA)" if not calls else "not listed")
  print(f"{head}: compiled in {r['lower_s']:.1f} + {r['compile_s']:.1f} s, "
        f"mesh {r['mesh']}; per chip {r['total_gib']:.2f} GiB (state and "
        f"batch {r['argument_gib']:.2f}, temporaries {r['temp_gib']:.2f}, "
        f"outputs {r['output_gib']:.2f}); kernel calls {calls}, their "
        f"VMEM MiB: {vmem}", flush=True)
  return True
