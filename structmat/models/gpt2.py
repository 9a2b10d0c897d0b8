"""GPT-2 (the architecture of the NOLA and Monarch GPT-2 experiments).

Learned position embeddings, pre-LayerNorm blocks, causal multi-head attention
and a GELU (tanh) MLP, every linear with a bias, the head tied to the token
embedding. Linear sites: attention "q", "k", "v", "o" and MLP "fc", "proj",
each built by ``make_linear`` from the config exactly as in the LLaMA model
(one structure for all sites, per-site overrides), so every structure and
adapter applies. Hugging Face's fused c_attn is split into q, k, v on load.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from structmat.kernels import shards
from structmat.layers import apply_to
from structmat.models import remat
from structmat.models.llama import LlamaConfig, _linear, attend

GPT2_SITES = ("q", "k", "v", "o", "fc", "proj")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """GPT-2 hyper-parameters (defaults: GPT-2 small, 124M)."""
  vocab_size: int = 50257
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  d_ff: int = 3072
  max_len: int = 1024
  norm_eps: float = 1e-5
  linear: str = "dense"
  linear_kwargs: tuple = ()
  overrides: tuple = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "xla"
  attention: str = "auto"
  remat: str = "none"  # blocks' activation checkpointing: see models.remat

  linear_for = LlamaConfig.linear_for  # same override rules as LLaMA

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def validate(self) -> None:
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} must be divisible by "
                       f"n_heads={self.n_heads}.")
    remat.check(self.remat)
    unknown = {s for s, _, _ in self.overrides
               if s.rpartition(".")[2] not in GPT2_SITES}
    if unknown:
      raise ValueError(f"overrides name unknown sites {sorted(unknown)}; "
                       f"GPT-2 sites are {GPT2_SITES}.")


def _norm(cfg, name):
  # Boxed like every other parameter, so sharding and memory estimates see
  # logical axes (replicated: "norm" maps to no mesh axis).
  box = lambda init: nn.with_logical_partitioning(init, ("norm",))
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name=name,
                      scale_init=box(nn.initializers.ones),
                      bias_init=box(nn.initializers.zeros))


class GPT2Attention(nn.Module):
  cfg: GPT2Config
  layer: int = 0

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, t, d = x.shape
    lin = functools.partial(_linear, cfg, self.layer, use_bias=True)
    heads = lambda y: y.reshape(b, t, cfg.n_heads, cfg.head_dim)
    q = heads(lin("q", d, ("embed", "heads"))(x))
    k = heads(lin("k", d, ("embed", "heads"))(x))
    v = heads(lin("v", d, ("embed", "heads"))(x))
    out = attend(q, k, v, cfg.attention).reshape(b, t, d)
    return lin("o", d, ("heads", "embed"))(out)


def gelu(h):
  return nn.gelu(h, approximate=True)


class GPT2MLP(nn.Module):
  cfg: GPT2Config
  layer: int = 0

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    lin = functools.partial(_linear, cfg, self.layer, use_bias=True)
    h = lin("fc", cfg.d_ff, ("embed", "mlp"))(x)
    return apply_to(lin("proj", cfg.d_model, ("mlp", "embed")), gelu, h)


class GPT2Block(nn.Module):
  cfg: GPT2Config
  layer: int = 0

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    x = x + GPT2Attention(cfg, self.layer, name="attn")(_norm(cfg, "ln_1")(x))
    return x + GPT2MLP(cfg, self.layer, name="mlp")(_norm(cfg, "ln_2")(x))


class GPT2(nn.Module):
  """tokens (batch, length) int -> logits (batch, length, vocab), float32
  unless ``logits_dtype`` says otherwise (None: the compute dtype)."""
  cfg: GPT2Config

  @nn.compact
  def __call__(self, tokens, positions=None, logits_dtype=jnp.float32):
    cfg = self.cfg
    cfg.validate()
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
    emb = lambda n, name, axes: nn.Embed(
        n, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), axes), name=name)
    wte = emb(cfg.vocab_size, "wte", ("vocab", "embed"))
    x = wte(tokens) + emb(cfg.max_len, "wpe", (None, "embed"))(positions)
    block = remat.block_class(GPT2Block, cfg.remat)
    for i in range(cfg.n_layers):   # shards.constrain: see llama._backbone
      x = block(cfg, i, name=f"layer_{i}")(shards.constrain(x))
    x = _norm(cfg, "ln_f")(shards.constrain(x))
    logits = wte.attend(x)
    return logits if logits_dtype is None else logits.astype(logits_dtype)
