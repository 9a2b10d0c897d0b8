"""The training loss's cross-entropy: optax's values and gradients, with a
lighter backward (bfloat16 logits saved, no float32 vocabulary-sized
residual)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from structmat.train.cross_entropy import cross_entropy
from structmat.train.steps import token_loss


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6),
                                       (jnp.bfloat16, 1e-6)])
def test_matches_optax(dtype, tol):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = (3 * jax.random.normal(k1, (2, 5, 97))).astype(dtype)
  targets = jax.random.randint(k2, (2, 5), 0, 97)
  weights = jax.random.normal(k3, (2, 5))
  ref = lambda l: optax.softmax_cross_entropy_with_integer_labels(
      l.astype(jnp.float32), targets)
  np.testing.assert_allclose(cross_entropy(logits, targets), ref(logits),
                             rtol=tol, atol=tol)
  loss = lambda f: lambda l: jnp.sum(f(l) * weights)
  ga = jax.grad(loss(lambda l: cross_entropy(l, targets)))(logits)
  gb = jax.grad(loss(ref))(logits)
  assert ga.dtype == dtype
  # bfloat16: both round the same float32 gradient once.
  np.testing.assert_allclose(np.asarray(ga, np.float32),
                             np.asarray(gb, np.float32), rtol=1e-2 if
                             dtype == jnp.bfloat16 else tol, atol=1e-6)


def test_token_loss_masks_padding():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 11))
  targets = jnp.array([[3, 0, 5, 0]])
  total, count = token_loss(logits, targets, pad_id=0)
  assert float(count) == 2
  np.testing.assert_allclose(total, cross_entropy(logits, targets)[0, ::2].sum(),
                             rtol=1e-6)


def test_backward_keeps_no_float32_logits():
  """XLA's memory analysis of loss and gradient for 4096 tokens x 32000
  logits in bfloat16: optax on float32 logits keeps about four float32
  logit-sized buffers (~1 GiB here), this loss about half of that."""
  n, vocab = 4096, 32000
  logits = jax.ShapeDtypeStruct((n, vocab), jnp.bfloat16)
  targets = jax.ShapeDtypeStruct((n,), jnp.int32)

  def temp_bytes(loss):
    f = jax.jit(jax.value_and_grad(lambda l, t: loss(l, t).mean()))
    return f.lower(logits, targets).compile().memory_analysis().temp_size_in_bytes

  ours = temp_bytes(cross_entropy)
  theirs = temp_bytes(lambda l, t: optax.softmax_cross_entropy_with_integer_labels(
      l.astype(jnp.float32), t))
  assert ours < 0.6 * theirs, (ours, theirs)
