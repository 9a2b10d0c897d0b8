"""Autoregressive sampling from any structmat language model (LLaMA, GPT-2,
every structure and adapter): greedy, temperature and top-k.

No KV cache: each new token reruns the model on the fixed-size token buffer
(causal attention makes the positions after the current one irrelevant), so
one compiled step serves every position. That costs O(length^2) but is exact
and needs nothing from the model beyond ``apply``: meant for inspecting
checkpoints, not for serving.
"""
import functools

import jax
import jax.numpy as jnp

from structmat.models.gpt2 import GPT2Config


def next_token(logits, key, temperature: float, top_k: int):
  """(batch,) int32 from (batch, vocab) logits: argmax when temperature is 0,
  else a draw from softmax(logits / temperature) over the top_k (0: all)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens",
                                             "temperature", "top_k"))
def _generate(model, variables, prompt, key, eos_id, pad_id, *,
              max_new_tokens, temperature, top_k):
  b, p = prompt.shape
  buf = jnp.concatenate(
      [prompt, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)

  def step(t, carry):
    buf, key, done = carry
    key, sub = jax.random.split(key)
    logits = model.apply(variables, buf)[:, t - 1, :]
    tok = next_token(logits, sub, temperature, top_k)
    tok = jnp.where(done, pad_id, tok)
    done = done | (tok == eos_id)
    return buf.at[:, t].set(tok), key, done

  buf, _, _ = jax.lax.fori_loop(p, p + max_new_tokens, step,
                                (buf, key, jnp.zeros((b,), bool)))
  return buf


def generate(model, variables, prompt, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             eos_id: int = -1, pad_id: int = 0):
  """Continue ``prompt`` by ``max_new_tokens`` tokens.

  Args:
    model: a flax LM mapping (batch, length) tokens to (batch, length, vocab)
      logits (``build_model(cfg)``).
    variables: {"params": ..., plus its other collections (SLTrain supports,
      NOLA keys)}.
    prompt: (batch, P) int tokens, every row P long (batch prompts of equal
      length; there is no padding mask).
    max_new_tokens: tokens to add.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: sample among the k most likely tokens (0: all).
    seed: the sampling key's seed (ignored when greedy).
    eos_id: a row stops at this token (the rest of it is ``pad_id``); -1
      never stops.

  Returns:
    (batch, P + max_new_tokens) int32: the prompt, then the new tokens.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be (batch, length >= 1) tokens, got shape "
                     f"{prompt.shape}.")
  total = prompt.shape[1] + max_new_tokens
  if isinstance(model.cfg, GPT2Config) and total > model.cfg.max_len:
    raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens "
                     f"({max_new_tokens}) = {total} exceeds GPT-2's "
                     f"{model.cfg.max_len} learned positions.")
  if temperature < 0 or top_k < 0:
    raise ValueError(f"temperature={temperature} and top_k={top_k} must be "
                     ">= 0.")
  return _generate(model, variables, prompt, jax.random.key(seed),
                   jnp.int32(eos_id), jnp.int32(pad_id),
                   max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_k=int(top_k))
