"""Parameter tables: counts by kind (embeddings, attention, MLP, norms, head)."""
import collections

import jax
import numpy as np

from structmat.utils.timing import format_table


def _kind(path: tuple[str, ...]) -> str:
  if path[0] in ("embed", "wte", "wpe"):  # LLaMA; GPT-2 tokens, positions
    return "embeddings"
  if path[0] == "head":
    return "head"
  if ("norm" in path[-2] or path[-2].startswith("ln_")   # GPT-2's ln_1, ln_f
      or path[0] == "final_norm"):
    return "norms"
  group = "attention" if "attn" in path else "mlp" if "mlp" in path else path[0]
  return f"{group}/{path[-1]}"


def param_rows(params) -> list[dict]:
  """One row per kind: number of tensors and parameters."""
  counts, tensors = collections.Counter(), collections.Counter()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    kind = _kind(keys)
    counts[kind] += int(np.prod(leaf.shape))
    tensors[kind] += 1
  return [{"kind": k, "tensors": tensors[k], "parameters": counts[k]}
          for k in sorted(counts)]


def param_table(params) -> str:
  rows = param_rows(params)
  total = sum(r["parameters"] for r in rows)
  return (format_table(rows, ["kind", "tensors", "parameters"])
          + f"\ntotal parameters: {total}")


def count_params(params) -> int:
  return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(params))
