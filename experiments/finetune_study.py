r"""Run a fine-tuning study config (configs/studies/finetune_methods.py).

  python -m experiments.finetune_study --config=configs/studies/finetune_methods.py \
      --init=runs/pretrain --workdir=runs/finetune_study

Each (task, method) run goes to WORKDIR/<task>/<method>; a run whose
finetune_summary.json exists is skipped and an interrupted one resumes.
Results: WORKDIR/results.md (table) and WORKDIR/results.json.
"""
import json
import os
import subprocess
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import finetune as finetune_config
from experiments.finetune_lib import run_finetune
from structmat.utils.timing import format_table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config.")
_INIT = flags.DEFINE_string("init", "", "The pretrained run (main job).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/finetune_study", "Output.")


def _tiny_base(workdir: str) -> str:
  base = os.path.join(workdir, "base")
  if not os.path.exists(os.path.join(base, "summary.json")):
    subprocess.run([sys.executable, "-m", "experiments.pretrain",
                    "--config=configs/pretrain.py:tiny=1,steps=8",
                    f"--workdir={base}"], check=True)
  return base


def _step_seconds(path: str, tokens_per_step: float) -> float:
  """Seconds per step from the last logged rate (the loop's running average
  since the run started: compilation and evaluations amortized over it)."""
  rows = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]
  tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
  return tokens_per_step / tps[-1] if tps else float("nan")


def row_of(task: str, name: str, s: dict, path: str) -> dict:
  trainable = s.get("trainable_parameters", s["trainable_params"])
  if task == "lm":
    step_s = _step_seconds(path, s["tokens_seen"] / s["step"])
    metric = {"metric": "val ppl", "value": s["eval_perplexity"]}
  else:
    step_s = s["step_seconds"]
    metric = {"metric": "acc / F1 / MCC",
              "value": f"{s['accuracy']:.3f} / {s['f1']:.3f} / {s['mcc']:.3f}"}
  return {"task": task, "method": name, "trainable": trainable,
          "trainable_pct": 100.0 * trainable / s.get("total_parameters",
                                                    s["total_params"]),
          "opt_state_MB": s["optimizer_state_bytes"] / 2**20,
          "step_s": step_s, **metric,
          "adapter_KB": s.get("adapter_bytes", 0) / 1024}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  c, workdir = _CONFIG.value, _WORKDIR.value
  init = _INIT.value or (_tiny_base(workdir) if c.tiny else "")
  if not init:
    raise app.UsageError("--init: the pretrained run to fine-tune (e.g. "
                         "runs/pretrain, the main job's workdir).")
  rows = []
  for task, data in c.tasks:
    for name, arg in c.methods:
      fc = finetune_config.get_config(f"{arg},steps={c.steps},task={task}"
                                      + (f",data={data}" if data else ""))
      with fc.unlocked():
        fc.max_train_examples = fc.max_eval_examples = c.max_examples
        fc.eval_every_steps = fc.checkpoint_every_steps = max(1, c.steps // 2)
        fc.log_every_steps = max(1, c.steps // 10)
      path = os.path.join(workdir, task.replace("/", "_"), name)
      done = os.path.join(path, "finetune_summary.json")
      if not os.path.exists(done):
        print(f"== {task} {name} ==", flush=True)
        os.makedirs(path, exist_ok=True)
        run_finetune(fc, init, path)
      rows.append(row_of(task, name, json.load(open(done)), path))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  table = format_table(rows, ["task", "method", "trainable", "trainable_pct",
                              "opt_state_MB", "step_s", "metric", "value",
                              "adapter_KB"])
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
