"""Kernels per token shard on fake CPU devices (run in a subprocess).

  python tests/kernel_shards_check.py [WORKDIR]

Sets 8 host devices before importing jax. On data x fsdp x tensor meshes
of 4 x 2 x 1 and 2 x 2 x 2 (factors split by block over "tensor"), every
kernel family through ``ops`` (impl="pallas", interpreted) and the TPU
flash attention inside ``shards.over``: the value and the gradients of every argument must match
impl="xla" on the same sharded inputs, and the kernels must see their
shard's 16 of the 128 tokens, split over "tensor" too (no operand with 128
or 32 rows: no weight or support here has those sizes). With WORKDIR,
also the train loop on the 2 x 2 x 2 mesh, LLaMA-tiny with Monarch,
SLTrain and block-diagonal MLPs: impl="pallas" must give impl="xla"'s
losses. And what kernels' backward passes keep per device
(``residual_check``, ``gather_check``). Prints one line per check and "ALL
OK".
"""
import os
import sys

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from structmat import ops  # noqa: E402
from structmat.kernels import shards  # noqa: E402


def kernel_shapes(fn, *args):
  """The set of the shapes of every pallas_call operand in fn's jaxpr
  (nested jaxprs included)."""
  shapes = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        shapes.update(v.aval.shape for v in eqn.invars)
        continue
      for v in eqn.params.values():
        for inner in v if isinstance(v, (tuple, list)) else (v,):
          inner = getattr(inner, "jaxpr", inner)
          if hasattr(inner, "eqns"):
            walk(inner)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def kernel_dims(fn, *args):
  """The set of every dimension of every pallas_call operand in fn's
  jaxpr."""
  return {d for shape in kernel_shapes(fn, *args) for d in shape}


def _mesh(shape):
  """A (data, fsdp, tensor) mesh of ``shape`` over the 8 fake devices."""
  return Mesh(np.array(jax.devices()).reshape(shape),
              ("data", "fsdp", "tensor"))


def check(shape):
  """Every case on a (data, fsdp, tensor) mesh of ``shape``; the Monarch
  and block-diagonal factors split by block over "tensor" (rules mapping
  "monarch_blocks" to it, the default before session 22). Returns the
  number of failures."""
  mesh = _mesh(shape)
  per_shard = 128 // (shape[0] * shape[1] * shape[2])   # tensor too
  k = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(k[0], (8, 16, 64))      # 128 tokens
  x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  blocks = NamedSharding(mesh, P("tensor"))
  w1 = jax.device_put(jax.random.normal(k[1], (4, 16, 16)) / 4, blocks)
  w2 = jax.device_put(jax.random.normal(k[2], (4, 16, 16)) / 4, blocks)
  rank, idx = 8, ops.draw_support(k[3], 64, 64, 0.05)
  a = jax.random.normal(k[4], (64, rank)) / 8
  b = jax.random.normal(k[5], (rank, 64)) / 3
  v = jax.random.normal(k[6], idx.shape) / 8
  g = jax.random.normal(k[7], (8, 16, 64))
  cases = {
      "monarch": (lambda impl: lambda x, p, q: ops.monarch_matmul(
          x, p, q, impl=impl), (w1, w2)),
      "monarch two_pass": (lambda impl: lambda x, p, q: ops.monarch_matmul(
          x, p, q, impl=impl + (":two_pass" if impl == "pallas" else "")),
          (w1, w2)),
      "blockdiag": (lambda impl: lambda x, p: ops.blockdiag_matmul(
          x, p, impl=impl), (w1,)),
      "sltrain": (lambda impl: lambda x, a, b, v: ops.sltrain_matmul(
          x, a, b, v, idx, 0.5, impl=impl), (a, b, v)),
  }
  failed = 0
  for name, (make, weights) in cases.items():
    args = (x, *weights)
    n = tuple(range(len(args)))
    loss = lambda impl: lambda *a: jnp.sum(make(impl)(*a) * g)
    ref = jax.jit(jax.value_and_grad(loss("xla"), n))(*args)
    with shards.over(mesh, ("data", "fsdp")):
      got = jax.jit(jax.value_and_grad(loss("pallas"), n))(*args)
      jax.block_until_ready(got)
      dims = kernel_dims(jax.value_and_grad(loss("pallas"), n), *args)
    errs = [float(jnp.max(jnp.abs(p - q)) / (jnp.max(jnp.abs(q)) + 1e-30))
            for p, q in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
    # Each kernel sees its shard's tokens, never all 128 nor its batch
    # shard's (the same rows on every "tensor" device).
    bigger = {128, 128 // (shape[0] * shape[1])} - {per_shard}
    local = per_shard in dims and not bigger & dims
    ok = max(errs) < 1e-4 and local
    failed += not ok
    print(shape, name, "errors", [f"{e:.1e}" for e in errs],
          "kernels per shard", local, "OK" if ok else "FAIL", flush=True)
  return failed


def attention_check(shape, kv_heads: int, expect: tuple) -> int:
  """The TPU flash attention kernel (interpreted) on a mesh of ``shape``,
  6 query heads over ``kv_heads`` grouped KV heads: value and q/k/v
  gradients as XLA's attention, and every kernel on ``expect`` = (its
  device's sequences of the 16, query heads): with a "tensor" axis that
  divides the KV heads, its batch shard's sequences and tensor shard's
  heads (``shards.per_batch(heads=True)``), else the batch split over
  every axis. Returns the number of failures."""
  from structmat.models.llama import attend  # pylint: disable=import-outside-toplevel
  mesh = _mesh(shape)
  k = jax.random.split(jax.random.key(3), 4)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  q = jax.device_put(jax.random.normal(k[0], (16, 128, 6, 16)), batch)
  kv = [jax.device_put(jax.random.normal(key, (16, 128, kv_heads, 16)), batch)
        for key in k[1:3]]
  g = jax.random.normal(k[3], q.shape)
  loss = lambda impl: lambda *a: jnp.sum(attend(*a, impl) * g)
  ref = jax.jit(jax.value_and_grad(loss("xla"), (0, 1, 2)))(q, *kv)
  with shards.over(mesh, ("data", "fsdp")):
    got = jax.jit(jax.value_and_grad(loss("tpu_flash"), (0, 1, 2)))(q, *kv)
    jax.block_until_ready(got)
    shapes = kernel_shapes(jax.value_and_grad(loss("tpu_flash"), (0, 1, 2)),
                           q, *kv)
  errs = [float(jnp.max(jnp.abs(p - r)) / jnp.max(jnp.abs(r)))
          for p, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
  # The (sequences, heads) of the kernels' (heads-major) q- and k-shaped
  # operands: expect's, and its KV heads.
  seen = {s[:2] for s in shapes if s[2:] == (128, 16)}
  want = {expect, (expect[0], expect[1] * kv_heads // 6)}
  ok = max(errs) < 1e-4 and seen == want
  print(shape, f"{kv_heads} kv heads: tpu_flash attention errors",
        [f"{e:.1e}" for e in errs], "(sequences, heads) per kernel", seen,
        "OK" if ok else "FAIL", flush=True)
  return int(not ok)


def residual_check() -> int:
  """What a kernel's backward keeps per device under ``shards.per_shard``
  (``shards.SAVED_POLICY``), on an fsdp mesh of 8 with the factors split
  by rows: only the operands as the caller holds them (x's shard, the
  sharded weights), plus the two-pass kernel's named stage-1 result, never
  copies made inside the shard_map. Before session 23 the TPU kernel's
  padded x and gathered, padded weights were kept: LLaMA-1B Monarch at
  fsdp 16 held 0.67 GiB more per v5e chip. Returns the number of
  failures."""
  import functools  # pylint: disable=import-outside-toplevel
  from structmat.kernels import monarch_tpu  # pylint: disable=import-outside-toplevel
  mesh = _mesh((1, 8, 1))
  k = jax.random.split(jax.random.key(1), 3)
  rows = NamedSharding(mesh, P(None, "fsdp", None))
  tpu = functools.partial(shards.per_shard, functools.partial(
      monarch_tpu.monarch_matmul_tpu, block_tokens=128, interpret=True))
  cases = {   # name: (product, x's dtype, w1, w2, named residual's width)
      # 43-wide blocks padded to 48 and bf16 x with f32 weights (cast).
      "monarch tpu, padded": (tpu, jnp.bfloat16, (4, 64, 43), (4, 64, 64), 0),
      "monarch, cast": (lambda x, a, b: ops.monarch_matmul(
          x, a, b, impl="pallas"), jnp.bfloat16, (4, 64, 48), (4, 64, 64), 0),
      "monarch two_pass": (lambda x, a, b: ops.monarch_matmul(
          x, a, b, impl="pallas:two_pass"), jnp.float32, (4, 64, 48),
                           (4, 64, 64), 4 * 64),
  }
  per_device = lambda leaves: sum(l.addressable_shards[0].data.nbytes
                                  for l in leaves)
  failed = 0
  for name, (f, dtype, s1, s2, named) in cases.items():
    x = jax.device_put(jax.random.normal(k[0], (1024, s1[0] * s1[2]), dtype),
                       NamedSharding(mesh, P("fsdp")))
    w1 = jax.device_put(jax.random.normal(k[1], s1) / 8, rows)
    w2 = jax.device_put(jax.random.normal(k[2], s2) / 8, rows)
    with shards.over(mesh, ("data", "fsdp")):
      res = jax.tree.leaves(jax.jit(lambda *a: jax.vjp(f, *a)[1])(x, w1, w2))
    allowed = per_device((x, w1, w2)) + 1024 // 8 * named * x.dtype.itemsize
    ok = per_device(res) <= allowed
    failed += not ok
    print(name, "residual bytes per device", per_device(res), "allowed",
          allowed, "OK" if ok else "FAIL", flush=True)
  return failed


def gather_check() -> int:
  """The backward of per-shard kernels gathers fsdp-sharded weights anew,
  as XLA's own fsdp matmuls do, instead of keeping the forward's gathered
  copies: two Monarch layers (slices of stacked factors, tanh between) on
  an fsdp mesh of 8 compile to 8 all-gathers (2 factors x 2 layers x
  forward and backward). Without the barrier in ``shards.per_shard`` XLA
  merged them into 4. Returns the number of failures."""
  mesh = _mesh((1, 8, 1))
  k = jax.random.split(jax.random.key(2), 3)
  x = jax.device_put(jax.random.normal(k[0], (64, 256)),
                     NamedSharding(mesh, P("fsdp")))
  rows = NamedSharding(mesh, P(None, None, "fsdp", None))
  w1, w2 = (jax.device_put(jax.random.normal(key, (2, 4, 64, 64)) / 8, rows)
            for key in k[1:])

  def loss(x, w1, w2):
    for i in range(2):
      x = jnp.tanh(ops.monarch_matmul(x, w1[i], w2[i], impl="pallas"))
    return jnp.sum(x ** 2)
  with shards.over(mesh, ("data", "fsdp")):
    hlo = jax.jit(jax.grad(loss, (1, 2))).lower(x, w1, w2).compile().as_text()
  gathers = hlo.count(" all-gather(") + hlo.count(" all-gather-start(")
  print("weight gathers", gathers, "OK" if gathers == 8 else "FAIL",
        flush=True)
  return int(gathers != 8)


def loop_check(root: str) -> int:
  """The train loop (``loop.Placement`` traces its steps in
  ``shards.over``) with impl="pallas" against impl="xla" on 2 x 2 x 2, and
  with remat="full" and "linears" (block checkpoints around per_shard's
  own; "linears" keeps the layers' outputs)."""
  from structmat.train import loop  # pylint: disable=import-outside-toplevel
  from tests import sharded_check  # pylint: disable=import-outside-toplevel
  out = {}
  runs = (("xla", "none"), ("pallas", "none"), ("pallas", "full"),
          ("pallas", "linears"))
  for impl, remat in runs:
    c = sharded_check.config(
        "dense", "adamw", "up=monarch;gate=sltrain:rank=8;down=blockdiag",
        "llama_tiny", dict(data=2, fsdp=2, tensor=2))
    c.impl, c.remat = impl, remat
    workdir = os.path.join(root, f"{impl}_{remat}")
    loop.train_and_evaluate(c, workdir)
    out[impl, remat] = sharded_check.losses(workdir)
  ref = out["xla", "none"]
  failed = 0
  for key in runs[1:]:
    ok = len(ref) == 3 and np.allclose(out[key], ref, rtol=1e-4)
    failed += not ok
    print(f"train loop, impl={key[0]} remat={key[1]} vs xla losses",
          out[key], ref, "OK" if ok else "FAIL", flush=True)
  return failed


def main():
  failed = (check((4, 2, 1)) + check((2, 2, 2))
            + attention_check((4, 2, 1), 2, (2, 6))
            + attention_check((2, 2, 2), 2, (4, 3))   # heads over tensor
            + attention_check((2, 2, 2), 3, (2, 6))   # 3 do not split
            + residual_check() + gather_check())
  if len(sys.argv) > 1:
    failed += loop_check(sys.argv[1])
  print("ALL OK" if not failed else f"{failed} FAILED")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
