"""Split a parameter tree into trainable and frozen parts by a path regex.

Frozen parameters are closed over, not differentiated: no gradient is computed
for them and the optimizer holds no state for them.
"""
import re

import jax


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _build(tree, keep):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    out = {}
    for k, v in tree.items():
      sub = _build(v, lambda p, k=k: keep(f"{k}/{p}" if p else str(k)))
      if sub is not None:
        out[k] = sub
    return out or None
  return tree if keep("") else None


def partition(params, pattern: str):
  """(trainable, frozen): leaves whose "a/b/c" path fully matches ``pattern``
  are trainable; an empty pattern makes everything trainable."""
  if not pattern:
    return params, {}
  rx = re.compile(pattern)
  flat = {path_str(p): l for p, l in jax.tree_util.tree_flatten_with_path(params)[0]}
  if not any(rx.fullmatch(p) for p in flat):
    raise ValueError(f"config.trainable={pattern!r} matches no parameter; "
                     f"paths look like {next(iter(flat))!r}.")
  train = _build(params, lambda p: bool(rx.fullmatch(p))) or {}
  frozen = _build(params, lambda p: not rx.fullmatch(p)) or {}
  return train, frozen


def merge(a, b):
  """Deep union of two nested dicts with disjoint leaves."""
  if not b:
    return a
  if not a:
    return b
  out = dict(a)
  for k, v in b.items():
    out[k] = merge(out[k], v) if k in out else v
  return out
