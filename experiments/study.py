r"""Run a study config: its pretraining runs, compressions and continued training.

  python -m experiments.study --config=configs/studies/pretrain_methods.py --workdir=runs/study

Each run gets WORKDIR/<name>; a run whose summary.json exists is skipped and an
interrupted one resumes from its checkpoint, so the command can be repeated.
Results: WORKDIR/results.md (table) and WORKDIR/results.json.
"""
import json
import os

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from configs import compress as compress_config
from configs import pretrain as pretrain_config
from experiments.compress_lib import run_compress
from structmat.train import loop
from structmat.utils.timing import format_table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "Study directory.")


def _pretrain_config(arg: str, overrides: dict, steps: int):
  c = pretrain_config.get_config(arg)
  with c.unlocked():
    c.total_steps = steps
    c.warmup_steps = max(1, steps // 10)
    c.eval_every_steps = max(1, steps // 3)
    c.checkpoint_every_steps = max(1, steps // 3)
    c.log_every_steps = max(1, steps // 30)
    for key, value in overrides.items():
      target = c
      *parents, leaf = key.split(".")
      for p in parents:
        target = target[p]
      target[leaf] = value
  return c


def _train(name, config, workdir, init=""):
  path = os.path.join(workdir, name)
  done = os.path.join(path, "summary.json")
  if not os.path.exists(done):
    print(f"== {name} ==", flush=True)
    loop.train_and_evaluate(config, path, init)
  with open(done) as f:
    return json.load(f)


def run_study(sc, workdir: str) -> list[dict]:
  os.makedirs(workdir, exist_ok=True)
  rows = []
  base_arg = sc.runs[0][1]
  for name, arg, overrides in sc.runs:
    s = _train(name, _pretrain_config(arg, dict(overrides), sc.steps), workdir)
    rows.append(_row(name, s))
  for name, method in sc.compressions:
    out = os.path.join(workdir, name)
    summary_file = os.path.join(out, "compress_summary.json")
    if not os.path.exists(summary_file):
      cc = compress_config.get_config(f"method={method},reduction={sc.reduction}")
      run_compress(cc, os.path.join(workdir, "dense"), out)
    with open(summary_file) as f:
      cs = json.load(f)
    rows.append({"run": f"{name} (no training)", "params": cs["params_after"],
                 "eval_perplexity": cs["eval_perplexity_after"]})
    ft = _pretrain_config(base_arg, {"lr": 1e-3}, sc.ft_steps)
    s = _train(f"{name}_ft", ft, workdir, init=out)
    rows.append(_row(f"{name} + {sc.ft_steps} steps", s))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  table = format_table(rows, ["run", "params", "trainable", "eval_perplexity",
                              "opt_state_MB", "tokens_per_sec", "tokens"])
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return rows


def _row(name, s):
  return {"run": name, "params": s["parameters"],
          "trainable": s.get("trainable_parameters", s["parameters"]),
          "eval_perplexity": s["eval_perplexity"],
          "opt_state_MB": s.get("optimizer_state_bytes", 0) / 2**20,
          "tokens_per_sec": s["tokens_per_sec_this_run"],
          "tokens": s["tokens_seen"]}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  run_study(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
