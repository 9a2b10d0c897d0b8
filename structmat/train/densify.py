"""Monarch "reverse sparsification": switch Monarch linears to dense mid-run.

The dense kernels are materialized from the factors (the function is
unchanged at the switch); their optimizer state starts fresh, every other
parameter keeps its moments, and the step count (so the schedule) continues.
"""
import dataclasses

import jax

from structmat.layers import make_linear
from structmat.models.llama import ATTN_SITES, SITES


def monarch_sites(cfg) -> list[str]:
  return [s for s in SITES if cfg.linear_for(s)[0] == "monarch"]


def densified_config(cfg):
  """The model config with every Monarch site made dense."""
  over = tuple(o for o in cfg.overrides if o[0] not in monarch_sites(cfg))
  over += tuple((s, "dense", ()) for s in monarch_sites(cfg))
  return dataclasses.replace(cfg, overrides=over)


def _in_features(cfg, site):
  return cfg.d_ff if site == "down" else cfg.d_model


def densify_params(cfg, params):
  """Replace each Monarch site's {w1, w2} by its materialized {kernel}."""
  params = jax.tree.map(lambda x: x, params)  # shallow copy of the dict tree
  for i in range(cfg.n_layers):
    for site in monarch_sites(cfg):
      group = "attn" if site in ATTN_SITES else "mlp"
      leaf = params[f"layer_{i}"][group][site]
      name, kwargs = cfg.linear_for(site)
      features = {"q": cfg.n_heads * cfg.head_dim,
                  "k": cfg.kv_heads * cfg.head_dim,
                  "v": cfg.kv_heads * cfg.head_dim, "o": cfg.d_model,
                  "gate": cfg.d_ff, "up": cfg.d_ff, "down": cfg.d_model}[site]
      layer = make_linear(name, features=features, use_bias=False, **kwargs)
      kernel = layer.apply({"params": leaf}, _in_features(cfg, site),
                           method="to_dense")
      params[f"layer_{i}"][group][site] = {"kernel": kernel}
  return params


def carry_opt_state(new_state, old_state):
  """new_state with every leaf whose path and shape exist in old_state copied."""
  old = {jax.tree_util.keystr(p): l for p, l in
         jax.tree_util.tree_flatten_with_path(old_state)[0]}

  def pick(path, leaf):
    prev = old.get(jax.tree_util.keystr(path))
    return prev if prev is not None and prev.shape == leaf.shape else leaf
  return jax.tree_util.tree_map_with_path(pick, new_state)
