"""PHM layers (Zhang et al. 2021) with Compacter's shared rule.

Sharing the rule: a ``PHMRule`` module holds the (n, n, n) rule tensor. Create
one in the parent module and pass the same instance to every ``PHMLinear``
(``rule=shared``): linen then stores it once, under the parent, and every layer
reads it (Compacter shares one rule across the whole model). A ``PHMLinear``
given no rule owns a private one, stored under its own ``rule`` scope.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from structmat import ops
from structmat.layers import init as sm_init
from structmat.layers.base import StructuredLinear, require, unbox

# Compacter: phm_init_range = 1e-4 (std of the normal rule init). A zero rule
# would block every gradient to the slices.
RULE_STD = 1e-4


class PHMRule(nn.Module):
  """The (n, n, n) rule tensor A, ~ N(0, init_std^2)."""
  n: int = 4
  init_std: float = RULE_STD
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    return self.param("rule", nn.with_logical_partitioning(
        sm_init.normal(self.init_std), (None, None, None)),
        (self.n, self.n, self.n), self.param_dtype)


class PHMLinear(StructuredLinear):
  """y = x H + b, H = sum_i kron(A_i, B_i) (in, out), never materialized.

  rank=None: full slices ``w`` (n, in/n, out/n) (PHM layer); rank=r: Compacter
  factors ``s`` (n, in/n, r), ``t`` (n, r, out/n). Slices are glorot-uniform
  (gain sqrt(2)) per slice, bias zero, as in Compacter.
  """
  n: int = 4
  rank: int | None = 1
  rule: nn.Module | None = None
  rule_init_std: float = RULE_STD

  def check(self, in_features):
    require(self.n >= 1, f"n={self.n} must be >= 1.")
    for what, size in (("in_features", in_features),
                       ("features", self.features)):
      require(size % self.n == 0,
              f"{what}={size} is not divisible by n={self.n}; choose n "
              f"dividing both in_features and features.")
    if self.rank is not None:
      require(1 <= self.rank <= min(in_features, self.features) // self.n,
              f"rank={self.rank} must be in [1, "
              f"{min(in_features, self.features) // self.n}] or None (full "
              f"slices); lower rank.")
    if self.rule is not None:
      require(self.rule.n == self.n,
              f"the shared rule has n={self.rule.n} but this layer has "
              f"n={self.n}; use the same n.")

  def _rule(self):
    if self.rule is not None:
      return self.rule()
    return PHMRule(self.n, self.rule_init_std, self.param_dtype, name="rule")()

  def make_params(self, in_features):
    n, a, b = self.n, in_features // self.n, self.features // self.n
    in_axis, out_axis = self.kernel_axes
    glorot = sm_init.glorot_uniform_slices()
    p = {"rule": self._rule()}
    if self.rank is None:
      p["w"] = self.factor("w", (n, a, b), (None, in_axis, out_axis), glorot,
                           a, b)
    else:
      p["s"] = self.factor("s", (n, a, self.rank), (None, in_axis, "rank"),
                           glorot, a, self.rank)
      p["t"] = self.factor("t", (n, self.rank, b), (None, "rank", out_axis),
                           glorot, self.rank, b)
    return p

  @staticmethod
  def _slices(p):
    return p["w"] if "w" in p else (p["s"], p["t"])

  def compute(self, x, p):
    return ops.phm_matmul(x, p["rule"], self._slices(p))

  def to_dense(self, in_features):
    p = dict(self.variables["params"])
    p["rule"] = (self.rule.variables["params"]["rule"] if self.rule is not None
                 else p["rule"]["rule"])
    p = {k: unbox(v) for k, v in p.items()}
    return self.kernel_from(p, in_features)

  def kernel_from(self, p, in_features):
    return ops.phm_kernel(p["rule"], self._slices(p))

  def bias_bound(self, in_features):
    return None

  @nn.nowrap
  def param_count(self, in_features):
    """Trainable parameters of this layer, excluding a shared rule."""
    n, a, b = self.n, in_features // self.n, self.features // self.n
    slices = n * a * b if self.rank is None else n * self.rank * (a + b)
    own_rule = 0 if self.rule is not None else n ** 3
    return slices + own_rule + self.bias_count()

  @nn.nowrap
  def flops_per_token(self, in_features):
    n, a, b = self.n, in_features // self.n, self.features // self.n
    if self.rank is None:
      return 2 * (n * n * n * a + n * n * a * b)
    return 2 * self.rank * (n * a * n + n ** 3 + n * n * b)
