"""Sequence classification: data, GLUE metrics and the fine-tuning loop.

Tasks are tfds names with text features and an integer label (GLUE through
``tfds.data_source``, tested with ``tfds.testing.mock_data``) or the embedded
``stdlib_topic``. Each example is tokenized (two-sentence tasks joined by a
newline), truncated or right-padded to ``seq_len``, and classified from the
last real token (``LlamaClassifier``). Metrics as GLUE reports them: accuracy,
F1 of the positive class (binary tasks) and Matthews correlation.
"""
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from structmat.data import sources
from structmat.optim.adamw import make_optimizer
from structmat.train.checkpoint import Checkpointer
from structmat.train.loop import frozen_dtype
from structmat.train.metrics import MetricWriter
from structmat.train.partition import merge
from structmat.train.state import create_state

# name -> (text features, number of classes, evaluation split). GLUE test
# labels are hidden (-1), so GLUE evaluates on validation.
TASKS = {
    "glue/sst2": (("sentence",), 2, "validation"),
    "glue/cola": (("sentence",), 2, "validation"),
    "glue/mrpc": (("sentence1", "sentence2"), 2, "validation"),
    "glue/rte": (("sentence1", "sentence2"), 2, "validation"),
    "glue/qnli": (("question", "sentence"), 2, "validation"),
    "glue/qqp": (("question1", "question2"), 2, "validation"),
    "stdlib_topic": (("sentence",), 2, "validation"),
}


def task_info(name: str):
  if name not in TASKS:
    raise ValueError(f"task={name!r} is not a classification task; use one of "
                     f"{sorted(TASKS)}.")
  return TASKS[name]


def encode(records, keys, tok, seq_len: int, limit: int = 0):
  """(tokens (N, seq_len) int32, lengths (N,), labels (N,)) of a split."""
  n = len(records) if not limit else min(limit, len(records))
  tokens = np.full((n, seq_len), tok.pad_id, np.int32)
  lengths = np.zeros(n, np.int32)
  labels = np.zeros(n, np.int32)
  for i in range(n):
    r = records[i]
    text = "\n".join(sources.as_text(r[k]) for k in keys)
    ids = list(tok.encode(text))[:seq_len] or [tok.pad_id]
    tokens[i, :len(ids)] = ids
    lengths[i] = len(ids)
    labels[i] = int(r["label"])
  if (labels < 0).any():
    raise ValueError("this split has hidden labels (-1): evaluate on "
                     "validation, as GLUE does.")
  return tokens, lengths, labels


def glue_metrics(preds, labels, num_classes: int) -> dict:
  """accuracy, F1 (binary: positive class 1) and Matthews correlation."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  out = {"accuracy": float(np.mean(preds == labels))}
  c = np.zeros((num_classes, num_classes))
  np.add.at(c, (labels, preds), 1)
  if num_classes == 2:
    tp, fp, fn = c[1, 1], c[0, 1], c[1, 0]
    out["f1"] = float(2 * tp / max(2 * tp + fp + fn, 1))
  # Multi-class MCC (Gorodkin), = the binary formula for two classes.
  t, p, s = c.sum(1), c.sum(0), c.sum()
  cov = np.trace(c) * s - t @ p
  den = math.sqrt((s * s - p @ p) * (s * s - t @ t))
  out["mcc"] = float(cov / den) if den else 0.0
  return out


def _loss(params, state, model, tokens, lengths, labels):
  logits = model.apply({"params": merge(params, state.frozen),
                        **state.structure}, tokens, lengths)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state, batch, *, model, tx):
  loss, grads = jax.value_and_grad(_loss)(state.params, state, model, *batch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), {"train_loss": loss}


def predict(state, tokens, lengths, *, model):
  logits = model.apply({"params": state.all_params(), **state.structure},
                       tokens, lengths)
  return jnp.argmax(logits, -1)


def _batch_ids(step: int, n: int, batch: int, seed: int):
  """Stateless sampler: the batch of ``step`` in shuffled epochs (resuming
  needs only the step)."""
  start = step * batch
  out = []
  while len(out) < batch:
    epoch, pos = divmod(start + len(out), n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out.extend(perm[pos:pos + batch - len(out)])
  return np.asarray(out)


def evaluate(state, data, batch: int, num_classes: int, predict_fn) -> dict:
  tokens, lengths, labels = data
  preds = []
  for i in range(0, len(labels), batch):
    t, l = tokens[i:i + batch], lengths[i:i + batch]
    pad = batch - len(l)  # fixed shapes: one compilation
    if pad:
      t = np.concatenate([t, np.repeat(t[:1], pad, 0)])
      l = np.concatenate([l, np.repeat(l[:1], pad, 0)])
    preds.append(np.asarray(predict_fn(state, t, l))[:batch - pad])
  return glue_metrics(np.concatenate(preds), labels, num_classes)


def train_classifier(config, model, params, structure, trainable, train_data,
                     eval_data, num_classes, workdir) -> dict:
  """Fine-tune ``model`` (a LlamaClassifier) from ``params``; returns the
  final evaluation metrics plus step timing and memory figures."""
  tx = make_optimizer(config)
  example = jnp.asarray(train_data[0][:1])
  state = create_state(model, tx, config.seed, example, trainable, params,
                       frozen_dtype=frozen_dtype(config))
  if structure:
    state = state.replace(structure={**state.structure, **structure})
  ckpt = Checkpointer(workdir, config.checkpoint_every_steps)
  start = ckpt.latest_step() or 0
  if start:
    state, _ = ckpt.restore(start, state)
    print(f"resumed at step {start}", flush=True)
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx),
                    donate_argnums=0)
  predict_fn = jax.jit(functools.partial(predict, model=model))
  writer = MetricWriter(workdir)
  tokens, lengths, labels = train_data
  n, b = len(labels), config.batch_size
  t0, result, times = time.perf_counter(), {}, []
  for step in range(start + 1, config.total_steps + 1):
    ids = _batch_ids(step - 1, n, b, config.seed)
    ts = time.perf_counter()
    state, m = step_fn(state, (tokens[ids], lengths[ids], labels[ids]))
    jax.block_until_ready(m["train_loss"])  # honest per-step times
    if step % config.log_every_steps == 0 or step == config.total_steps:
      loss = float(m["train_loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite train loss at step {step}; "
                                 "lower config.lr.")
      writer.write(step, {"train_loss": loss})
      print(f"step {step}/{config.total_steps}  loss {loss:.4f}  "
            f"{(time.perf_counter() - t0) / (step - start):.3f} s/step",
            flush=True)
    times.append(time.perf_counter() - ts)
    last = step == config.total_steps
    if last or (config.eval_every_steps and step % config.eval_every_steps == 0):
      result = evaluate(state, eval_data, b, num_classes, predict_fn)
      writer.write(step, {f"eval_{k}": v for k, v in result.items()})
      print(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in
                                        result.items()), flush=True)
    if ckpt.due(step) or last:
      ckpt.save(step, state, {})
  ckpt.close()
  writer.close()
  steady = times[len(times) // 2:] or [0.0]
  result.update(step=int(state.step), step_seconds=float(np.median(steady)),
                trainable_parameters=sum(  # the new head included
                    l.size for l in jax.tree.leaves(state.params)),
                total_parameters=sum(  # no LM head; cls_head instead
                    l.size for l in jax.tree.leaves(state.all_params())),
                optimizer_state_bytes=sum(
                    l.nbytes for l in jax.tree.leaves(state.opt_state)))
  return result
