"""Monarch "reverse sparsification": switch Monarch linears to dense mid-run.

The dense kernels are materialized from the factors (the function is
unchanged at the switch); their optimizer state starts fresh, every other
parameter keeps its moments, and the step count (so the schedule) continues.
"""
import dataclasses

import jax

from structmat.layers import make_linear
from structmat.models.family import linear_shapes, linear_sites
from structmat.models.llama import site_params


def structured_sites(cfg, names=None) -> list[tuple[int, str]]:
  """(layer, site) of every non-dense linear (of the given structure names)."""
  return [(i, s) for i in range(cfg.n_layers) for s in linear_sites(cfg)
          if cfg.linear_for(s, i)[0] != "dense"
          and (names is None or cfg.linear_for(s, i)[0] in names)]


def monarch_sites(cfg) -> list[tuple[int, str]]:
  """(layer, site) of every Monarch linear."""
  return structured_sites(cfg, ("monarch",))


def densified_config(cfg, sites=None):
  """The model config with the given linears (default: Monarch) made dense."""
  sites = monarch_sites(cfg) if sites is None else sites
  over = cfg.overrides + tuple((f"{i}.{s}", "dense", ()) for i, s in sites)
  return dataclasses.replace(cfg, overrides=over)


def densify_params(cfg, params, sites=None, structure=None):
  """Replace each given linear's parameters (default: Monarch's {w1, w2}) by
  its materialized {kernel} (the layer's own ``to_dense``; a bias stays); adapters such as
  LoRA and NOLA merge their delta into the base kernel this way.
  ``structure``: the model's non-parameter collections ({"structure": ...},
  as TrainState.structure), needed by NOLA's regenerated bases."""
  params = jax.tree.map(lambda x: x, params)  # new dicts: safe to mutate
  for i, site in monarch_sites(cfg) if sites is None else sites:
    group = site_params(params, i, site)
    name, kwargs = cfg.linear_for(site, i)
    d_in, d_out = linear_shapes(cfg)[site]
    layer = make_linear(name, features=d_out, use_bias=False, **kwargs)
    own = dict(group[site])
    bias = own.pop("bias", None)  # GPT-2's linears: kept as it is
    variables = {"params": own}
    if structure and structure.get("structure"):  # TrainState.structure
      sub = site_params(structure["structure"], i, site).get(site)
      if sub:
        variables["structure"] = sub
    group[site] = {"kernel": layer.apply(variables, d_in, method="to_dense")}
    if bias is not None:
      group[site]["bias"] = bias
  return params


def carry_opt_state(new_state, old_state):
  """new_state with every leaf whose path and shape exist in old_state copied."""
  old = {jax.tree_util.keystr(p): l for p, l in
         jax.tree_util.tree_flatten_with_path(old_state)[0]}

  def pick(path, leaf):
    prev = old.get(jax.tree_util.keystr(path))
    return prev if prev is not None and prev.shape == leaf.shape else leaf
  return jax.tree_util.tree_map_with_path(pick, new_state)
