"""Conventions shared by every structured linear layer.

A layer maps (..., in) -> (..., features) like ``flax.linen.Dense``. Every
layer has ``features``, ``use_bias``, ``dtype`` (compute; None keeps the input's),
``param_dtype`` (storage), ``kernel_axes`` (the logical (in, out) axis names of
the dense kernel it replaces) and ``init_scheme`` ("reference": the method's
official initialization; "mup": structure-aware muP, see ``structmat.layers.init``).

Subclasses define ``make_params`` (create parameters), ``compute`` (the
forward product from those parameters) and ``kernel_from`` (the explicit dense
(in, out) kernel, the reference every test compares against), plus analytic
``param_count`` and ``flops_per_token``.
"""
import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from structmat.layers import init as sm_init

Array = jax.Array
INIT_SCHEMES = ("reference", "mup")
# The checkpoint_name of every layer's output: remat="linears" keeps these
# (structmat.models.remat).
LINEAR_OUT = "structmat_linear_out"


class Elementwise(NamedTuple):
  """A layer input given as ``fn(*args)``, fn elementwise (``apply_to``)."""
  fn: Callable
  args: tuple


def apply_to(layer, fn: Callable, *args):
  """``layer(fn(*args))``, for an input that is an elementwise function of
  other activations (the LLaMA MLP's silu(gate) * up). A layer whose
  backward can rebuild its input a block at a time (``rebuilds_input``:
  SLTrain with ``kernel_block``) gets fn and args instead, so fn(*args) is
  not kept for the backward pass (the args are kept anyway)."""
  if getattr(layer, "rebuilds_input", False):
    return layer(Elementwise(fn, args))
  return layer(fn(*args))


def _cast_out(fn, dtype, *args):
  return fn(*args).astype(dtype)


class StructuredLinear(nn.Module):
  """Base class; see the module docstring."""
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
  init_scheme: str = "reference"

  # ---- to be defined by subclasses -------------------------------------
  def check(self, in_features: int) -> None:
    """Raise ValueError naming the argument when the shapes cannot work."""

  def make_params(self, in_features: int) -> dict[str, Array]:
    raise NotImplementedError

  def compute(self, x: Array, p: dict[str, Array]) -> Array:
    raise NotImplementedError

  def kernel_from(self, p: dict[str, Array], in_features: int) -> Array:
    raise NotImplementedError

  @nn.nowrap
  def param_count(self, in_features: int) -> int:
    """Number of trainable parameters (bias included)."""
    raise NotImplementedError

  @nn.nowrap
  def flops_per_token(self, in_features: int) -> int:
    """Forward FLOPs (2 x multiply-adds) per token of the structured product."""
    raise NotImplementedError

  def bias_bound(self, in_features: int) -> float | None:
    """Uniform bias bound; None means zeros. Default: torch nn.Linear."""
    return 1.0 / math.sqrt(in_features)

  # ---- shared machinery -------------------------------------------------
  @nn.nowrap
  def bias_count(self) -> int:
    return self.features if self.use_bias else 0

  def factor(self, name: str, shape, axes, ref_init: Callable,
             fan_in: int, fan_out: int) -> Array:
    """A parameter with logical axes and the chosen init scheme.

    Args:
      name: parameter name.
      shape: its shape.
      axes: one logical axis name (or None) per dimension.
      ref_init: the reference (official) initializer.
      fan_in, fan_out: the dense-matrix view of one block of this factor,
        used by the muP scheme.
    """
    if self.init_scheme not in INIT_SCHEMES:
      raise ValueError(f"init_scheme={self.init_scheme!r}; use one of "
                       f"{INIT_SCHEMES}.")
    fn = ref_init
    if self.init_scheme == "mup" and ref_init is not nn.initializers.zeros:
      fn = sm_init.mup_init(fan_in, fan_out)
    return self.param(name, nn.with_logical_partitioning(fn, tuple(axes)),
                      tuple(shape), self.param_dtype)

  def _bias(self, in_features: int) -> Array:
    bound = self.bias_bound(in_features)
    init = (nn.initializers.zeros if bound is None
            else sm_init.uniform(bound))
    return self.param("bias", nn.with_logical_partitioning(
        init, (self.kernel_axes[1],)), (self.features,), self.param_dtype)

  rebuilds_input = False   # takes an ``Elementwise`` input (``apply_to``)

  def compute_of(self, fn: Callable, args: tuple, p: dict[str, Array]) -> Array:
    """compute(fn(*args), p) without keeping fn(*args) for the backward;
    layers with ``rebuilds_input`` define it."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: Array | Elementwise) -> Array:
    """(..., in) -> (..., features); x may be an ``Elementwise`` input when
    the layer ``rebuilds_input``."""
    fused = isinstance(x, Elementwise)
    inputs = x.args if fused else (x,)
    in_features = inputs[0].shape[-1]
    self.check(in_features)
    p = self.make_params(in_features)
    dtype = self.dtype or jnp.result_type(*inputs, *[
        v for v in p.values() if jnp.issubdtype(v.dtype, jnp.floating)])
    p = {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
         for k, v in p.items()}
    bias = self._bias(in_features).astype(dtype) if self.use_bias else None
    # Ops see 2-D (tokens, in): XLA:CPU runs a weight gradient that contracts
    # over several batch dims on a slow path (6x the forward for the MLP).
    batch_shape = inputs[0].shape[:-1]
    if fused:
      y = self.compute_of(functools.partial(_cast_out, x.fn, dtype),
                          tuple(v.reshape(-1, in_features) for v in inputs), p)
      y = y if bias is None else y + bias
    else:
      y = self.compute_with_bias(x.reshape(-1, in_features).astype(dtype), p,
                                 bias)
    # (an identity unless a remat policy keeps it: models.remat)
    return checkpoint_name(y.reshape(*batch_shape, y.shape[-1]), LINEAR_OUT)

  def compute_with_bias(self, x: Array, p: dict[str, Array],
                        bias: Array | None) -> Array:
    """compute(x, p) + bias; layers whose op fuses the bias override this."""
    y = self.compute(x, p)
    return y if bias is None else y + bias

  def to_dense(self, in_features: int) -> Array:
    """The explicit (in_features, features) kernel this layer computes (no bias).

    Call as ``layer.apply(variables, in_features, method="to_dense")``.
    """
    p = dict(self.variables.get("params", {}))
    p.update(self.variables.get("structure", {}))
    p.pop("bias", None)
    p = jax.tree.map(unbox, p,
                     is_leaf=lambda v: isinstance(v, nn.Partitioned))
    return self.kernel_from(p, in_features)


def unbox(v):
  """A boxed (logically partitioned) variable's value; other values as is."""
  return v.value if isinstance(v, nn.Partitioned) else v


def require(cond: bool, message: str) -> None:
  """Raise ValueError(message) unless cond: messages name the argument and fix."""
  if not cond:
    raise ValueError(message)
