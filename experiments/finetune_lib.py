"""Fine-tuning run: method preparation, then the standard training loop."""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.sources import check_window, embedding_rows, load_source
from structmat.data import sources
from structmat.finetune import classify, export, prepare
from structmat.finetune.methods import graft
from structmat.models import LlamaClassifier, hf, save_hf
from structmat.optim import make_optimizer
from structmat.train import init_ckpt, loop
from structmat.train.params import count_params
from structmat.train.partition import partition

_TRAIN_FIELDS = ("total_steps", "warmup_steps", "lr", "eval_every_steps",
                 "checkpoint_every_steps", "log_every_steps", "seed")


def _nbytes(tree) -> int:
  return sum(math.prod(l.shape) * jnp.dtype(l.dtype).itemsize
             for l in jax.tree.leaves(tree))


def trainable_report(params, trainable: str, config) -> dict:
  """Trainable counts and the gradient + optimizer-state memory of the run.

  The state is the one ``config``'s optimizer builds for the trainable
  parameters (shapes only, nothing allocated): AdamW's two moments, or
  GaLore's projected moments and projectors. The full fine-tuning column is
  AdamW on every parameter."""
  train, _ = partition(params, trainable)
  n_train, n_all = count_params(train), count_params(params)
  state = jax.eval_shape(make_optimizer(config).init, train)
  return {"trainable_params": n_train, "total_params": n_all,
          "trainable_pct": 100.0 * n_train / n_all,
          "grad_and_opt_state_mb": (_nbytes(train) + _nbytes(state)) / 2**20,
          "full_ft_grad_and_opt_state_mb": 3 * _nbytes(params) / 2**20}


def run_finetune(fc, init: str, workdir: str) -> dict:
  """Fine-tune the run at ``init`` with config ``fc`` into ``workdir``."""
  params, structure, meta, source = load_source(init)
  if fc.task != "lm" and source.get("family", "llama") != "llama":
    raise ValueError(f"task={fc.task!r}: sequence classification heads exist "
                     f"for LLaMA models; a {source.family} source fine-tunes "
                     "on task=lm.")
  check_window(meta, fc.seq_len or source.seq_len)
  vocab = embedding_rows(params)
  cfg = loop.model_config(source, vocab)
  init_dir = os.path.join(os.path.abspath(workdir), "init")
  prepared = None
  if not os.path.exists(os.path.join(init_dir, "model.json")):
    # Prepared once: a restarted run resumes from its own checkpoints.
    prep = prepare(fc.method, cfg, params, structure, fc)
    init_ckpt.save_init(init_dir, prep.params, prep.structure, {
        "overrides": prep.overrides, "trainable": prep.trainable,
        "adapters": prep.adapters, "config": meta["config"],
        "method": fc.method, "hf": meta.get("hf", "")})
    prepared = (prep.params, prep.trainable)
  del params, structure
  config = source.copy_and_resolve_references()
  # The base model's tokenizer, whatever the fine-tuning data: a tokenizer
  # trained on the new text would scramble the pretrained embeddings.
  tok = loop.build_data(source)[0]
  with config.unlocked():
    for k in _TRAIN_FIELDS:
      config[k] = fc[k]
    for k in ("seq_len", "batch_size", "compute_dtype", "frozen_dtype"):
      if fc.get(k):
        config[k] = fc[k]
    config.overrides = ""  # the init's overrides are re-applied below
    if fc.method == "galore":  # full fine-tuning, low-rank optimizer state
      config.optimizer, config.galore.rank = "galore", fc.rank
    if getattr(tok, "model_file", ""):
      config.data.tokenizer_model = tok.model_file
    if fc.data:
      config.data.name = fc.data
      config.data.eval_split = "test" if fc.data == "lm1b" else "validation"
  report = _report(workdir, init_dir, prepared, config)
  print(f"method {fc.method}: trainable parameters "
        f"{report['trainable_params']:,} of {report['total_params']:,} "
        f"({report['trainable_pct']:.3f}%); gradients + optimizer state "
        f"{report['grad_and_opt_state_mb']:.2f} MB (full AdamW "
        f"{report['full_ft_grad_and_opt_state_mb']:.2f} MB)", flush=True)
  if fc.task == "lm":
    summary = loop.train_and_evaluate(config, workdir, init=init_dir)
  else:
    summary = _classify(fc, config, init_dir, tok, vocab, workdir)
  summary.update(report, method=fc.method, task=fc.task)
  summary.update(_export(fc, workdir, init_dir, source, vocab,
                         config.data.tokenizer_model))
  with open(os.path.join(workdir, "finetune_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _report(workdir, init_dir, prepared, config) -> dict:
  """trainable.json: written once, from the prepared parameters (read back
  from the init directory when a run stopped before writing it)."""
  path = os.path.join(workdir, "trainable.json")
  if not os.path.exists(path):
    if prepared is None:
      p, _, m = init_ckpt.load_init(init_dir)
      prepared = (p, m["trainable"])
    with open(path, "w") as f:
      json.dump(trainable_report(*prepared, config), f, indent=1)
  with open(path) as f:
    return json.load(f)


def _classify(fc, config, init_dir, tok, vocab, workdir) -> dict:
  keys, num_classes, eval_split = classify.task_info(fc.task)
  params, structure, meta = init_ckpt.load_init(init_dir)
  config = loop.apply_init_meta(config, meta)
  model = LlamaClassifier(loop.model_config(config, vocab), num_classes)
  data_dir = config.data.data_dir or None
  data = {split: classify.encode(
      sources.open_records(fc.task, split, data_dir), keys, tok,
      config.seq_len, limit)
          for split, limit in (("train", fc.max_train_examples),
                               (eval_split, fc.max_eval_examples))}
  example = jnp.asarray(data["train"][0][:1])
  fresh = nn.unbox(model.init(jax.random.key(config.seed), example))["params"]
  params = graft(fresh, params)   # the base weights; a new cls_head
  trainable = meta["trainable"]
  if trainable:
    trainable += "|cls_head/.*"
  print(f"task {fc.task}: {len(data['train'][2])} train / "
        f"{len(data[eval_split][2])} {eval_split} examples, "
        f"{num_classes} classes", flush=True)
  return classify.train_classifier(
      config, model, params, jax.tree.map(jnp.asarray, structure), trainable,
      data["train"], data[eval_split], num_classes, workdir)


def _export(fc, workdir, init_dir, source, vocab, tokenizer_model) -> dict:
  """The adapter file (trainable parameters only, when some are frozen), the
  PEFT format for LoRA, and, with fc.export_merged, a merged dense init
  directory (plus, for LM fine-tuning, the same as a Hugging Face LLaMA or
  GPT-2 directory; full and GaLore tuning included)."""
  with open(os.path.join(init_dir, "model.json")) as f:
    meta = json.load(f)
  if not meta["trainable"] and not fc.export_merged:
    return {}  # full tuning: the final checkpoint is the whole model
  if fc.task != "lm" and meta["trainable"]:  # the trained head belongs to it
    meta.update(trainable=meta["trainable"] + "|cls_head/.*", task=fc.task,
                num_classes=classify.task_info(fc.task)[1])
  params, structure, _ = init_ckpt.load_init(workdir)   # the final step
  out = {}
  if meta["trainable"]:
    out["adapter_bytes"] = export.save_adapter(
        os.path.join(workdir, "adapter"), params, structure, meta)
    print(f"adapter: {out['adapter_bytes']:,} bytes in {workdir}/adapter",
          flush=True)
  cfg = export.method_config(loop.model_config(source, vocab), meta)
  if fc.method == "lora" and fc.task == "lm":
    export.export_peft_lora(os.path.join(workdir, "peft"), cfg, params)
    out["peft"] = os.path.join(workdir, "peft")
  if fc.export_merged and not meta["adapters"]:
    dense_cfg, dense = export.merge_to_dense(cfg, params, structure)
    init_ckpt.save_init(os.path.join(workdir, "merged"), dense, {}, {
        "overrides": [], "trainable": "", "config": meta["config"]})
    out["merged"] = os.path.join(workdir, "merged")
    if fc.task == "lm":  # a classifier's head has no *ForCausalLM slot
      hf_dir = meta.get("hf", "")
      save_hf(os.path.join(workdir, "merged_hf"), dense_cfg, dense,
              hf_config=hf.read_config(hf_dir) if hf_dir else None,
              tokenizer_file=tokenizer_model)
      out["merged_hf"] = os.path.join(workdir, "merged_hf")
  return out
