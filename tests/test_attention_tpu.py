"""The TPU flash attention kernel (``kernels.attention_tpu``), interpreted on
the CPU against the float32 reference, and attention's "auto" choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from structmat.kernels import shards, target
from structmat.models.llama import attend, attention_impl
from tests.helpers import abstract_mesh


def _qkv(b, t, heads, kv_heads, d, dtype, seed):
  k = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(k[0], (b, t, heads, d), dtype)
  kk = jax.random.normal(k[1], (b, t, kv_heads, d), dtype)
  v = jax.random.normal(k[2], (b, t, kv_heads, d), dtype)
  return q, kk, v, jax.random.normal(k[3], (b, t, heads, d))


def _value_and_grads(impl, q, k, v, g):
  f = lambda *a: jnp.sum(attend(*a, impl).astype(jnp.float32) * g)
  return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("b,t,heads,kv_heads,d,dtype,tol", [
    (2, 256, 4, 2, 64, jnp.float32, 1e-5),     # grouped KV heads
    (1, 384, 3, 3, 16, jnp.float32, 1e-5),     # 3 query tiles, narrow heads
    (2, 128, 4, 1, 128, jnp.bfloat16, 2e-2),   # one KV head, wide heads
])
def test_tpu_flash_matches_the_reference(b, t, heads, kv_heads, d, dtype, tol):
  """Output and q/k/v gradients of the interpreted kernel against the
  "naive" attention computed in float32 from the same inputs."""
  q, k, v, g = _qkv(b, t, heads, kv_heads, d, dtype, seed=t + d)
  out = attend(q, k, v, "tpu_flash")
  assert out.shape == q.shape and out.dtype == q.dtype
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             attend(*f32, "naive"), rtol=tol, atol=tol)
  got = _value_and_grads("tpu_flash", q, k, v, g)
  ref = _value_and_grads("naive", *f32, g)
  for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    scale = float(jnp.max(jnp.abs(r)))
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - r))) <= tol * scale


def test_tpu_flash_refuses_sequences_off_its_tiles():
  q, k, v, _ = _qkv(1, 200, 2, 2, 16, jnp.float32, seed=0)
  with pytest.raises(ValueError, match="seq_len=200.*multiple of 128"):
    attend(q, k, v, "tpu_flash")


def test_auto_takes_the_kernel_on_tpus_where_the_shapes_fit():
  """On a TPU target: the kernel from 512 tokens where the sequence fits
  its tiles and the batch divides over the mesh (4 abstract chips; XLA
  cannot split a kernel), XLA elsewhere and on the CPU; never on a GPU."""
  impl = lambda *shape: attention_impl("auto", jnp.bfloat16, 64, *shape)
  assert impl(8, 512) == "xla"   # the CPU
  mesh = jax.sharding.AbstractMesh((4, 1), ("data", "fsdp"))
  with target.targeting("tpu"):
    assert impl(8, 512) == "tpu_flash"
    assert impl(1, 1024) == "tpu_flash"
    assert impl(8, 256) == "xla"    # XLA planned less at 1B
    assert impl(8, 600) == "xla"    # off the tiles
    with shards.over(mesh, ("data", "fsdp")):
      assert impl(8, 512) == "tpu_flash"
      assert impl(6, 512) == "xla"
  with target.targeting("cuda"), pytest.raises(ValueError, match="TPUs"):
    attention_impl("tpu_flash", jnp.bfloat16, 64, 8, 256)


def test_tpu_flash_lowers_for_eight_tpus_per_sequence_shard():
  """Value and gradients lowered for 8 abstract v5e chips with the batch of
  16 sequences sharded (``shards.over``): the forward, dq and dkv kernels
  each take one chip's 2 sequences, heads-major."""
  mesh = abstract_mesh("tpu", 8)
  f = jax.value_and_grad(
      lambda *a: jnp.sum(attend(*a, "tpu_flash").astype(jnp.float32)),
      (0, 1, 2))
  with jax.sharding.use_abstract_mesh(mesh), target.targeting("tpu"):
    batch = NamedSharding(mesh, P("data"))
    q = jax.ShapeDtypeStruct((16, 512, 8, 64), jnp.bfloat16, sharding=batch)
    kv = jax.ShapeDtypeStruct((16, 512, 2, 64), jnp.bfloat16, sharding=batch)
    with shards.over(mesh, ("data", "fsdp")):
      text = jax.jit(f).trace(q, kv, kv).lower(
          lowering_platforms=("tpu",)).as_text()
  calls = [l for l in text.splitlines() if "tpu_custom_call" in l]
  assert len(calls) == 3, calls
  assert all("tensor<2x8x512x64xbf16>" in l for l in calls), calls
