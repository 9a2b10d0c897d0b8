"""Where a launcher starts from: a structmat run or init directory, or a
Hugging Face LLaMA-family or GPT-2 directory (its sizes and tokenizer become
the config's).

Used by experiments.compress, experiments.finetune and experiments.pretrain.
"""
import json
import os

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections

from configs import pretrain as pretrain_config
from structmat import data as sm_data
from structmat.models import hf
from structmat.models.family import GPT2_DIMS, family_of
from structmat.train import init_ckpt, loop


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


def hf_source(path: str):
  """(params, structure, meta, config) for a Hugging Face LLaMA-family or
  GPT-2 directory.

  The config is today's pretraining defaults with the checkpoint's family and
  sizes (family, model="custom", model_dims) and its tokenizer
  (tokenizer.model, else tokenizer.json), so the launchers tokenize and build
  the model exactly as the checkpoint expects.
  """
  hf_config = hf.read_config(path)
  if hf_config.get("model_type") not in ("llama", "mistral", "gpt2"):
    raise ValueError(f"--init={path}: model_type="
                     f"{hf_config.get('model_type')!r}; the launchers train "
                     "llama, mistral and gpt2 checkpoints.")
  # sentencepiece (a core dependency) where the checkpoint has it, else
  # tokenizer.json through the optional tokenizers package.
  for kind, name in (("sentencepiece", "tokenizer.model"), ("hf", "tokenizer.json")):
    tok_file = os.path.join(os.path.abspath(path), name)
    if os.path.exists(tok_file):
      break
  else:
    raise ValueError(f"--init={path} has neither tokenizer.model nor "
                     "tokenizer.json: the launchers tokenize with the "
                     "checkpoint's own tokenizer.")
  model, params = hf.load_hf(path)
  cfg = model.cfg
  # Mistral-style sliding-window attention: structmat attends over the whole
  # sequence, which is the same function only up to the window.
  window = (int(hf_config["sliding_window"]) if hf_config.get("sliding_window")
            and hf_config.get("use_sliding_window", True) else 0)
  size = sm_data.make_tokenizer(kind, model_file=tok_file).vocab_size
  if size > cfg.vocab_size or (kind == "sentencepiece" and size != cfg.vocab_size):
    raise ValueError(f"--init={path}: {name} has {size} tokens but the "
                     f"embedding has {cfg.vocab_size} rows; the launchers need "
                     "them equal (a tokenizer.json may have fewer).")
  config = pretrain_config.get_config()
  with config.unlocked():
    config.model = "custom"
    config.family = family_of(cfg)
    if config.family == "gpt2":  # learned positions: max_len is a size
      config.model_dims = json.dumps({f: getattr(cfg, f) for f in GPT2_DIMS})
      config.n_kv_heads, config.tie_embeddings = 0, True
    else:
      config.model_dims = json.dumps({
          "d_model": cfg.d_model, "d_ff": cfg.d_ff, "n_layers": cfg.n_layers,
          "n_heads": cfg.n_heads, "rope_theta": cfg.rope_theta,
          "rope_scaling": [list(kv) for kv in cfg.rope_scaling],
          "norm_eps": cfg.norm_eps})
      config.n_kv_heads = cfg.kv_heads if cfg.kv_heads != cfg.n_heads else 0
      config.tie_embeddings = cfg.tie_embeddings
    config.data.tokenizer = kind
    config.data.tokenizer_model = tok_file
    config.data.vocab_size = cfg.vocab_size
    config.seq_len = min(config.seq_len, cfg.max_len, window or cfg.max_len)
  meta = {"overrides": [], "trainable": "", "config": config.to_dict(),
          "hf": os.path.abspath(path)}
  if window:
    meta["sliding_window"] = window
  return params, {}, meta, config


def hf_init(config, init: str, workdir: str):
  """(config, init directory) for a pretraining run whose --init is a Hugging
  Face LLaMA or GPT-2 directory: the checkpoint's parameters written once as
  WORKDIR/hf_init, and the config's model and tokenizer fields taken from
  the checkpoint. Other --init values pass through unchanged."""
  if not hf.is_hf_dir(init):
    return config, init
  init_dir = os.path.join(os.path.abspath(workdir), "hf_init")
  meta_file = os.path.join(init_dir, "model.json")
  if os.path.exists(meta_file):  # converted before: a restart
    with open(meta_file) as f:
      meta = json.load(f)
    source = source_config(meta["config"])
  else:
    params, _, meta, source = hf_source(init)
    if jax.process_index() == 0:
      init_ckpt.save_init(init_dir, params, {}, meta)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("structmat_hf_init")
  check_window(meta, config.seq_len)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for k in ("model", "family", "model_dims", "n_kv_heads", "tie_embeddings"):
      config[k] = source[k]
    for k in ("tokenizer", "tokenizer_model", "vocab_size"):
      config.data[k] = source.data[k]
  return config, init_dir


def check_window(meta: dict, seq_len: int) -> None:
  """Refuse sequences longer than a Mistral-style sliding window: structmat
  attends over the whole sequence, the same function only up to the window."""
  window = meta.get("sliding_window")
  if window and seq_len > window:
    raise ValueError(f"seq_len={seq_len} exceeds the checkpoint's "
                     f"sliding_window={window}; structmat attends over the "
                     "whole sequence, the same function only up to the "
                     "window: use seq_len <= the window.")


def model_flags(config) -> str:
  """The launcher flags that rebuild a Hugging Face source's model ("" for a
  preset, which the source run's own flags already name)."""
  if config.model != "custom":
    return ""
  return (f"--config.model=custom --config.family={config.family} "
          f"--config.model_dims='{config.model_dims}' "
          f"--config.n_kv_heads={config.n_kv_heads} "
          f"--config.tie_embeddings={config.tie_embeddings} "
          f"--config.data.tokenizer={config.data.tokenizer} "
          f"--config.data.vocab_size={config.data.vocab_size} "
          f"--config.data.tokenizer_model={config.data.tokenizer_model}")


def embedding_rows(params) -> int:
  """The token embedding's rows (the model's vocabulary, padding included)."""
  return (params.get("embed") or params["wte"])["embedding"].shape[0]


def load_source(init: str):
  """(params, structure, meta, the source run's config) of a pretraining
  workdir, an init directory or a Hugging Face LLaMA or GPT-2 directory,
  parameters as jax arrays."""
  if hf.is_hf_dir(init):
    return hf_source(init)
  params, structure, meta = init_ckpt.load_init(init)
  if "config" not in meta:
    raise ValueError(f"--init={init} has no config.json: give a pretraining "
                     "workdir (or an init directory written by structmat).")
  source = loop.apply_init_meta(source_config(meta["config"]), meta)
  return (jax.tree.map(jnp.asarray, params),
          jax.tree.map(jnp.asarray, structure), meta, source)
