r"""GaLore benchmarks: projector refresh cost, and optimizer-state memory per preset.

  python -m experiments.benchmark_galore                 # both parts
  python -m experiments.benchmark_galore --size=4096 --ranks=128,512 --part=refresh
  python -m experiments.benchmark_galore --part=memory

refresh: one projector refresh of a (size x size) float32 gradient-like
matrix (singular values 1/i) with the full SVD (official) and the randomized
range finder (8 extra columns, 2 power iterations), next to one plain AdamW
step on the same matrix; "per-step overhead" amortizes a refresh over the gap.
memory: optimizer-state bytes of AdamW and GaLore for the LLaMA presets, from
``jax.eval_shape`` (nothing allocated), next to the paper's formula (Adam 2mn;
GaLore mr + 2nr per m x n weight, m <= n, plus Adam for what is not projected).
The paper's Table 2 counts weights + states in bf16: the "bf16 GB" columns.
"""
import json
import os

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from structmat.models import Llama, llama_config
from structmat.models.presets import RANKS
from structmat.optim import galore
from structmat.utils.timing import format_table, time_fn

_PART = flags.DEFINE_enum("part", "all", ["all", "refresh", "memory"], "What to run.")
_SIZE = flags.DEFINE_integer("size", 4096, "Matrix size for the refresh.")
_RANKS = flags.DEFINE_list("ranks", ["128", "512"], "Ranks for the refresh.")
_GAP = flags.DEFINE_integer("gap", 200, "update_proj_gap for amortization.")
_PRESETS = flags.DEFINE_list("presets", ["llama_60m", "llama_130m", "llama_350m",
                                         "llama_1b"], "Presets for memory.")
_OUTPUT = flags.DEFINE_string("output", "runs/benchmark_galore.json", "JSON.")


def refresh_rows(size, ranks, gap):
  # A gradient-like test matrix: singular values decaying as 1/i.
  k1, k2 = jax.random.split(jax.random.key(0))
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (size, size // 4)))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (size, size // 4)))
  g = (u / jnp.arange(1, size // 4 + 1)) @ v.T
  w = jnp.zeros((size, size))
  adam = optax.adam(1e-3)
  st = adam.init(w)
  # Updates and the new state: returning the updates alone let jit skip
  # writing the two moments back (until session 17), a third of the step's
  # memory traffic.
  adam_step = jax.jit(adam.update)
  step_ms = 1e3 * time_fn(adam_step, g, st, repeats=5)
  full = jax.jit(lambda g: jnp.linalg.svd(g, full_matrices=False))
  full_ms = 1e3 * time_fn(full, g, repeats=1, warmup=0)
  s_full = full(g)[1]
  rows = []
  for rank in ranks:
    rand = jax.jit(lambda g, r=rank: galore.randomized_svd(g, r, jax.random.key(1)))
    rand_ms = 1e3 * time_fn(rand, g, repeats=3)
    u_r = rand(g)[0]
    # Share of the optimal rank-r energy that the projector captures.
    captured = float(jnp.sum((u_r.T @ g) ** 2) / jnp.sum(s_full[:rank] ** 2))
    for name, ms, energy in (("full SVD", full_ms, 1.0),
                             ("randomized", rand_ms, captured)):
      rows.append({"size": size, "rank": rank, "refresh": name,
                   "refresh_ms": ms, "adam_step_ms": step_ms,
                   "per_step_overhead_ms": ms / gap,
                   "speedup_vs_full": full_ms / ms,
                   "energy_vs_optimal": energy})
  return rows


def _count(tree):
  return sum(l.size for l in jax.tree.leaves(tree))


def memory_rows(presets):
  rows = []
  for preset in presets:
    cfg = llama_config(preset)
    params = nn.unbox(jax.eval_shape(Llama(cfg).init, jax.random.key(0),
                                     jnp.ones((1, 8), jnp.int32))["params"])
    rank = RANKS[preset]
    adam = jax.eval_shape(optax.adamw(1e-3).init, params)
    gal = jax.eval_shape(galore.galore_adamw(1e-3, rank=rank).init, params)
    pred = galore.default_predicate()
    formula_galore = formula_adam = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      keys = tuple(str(k.key) for k in path)
      formula_adam += 2 * leaf.size
      if pred(keys, leaf):
        m, n = sorted(leaf.shape)
        r = min(rank, m)
        formula_galore += m * r + 2 * n * r
      else:
        formula_galore += 2 * leaf.size
    n_params = _count(params)
    rows.append({
        "preset": preset, "rank": rank, "params": n_params,
        "adamw_state_MB": 4 * _count(adam) / 2**20,
        "galore_state_MB": 4 * _count(gal) / 2**20,
        "formula_adam_MB": 4 * formula_adam / 2**20,
        "formula_galore_MB": 4 * formula_galore / 2**20,
        "adamw_bf16_GB": 2 * (n_params + formula_adam) / 1e9,
        "galore_bf16_GB": 2 * (n_params + formula_galore) / 1e9,
    })
  return rows


def main(argv):
  del argv
  out = {"meta": {"backend": jax.default_backend(), "jax": jax.__version__}}
  if _PART.value in ("all", "memory"):
    out["memory"] = memory_rows(_PRESETS.value)
    print(format_table(out["memory"], list(out["memory"][0])))
  if _PART.value in ("all", "refresh"):
    out["refresh"] = refresh_rows(_SIZE.value, [int(r) for r in _RANKS.value],
                                  _GAP.value)
    print()
    print(format_table(out["refresh"], list(out["refresh"][0])))
  os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print(f"\nJSON: {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
