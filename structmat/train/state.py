"""The train state: everything a resumed run needs besides the data position."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from structmat.train.partition import merge, partition


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any       # trainable parameters
  frozen: Any       # frozen parameters: no gradients, no optimizer state
  opt_state: Any
  structure: Any    # non-trainable collections (SLTrain support, NOLA keys)
  rng: jax.Array    # uint32 key data; per-step keys are fold_in(rng, step)

  def all_params(self):
    return merge(self.params, self.frozen)


def create_state(model, tx, seed: int, example_tokens, trainable: str = "",
                 params=None, frozen_dtype=None) -> TrainState:
  """Initialize (or take ``params``), split by ``trainable``, init the optimizer.

  Parameters are unboxed (logical axes dropped). ``frozen_dtype`` (e.g.
  bfloat16) stores the frozen floating-point parameters in that dtype: they
  get no updates, so only the forward pass sees the rounding, and a LoRA on
  a large base holds half the base's bytes.
  """
  key = jax.random.key(seed)
  variables = dict(nn.unbox(jax.jit(model.init)(key, example_tokens)))
  init_params = variables.pop("params")
  train, frozen = partition(init_params if params is None else params,
                            trainable)
  if frozen_dtype is not None:
    frozen = jax.tree.map(
        lambda a: a.astype(frozen_dtype)
        if jnp.issubdtype(a.dtype, jnp.floating) else a, frozen)
  return TrainState(step=jnp.zeros((), jnp.int32), params=train,
                    frozen=frozen, opt_state=tx.init(train),
                    structure=variables,
                    rng=jax.random.key_data(jax.random.fold_in(key, 1)))
