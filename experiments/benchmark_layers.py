r"""Layer benchmark: parameters, FLOPs and forward / forward+backward time per structure.

  python -m experiments.benchmark_layers                       # widths 1024 and 4096
  python -m experiments.benchmark_layers --widths=1024 --tokens=4096 --repeats=5

Each row is one layer (width -> width) applied to ``tokens`` float32 tokens;
times are medians of jitted calls, "speedup" is dense time / layer time at the
same width. Shared machines are noisy (the same call varies by a third between
minutes on the development VM), so forward+backward also reports the fastest
sample ("min") and the speedup between fastest samples, the estimate least
disturbed by neighbours. A table is printed last and the rows are written as
JSON to ``--output``. Target on a 2-core CPU: Monarch at n=1024 with 32 blocks at least
4x faster than dense for forward+backward.

``--retain_host_memory`` (on by default) keeps freed host memory in the
process (``structmat.utils.host_memory``): otherwise XLA:CPU page-faults its
fresh per-call temporary buffer, which costs memory-bound structured layers a
fifth of their time. The JSON's meta records the setting.
"""
import json
import os
import statistics

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from structmat.layers import make_linear
from structmat.utils.host_memory import retain_freed_memory
from structmat.utils.timing import format_table, time_fn, time_samples

_WIDTHS = flags.DEFINE_list("widths", ["1024", "4096"], "Layer widths.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
_OUTPUT = flags.DEFINE_string("output", "runs/benchmark_layers.json",
                              "Where the JSON rows go.")
_RETAIN = flags.DEFINE_bool(
    "retain_host_memory", True,
    "Keep freed host memory (no per-call page faults on XLA:CPU temps).")


def layer_specs(width: int) -> list[tuple[str, str, dict]]:
  """(label, registry name, kwargs) for every structure at ``width``."""
  sqrt_n = int(round(width ** 0.5))
  return [
      ("dense", "dense", {}),
      (f"lowrank r={width // 8}", "lowrank", dict(rank=width // 8)),
      ("monarch nb=4", "monarch", dict(nblocks=4)),
      (f"monarch nb={sqrt_n // 1}", "monarch", dict(nblocks=sqrt_n)),
      ("monarch nb=32", "monarch", dict(nblocks=32)),
      (f"btt nb={sqrt_n} r=4", "btt", dict(nblocks=sqrt_n, rank=4)),
      ("blockdiag nb=4", "blockdiag", dict(nblocks=4)),
      ("phm n=4 full", "phm", dict(n=4, rank=None, rule_init_std=1.0)),
      ("phm n=4 r=8", "phm", dict(n=4, rank=8, rule_init_std=1.0)),
      (f"sltrain r={width // 8} d=0.03", "sltrain",
       dict(rank=width // 8, density=0.03)),
  ]


def bench_layer(name: str, kwargs: dict, width: int, tokens: int,
                repeats: int) -> dict:
  module = make_linear(name, features=width, **kwargs)
  x = jax.random.normal(jax.random.key(0), (tokens, width), jnp.float32)
  variables = nn.unbox(module.init(jax.random.key(1), x[:1]))
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  fwd = jax.jit(lambda p, x: module.apply({"params": p, **rest}, x))

  @jax.jit
  def fwd_bwd(p, x):
    def loss(p, x):
      return jnp.sum(module.apply({"params": p, **rest}, x) ** 2)
    return jax.grad(loss, argnums=(0, 1))(p, x)

  fwd_bwd_s = time_samples(fwd_bwd, params, x, repeats=repeats)
  return {
      "params": module.param_count(width),
      "mflops_per_token": module.flops_per_token(width) / 1e6,
      "fwd_ms": 1e3 * time_fn(fwd, params, x, repeats=repeats),
      "fwd_bwd_ms": 1e3 * statistics.median(fwd_bwd_s),
      "fwd_bwd_min_ms": 1e3 * min(fwd_bwd_s),
  }


def run(widths, tokens, repeats) -> list[dict]:
  rows = []
  for width in widths:
    dense = None
    seen = set()
    for label, name, kwargs in layer_specs(width):
      if label in seen:  # sqrt(n) may coincide with a fixed block count
        continue
      seen.add(label)
      logging.info("width %d: %s", width, label)
      row = {"width": width, "layer": label, "tokens": tokens,
             **bench_layer(name, kwargs, width, tokens, repeats)}
      dense = dense or row
      row["flops_ratio"] = dense["mflops_per_token"] / row["mflops_per_token"]
      row["fwd_speedup"] = dense["fwd_ms"] / row["fwd_ms"]
      row["fwd_bwd_speedup"] = dense["fwd_bwd_ms"] / row["fwd_bwd_ms"]
      row["fwd_bwd_min_speedup"] = (dense["fwd_bwd_min_ms"] /
                                    row["fwd_bwd_min_ms"])
      print(f"  {width:5d} {label:22s} fwd {row['fwd_ms']:8.2f} ms  "
            f"fwd+bwd {row['fwd_bwd_ms']:8.2f} ms", flush=True)
      rows.append(row)
  return rows


def main(argv):
  del argv
  retained = _RETAIN.value and retain_freed_memory()
  rows = run([int(w) for w in _WIDTHS.value], _TOKENS.value, _REPEATS.value)
  meta = {"backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "cpu_count": os.cpu_count(), "dtype": "float32",
          "retain_host_memory": retained}
  os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"\n{meta}\n")
  print(format_table(rows, ["width", "layer", "params", "mflops_per_token",
                            "flops_ratio", "fwd_ms", "fwd_bwd_ms",
                            "fwd_bwd_min_ms", "fwd_speedup", "fwd_bwd_speedup",
                            "fwd_bwd_min_speedup"]))
  print(f"\nJSON: {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
