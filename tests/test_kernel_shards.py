"""Kernels per token shard (``kernels.shards``): XLA cannot split a Pallas
kernel, so under a multi-device mesh dispatch runs each under shard_map."""
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from structmat import ops
from structmat.kernels import shards, target
from tests.helpers import abstract_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_run_per_shard_on_eight_devices(tmp_path, data_dir):
  """Monarch (fused, two-pass), block-diagonal and SLTrain kernels and the
  TPU attention kernel on meshes of 8 fake CPU devices: values and every
  gradient as impl="xla", each kernel on its shard's tokens (sequences); then the train loop with impl="pallas"
  gives impl="xla"'s losses (a subprocess: the device count is set before
  jax starts; one at a time)."""
  p = subprocess.run([sys.executable, "tests/kernel_shards_check.py",
                      str(tmp_path)], cwd=ROOT, capture_output=True,
                     text=True, timeout=900,
                     env=dict(os.environ, STRUCTMAT_DATA_DIR=data_dir))
  assert p.returncode == 0 and "ALL OK" in p.stdout, (p.stdout
                                                      + p.stderr[-3000:])


@pytest.mark.parametrize("platform,call", [("tpu", "tpu_custom_call"),
                                           ("cuda", "__gpu$xla.gpu.triton")])
def test_a_pod_step_lowers_its_kernels_per_shard(platform, call):
  """Lowered for 8 abstract TPUs (H100s) with the tokens sharded: inside
  ``shards.over`` the kernel's operands are one shard's 512 of the 4096
  tokens; outside it a TPU refuses to lower the Mosaic kernel at all
  (jax: "cannot be automatically partitioned") and a GPU's would take all
  4096 rows on every device."""
  mesh = abstract_mesh(platform, 8)
  fn = lambda x, a, b: ops.monarch_matmul(x, a, b, impl="pallas")
  w = jax.ShapeDtypeStruct((2, 256, 256), jnp.bfloat16)

  def lower(over: bool):
    with jax.sharding.use_abstract_mesh(mesh), target.targeting(platform):
      x = jax.ShapeDtypeStruct((64, 64, 512), jnp.bfloat16,
                               sharding=NamedSharding(mesh, P("data")))
      if over:
        with shards.over(mesh, ("data", "fsdp")):
          # a fresh function: jit caches traces regardless of ``over``
          return jax.jit(lambda *a: fn(*a)).trace(x, w, w).lower(
              lowering_platforms=(platform,)).as_text()
      return jax.jit(lambda *a: fn(*a)).trace(x, w, w).lower(
          lowering_platforms=(platform,)).as_text()

  kernel_lines = lambda text: [l for l in text.splitlines() if call in l]
  lines = kernel_lines(lower(True))
  assert lines and all("tensor<512x512xbf16>" in l for l in lines), lines
  if platform == "tpu":
    with pytest.raises(NotImplementedError, match="automatically partitioned"):
      lower(False)
  else:
    assert all("tensor<4096x512xbf16>" in l for l in kernel_lines(lower(False)))


def _eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for inner in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_weights_are_gathered_after_the_layer_input():
  """per_shard fences the activation with the weights, so the gathers of
  fsdp-sharded weights (after the fence) cannot start before the layer's
  input exists. Fenced alone, libtpu's scheduler gathered every layer's
  weights at the start of the step: 7B Monarch on a v5e-32 (fsdp 32,
  remat=full, 8 layers) planned 2.12 GiB of temporaries a chip, 0.85 with
  x in the fence."""
  mesh = abstract_mesh("tpu", 8)
  fn = lambda x, a, b: ops.monarch_matmul(x, a, b, impl="pallas")
  w = jax.ShapeDtypeStruct((2, 256, 256), jnp.bfloat16)
  with jax.sharding.use_abstract_mesh(mesh), target.targeting("tpu"):
    x = jax.ShapeDtypeStruct((64, 64, 512), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P("data")))
    with shards.over(mesh, ("data", "fsdp")):
      jaxpr = jax.make_jaxpr(fn)(x, w, w).jaxpr
  fences = [[v.aval.shape for v in e.invars] for e in _eqns(jaxpr)
            if e.primitive.name == "optimization_barrier"]
  assert [(4096, 512), (2, 256, 256), (2, 256, 256)] in fences, fences


def test_train_steps_trace_on_their_mesh():
  """``Placement.on_mesh``: the train loop's jitted steps are traced inside
  ``shards.over`` with the batch's mesh axes; outside, one shard."""
  from structmat.train import loop
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  fake = types.SimpleNamespace(
      mesh=types.SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 2}),
      batch=NamedSharding(mesh, P(("data", "fsdp"))))
  seen = []
  step = loop.Placement.on_mesh(fake, lambda *a: seen.append(
      (shards.token_shards(), a)))
  step(1, 2)
  # Kernels split the tokens over every axis, "tensor" included.
  assert seen == [(16, (1, 2))] and shards.token_shards() == 1
  assert shards.local_tokens(64) == 64
  with shards.over(fake.mesh, "data"):
    assert shards.token_shards() == 16 and shards.local_tokens(64) == 4
    assert shards.local_tokens(8) == 2     # not over 16: the batch's 4
    assert shards.local_tokens(66) == 66   # does not divide: all of them
