"""Fine-tuning methods: turn a pretrained dense LLaMA or GPT-2 checkpoint into
the model, initial parameters and trainable-parameter regex of one method
(the Compacter family needs LLaMA's adapter slots).

Methods (``method=`` in configs/finetune.py):

  full         every parameter trains.
  lora         LoRA deltas on the linears whose "layer.site" name fully matches
               ``target`` (PEFT's target_modules; default q and v).
  nola         NOLA deltas on the same linears (``variant`` offset or basis).
  monarch      the matched dense linears projected onto Monarch factors
               (closed form), then the factors fine-tuned (dense-to-sparse).
  welore       WeLore compression, then only the low-rank components (LRCs)
               and norms fine-tuned.
  compacter    PHM bottleneck adapters after attention and MLP, one shared
               rule, rank-1 factors (Compacter); adapters + norms train.
  compacter++  the same after the MLP only.
  phm_adapter  full-rank PHM adapters (n=12 in the paper) after both.

Frozen parameters live outside the optimizer (``TrainState.frozen``): no
gradient is computed for them and no optimizer state is kept.
"""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structmat import compress
from structmat.models import build_model, linear_sites
from structmat.models.gpt2 import GPT2Config
from structmat.models.llama import ATTN_SITES, parse_adapters

METHODS = ("full", "galore", "lora", "nola", "monarch", "welore", "compacter",
           "compacter++", "phm_adapter")
ADAPTER_PLACES = {"compacter": "attn+mlp", "compacter++": "mlp",
                  "phm_adapter": "attn+mlp"}
NORMS = r".*norm.*"


@dataclasses.dataclass
class Prepared:
  """What a method hands the training loop."""
  overrides: list      # [(site key "i.site", linear name, [(k, v), ...])]
  adapters: str        # config.adapters string ("" for none)
  params: dict
  structure: dict
  trainable: str       # regex over "a/b/c" parameter paths ("" = all)


def matched_sites(cfg, target: str) -> list[str]:
  """The "layer.site" names that ``target`` fully matches."""
  sites = linear_sites(cfg)
  names = [f"{i}.{s}" for i in range(cfg.n_layers) for s in sites]
  hits = [n for n in names if re.fullmatch(target, n)]
  if not hits:
    raise ValueError(f"target={target!r} matches no linear; names look like "
                     f"'0.q' (sites {sites}).")
  return hits


def _site_regex(sites: list[str], leaf: str) -> str:
  parts = []
  for s in sites:
    layer, site = s.split(".")
    group = "attn" if site in ATTN_SITES else "mlp"
    parts.append(f"layer_{layer}/{group}/{site}/{leaf}")
  return "|".join(parts)


def graft(new, base):
  """``new``'s tree with every leaf that ``base`` has (same path and shape)
  taken from ``base``: the pretrained weights under the method's additions."""
  if isinstance(new, dict):
    return {k: graft(v, base.get(k) if isinstance(base, dict) else None)
            for k, v in new.items()}
  if base is not None and np.shape(base) == np.shape(new):
    return jnp.asarray(base, new.dtype)
  return new


def _init_with(cfg, params, structure, seed: int):
  """Initialize the method's model and graft the pretrained weights in."""
  example = jnp.ones((1, 8), jnp.int32)
  v = dict(nn.unbox(build_model(cfg).init(jax.random.key(seed), example)))
  new_params = v.pop("params")
  # Non-parameter collections ({"structure": ...}: SLTrain supports, NOLA
  # keys), the base's kept where it has them.
  return graft(new_params, params), graft(v, structure or {})


def prepare(method: str, cfg, params, structure, hp) -> Prepared:
  """The method's model changes, parameters and trainable regex.

  Args:
    method: one of METHODS.
    cfg: the pretrained model's LlamaConfig (selected linears dense).
    params: its parameters; structure: its other collections
      ({"structure": tree} or {}), as TrainState.structure holds them.
    hp: hyper-parameters (a ConfigDict or object with attributes): target,
      rank, alpha, num_basis, variant, nblocks, reduction, n, reduction_factor,
      seed.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; use one of {METHODS}.")
  if method in ("full", "galore"):  # galore: the same model, its optimizer
    return Prepared([], "", params, structure, "")
  if method in ("lora", "nola"):
    sites = matched_sites(cfg, hp.target)
    if method == "lora":
      kw = [("alpha", float(hp.alpha)), ("rank", int(hp.rank))]
      leaf = "lora/lora_(a|b)"
    else:
      kw = [("num_basis", int(hp.num_basis)), ("rank", int(hp.rank)),
            ("variant", hp.variant)]
      leaf = "nola/coef_(a|b)"
    overrides = [(s, method, kw) for s in sites]
    new_cfg = dataclasses.replace(cfg, overrides=cfg.overrides + tuple(
        (s, n, tuple(k)) for s, n, k in overrides))
    p, st = _init_with(new_cfg, params, structure, hp.seed)
    return Prepared(overrides, "", p, st, _site_regex(sites, leaf))
  if method in ("monarch", "welore"):
    sites = matched_sites(cfg, hp.target)
    pattern = "|".join(re.escape(s) for s in sites)
    kind = "monarch" if method == "monarch" else "welore"
    new_params, overrides, _ = compress.convert(
        cfg, params, kind, hp.reduction, pattern, nblocks=hp.nblocks)
    overrides = [(s, n, [tuple(x) for x in k]) for s, n, k in overrides]
    if method == "monarch":
      trainable = _site_regex([s for s, _, _ in overrides], "(w1|w2)")
    else:
      trainable = compress.lrc_trainable_pattern(overrides)
    return Prepared(overrides, "", new_params, structure, trainable)
  if isinstance(cfg, GPT2Config):
    raise ValueError(f"method={method!r} adds adapter slots that only the "
                     "LLaMA model has; on GPT-2 use full, galore, lora, nola, "
                     "monarch or welore.")
  # Compacter: rank-1 factors with n; PHM-Adapter: full slices with n_phm.
  n, rank = (hp.n_phm, "none") if method == "phm_adapter" else (hp.n, 1)
  adapters = (f"after={ADAPTER_PLACES[method]};n={n};rank={rank};"
              f"reduction_factor={hp.reduction_factor}")
  new_cfg = dataclasses.replace(cfg, adapters=parse_adapters(adapters))
  p, st = _init_with(new_cfg, params, structure, hp.seed)
  return Prepared([], adapters, p, st,
                  r".*_adapter/.*|phm_rule/.*|" + NORMS)
