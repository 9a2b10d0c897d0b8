"""SLTrain's product through a kernel materialized block by block: the same
values and gradients as the whole-kernel reference, and (XLA's own memory
accounting) no kernel-sized buffers per layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.layers import make_linear
from tests.helpers import assert_close

SHAPES = [  # (d_in, d_out, rank, block)
    (48, 80, 4, 16),     # blocks divide both widths
    (96, 40, 8, 28),     # neither: the last block overlaps the one before
    (40, 24, 3, 64),     # one block wider than the layer: the whole kernel
    (33, 50, 2, 1),      # one row / column at a time
]


def _inputs(d_in, d_out, rank, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed + d_in * d_out), 6)
  idx = ops.draw_support(k[0], d_in, d_out, 0.1)
  return (jax.random.normal(k[1], (2, 5, d_in)).astype(dtype),
          jax.random.normal(k[2], (d_in, rank)),
          jax.random.normal(k[3], (rank, d_out)),
          jax.random.normal(k[4], idx.shape), idx,
          jax.random.normal(k[5], (2, 5, d_out)))


@pytest.mark.parametrize("d_in,d_out,rank,block", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5),
                                       (jnp.bfloat16, 1e-2)])
def test_blocked_matches_whole_kernel(d_in, d_out, rank, block, dtype, tol):
  x, a, b, v, idx, g = _inputs(d_in, d_out, rank, dtype)
  whole = lambda *p: ops.sltrain_matmul(*p, idx, 0.5)
  blocked = lambda *p: ops.sltrain_matmul_blocked(*p, idx, 0.5, block)
  y = blocked(x, a, b, v)
  assert y.dtype == dtype and y.shape == (2, 5, d_out)
  f32 = lambda t: t.astype(jnp.float32)
  ref = f32(whole(x, a, b, v))
  assert_close(f32(y), ref, rtol=tol, atol=tol * float(jnp.abs(ref).max()))
  loss = lambda f: lambda *p: jnp.sum(f32(f(*p)) * g)
  want = jax.grad(loss(whole), argnums=(0, 1, 2, 3))(x, a, b, v)
  got = jax.grad(loss(blocked), argnums=(0, 1, 2, 3))(x, a, b, v)
  for u, w, name in zip(got, want, ("dx", "da", "db", "dvalues")):
    assert u.dtype == w.dtype, name
    assert_close(f32(u), f32(w), rtol=tol, atol=tol * float(jnp.abs(w).max()),
                 what=name)


def _swiglu(g, u):
  return jax.nn.silu(g) * u


@pytest.mark.parametrize("d_in,d_out,rank,block", SHAPES[:2])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5),
                                       (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("fn,n_args", [(_swiglu, 2), (jax.nn.gelu, 1)])
def test_blocked_of_an_elementwise_input(d_in, d_out, rank, block, dtype, tol,
                                         fn, n_args):
  """The input given as fn(*args) (rebuilt per block in the backward, never
  kept): the same values and gradients, the args' included, as the whole
  kernel applied to fn(*args)."""
  x, a, b, v, idx, g = _inputs(d_in, d_out, rank, dtype)
  args = (x, (x * 0.7 + 0.3).astype(dtype))[:n_args]
  whole = lambda args, *p: ops.sltrain_matmul(fn(*args), *p, idx, 0.5)
  fused = lambda args, *p: ops.sltrain_matmul_blocked_of(fn, args, *p, idx,
                                                         0.5, block)
  f32 = lambda t: t.astype(jnp.float32)
  ref = f32(whole(args, a, b, v))
  y = fused(args, a, b, v)
  assert y.dtype == dtype
  assert_close(f32(y), ref, rtol=tol, atol=tol * float(jnp.abs(ref).max()))
  loss = lambda f: lambda *p: jnp.sum(f32(f(*p)) * g)
  want = jax.tree.leaves(jax.grad(loss(whole), argnums=(0, 1, 2, 3))(
      args, a, b, v))
  got = jax.tree.leaves(jax.grad(loss(fused), argnums=(0, 1, 2, 3))(
      args, a, b, v))
  names = [f"dargs{i}" for i in range(n_args)] + ["da", "db", "dvalues"]
  for u, w, name in zip(got, want, names):
    assert u.dtype == w.dtype, name
    assert_close(f32(u), f32(w), rtol=tol, atol=tol * float(jnp.abs(w).max()),
                 what=name)


def test_blocked_of_keeps_no_input_per_layer():
  """XLA's memory analysis of a stack of LLaMA MLPs (f32, 512 tokens,
  256 -> 512 -> 256): with the down projection's input kept as a residual,
  blocks cost more than the whole-kernel path (which recomputes silu(g) * u
  in its backward); rebuilt per block from g and u, they cost less."""
  d, ff, rank, layers, t = 256, 512, 16, 4, 512
  k = jax.random.split(jax.random.key(5), 8)
  i_up = ops.draw_support(k[0], d, ff, 0.03)
  i_dn = ops.draw_support(k[1], ff, d, 0.03)
  fac = lambda key, n_in, n_out, nnz: tuple(
      jax.random.normal(kk, s) * 0.05 for kk, s in zip(
          jax.random.split(key, 3), ((n_in, rank), (rank, n_out), (nnz,))))
  params = [(fac(k[2], d, ff, i_up.shape[0]), fac(k[3], d, ff, i_up.shape[0]),
             fac(k[4], ff, d, i_dn.shape[0]))] * layers
  x = jax.random.normal(k[5], (t, d))

  def temp_mb(kind):
    up = lambda h, p: ops.sltrain_matmul(h, *p, i_up, 0.5,
                                         block=0 if kind == "whole" else 128)
    def down(g, u, p):
      if kind == "fused":
        return ops.sltrain_matmul_blocked_of(_swiglu, (g, u), *p, i_dn, 0.5,
                                             128)
      return ops.sltrain_matmul(_swiglu(g, u), *p, i_dn, 0.5,
                                block=0 if kind == "whole" else 128)
    def loss(params):
      h = x
      for pg, pu, pd in params:
        h = h + down(up(h, pg), up(h, pu), pd)
      return jnp.sum(h ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20

  whole, blocked, fused = temp_mb("whole"), temp_mb("blocked"), temp_mb("fused")
  assert blocked > whole > fused, (whole, blocked, fused)


@pytest.mark.parametrize("preset", ["llama_tiny", "gpt2_tiny"])
def test_models_rebuild_the_down_projection_input(preset, monkeypatch):
  """With kernel_block the MLP's down projection (LLaMA: silu(gate) * up,
  GPT-2: gelu(fc)) goes through apply_to into the fused op, once per layer,
  and the model's loss and gradients equal the whole-kernel model's."""
  from structmat.models import build_model  # pylint: disable=import-outside-toplevel
  from structmat.models.family import preset_config  # pylint: disable=import-outside-toplevel
  calls = []
  fused = ops.sltrain_matmul_blocked_of
  monkeypatch.setattr(ops, "sltrain_matmul_blocked_of",
                      lambda *a, **k: calls.append(1) or fused(*a, **k))
  tok = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  results = []
  for kb in (0, 8):
    cfg = preset_config(preset, "sltrain", vocab_size=256, max_len=16,
                        linear_kwargs={"kernel_block": kb} if kb else None)
    model = build_model(cfg)
    v = model.init(jax.random.key(1), tok)
    # lora_b starts at zero: shift the parameters so every path counts.
    params = jax.tree.map(lambda t: t + 0.01, v["params"])
    loss = lambda p, model=model, v=v: jnp.mean(model.apply(
        {**v, "params": p}, tok) ** 2)
    calls.clear()
    results.append(jax.value_and_grad(loss)(params))
  assert len(calls) == cfg.n_layers   # the kernel_block model's step
  (l0, g0), (l1, g1) = results
  assert_close(l1, l0, rtol=1e-5)
  scale = max(float(jnp.abs(t).max()) for t in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert_close(a, b, atol=1e-5 * scale)


def test_apply_to_materializes_for_other_layers(monkeypatch):
  """apply_to(layer, fn, *args) is layer(fn(*args)) for layers that do not
  rebuild their input (dense; SLTrain without kernel_block or off XLA)."""
  from structmat.layers import apply_to  # pylint: disable=import-outside-toplevel
  g = jax.random.normal(jax.random.key(0), (2, 3, 12))
  u = jax.random.normal(jax.random.key(1), (2, 3, 12))
  fn = lambda g, u: jax.nn.silu(g) * u
  for layer in (make_linear("dense", features=5),
                make_linear("sltrain", features=5, rank=2),
                make_linear("sltrain", features=5, rank=2, kernel_block=4,
                            impl="pallas")):
    assert not layer.rebuilds_input
    v = layer.init(jax.random.key(2), g)
    assert_close(apply_to(layer.bind(v), fn, g, u),
                 layer.apply(v, fn(g, u)), atol=1e-6)
  assert make_linear("sltrain", features=5, rank=2,
                     kernel_block=4).rebuilds_input
  auto = make_linear("sltrain", features=5, rank=2, kernel_block=4,
                     impl="auto")
  assert auto.rebuilds_input    # the CPU: auto runs the blocked XLA path
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert not auto.rebuilds_input   # the TPU kernel may take it there


def test_ops_and_layer_route_block():
  x, a, b, v, idx, _ = _inputs(40, 24, 3, jnp.float32)
  # ops.sltrain_matmul(block=...) is the blocked form (a scan in its jaxpr).
  jaxpr = str(jax.make_jaxpr(
      lambda x: ops.sltrain_matmul(x, a, b, v, idx, 0.5, block=8))(x))
  assert "scan" in jaxpr
  layer = make_linear("sltrain", features=24, rank=3, kernel_block=8)
  whole = make_linear("sltrain", features=24, rank=3)
  variables = layer.init(jax.random.key(0), x)
  # lora_b starts at zero: give it values so the low-rank path counts.
  variables = jax.tree_util.tree_map(
      lambda t: t + 0.1 if t.dtype == jnp.float32 else t, variables)
  assert_close(layer.apply(variables, x), whole.apply(variables, x),
               atol=1e-5)
  with pytest.raises(ValueError, match="kernel_block=-1"):
    make_linear("sltrain", features=24, rank=3, kernel_block=-1).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match="block=0"):
    ops.sltrain_matmul_blocked(x, a, b, v, idx, 0.5, 0)


def test_blocks_bound_the_step_memory():
  """XLA's memory analysis of a jitted gradient through six layers: the
  whole-kernel path holds about two kernels per layer (W kept for the
  backward, dW), the blocked one a fixed few blocks."""
  d, rank, layers = 512, 8, 6
  k = jax.random.split(jax.random.key(2), 4)
  idx = ops.draw_support(k[0], d, d, 0.03)
  params = [(jax.random.normal(k[1], (d, rank)) * 0.1,
             jax.random.normal(k[2], (rank, d)) * 0.1,
             jax.random.normal(k[3], idx.shape) * 0.1)] * layers
  x = jnp.ones((16, d))

  def temp_kernels(matmul):
    def loss(params):
      h = x
      for a, b, v in params:
        h = jnp.tanh(matmul(h, a, b, v))
      return h.sum()
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (d * d * 4)

  whole = temp_kernels(lambda h, a, b, v: ops.sltrain_matmul(h, a, b, v, idx,
                                                             0.5))
  blocked = temp_kernels(lambda h, a, b, v: ops.sltrain_matmul(
      h, a, b, v, idx, 0.5, block=64))
  assert whole >= layers, whole          # at least one kernel per layer
  assert blocked < 2, blocked            # a few 64-wide blocks in all
  np.testing.assert_array_less(4 * blocked, whole)
