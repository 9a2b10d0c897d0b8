"""LLaMA-style decoder whose attention and MLP linears are structured.

RMSNorm, rotary embeddings, SwiGLU MLP, causal multi-head attention with
optional grouped KV heads, tied or untied embeddings. Every attention and MLP
linear is built by ``make_linear`` from the config (one structure for all
sites, with per-site overrides); embeddings and the head stay dense.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from structmat.kernels import attention_tpu, shards, target
from structmat.layers import LINEARS, apply_to, make_linear
from structmat.layers.adapters import CompacterAdapter
from structmat.layers.phm import PHMRule
from structmat.models import remat

SITES = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_SITES, MLP_SITES = SITES[:4], SITES[4:]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Model hyper-parameters; ``linear`` names a structure in the registry.

  linear_kwargs: kwargs for every structured site, e.g. (("rank", 128),).
  overrides: per-site (site, linear name, kwargs) that replace the default,
    e.g. (("q", "dense", ()),) keeps the query projection dense.
  """
  vocab_size: int = 32000
  d_model: int = 512
  n_layers: int = 8
  n_heads: int = 8
  n_kv_heads: int | None = None
  d_ff: int = 1376
  max_len: int = 1024
  rope_theta: float = 10000.0
  # Hugging Face's rope_scaling as sorted (key, value) pairs, () for none:
  # rope_type "linear" (factor) or "llama3" (factor, low_freq_factor,
  # high_freq_factor, original_max_position_embeddings).
  rope_scaling: tuple = ()
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  linear: str = "dense"
  linear_kwargs: tuple = ()
  overrides: tuple = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "xla"  # kernels of the layers that have them (Monarch, BTT,
                     # blockdiag, SLTrain): see structmat.kernels.dispatch
  attention: str = "auto"  # see ATTENTION_IMPLS / attend()
  remat: str = "none"  # blocks' activation checkpointing: see models.remat
  # Compacter-style bottleneck adapters inserted after sublayers, as sorted
  # (key, value) pairs, () for none: after ("attn,mlp" or "mlp"), n, rank
  # (None: full PHM slices), reduction_factor. One PHM rule is shared by all.
  adapters: tuple = ()

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def linear_for(self, site: str, layer: int | None = None) -> tuple[str, dict]:
    """The (registry name, kwargs) of a site after overrides.

    An override keyed "3.q" (layer 3 only) wins over one keyed "q" (every
    layer); WeLore's per-matrix ranks use the layer-specific form.
    """
    found = None
    for s, name, kwargs in self.overrides:
      if layer is not None and s == f"{layer}.{site}":
        return name, dict(kwargs)
      if s == site:
        found = (name, dict(kwargs))
    return found or (self.linear, dict(self.linear_kwargs))

  def validate(self) -> None:
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} must be divisible by "
                       f"n_heads={self.n_heads}.")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of "
                       f"n_kv_heads={self.kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary "
                       "embeddings; change d_model or n_heads.")
    remat.check(self.remat)
    unknown = {s for s, _, _ in self.overrides
               if s.rpartition(".")[2] not in SITES
               or (s.count(".") and not s.partition(".")[0].isdigit())}
    if unknown:
      raise ValueError(f"overrides name unknown sites {sorted(unknown)}; "
                       f"sites are {SITES}.")


def parse_value(v: str):
  """A config-string value: int, float, None ("none") or the string."""
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return None if v.lower() == "none" else v


def parse_adapters(spec: str) -> tuple:
  """"after=attn+mlp;n=4;rank=1;reduction_factor=32" -> LlamaConfig.adapters."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    k, _, v = item.partition("=")
    out[k] = v.replace("+", ",") if k == "after" else parse_value(v)
  if out and (not out.get("after")
              or set(out["after"].split(",")) - {"attn", "mlp"}):
    raise ValueError(f"config.adapters={spec!r}: after= must list attn "
                     "and/or mlp joined by '+'.")
  return tuple(sorted(out.items()))


def site_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
  """site -> (in_features, out_features) of its linear."""
  hd = cfg.head_dim
  return {"q": (cfg.d_model, cfg.n_heads * hd),
          "k": (cfg.d_model, cfg.kv_heads * hd),
          "v": (cfg.d_model, cfg.kv_heads * hd),
          "o": (cfg.n_heads * hd, cfg.d_model),
          "gate": (cfg.d_model, cfg.d_ff), "up": (cfg.d_model, cfg.d_ff),
          "down": (cfg.d_ff, cfg.d_model)}


def site_params(params, layer: int, site: str) -> dict:
  """The parameter dict holding linear ``site`` of block ``layer``."""
  return params[f"layer_{layer}"]["attn" if site in ATTN_SITES else "mlp"]


def _linear(cfg: LlamaConfig, layer: int, site: str, features: int, axes,
            **extra):
  name, kwargs = cfg.linear_for(site, layer)
  if "impl" in LINEARS[name].__dataclass_fields__:
    kwargs.setdefault("impl", cfg.impl)
  use_bias = extra.pop("use_bias", False)
  return make_linear(name, features=features, use_bias=use_bias,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     kernel_axes=axes, name=site, **kwargs, **extra)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, scaling: tuple = ()):
  """(head_dim/2,) inverse frequencies theta^(-i/half), rescaled as HF does."""
  half = head_dim // 2
  inv = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  sc = dict(scaling)
  kind = sc.get("rope_type", sc.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling type {kind!r} is not supported; use one "
                     f"of {ROPE_TYPES}.")
  if kind == "linear":
    return inv / sc["factor"]
  if kind == "llama3":  # smooth interpolation between low and high bands
    factor, old = sc["factor"], sc["original_max_position_embeddings"]
    low, high = sc["low_freq_factor"], sc["high_freq_factor"]
    wavelen = 2 * jnp.pi / inv
    scaled = jnp.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return jnp.where(medium, mid, scaled)
  return inv


def rotary(x, positions, theta: float, scaling: tuple = ()):
  """Rotate (..., length, heads, head_dim) by position (half-split convention,
  as Hugging Face LLaMA checkpoints expect)."""
  half = x.shape[-1] // 2
  freqs = rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions[..., :, None, None].astype(jnp.float32) * freqs
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)


def rms_norm(cfg: LlamaConfig, name: str) -> nn.Module:
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(
                        nn.initializers.ones, ("norm",)))


ATTENTION_IMPLS = ("auto", "naive", "xla", "cudnn", "tpu_flash")


def attention_impl(name: str, dtype, head_dim: int, batch: int,
                   seq_len: int, platform: str | None = None) -> str:
  """Resolve "auto": cuDNN's fused (flash) attention on GPUs in 16-bit dtypes
  with head_dim a multiple of 8 up to 128 (its constraints), the Pallas
  flash kernel on TPUs from ``attention_tpu.AUTO_FROM`` (512) tokens where
  the shapes fit it (seq_len a multiple of 128), XLA otherwise (and on the
  CPU). ``platform`` ("cpu", "gpu", "tpu"): the choice for it (a memory
  estimate's); default: the traced step's (``target.platform()``; cuDNN
  only on a GPU host)."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention={name!r}; use one of {ATTENTION_IMPLS}.")
  # cuDNN is looked up while tracing: only on a GPU host (a step
  # cross-lowered for one on a CPU attends through XLA).
  gpu = platform == "gpu" if platform else jax.default_backend() == "gpu"
  platform = platform or target.platform()
  if name == "tpu_flash" and platform not in ("tpu", "cpu"):
    raise ValueError(f"attention='tpu_flash' runs on TPUs (and interpreted on "
                     f"the CPU), not on {platform}; use 'auto'.")
  if name != "auto":
    return name
  if (gpu and jnp.dtype(dtype).itemsize == 2
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  if (platform == "tpu" and seq_len >= attention_tpu.AUTO_FROM
      and attention_tpu.why_not(batch, seq_len) is None):
    return "tpu_flash"
  return "xla"


def attend(q, k, v, impl: str = "auto"):
  """Causal attention. q (b, t, heads, d); k, v (b, t, kv_heads, d) with
  kv_heads dividing heads (grouped KV heads) -> (b, t, heads, d).

  "naive" writes the float32 score matrix out (the readable reference);
  "xla" / "cudnn" go through ``jax.nn.dot_product_attention``; "tpu_flash"
  is jax's Pallas TPU flash kernel (``kernels.attention_tpu``).
  """
  impl = attention_impl(impl, q.dtype, q.shape[-1], *q.shape[:2])
  if impl == "tpu_flash":
    return attention_tpu.attention(q, k, v)
  if impl != "naive":
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        implementation=impl)
  t, hd = q.shape[1], q.shape[-1]
  group = q.shape[2] // k.shape[2]
  if group > 1:  # grouped KV heads: each KV head serves `group` query heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k).astype(jnp.float32)
  mask = jnp.tril(jnp.ones((t, t), bool))
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
  cfg: LlamaConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x, positions):
    cfg = self.cfg
    b, t, _ = x.shape
    hd = cfg.head_dim
    lin = functools.partial(_linear, cfg, self.layer)
    q = lin("q", cfg.n_heads * hd, ("embed", "heads"))(x)
    k = lin("k", cfg.kv_heads * hd, ("embed", "kv_heads"))(x)
    v = lin("v", cfg.kv_heads * hd, ("embed", "kv_heads"))(x)
    q = rotary(q.reshape(b, t, cfg.n_heads, hd), positions, cfg.rope_theta,
               cfg.rope_scaling)
    k = rotary(k.reshape(b, t, cfg.kv_heads, hd), positions, cfg.rope_theta,
               cfg.rope_scaling)
    v = v.reshape(b, t, cfg.kv_heads, hd)
    out = attend(q, k, v, cfg.attention).reshape(b, t, -1)
    return lin("o", cfg.d_model, ("heads", "embed"))(out)


def swiglu(gate, up):
  return nn.silu(gate) * up


class MLP(nn.Module):
  cfg: LlamaConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    lin = functools.partial(_linear, cfg, self.layer)
    gate = lin("gate", cfg.d_ff, ("embed", "mlp"))(x)
    up = lin("up", cfg.d_ff, ("embed", "mlp"))(x)
    # apply_to: an SLTrain down projection with kernel_block rebuilds its
    # input from gate and up in its backward instead of keeping it.
    return apply_to(lin("down", cfg.d_model, ("mlp", "embed")), swiglu, gate,
                    up)


class Block(nn.Module):
  cfg: LlamaConfig
  layer: int = 0
  rule: nn.Module | None = None  # the model's shared PHM rule (adapters)

  def _adapt(self, h, where: str):
    """Compacter: a residual PHM bottleneck on the sublayer's output."""
    ad = dict(self.cfg.adapters)
    if where not in ad.get("after", "").split(","):
      return h
    return CompacterAdapter(ad.get("reduction_factor", 32), ad.get("n", 4),
                            ad.get("rank", 1), rule=self.rule,
                            dtype=self.cfg.dtype,
                            param_dtype=self.cfg.param_dtype,
                            name=f"{where}_adapter")(h)

  @nn.compact
  def __call__(self, x, positions):
    cfg = self.cfg
    norm = lambda name: rms_norm(cfg, name)
    attn = Attention(cfg, self.layer, name="attn")
    x = x + self._adapt(attn(norm("attn_norm")(x), positions), "attn")
    return x + self._adapt(MLP(cfg, self.layer, name="mlp")(
        norm("mlp_norm")(x)), "mlp")


def _backbone(cfg: LlamaConfig, tokens, positions):
  """(embedding module, final normed hidden (batch, length, d_model)).

  Called from a compact ``__call__``: the submodules it creates belong to the
  caller, so Llama and LlamaClassifier share parameter paths (embed, layer_i,
  final_norm, phm_rule) and checkpoints move between them.
  """
  cfg.validate()
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
  embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype,
                   embedding_init=nn.with_logical_partitioning(
                       nn.initializers.normal(0.02), ("vocab", "embed")),
                   name="embed")
  x = embed(tokens)
  rule = None
  if cfg.adapters:  # one rule tensor shared by every adapter (Compacter)
    rule = PHMRule(dict(cfg.adapters).get("n", 4),
                   param_dtype=cfg.param_dtype, name="phm_rule")
  block = remat.block_class(Block, cfg.remat)
  # The residual stream pinned to the batch's sharding at every block
  # boundary (shards.constrain: fsdp otherwise gathers whole batches).
  for i in range(cfg.n_layers):
    x = block(cfg, i, rule=rule, name=f"layer_{i}")(shards.constrain(x),
                                                    positions)
  x = shards.constrain(x)
  return embed, rms_norm(cfg, "final_norm")(x)


class Llama(nn.Module):
  """tokens (batch, length) int -> logits (batch, length, vocab), float32
  unless ``logits_dtype`` says otherwise (None: the compute dtype, which the
  training loss takes to save memory)."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens, positions=None, logits_dtype=jnp.float32):
    cfg = self.cfg
    embed, x = _backbone(cfg, tokens, positions)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype,
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.normal(0.02), ("embed", "vocab")),
                        name="head")(x)
    return logits if logits_dtype is None else logits.astype(logits_dtype)


class LlamaClassifier(nn.Module):
  """Sequence classification on the LLaMA backbone (HF's
  LlamaForSequenceClassification): the final hidden state of each sequence's
  last real token through a linear head ``cls_head``.

  tokens (batch, length) int, lengths (batch,) int (default: full length)
  -> logits (batch, num_classes) float32. Causal attention means right
  padding never reaches the pooled position, so no attention mask is needed.
  """
  cfg: LlamaConfig
  num_classes: int = 2

  @nn.compact
  def __call__(self, tokens, lengths=None):
    _, x = _backbone(self.cfg, tokens, None)
    if lengths is None:
      lengths = jnp.full(tokens.shape[:1], tokens.shape[1])
    last = jnp.take_along_axis(
        x, (jnp.maximum(lengths, 1) - 1)[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.num_classes, dtype=self.cfg.dtype,
                    param_dtype=self.cfg.param_dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.normal(0.02), ("embed", None)),
                    name="cls_head")(last).astype(jnp.float32)
