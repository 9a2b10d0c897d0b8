r"""Compress a dense pretraining run: WeLore, uniform low-rank or Monarch.

  python -m experiments.compress --config=configs/compress.py:method=welore,reduction=0.5 \
      --init=runs/pretrain --workdir=runs/welore50

See configs/compress.py. Writes WORKDIR/init (orbax), WORKDIR/model.json,
WORKDIR/report.txt and report.json, and WORKDIR/compress_summary.json.
"""
import json
import math
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from configs import pretrain as pretrain_config
from structmat import compress
from structmat import data as sm_data
from structmat.models import Llama
from structmat.train import init_ckpt, loop, steps
from structmat.train.params import count_params

_CONFIG = config_flags.DEFINE_config_file("config", "configs/compress.py",
                                          "Compression config.", lock_config=True)
_INIT = flags.DEFINE_string("init", None, "The dense run's workdir (or init dir).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the result goes.")
flags.mark_flags_as_required(["init", "workdir"])


def source_config(saved: dict) -> ml_collections.ConfigDict:
  """The source run's config: today's defaults updated with what it saved."""
  config = pretrain_config.get_config()

  def update(target, values):
    for k, v in values.items():
      if isinstance(v, dict) and k in target and isinstance(
          target[k], ml_collections.ConfigDict):
        update(target[k], v)
      else:
        target[k] = v
  with config.unlocked():
    update(config, saved)
  return config


def eval_loss(config, cfg, params, structure, tok, eval_src):
  batches = sm_data.eval_batches(eval_src, tok, config.batch_size,
                                 config.seq_len, config.eval_batches)
  model = Llama(cfg)
  fn = jax.jit(lambda p, b: steps.token_loss(
      model.apply({"params": p, **structure}, b[:, :-1]), b[:, 1:], tok.pad_id))
  total = count = 0.0
  for b in batches:
    t, c = fn(params, b)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cc = _CONFIG.value
  params, structure, meta = init_ckpt.load_init(_INIT.value)
  if "config" not in meta:
    raise ValueError(f"--init={_INIT.value} has no config.json: give a "
                     "pretraining workdir.")
  source = loop.apply_init_meta(source_config(meta["config"]), meta)
  tok, _, eval_src = loop.build_data(source)
  cfg = loop.model_config(source, tok.vocab_size)
  params = jax.tree.map(jnp.asarray, params)
  structure = jax.tree.map(jnp.asarray, structure)
  new_params, overrides, info = compress.convert(
      cfg, params, cc.method, cc.reduction, cc.pattern, cc.min_ratio, cc.nblocks)
  trainable = (compress.lrc_trainable_pattern(overrides)
               if cc.method == "welore" else "")
  new_meta = {"overrides": [list(o) for o in overrides], "trainable": trainable,
              "config": meta["config"], "method": cc.method}
  init_ckpt.save_init(_WORKDIR.value, new_params, structure, new_meta)
  new_cfg = loop.model_config(loop.apply_init_meta(
      source_config(meta["config"]),
      {"overrides": meta.get("overrides", []) + new_meta["overrides"]}),
      tok.vocab_size)
  before = eval_loss(source, cfg, params, structure, tok, eval_src)
  after = eval_loss(source, new_cfg, new_params, structure, tok, eval_src)
  summary = {"method": cc.method, "target_reduction": cc.reduction,
             "achieved_reduction_of_selected": info["reduction"],
             "params_before": count_params(params),
             "params_after": count_params(new_params),
             "eval_loss_before": before, "eval_loss_after": after,
             "eval_perplexity_before": math.exp(min(before, 50)),
             "eval_perplexity_after": math.exp(min(after, 50)),
             "tau": info.get("tau"), "trainable": trainable}
  if "report" in info:
    print(info["report"])
    with open(os.path.join(_WORKDIR.value, "report.txt"), "w") as f:
      f.write(info["report"] + "\n")
    with open(os.path.join(_WORKDIR.value, "report.json"), "w") as f:
      json.dump(info["rows"], f, indent=1)
  with open(os.path.join(_WORKDIR.value, "compress_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  for k, v in summary.items():
    print(f"{k}: {v}")
  print(f"\ncontinue training: python -m experiments.pretrain "
        f"--config=configs/pretrain.py --init={_WORKDIR.value} "
        f"--workdir={_WORKDIR.value}_ft (same data flags as the source run)")


if __name__ == "__main__":
  app.run(main)
