"""Monarch "reverse sparsification": switch Monarch linears to dense mid-run.

The dense kernels are materialized from the factors (the function is
unchanged at the switch); their optimizer state starts fresh, every other
parameter keeps its moments, and the step count (so the schedule) continues.
"""
import dataclasses

import jax

from structmat.layers import make_linear
from structmat.models.llama import SITES, site_params, site_shapes


def monarch_sites(cfg) -> list[tuple[int, str]]:
  """(layer, site) of every Monarch linear."""
  return [(i, s) for i in range(cfg.n_layers) for s in SITES
          if cfg.linear_for(s, i)[0] == "monarch"]


def densified_config(cfg):
  """The model config with every Monarch linear made dense."""
  over = cfg.overrides + tuple((f"{i}.{s}", "dense", ())
                               for i, s in monarch_sites(cfg))
  return dataclasses.replace(cfg, overrides=over)


def densify_params(cfg, params):
  """Replace each Monarch linear's {w1, w2} by its materialized {kernel}."""
  params = jax.tree.map(lambda x: x, params)  # new dicts: safe to mutate
  for i, site in monarch_sites(cfg):
    group = site_params(params, i, site)
    name, kwargs = cfg.linear_for(site, i)
    d_in, d_out = site_shapes(cfg)[site]
    layer = make_linear(name, features=d_out, use_bias=False, **kwargs)
    group[site] = {"kernel": layer.apply({"params": group[site]}, d_in,
                                         method="to_dense")}
  return params


def carry_opt_state(new_state, old_state):
  """new_state with every leaf whose path and shape exist in old_state copied."""
  old = {jax.tree_util.keystr(p): l for p, l in
         jax.tree_util.tree_flatten_with_path(old_state)[0]}

  def pick(path, leaf):
    prev = old.get(jax.tree_util.keystr(path))
    return prev if prev is not None and prev.shape == leaf.shape else leaf
  return jax.tree_util.tree_map_with_path(pick, new_state)
