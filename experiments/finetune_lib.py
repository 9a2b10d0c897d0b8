"""Fine-tuning run: method preparation, then the standard training loop."""
import json
import os

import jax
import jax.numpy as jnp

from experiments.compress_lib import source_config
from structmat.finetune import prepare
from structmat.train import init_ckpt, loop
from structmat.train.params import count_params
from structmat.train.partition import partition

_TRAIN_FIELDS = ("total_steps", "warmup_steps", "lr", "eval_every_steps",
                 "checkpoint_every_steps", "log_every_steps", "seed")


def trainable_report(params, trainable: str) -> dict:
  train, _ = partition(params, trainable)
  n_train, n_all = count_params(train), count_params(params)
  return {"trainable_params": n_train, "total_params": n_all,
          "trainable_pct": 100.0 * n_train / n_all,
          # float32 weights' gradient + AdamW's two moments per trainable
          # parameter; frozen ones get none of the three.
          "grad_and_opt_state_mb": 12 * n_train / 2**20,
          "full_ft_grad_and_opt_state_mb": 12 * n_all / 2**20}


def run_finetune(fc, init: str, workdir: str) -> dict:
  """Fine-tune the run at ``init`` with config ``fc`` into ``workdir``."""
  params, structure, meta = init_ckpt.load_init(init)
  if "config" not in meta:
    raise ValueError(f"--init={init} has no config.json: give a pretraining "
                     "workdir (or an init directory written by structmat).")
  source = loop.apply_init_meta(source_config(meta["config"]), meta)
  vocab = params["embed"]["embedding"].shape[0]
  cfg = loop.model_config(source, vocab)
  init_dir = os.path.join(os.path.abspath(workdir), "init")
  if not os.path.exists(os.path.join(init_dir, "model.json")):
    # Prepared once: a restarted run resumes from its own checkpoints.
    prep = prepare(fc.method, cfg, jax.tree.map(jnp.asarray, params),
                   jax.tree.map(jnp.asarray, structure), fc)
    init_ckpt.save_init(init_dir, prep.params, prep.structure, {
        "overrides": prep.overrides, "trainable": prep.trainable,
        "adapters": prep.adapters, "config": meta["config"],
        "method": fc.method})
    report = trainable_report(prep.params, prep.trainable)
    with open(os.path.join(workdir, "trainable.json"), "w") as f:
      json.dump(report, f, indent=1)
  report = json.load(open(os.path.join(workdir, "trainable.json")))
  print(f"method {fc.method}: trainable parameters "
        f"{report['trainable_params']:,} of {report['total_params']:,} "
        f"({report['trainable_pct']:.3f}%)", flush=True)
  config = source.copy_and_resolve_references()
  with config.unlocked():
    for k in _TRAIN_FIELDS:
      config[k] = fc[k]
    config.overrides = ""  # the init's overrides are re-applied below
    if fc.data:
      config.data.name = fc.data
      config.data.eval_split = "test" if fc.data == "lm1b" else "validation"
  summary = loop.train_and_evaluate(config, workdir, init=init_dir)
  summary.update(report, method=fc.method)
  with open(os.path.join(workdir, "finetune_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary
