"""Load Hugging Face-format checkpoints (config.json + safetensors) into
structmat's LLaMA and GPT-2 models.

    model, params = load_hf("path/to/dir")
    logits = model.apply({"params": params}, tokens)   # (batch, length, vocab)

Every linear is loaded dense (PyTorch's (out, in) weights transposed to flax's
(in, out) kernels; GPT-2's Conv1D weights already are (in, out), and its fused
c_attn is split into q, k, v). Turning the dense linears into a structure or
adding adapters is the fine-tuning methods' job (``structmat.finetune``).
Shapes are checked tensor by tensor: an error names the tensor, its shape and
the shape the config implies.
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structmat.models.gpt2 import GPT2, GPT2Config
from structmat.models.llama import Llama, LlamaConfig
from structmat.utils import safetensors

# Buffers some checkpoints carry that hold no parameters.
_IGNORED = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def read_config(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def is_hf_dir(path: str) -> bool:
  """A Hugging Face model directory: config.json naming a model_type."""
  try:
    return "model_type" in read_config(path)
  except (OSError, ValueError):
    return False


def llama_config_from_hf(c: dict, **overrides) -> LlamaConfig:
  """LlamaConfig for a HF LLaMA-family config.json (llama, mistral-style)."""
  if c.get("attention_bias") or c.get("mlp_bias"):
    raise ValueError("attention_bias / mlp_bias checkpoints are not supported "
                     "(structmat's LLaMA linears have no bias).")
  if c.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={c['hidden_act']!r}: only silu (SwiGLU).")
  heads = c["num_attention_heads"]
  if c.get("head_dim") not in (None, c["hidden_size"] // heads):
    raise ValueError(f"head_dim={c['head_dim']} differs from hidden_size / "
                     f"num_attention_heads = {c['hidden_size'] // heads}; "
                     "not supported.")
  # transformers >= 5 keeps theta and scaling in rope_parameters.
  rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
  theta = c.get("rope_theta", rope.pop("rope_theta", 10000.0))
  rope.pop("rope_theta", None)
  if rope.get("rope_type", rope.get("type")) == "default":
    rope = {}
  kw = dict(vocab_size=c["vocab_size"], d_model=c["hidden_size"],
            n_layers=c["num_hidden_layers"], n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads") or heads,
            d_ff=c["intermediate_size"],
            max_len=c.get("max_position_embeddings", 2048),
            rope_theta=float(theta), norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            rope_scaling=tuple(sorted(rope.items())))
  kw.update(overrides)
  return LlamaConfig(**kw)


def gpt2_config_from_hf(c: dict, **overrides) -> GPT2Config:
  act = c.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"activation_function={act!r}: only the tanh GELU.")
  kw = dict(vocab_size=c["vocab_size"], d_model=c["n_embd"],
            n_layers=c["n_layer"], n_heads=c["n_head"],
            d_ff=c.get("n_inner") or 4 * c["n_embd"],
            max_len=c["n_positions"],
            norm_eps=c.get("layer_norm_epsilon", 1e-5))
  kw.update(overrides)
  return GPT2Config(**kw)


def _llama_tensors(t: dict, cfg: LlamaConfig) -> dict:
  """our param path (tuple) -> (HF name, array in our layout)."""
  return {p: (name, _get(t, name).T if p[-1] == "kernel" else _get(t, name))
          for p, name in _llama_names(cfg).items()}


def _llama_names(cfg: LlamaConfig) -> dict:
  """our param path (tuple) -> HF tensor name; kernels are transposed."""
  out = {("embed", "embedding"): "model.embed_tokens.weight",
         ("final_norm", "scale"): "model.norm.weight"}
  if not cfg.tie_embeddings:
    out[("head", "kernel")] = "lm_head.weight"
  for i in range(cfg.n_layers):
    pre = f"model.layers.{i}."
    for site in ("q", "k", "v", "o"):
      out[(f"layer_{i}", "attn", site, "kernel")] = f"{pre}self_attn.{site}_proj.weight"
    for site in ("gate", "up", "down"):
      out[(f"layer_{i}", "mlp", site, "kernel")] = f"{pre}mlp.{site}_proj.weight"
    out[(f"layer_{i}", "attn_norm", "scale")] = f"{pre}input_layernorm.weight"
    out[(f"layer_{i}", "mlp_norm", "scale")] = f"{pre}post_attention_layernorm.weight"
  return out


def hf_llama_config(cfg: LlamaConfig) -> dict:
  """A transformers LlamaConfig dict (config.json) for a dense LlamaConfig."""
  return {
      "model_type": "llama", "architectures": ["LlamaForCausalLM"],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
      "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": dict(cfg.rope_scaling) or None,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


def hf_gpt2_config(cfg: GPT2Config) -> dict:
  """A transformers GPT2Config dict (config.json) for a dense GPT2Config."""
  return {
      "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
      "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model,
      "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
      "n_positions": cfg.max_len, "layer_norm_epsilon": cfg.norm_eps,
      "activation_function": "gelu_new", "tie_word_embeddings": True,
      "torch_dtype": "float32"}


def _gpt2_out(cfg: GPT2Config, flat: dict) -> dict:
  """HF tensor name -> array: ``_gpt2_tensors`` inverted (q, k, v fused back
  into c_attn; Conv1D weights are already (in, out))."""
  def get(*p):
    if p not in flat:
      raise ValueError(f"a dense GPT-2 needs parameter {'/'.join(p)}.")
    return np.asarray(flat.pop(p), np.float32)

  out = {"transformer.wte.weight": get("wte", "embedding"),
         "transformer.wpe.weight": get("wpe", "embedding"),
         "transformer.ln_f.weight": get("ln_f", "scale"),
         "transformer.ln_f.bias": get("ln_f", "bias")}
  for i in range(cfg.n_layers):
    pre, layer = f"transformer.h.{i}.", f"layer_{i}"
    for ln in ("ln_1", "ln_2"):
      out[f"{pre}{ln}.weight"] = get(layer, ln, "scale")
      out[f"{pre}{ln}.bias"] = get(layer, ln, "bias")
    for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias")):
      out[f"{pre}attn.c_attn.{hf_leaf}"] = np.concatenate(
          [get(layer, "attn", s, leaf) for s in ("q", "k", "v")], axis=-1)
      for site, group, hf_name in (("o", "attn", "attn.c_proj"),
                                   ("fc", "mlp", "mlp.c_fc"),
                                   ("proj", "mlp", "mlp.c_proj")):
        out[f"{pre}{hf_name}.{hf_leaf}"] = get(layer, group, site, leaf)
  return out


def save_hf(path: str, cfg: LlamaConfig | GPT2Config, params,
            hf_config: dict | None = None, tokenizer_file: str = "") -> None:
  """Write a dense LLaMA or GPT-2 as a Hugging Face directory (float32
  safetensors).

  ``hf_config``: the source checkpoint's config.json to keep (its
  max_position_embeddings, ids, ...); default ``hf_llama_config(cfg)`` or
  ``hf_gpt2_config(cfg)``.
  ``tokenizer_file``: a sentencepiece .model (copied as tokenizer.model) or a
  tokenizer.json (copied with the special-token files beside it).
  Structured linears must be merged first (``finetune.export.merge_to_dense``).
  """
  gpt2 = isinstance(cfg, GPT2Config)
  if cfg.linear != "dense" or cfg.overrides or getattr(cfg, "adapters", ()):
    raise ValueError("save_hf writes dense models; merge the structured or "
                     "adapter linears first (finetune.export.merge_to_dense).")
  flat = {tuple(getattr(k, "key", k) for k in kp): v
          for kp, v in jax.tree_util.tree_leaves_with_path(nn.unbox(params))}
  if gpt2:
    rest = dict(flat)  # _gpt2_out takes what it writes; extras remain
    tensors = _gpt2_out(cfg, rest)
    extra = sorted("/".join(p) for p in rest)
  else:
    names = _llama_names(cfg)
    extra = sorted("/".join(p) for p in set(flat) - set(names))
  if extra:
    raise ValueError(f"parameters a dense {'GPT-2' if gpt2 else 'LLaMA'} "
                     f"does not have: {extra[:8]}.")
  if not gpt2:
    tensors = {name: np.asarray(flat[p], np.float32).T if p[-1] == "kernel"
               else np.asarray(flat[p], np.float32)
               for p, name in names.items()}
  os.makedirs(path, exist_ok=True)
  safetensors.save_file(tensors, os.path.join(path, "model.safetensors"),
                        {"format": "pt"})
  default = hf_gpt2_config(cfg) if gpt2 else hf_llama_config(cfg)
  config = dict(hf_config or default, torch_dtype="float32")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
  if tokenizer_file.endswith(".json"):
    src = os.path.dirname(tokenizer_file)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      if os.path.exists(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), os.path.join(path, name))
    shutil.copy(tokenizer_file, os.path.join(path, "tokenizer.json"))
  elif tokenizer_file:
    shutil.copy(tokenizer_file, os.path.join(path, "tokenizer.model"))


def _gpt2_tensors(t: dict, cfg: GPT2Config) -> dict:
  d = cfg.d_model
  out = {("wte", "embedding"): ("transformer.wte.weight", None),
         ("wpe", "embedding"): ("transformer.wpe.weight", None),
         ("ln_f", "scale"): ("transformer.ln_f.weight", None),
         ("ln_f", "bias"): ("transformer.ln_f.bias", None)}
  for i in range(cfg.n_layers):
    pre = f"transformer.h.{i}."
    for ln in ("ln_1", "ln_2"):
      out[(f"layer_{i}", ln, "scale")] = (f"{pre}{ln}.weight", None)
      out[(f"layer_{i}", ln, "bias")] = (f"{pre}{ln}.bias", None)
    for j, site in enumerate(("q", "k", "v")):  # fused c_attn: columns q|k|v
      cols = slice(j * d, (j + 1) * d)
      out[(f"layer_{i}", "attn", site, "kernel")] = (f"{pre}attn.c_attn.weight",
                                                     (slice(None), cols))
      out[(f"layer_{i}", "attn", site, "bias")] = (f"{pre}attn.c_attn.bias", cols)
    for site, hf in (("o", "attn.c_proj"), ("fc", "mlp.c_fc"),
                     ("proj", "mlp.c_proj")):
      group = "attn" if site == "o" else "mlp"
      out[(f"layer_{i}", group, site, "kernel")] = (f"{pre}{hf}.weight", None)
      out[(f"layer_{i}", group, site, "bias")] = (f"{pre}{hf}.bias", None)
  res = {}
  for p, (name, idx) in out.items():
    a = _get(t, name)
    res[p] = (name, a if idx is None else a[idx])
  return res


def _get(t: dict, name: str):
  if name not in t:
    close = [k for k in t if k.split(".")[-2:] == name.split(".")[-2:]][:3]
    raise KeyError(f"tensor {name!r} is missing from the checkpoint"
                   + (f" (similar: {close})" if close else "") + ".")
  return t[name]


def _normalize_names(t: dict, model_type: str) -> dict:
  """Accept checkpoints saved from the bare model (no 'model.' or
  'transformer.' prefix) as well as from the *ForCausalLM class."""
  prefix = "transformer." if model_type == "gpt2" else "model."
  out = {}
  for k, v in t.items():
    if k.endswith(_IGNORED):
      continue
    if not k.startswith(prefix) and not k.startswith("lm_head."):
      k = prefix + k
    out[k] = v
  return out


def load_hf(path: str, dtype=jnp.float32, param_dtype=jnp.float32,
            **overrides):
  """(model, params) from a HF directory: config.json + model.safetensors (or
  shards with model.safetensors.index.json). LLaMA-family and GPT-2.

  ``overrides`` replace config fields (e.g. ``attention="naive"``).
  """
  c = read_config(path)
  kind = c.get("model_type")
  cfg_kw = dict(dtype=dtype, param_dtype=param_dtype, **overrides)
  if kind in ("llama", "mistral"):
    cfg = llama_config_from_hf(c, **cfg_kw)
    model, mapper = Llama(cfg), _llama_tensors
  elif kind == "gpt2":
    cfg = gpt2_config_from_hf(c, **cfg_kw)
    model, mapper = GPT2(cfg), _gpt2_tensors
  else:
    raise ValueError(f"{path}: model_type={kind!r}; load_hf reads llama, "
                     "mistral and gpt2 checkpoints.")
  tensors = _normalize_names(safetensors.load_dir(path), kind)
  mapped = mapper(tensors, cfg)
  if kind == "gpt2":  # the tied head may or may not be saved
    tensors.pop("lm_head.weight", None)
  used = {name for name, _ in mapped.values()}
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"{path}: tensors the {kind} model does not use: "
                     f"{unused[:8]}{' ...' if len(unused) > 8 else ''}; "
                     "check config.json matches the weights.")
  shapes = nn.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jnp.ones((1, 2), jnp.int32)))["params"]
  flat = {tuple(getattr(k, "key", k) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(shapes)}
  missing = sorted(set(flat) - set(mapped))
  if missing:
    raise ValueError(f"no checkpoint tensor for parameters {missing[:8]}.")
  params = {}
  for p, spec in flat.items():
    name, a = mapped[p]
    if tuple(a.shape) != tuple(spec.shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(a.shape)}; "
                       f"parameter {'/'.join(p)} expects {tuple(spec.shape)} "
                       "(in flax (in, out) layout) from config.json.")
    node = params
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = jnp.asarray(np.asarray(a, np.float32), param_dtype)
  return model, params
