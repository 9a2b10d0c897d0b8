"""Pure step functions: token-weighted cross-entropy, train_step, eval_step."""
import jax
import jax.numpy as jnp
import optax

from structmat.train.cross_entropy import cross_entropy
from structmat.train.partition import merge


def token_loss(logits, targets, pad_id: int):
  """(sum of token losses, number of tokens), padding excluded."""
  losses = cross_entropy(logits, targets)
  mask = (targets != pad_id).astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def train_step(state, batch, *, model, tx, pad_id: int):
  """One AdamW step on batch (B, L+1) int32. Returns (state, metrics)."""
  inputs, targets = batch[:, :-1], batch[:, 1:]

  def loss_fn(params):
    # Logits in the compute dtype: the loss upcasts inside its fusions and
    # its backward saves no float32 vocabulary-sized residual.
    logits = model.apply({"params": merge(params, state.frozen),
                          **state.structure}, inputs, logits_dtype=None)
    total, count = token_loss(logits, targets, pad_id)
    return total / jnp.maximum(count, 1.0), count

  (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"train_loss": loss, "tokens": count,
             "grad_norm": optax.tree.norm(grads),
             "update_norm": optax.tree.norm(updates),
             "param_norm": optax.tree.norm(params)}
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), metrics


def eval_step(state, batch, *, model, pad_id: int):
  """(sum of token losses, number of tokens) on one batch."""
  logits = model.apply({"params": state.all_params(), **state.structure},
                       batch[:, :-1], logits_dtype=None)
  return token_loss(logits, batch[:, 1:], pad_id)
