"""Compression steps shared by experiments.compress and experiments.study."""
import json
import math
import os

import jax

from experiments.sources import load_source, model_flags, source_config
from structmat import compress
from structmat import data as sm_data
from structmat.models import build_model
from structmat.train import init_ckpt, loop, steps
from structmat.train.params import count_params


def eval_loss(config, cfg, params, structure, tok, eval_src):
  batches = sm_data.eval_batches(eval_src, tok, config.batch_size,
                                 config.seq_len, config.eval_batches)
  model = build_model(cfg)
  fn = jax.jit(lambda p, b: steps.token_loss(
      model.apply({"params": p, **structure}, b[:, :-1]), b[:, 1:], tok.pad_id))
  total = count = 0.0
  for b in batches:
    t, c = fn(params, b)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def run_compress(cc, init: str, workdir: str) -> dict:
  """Compress the run at ``init`` per config ``cc`` into ``workdir``."""
  params, structure, meta, source = load_source(init)
  tok, _, eval_srcs = loop.build_data(source)
  eval_src = eval_srcs[0]  # one process, one shard: the whole split
  cfg = loop.model_config(source, tok.vocab_size)
  new_params, overrides, info = compress.convert(
      cfg, params, cc.method, cc.reduction, cc.pattern, cc.min_ratio, cc.nblocks)
  trainable = (compress.lrc_trainable_pattern(overrides)
               if cc.method == "welore" else "")
  new_meta = {"overrides": [list(o) for o in overrides], "trainable": trainable,
              "config": meta["config"], "method": cc.method}
  init_ckpt.save_init(workdir, new_params, structure, new_meta)
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
             "tau": info.get("tau"), "trainable": trainable,
             "model": source.model, "model_flags": model_flags(source)}
  if "report" in info:
    print(info["report"])
    with open(os.path.join(workdir, "report.txt"), "w") as f:
      f.write(info["report"] + "\n")
    with open(os.path.join(workdir, "report.json"), "w") as f:
      json.dump(info["rows"], f, indent=1)
  with open(os.path.join(workdir, "compress_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  for k, v in summary.items():
    print(f"{k}: {v}")
  return summary
