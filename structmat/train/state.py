"""The train state: everything a resumed run needs besides the data position."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  structure: Any    # non-trainable collections (SLTrain support, NOLA keys)
  rng: jax.Array    # uint32 key data; per-step keys are fold_in(rng, step)


def create_state(model, tx, seed: int, example_tokens) -> TrainState:
  """Initialize params and optimizer state (unboxed; logical axes dropped)."""
  key = jax.random.key(seed)
  variables = dict(nn.unbox(jax.jit(model.init)(key, example_tokens)))
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), structure=variables,
                    rng=jax.random.key_data(jax.random.fold_in(key, 1)))
