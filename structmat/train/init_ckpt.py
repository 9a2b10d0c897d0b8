"""Initial checkpoints: what ``--init`` reads and the compress launcher writes.

An init directory holds ``init/`` (an orbax checkpoint of {"params",
"structure"}) and ``model.json`` ({"overrides": [...], "trainable": regex,
"config": the source run's config}). ``--init`` also accepts a pretraining
workdir, whose latest checkpoint's parameters are taken.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from structmat.train.partition import merge, path_str


def save_init(directory: str, params, structure, meta: dict) -> None:
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "init"),
               {"params": params, "structure": structure}, force=True)
  with open(os.path.join(directory, "model.json"), "w") as f:
    json.dump(meta, f, indent=1)


def _restore_raw(path: str):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def load_init(path: str):
  """(params, structure, meta) from an init dir or a pretraining workdir."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "model.json")):
    raw = _restore_raw(os.path.join(path, "init"))
    with open(os.path.join(path, "model.json")) as f:
      meta = json.load(f)
    return raw["params"], raw.get("structure") or {}, meta
  ckpts = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpts):
    raise FileNotFoundError(f"--init={path}: neither an init directory "
                            "(model.json) nor a pretraining workdir "
                            "(checkpoints/).")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  if not steps:
    raise FileNotFoundError(f"--init={path}: no checkpoint in {ckpts}.")
  raw = _restore_raw(os.path.join(ckpts, str(steps[-1]), "state"))
  meta = {"overrides": [], "trainable": ""}
  cfg_file = os.path.join(path, "config.json")
  if os.path.exists(cfg_file):
    with open(cfg_file) as f:
      meta["config"] = json.load(f)
  params = merge(raw["params"], raw.get("frozen") or {})
  return params, raw.get("structure") or {}, meta


def check_compatible(expected, loaded, what: str = "params"):
  """Raise naming the first tensor whose path or shape differs."""
  exp = {path_str(p): l.shape for p, l in
         jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {path_str(p): np.shape(l) for p, l in
         jax.tree_util.tree_flatten_with_path(loaded)[0]}
  for k, shape in exp.items():
    if k not in got:
      raise ValueError(f"--init: {what} has no tensor {k!r} (expected shape "
                       f"{shape}); the config's model/linear/overrides/vocab "
                       "must match the init checkpoint.")
    if tuple(got[k]) != tuple(shape):
      raise ValueError(f"--init: tensor {k!r} has shape {tuple(got[k])}, the "
                       f"model expects {tuple(shape)}; check model, vocab_size "
                       "and overrides.")
  extra = sorted(set(got) - set(exp))
  if extra:
    raise ValueError(f"--init: tensor {extra[0]!r} is not in the model.")
