"""Convert a dense LLaMA checkpoint's linears: WeLore LRCs, Monarch, low-rank.

Each method returns new params and per-layer config overrides ("3.q" ->
structure), so the pretraining launcher can rebuild the model and continue.
"""
import re

import jax
import numpy as np

from structmat import ops
from structmat.compress import welore
from structmat.models.family import linear_sites
from structmat.models.llama import site_params

METHODS = ("welore", "monarch", "lowrank")


def linear_paths(cfg, params, pattern: str = ".*"):
  """[(layer, site, kernel)] of the dense linears whose "i.site" matches."""
  out = []
  for i in range(cfg.n_layers):
    for site in linear_sites(cfg):
      leaf = site_params(params, i, site)[site]
      if "kernel" in leaf and re.fullmatch(pattern, f"{i}.{site}"):
        out.append((i, site, np.asarray(leaf["kernel"], np.float32)))
  return out


def spectra_of(linears) -> dict:
  """"i.site" -> (shape, singular values)."""
  return {f"{i}.{s}": (k.shape, np.linalg.svd(k, compute_uv=False))
          for i, s, k in linears}


def _set(params, layer, site, value):
  """Replace a linear's kernel by ``value``'s factors; a bias (GPT-2) stays."""
  group = site_params(params, layer, site)
  if "bias" in group[site]:
    value = dict(value, bias=group[site]["bias"])
  group[site] = value


def convert(cfg, params, method: str, reduction: float = 0.5,
            pattern: str = ".*", min_ratio: float = 0.4999, nblocks: int = 4):
  """Compress a dense checkpoint's linears.

  Args:
    cfg: the LlamaConfig or GPT2Config of ``params`` (its selected linears
      must be dense).
    params: the parameter tree.
    method: "welore" (LRCs by a bisected global tau), "lowrank" (uniform rank
      giving the same reduction on every selected matrix) or "monarch"
      (``monarch_project`` with ``nblocks``).
    reduction: target parameter reduction of the selected linears.
    pattern: regex over "layer.site" names (default: every linear).

  Returns:
    (new params, overrides tuple for LlamaConfig, info dict with the report).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; use one of {METHODS}.")
  params = jax.tree.map(lambda x: x, params)
  linears = linear_paths(cfg, params, pattern)
  if not linears:
    raise ValueError(f"pattern={pattern!r} selects no dense linear.")
  overrides, info = [], {"method": method}
  if method == "welore":
    spectra = spectra_of(linears)
    tau = welore.find_tau(spectra, reduction, min_ratio)
    plans = {p.path: p for p in welore.plan(spectra, tau, min_ratio)}
    text, rows = welore.report(list(plans.values()))
    info.update(tau=tau, report=text, rows=rows,
                reduction=welore.reduction(list(plans.values())))
    for i, site, kernel in linears:
      p = plans[f"{i}.{site}"]
      if p.lrc:
        u, v = ops.lowrank_project(kernel, p.kept_rank)
        _set(params, i, site, {"u": u, "v": v})
        overrides.append((f"{i}.{site}", "lowrank", (("rank", p.kept_rank),)))
  elif method == "lowrank":
    before = after = 0
    for i, site, kernel in linears:
      m, n = kernel.shape
      rank = max(1, int(round((1 - reduction) * m * n / (m + n))))
      u, v = ops.lowrank_project(kernel, rank)
      _set(params, i, site, {"u": u, "v": v})
      overrides.append((f"{i}.{site}", "lowrank", (("rank", rank),)))
      before, after = before + m * n, after + rank * (m + n)
    info["reduction"] = 1 - after / before
  else:
    before = after = 0
    for i, site, kernel in linears:
      w1, w2 = ops.monarch_project(kernel, nblocks)
      _set(params, i, site, {"w1": w1, "w2": w2})
      overrides.append((f"{i}.{site}", "monarch", (("nblocks", nblocks),)))
      before, after = before + kernel.size, after + w1.size + w2.size
    info["reduction"] = 1 - after / before
  return params, tuple(overrides), info


def lrc_trainable_pattern(overrides) -> str:
  """Regex of the parameters WeLore fine-tunes: LRC factors and norms
  (LLaMA's *norm*, GPT-2's ln_*)."""
  sites = [s for s, name, _ in overrides if name == "lowrank"]
  parts = [rf"layer_{s.split('.')[0]}/(attn|mlp)/{s.split('.')[1]}/(u|v)"
           for s in sites]
  return "|".join(parts + [r".*norm.*", r"(.*/)?ln_\w+/.*"])
