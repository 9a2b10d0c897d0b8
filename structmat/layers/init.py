"""Initializers: reference (official-code) inits and structure-aware muP.

muP ("Compute Better Spent", Qiu et al. 2024): initialize each factor as if it
were its own dense matrix of its block's fan-in and fan-out, with
std = sqrt(1 / d_in) * min(1, sqrt(d_out / d_in)); in Adam, scale each factor's
learning rate by (full d_in / factor d_in) / number of factors
(``mup_lr_multiplier``).
"""
import math

import jax
import jax.numpy as jnp


def uniform(bound: float):
  """U(-bound, bound) initializer."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def normal(std: float):
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)
  return init


def glorot_uniform_slices(gain: float = math.sqrt(2.0)):
  """Xavier-uniform applied to each slice w[i] of an (n, a, b) tensor.

  Compacter's "glorot-uniform": torch's xavier_uniform_ with gain sqrt(2) on each
  slice, bound = gain * sqrt(6 / (a + b)).
  """
  def init(key, shape, dtype=jnp.float32):
    a, b = shape[-2], shape[-1]
    bound = gain * math.sqrt(6.0 / (a + b))
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def mup_std(fan_in: int, fan_out: int) -> float:
  return math.sqrt(1.0 / fan_in) * min(1.0, math.sqrt(fan_out / fan_in))


def mup_init(fan_in: int, fan_out: int):
  """Structure-aware muP normal init for a factor whose blocks are fan_in -> fan_out."""
  return normal(mup_std(fan_in, fan_out))


def mup_lr_multiplier(full_fan_in: int, factor_fan_in: int,
                      num_factors: int) -> float:
  """Per-factor Adam learning-rate multiplier of structure-aware muP."""
  return (full_fan_in / factor_fan_in) / num_factors
