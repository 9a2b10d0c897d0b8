"""Adapters: a trainable delta added to a frozen base (LoRA, NOLA, Compacter).

``LoRA`` and ``NOLA`` return the delta ``x @ delta_kernel`` of a linear layer;
``AdaptedLinear`` adds one to a frozen dense base kernel. Which parameters are
frozen is the optimizer's business (a path mask), not the module's.
``CompacterAdapter`` is a residual bottleneck block inserted after a sublayer.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from structmat import ops
from structmat.layers import init as sm_init
from structmat.layers.base import StructuredLinear, require, unbox
from structmat.layers.phm import PHMLinear, PHMRule

NOLA_VARIANTS = ("offset", "basis")


class LoRA(nn.Module):
  """delta(x) = (alpha / rank) * x A B; A (in, rank) ~ U(+-1/sqrt(in)), B = 0."""
  features: int
  rank: int = 8
  alpha: float = 16.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")

  def _factors(self, in_features):
    require(1 <= self.rank <= min(in_features, self.features),
            f"rank={self.rank} must be in [1, {min(in_features, self.features)}];"
            " lower rank.")
    in_axis, out_axis = self.kernel_axes
    a = self.param("lora_a", nn.with_logical_partitioning(
        sm_init.uniform(1 / math.sqrt(in_features)), (in_axis, "rank")),
        (in_features, self.rank), self.param_dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, ("rank", out_axis)),
        (self.rank, self.features), self.param_dtype)
    return a, b

  @nn.compact
  def __call__(self, x):
    """(..., in) -> (..., features) delta."""
    a, b = self._factors(x.shape[-1])
    dtype = self.dtype or jnp.result_type(x, a)
    return (x.astype(dtype) @ a.astype(dtype)) @ (
        b.astype(dtype) * (self.alpha / self.rank))

  def to_dense(self, in_features):
    """The (in, features) delta kernel (alpha / rank) A B."""
    p = self.variables["params"]
    return (unbox(p["lora_a"]) @ unbox(p["lora_b"])) * (self.alpha / self.rank)

  @nn.nowrap
  def param_count(self, in_features):
    return self.rank * (in_features + self.features)


class NOLA(nn.Module):
  """delta(x) = scale * x A B, A = sum_i a_i A_i, B = sum_j b_j B_j.

  Bases A_i (in, rank) and B_j (rank, features) are U(-1, 1)/sqrt(count),
  regenerated from this layer's key (``structure/nola_key``) chunk by chunk in
  forward and backward (``ops.combine_bases``): params hold only the
  coefficients ``coef_a`` (k,) and ``coef_b`` (l,).

  Variants (both official):
    "offset" (GPT-2 code): coefficients start at 0, plus a frozen offset A0
      ~ U(+-1/sqrt(in)) regenerated from the key (B0 = 0), so
      A = A0 + sum a_i A_i and the delta is 0 at init. scale = alpha / rank,
      alpha defaults to rank.
    "basis" (ViT code): no offset; coefficients start at 1/k and 1/l, so the
      delta is non-zero at init; scale = alpha / rank with alpha default 1.
  """
  features: int
  rank: int = 8
  num_basis: int | tuple[int, int] = 512
  alpha: float | None = None
  variant: str = "offset"
  chunk: int = 32
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.nowrap
  def counts(self):
    k = self.num_basis
    return (k, k) if isinstance(k, int) else tuple(k)

  @nn.nowrap
  def scale(self):
    alpha = self.alpha
    if alpha is None:
      alpha = self.rank if self.variant == "offset" else 1.0
    return alpha / self.rank

  def _check(self):
    require(self.variant in NOLA_VARIANTS,
            f"variant={self.variant!r}; use one of {NOLA_VARIANTS}.")
    k, l = self.counts()
    require(k >= 1 and l >= 1,
            f"num_basis={self.num_basis} must be >= 1 (an int or (k, l)).")
    require(self.rank >= 1, f"rank={self.rank} must be >= 1.")

  def _factors(self, in_features):
    """The combined A (in, rank) and B (rank, features), float32."""
    self._check()
    k, l = self.counts()
    if self.variant == "offset":
      init_a = init_b = nn.initializers.zeros
    else:
      init_a = nn.initializers.constant(1.0 / k)
      init_b = nn.initializers.constant(1.0 / l)
    ca = self.param("coef_a", nn.with_logical_partitioning(
        init_a, ("nola_basis",)), (k,), self.param_dtype)
    cb = self.param("coef_b", nn.with_logical_partitioning(
        init_b, ("nola_basis",)), (l,), self.param_dtype)
    key = self.variable("structure", "nola_key", lambda: nn.LogicallyPartitioned(
        jax.random.key_data(self.make_rng("params")), ("nola_key",)))
    return self._combine(ca, cb, unbox(key.value), in_features)

  def _combine(self, ca, cb, key_data, in_features):
    keys = [jax.random.key_data(jax.random.fold_in(
        jax.random.wrap_key_data(key_data), i)) for i in range(3)]
    a = ops.combine_bases(ca, keys[0], (in_features, self.rank), self.chunk)
    b = ops.combine_bases(cb, keys[1], (self.rank, self.features), self.chunk)
    if self.variant == "offset":
      a = a + self.offset(keys[2], in_features)
    return a, b

  @nn.nowrap
  def offset(self, key_data, in_features):
    """The frozen A0 (in, rank) of the "offset" variant (torch kaiming-uniform)."""
    return jax.random.uniform(jax.random.wrap_key_data(key_data),
                              (in_features, self.rank), jnp.float32,
                              -1 / math.sqrt(in_features),
                              1 / math.sqrt(in_features))

  @nn.compact
  def __call__(self, x):
    """(..., in) -> (..., features) delta."""
    a, b = self._factors(x.shape[-1])
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    return (x.astype(dtype) @ a.astype(dtype)) @ (
        b.astype(dtype) * self.scale())

  def to_dense(self, in_features):
    """The (in, features) delta kernel."""
    p = self.variables["params"]
    a, b = self._combine(unbox(p["coef_a"]), unbox(p["coef_b"]),
                         unbox(self.variables["structure"]["nola_key"]),
                         in_features)
    return (a @ b) * self.scale()

  @nn.nowrap
  def param_count(self, in_features):
    del in_features
    return sum(self.counts())


class AdaptedLinear(nn.Module):
  """y = x (W + delta) + bias with a frozen dense base W and an adapter delta."""
  features: int
  adapter: nn.Module
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        sm_init.uniform(1 / math.sqrt(in_features)), self.kernel_axes),
        (in_features, self.features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = x.astype(dtype) @ kernel.astype(dtype) + self.adapter(x).astype(dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, (self.kernel_axes[1],)), (self.features,),
          self.param_dtype).astype(dtype)
    return y

  def to_dense(self, in_features):
    """The merged (in, features) kernel W + delta."""
    return (unbox(self.variables["params"]["kernel"])
            + self.adapter.to_dense(in_features))


class CompacterAdapter(nn.Module):
  """y = x + up(gelu(down(x))) with PHM down/up projections (Compacter).

  bottleneck = d // reduction_factor (24 for d=768 and the default 32). Pass
  the model's shared ``PHMRule`` as ``rule`` (Compacter shares one rule across
  every adapter); with rule=None the adapter owns one (shared by its two
  projections).
  """
  reduction_factor: int = 32
  n: int = 4
  rank: int | None = 1
  rule: nn.Module | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    require(d % self.reduction_factor == 0 and d >= self.reduction_factor,
            f"reduction_factor={self.reduction_factor} must divide the model "
            f"width {d}.")
    rule = self.rule or PHMRule(self.n, param_dtype=self.param_dtype,
                                name="rule")
    kw = dict(n=self.n, rank=self.rank, rule=rule, dtype=self.dtype,
              param_dtype=self.param_dtype)
    h = PHMLinear(d // self.reduction_factor, kernel_axes=("embed", "adapter"),
                  name="down", **kw)(x)
    h = nn.gelu(h, approximate=False)
    return x + PHMLinear(d, kernel_axes=("adapter", "embed"), name="up",
                         **kw)(h).astype(x.dtype)

  @nn.nowrap
  def param_count(self, d):
    """Adapter parameters excluding a shared rule (2,376 at d=768)."""
    b = d // self.reduction_factor
    kw = dict(n=self.n, rank=self.rank, rule=PHMRule(self.n, parent=None))
    return (PHMLinear(b, **kw, parent=None).param_count(d)
            + PHMLinear(d, **kw, parent=None).param_count(b))


class _DeltaLinear(StructuredLinear):
  """A dense base kernel plus an adapter delta (``_delta(**kw)`` builds the
  adapter module, held under the name ``_NAME``), as one registry linear."""
  _NAME = "delta"

  def _delta(self, **kw):
    raise NotImplementedError

  def make_params(self, in_features):
    bound = 1 / math.sqrt(in_features)
    return {"kernel": self.factor("kernel", (in_features, self.features),
                                  self.kernel_axes, sm_init.uniform(bound),
                                  in_features, self.features)}

  def compute(self, x, p):
    return x @ p["kernel"] + self._delta(name=self._NAME)(x).astype(x.dtype)

  def to_dense(self, in_features):
    params = self.variables["params"]
    variables = {"params": params[self._NAME]}
    if "structure" in self.variables:
      variables["structure"] = self.variables["structure"][self._NAME]
    delta = self._delta(parent=None).apply(variables, in_features,
                                           method="to_dense")
    return unbox(params["kernel"]) + delta

  def kernel_from(self, p, in_features):
    raise NotImplementedError(f"{type(self).__name__}.to_dense reads its "
                              "submodule.")

  @nn.nowrap
  def flops_per_token(self, in_features):
    return 2 * in_features * self.features + 2 * self.rank * (
        in_features + self.features)


class NOLALinear(_DeltaLinear):
  """A dense base kernel plus a NOLA delta, as one linear for the registry.

  ``make_linear("nola", ...)`` builds LLaMA models whose linears carry NOLA
  adapters; freeze the base with ``config.trainable=".*coef_.*|.*norm.*"``.
  Params: ``kernel`` (in, out) and ``nola/coef_a``, ``nola/coef_b``; the key
  lives in ``structure/nola/nola_key``.
  """
  rank: int = 8
  num_basis: int | tuple[int, int] = 64
  alpha: float | None = None
  variant: str = "offset"
  chunk: int = 32
  _NAME = "nola"

  def _delta(self, **kw):
    return NOLA(self.features, self.rank, self.num_basis, self.alpha,
                self.variant, self.chunk, self.dtype, self.param_dtype, **kw)

  @nn.nowrap
  def param_count(self, in_features):
    return (in_features * self.features + sum(
        NOLA(self.features, self.rank, self.num_basis, parent=None).counts())
        + self.bias_count())


class LoRALinear(_DeltaLinear):
  """A dense base kernel plus a LoRA delta, as one linear for the registry.

  Params: ``kernel`` (in, out) and ``lora/lora_a`` (in, rank), ``lora/lora_b``
  (rank, out), B = 0 at init so the model starts as its base. Freeze the base
  with a trainable regex such as ``.*lora_.*``.
  """
  rank: int = 8
  alpha: float = 16.0
  _NAME = "lora"

  def _delta(self, **kw):
    return LoRA(self.features, self.rank, self.alpha, self.dtype,
                self.param_dtype, self.kernel_axes, **kw)

  @nn.nowrap
  def param_count(self, in_features):
    return (in_features * self.features
            + self.rank * (in_features + self.features) + self.bias_count())
