"""Adapter files, merging, and the PEFT LoRA format.

- ``save_adapter`` / ``load_adapter``: only the trainable parameters (and the
  small non-parameter collections, e.g. NOLA keys) go to
  ``adapter.safetensors``; ``adapter.json`` records the method's model changes
  so the adapter can be put back onto any copy of the base weights.
- ``merge_to_dense``: every structured or adapted linear materialized into a
  plain dense kernel (PEFT's merge_and_unload): the result is a checkpoint of
  the base architecture. Compacter-style bottleneck adapters are nonlinear and
  cannot be merged; that raises.
- ``export_peft_lora`` / ``import_peft_lora``: LoRA adapters as PEFT writes
  them (adapter_config.json + adapter_model.safetensors, keys such as
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` holding
  (rank, in) and lora_B (out, rank); scaling lora_alpha / r, as here).
"""
import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structmat.finetune.methods import graft
from structmat.models import LlamaClassifier, build_model
from structmat.models.gpt2 import GPT2Config
from structmat.models.llama import parse_adapters, site_params
from structmat.train.densify import densify_params, structured_sites
from structmat.train.partition import partition, path_str
from structmat.utils import safetensors

HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}


def _flat(tree, prefix=""):
  return {prefix + path_str(p): np.asarray(l) for p, l in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict, prefix: str = ""):
  out = {}
  for key, value in flat.items():
    if not key.startswith(prefix):
      continue
    node, parts = out, key[len(prefix):].split("/")
    for k in parts[:-1]:
      node = node.setdefault(k, {})
    node[parts[-1]] = value
  return out


def save_adapter(directory: str, params, structure, meta: dict) -> int:
  """Write the trainable parameters (``meta["trainable"]``) and the
  collections; returns the bytes written. ``meta`` needs "trainable",
  "overrides", "adapters" (as ``methods.Prepared``) and may hold anything
  JSON (method, base run)."""
  os.makedirs(directory, exist_ok=True)
  if not meta.get("trainable"):
    raise ValueError("meta['trainable'] is empty: full fine-tuning has no "
                     "adapter; save the whole checkpoint instead.")
  train, _ = partition(params, meta["trainable"])
  tensors = {**_flat(train, "params/"), **_flat(structure or {}, "collections/")}
  path = os.path.join(directory, "adapter.safetensors")
  safetensors.save_file(tensors, path)
  with open(os.path.join(directory, "adapter.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return os.path.getsize(path)


def method_config(cfg, meta: dict):
  """The base LlamaConfig with an adapter's overrides and adapters applied."""
  over = tuple((s, n, tuple(tuple(kv) for kv in k))
               for s, n, k in meta.get("overrides", []))
  cfg = dataclasses.replace(cfg, overrides=cfg.overrides + over)
  if meta.get("adapters"):  # Compacter slots: LLaMA only
    cfg = dataclasses.replace(cfg, adapters=parse_adapters(meta["adapters"]))
  return cfg


def adapter_module(cfg, meta: dict):
  """The module an adapter's parameters belong to: ``LlamaClassifier`` for
  a classification adapter (``meta["num_classes"]``), else the LM
  (``build_model``)."""
  if meta.get("num_classes"):
    return LlamaClassifier(cfg, meta["num_classes"])
  return build_model(cfg)


def load_adapter(directory: str, cfg, base_params):
  """(method cfg, params, structure): the adapter put onto ``base_params``.

  Every parameter of the method's model comes from the adapter file or, with
  the same path and shape, from the base; anything else raises, naming it.
  Classification adapters carry their ``cls_head``; apply the result with
  ``adapter_module(cfg, read_meta(directory))``.
  """
  meta = read_meta(directory)
  tensors = safetensors.load_file(os.path.join(directory, "adapter.safetensors"))
  new_cfg = method_config(cfg, meta)
  shapes = nn.unbox(jax.eval_shape(adapter_module(new_cfg, meta).init,
                                   jax.random.key(0),
                                   jnp.ones((1, 2), jnp.int32)))
  adapter = _unflat(tensors, "params/")
  merged = graft(shapes["params"], base_params)
  merged = graft(merged, adapter)
  _check_complete(merged, directory)
  return new_cfg, merged, _unflat(tensors, "collections/")


def read_meta(directory: str) -> dict:
  """An adapter directory's ``adapter.json``."""
  with open(os.path.join(directory, "adapter.json")) as f:
    return json.load(f)


def _flat_shapes(tree):
  return {path_str(p): l for p, l in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))[0]}


def merge_to_dense(cfg, params, structure=None):
  """(dense cfg, params): every non-dense linear materialized (its layer's
  to_dense: LoRA/NOLA deltas added to the base kernel, Monarch and low-rank
  factors multiplied out). The cfg keeps no overrides or adapters."""
  if getattr(cfg, "adapters", ()):
    raise ValueError("Compacter-style adapters (config.adapters) are "
                     "nonlinear bottlenecks and cannot be merged into dense "
                     "weights; keep the adapter file, or use lora/nola.")
  sites = structured_sites(cfg)
  dense = densify_params(cfg, params, sites, structure)
  return dataclasses.replace(cfg, overrides=(), linear="dense",
                             linear_kwargs=()), dense


def _lora_sites(cfg):
  """(sites, rank, alpha) of a LoRA model: PEFT needs one rank and alpha."""
  sites = structured_sites(cfg, ("lora",))
  if not sites:
    raise ValueError("the model has no LoRA linears to export.")
  kwargs = {tuple(sorted(cfg.linear_for(s, i)[1].items())) for i, s in sites}
  if len(kwargs) != 1:
    raise ValueError("PEFT needs one rank and alpha for every LoRA module; "
                     f"found {sorted(kwargs)}.")
  kw = dict(kwargs.pop())
  return sites, int(kw["rank"]), float(kw["alpha"])


def _write_peft(directory: str, tensors: dict, config: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  safetensors.save_file(tensors, os.path.join(directory,
                                              "adapter_model.safetensors"))
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=1)


def _peft_config(base_model: str, rank: int, alpha: float, modules,
                 **extra) -> dict:
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM",
          "base_model_name_or_path": base_model, "r": rank,
          "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
          "fan_in_fan_out": False, "inference_mode": True,
          # A regex over full module names: exactly the exported modules.
          "target_modules": "(" + "|".join(re.escape(m) for m in modules)
                            + ")", **extra}


GPT2_PEFT_MODULES = {"o": "attn.c_proj", "fc": "mlp.c_fc",
                     "proj": "mlp.c_proj"}


def _export_peft_gpt2(directory, cfg, params, base_model):
  """GPT-2: LoRA on q, k and v becomes one LoRA on the fused c_attn whose rank
  is r times the number of those sites (block-diagonal A and B: the same
  delta), with alpha scaled alike so PEFT's alpha / rank stays ours; o, fc
  and proj map to c_proj, c_fc, c_proj. Conv1D weights: fan_in_fan_out."""
  sites, rank, alpha = _lora_sites(cfg)
  by_layer = {}
  for i, s in sites:
    by_layer.setdefault(i, []).append(s)
  tensors, modules, rank_pattern, alpha_pattern = {}, [], {}, {}

  def put(name, a, b):  # PEFT's (r, in) A and (out, r) B of module ``name``
    tensors[f"base_model.model.{name}.lora_A.weight"] = a
    tensors[f"base_model.model.{name}.lora_B.weight"] = b
    modules.append(name)

  d = cfg.d_model
  for i, layer_sites in sorted(by_layer.items()):
    pre = f"transformer.h.{i}."
    fused = [s for s in ("q", "k", "v") if s in layer_sites]
    if fused:
      r_all = rank * len(fused)
      a = np.zeros((r_all, d), np.float32)
      b = np.zeros((3 * d, r_all), np.float32)
      for j, s in enumerate(fused):
        lora = site_params(params, i, s)[s]["lora"]
        rows, col = slice(j * rank, (j + 1) * rank), "qkv".index(s) * d
        a[rows] = np.asarray(lora["lora_a"], np.float32).T
        b[col:col + d, rows] = np.asarray(lora["lora_b"], np.float32).T
      name = pre + "attn.c_attn"
      put(name, a, b)
      if r_all != rank:
        rank_pattern[re.escape(name)] = r_all
        alpha_pattern[re.escape(name)] = alpha * len(fused)
    for s in layer_sites:
      if s in GPT2_PEFT_MODULES:
        lora = site_params(params, i, s)[s]["lora"]
        put(pre + GPT2_PEFT_MODULES[s],
            np.asarray(lora["lora_a"], np.float32).T,
            np.asarray(lora["lora_b"], np.float32).T)
  _write_peft(directory, tensors, _peft_config(
      base_model, rank, alpha, modules, fan_in_fan_out=True,
      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))


def export_peft_lora(directory: str, cfg, params, base_model: str = "") -> None:
  """Write a LoRA model's adapters in PEFT's format (LLaMA or GPT-2)."""
  if isinstance(cfg, GPT2Config):
    _export_peft_gpt2(directory, cfg, params, base_model)
    return
  sites, rank, alpha = _lora_sites(cfg)
  tensors, modules = {}, []
  for i, s in sites:
    lora = site_params(params, i, s)[s]["lora"]
    name = f"base_model.model.model.layers.{i}.{HF_MODULES[s]}"
    tensors[f"{name}.lora_A.weight"] = np.asarray(lora["lora_a"], np.float32).T
    tensors[f"{name}.lora_B.weight"] = np.asarray(lora["lora_b"], np.float32).T
    modules.append(f"model.layers.{i}.{HF_MODULES[s]}")
  _write_peft(directory, tensors, _peft_config(base_model, rank, alpha,
                                               modules))


_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(\w+\.\w+)"
                  r"\.lora_([AB])(?:\.default)?\.weight")
_GPT2_KEY = re.compile(
    r"(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\."
    r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
    r"\.lora_([AB])(?:\.default)?\.weight")


def _peft_pattern(patterns: dict, module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches
  the end of the module name (after a dot), else the default."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _peft_site_factors(cfg, tensors, directory):
  """{(layer, site): (A (r, in), B (out, r), module name)} of a PEFT file:
  LLaMA modules map one to one; GPT-2's fused c_attn splits into q, k, v
  (B's row thirds, sharing A; an all-zero third adds nothing and is left
  out), c_proj / c_fc / mlp.c_proj are o / fc / proj."""
  gpt2 = isinstance(cfg, GPT2Config)
  key_re = _GPT2_KEY if gpt2 else _KEY
  modules = ({"attn.c_attn": None, **{v: k for k, v in
                                      GPT2_PEFT_MODULES.items()}}
             if gpt2 else {v: k for k, v in HF_MODULES.items()})
  found = {}
  for key, value in tensors.items():
    m = key_re.fullmatch(key)
    if not m or m.group(2) not in modules:
      raise ValueError(f"{directory}: tensor {key!r} is not a LoRA weight of "
                       f"a {'GPT-2' if gpt2 else 'LLaMA'} attention or MLP "
                       "projection.")
    found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
  out = {}
  for (i, mod), ab in sorted(found.items()):
    if set(ab) != {"A", "B"}:
      raise ValueError(f"{directory}: layer {i} {mod} lacks lora_A or lora_B.")
    name = (f"transformer.h.{i}.{mod}" if gpt2
            else f"model.layers.{i}.{mod}")
    if modules[mod] is not None:
      out[(i, modules[mod])] = (ab["A"], ab["B"], name)
      continue
    d = cfg.d_model
    for j, site in enumerate(("q", "k", "v")):
      part = ab["B"][j * d:(j + 1) * d]
      if np.any(part):
        out[(i, site)] = (ab["A"], part, name)
  return out


def import_peft_lora(directory: str, cfg, base_params):
  """(LoRA cfg, params) from a PEFT LoRA directory onto dense base params
  (LLaMA or GPT-2 ``cfg``). Per-module ranks and alphas (PEFT's
  rank_pattern / alpha_pattern) become per-site LoRA settings."""
  with open(os.path.join(directory, "adapter_config.json")) as f:
    pc = json.load(f)
  if pc.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{directory}: peft_type={pc.get('peft_type')!r}, not LORA.")
  if pc.get("use_dora") or pc.get("use_rslora"):
    raise ValueError(f"{directory}: DoRA / rsLoRA adapters are not supported.")
  tensors = safetensors.load_file(os.path.join(directory,
                                               "adapter_model.safetensors"))
  factors = _peft_site_factors(cfg, tensors, directory)
  over = []
  for (i, s), (a, _, name) in factors.items():
    rank = int(_peft_pattern(pc.get("rank_pattern"), name, pc["r"]))
    alpha = float(_peft_pattern(pc.get("alpha_pattern"), name,
                                pc["lora_alpha"]))
    if a.shape[0] != rank:
      raise ValueError(f"{directory}: {name} lora_A has rank {a.shape[0]}, "
                       f"the config says {rank}.")
    over.append((f"{i}.{s}", "lora", [["alpha", alpha], ["rank", rank]]))
  new_cfg = method_config(cfg, {"overrides": over})
  shapes = nn.unbox(jax.eval_shape(build_model(new_cfg).init,
                                   jax.random.key(0),
                                   jnp.ones((1, 2), jnp.int32)))["params"]
  params = graft(shapes, base_params)
  for (i, s), (a, b, name) in factors.items():
    group = site_params(params, i, s)[s]["lora"]
    for leaf, arr in (("lora_a", a.T), ("lora_b", b.T)):
      if arr.shape != group[leaf].shape:
        raise ValueError(f"{directory}: {name} lora_{leaf[-1].upper()} gives "
                         f"{s} shape {arr.T.shape}; the model expects "
                         f"{group[leaf].shape[::-1]}.")
      group[leaf] = jnp.asarray(arr, group[leaf].dtype)
  _check_complete(params, directory)
  return new_cfg, params


def _check_complete(params, where):
  missing = [p for p, l in _flat_shapes(params).items()
             if isinstance(l, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"{where}: neither the adapter nor the base has "
                     f"parameter(s) {missing[:5]}; is this the right base?")
