r"""Pretraining launcher.

  python -m experiments.pretrain --config=configs/pretrain.py --workdir=runs/pretrain
  python -m experiments.pretrain --config=configs/pretrain.py:model=llama_60m,linear=monarch --dry_run
  PYTHONPATH=/tmp/libtpu python -m experiments.pretrain \
      --config=configs/pretrain.py:model=llama_130m,linear=monarch \
      --config.impl=pallas --dry_run --tpu_topology=v5e:4x4

See configs/pretrain.py for the variants and expected results.
"""
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from experiments import sources
from structmat.train import loop, preflight

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pretrain.py", "Config file (path[:args]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/pretrain",
                               "Checkpoints, metrics and summary go here; a "
                               "run resumes from its latest checkpoint.")
_INIT = flags.DEFINE_string("init", "", "Start from these parameters when the "
                            "workdir has no checkpoint: an init directory "
                            "written by experiments.compress, another run's "
                            "workdir, or a Hugging Face LLaMA or GPT-2 "
                            "directory (its sizes and tokenizer replace the "
                            "config's).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for a multi-process "
    "run (multi-GPU hosts, clusters); TPU pods and SLURM are detected without.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "With "
                                      "--coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "With "
                                   "--coordinator_address.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the parameter table "
                             "and exit without training.")
_CROSS_LOWER = flags.DEFINE_list(
    "cross_lower", [], "With --dry_run: also lower the train step for these "
    "abstract devices (cuda: an H100, tpu: a TPU v5e), choosing kernels as "
    "they would, and print the Pallas kernels each holds or why a kernel "
    "refuses the shapes (exit status 1). Needs no accelerator.")
_TPU_TOPOLOGY = flags.DEFINE_string(
    "tpu_topology", "", "With --dry_run: also compile the train step with "
    "libtpu for this TPU slice (v5e:2x2, v5e:4x4, v6e:2x2, v5p:2x2x1...), "
    "described without hardware, on the config's mesh over all its chips, "
    "and print the HBM per chip and the kernels' VMEM, or the compiler's "
    "error (out of HBM: exit status 1). Needs libtpu beside structmat "
    "(structmat/train/preflight.py), no TPU.")


def _multi_process_env() -> bool:
  """True where jax.distributed can find its peers by itself."""
  env = os.environ
  return ("," in env.get("TPU_WORKER_HOSTNAMES", "")
          or int(env.get("SLURM_NTASKS", "1")) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def main(argv):
  del argv
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  elif _multi_process_env():
    jax.distributed.initialize()
  if not flags.FLAGS["verbosity"].present:
    # orbax and jax log a lot at INFO; progress lines are printed anyway.
    logging.set_verbosity(logging.WARNING)
  if _DRY_RUN.value:
    loop.dry_run(_CONFIG.value)
    ok = not _CROSS_LOWER.value or preflight.report(_CONFIG.value,
                                                    _CROSS_LOWER.value)
    if _TPU_TOPOLOGY.value:
      try:
        ok = preflight.report_topology(_CONFIG.value,
                                       _TPU_TOPOLOGY.value) and ok
      except ValueError as e:   # no libtpu, or a name it does not know
        raise app.UsageError(str(e)) from e
    if not ok:
      raise SystemExit(1)
    return
  if _CROSS_LOWER.value or _TPU_TOPOLOGY.value:
    raise app.UsageError("--cross_lower and --tpu_topology go with --dry_run.")
  config, init = sources.hf_init(_CONFIG.value, _INIT.value, _WORKDIR.value)
  loop.train_and_evaluate(config, _WORKDIR.value, init)


if __name__ == "__main__":
  app.run(main)
