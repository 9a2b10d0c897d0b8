r"""Pretraining launcher.

  python -m experiments.pretrain --config=configs/pretrain.py --workdir=runs/pretrain
  python -m experiments.pretrain --config=configs/pretrain.py:model=llama_60m,linear=monarch --dry_run

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
    if _CROSS_LOWER.value and not preflight.report(_CONFIG.value,
                                                   _CROSS_LOWER.value):
      raise SystemExit(1)
    return
  if _CROSS_LOWER.value:
    raise app.UsageError("--cross_lower goes with --dry_run.")
  config, init = sources.hf_init(_CONFIG.value, _INIT.value, _WORKDIR.value)
  loop.train_and_evaluate(config, _WORKDIR.value, init)


if __name__ == "__main__":
  app.run(main)
