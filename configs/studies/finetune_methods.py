r"""Study: every fine-tuning method on the offline downstream tasks (CPU).

  python -m experiments.finetune_study --config=configs/studies/finetune_methods.py \
      --init=runs/pretrain --workdir=runs/finetune_study

Starts from the pretraining main job's checkpoint (--init) and fine-tunes it
with full, LoRA, NOLA (both variants), Monarch (dense-to-sparse), WeLore
(LRC-only), Compacter, Compacter++ and PHM-Adapter on two tasks built from the
embedded corpus: causal LM on the stdlib's prose (stdlib_docs: a domain shift
from code) and code-topic classification (stdlib_topic). Writes
WORKDIR/results.md and results.json (trainable parameters, optimizer state,
time per step, final metric); finished runs are skipped, so it resumes.
Expected runtime on 2 CPU cores: about 35 minutes (tiny=1: about 2 minutes,
and it builds its own tiny base when --init is not given).
"""
import re

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = dict(item.split("=", 1) for item in (arg or "").split(",") if item)
  """arg: "tiny=1" (seconds-long runs), "methods=lora+compacter" (a subset)."""
  tiny = args.pop("tiny", "0") == "1"
  only = args.pop("methods", "")
  if args:
    raise ValueError(f"unknown study argument(s) {sorted(args)}; known: tiny, "
                     "methods.")
  c = ml_collections.ConfigDict()
  c.tiny = tiny
  c.steps = 3 if tiny else 200
  c.max_examples = 64 if tiny else 0
  # (task, data): "lm" fine-tunes on `data`; other tasks are classification.
  c.tasks = [("lm", "stdlib_docs"), ("stdlib_topic", "")]
  # (name, configs/finetune.py argument). llama_small has d_model 128: the
  # adapters use reduction_factor 8 (bottleneck 16) and PHM-Adapter n=8, since
  # the paper's n=12 does not divide 128.
  c.methods = [
      ("full", "method=full"),
      ("galore", "method=galore,rank=32"),
      ("lora", "method=lora,rank=8"),
      ("nola_offset", "method=nola,variant=offset,rank=8,num_basis=64"),
      ("nola_basis", "method=nola,variant=basis,rank=8,num_basis=64"),
      ("monarch", "method=monarch,nblocks=4"),
      ("welore", "method=welore,reduction=0.5"),
      ("compacter", "method=compacter,reduction_factor=8"),
      ("compacter++", "method=compacter++,reduction_factor=8"),
      ("phm_adapter", "method=phm_adapter,reduction_factor=8,n_phm=8"),
  ]
  if only:
    names = [m[0] for m in c.methods]
    # '+' joins names, and "compacter++" ends in two: split before a letter.
    only = re.split(r"\+(?=[a-z])", only)
    unknown = sorted(set(only) - set(names))
    if unknown:
      raise ValueError(f"methods={only!r}: unknown {unknown}; use names from "
                       f"{names} joined by '+'.")
    c.methods = [m for m in c.methods if m[0] in only]
  return c
