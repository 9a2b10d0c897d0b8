"""SLTrain reconstruct-and-multiply kernel: interpret mode against the XLA
reference (forward and every gradient), poisoned outputs, cross-lowering."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.kernels import sltrain as sk
from tests.helpers import poison_pallas_outputs

# (tokens, in, out, rank, density, block_tokens, block_in, block_out, chunk)
SHAPES = [
    (32, 64, 96, 4, 0.05, 16, 16, 32, 8),      # rectangular, several tiles
    (16, 32, 32, 8, 0.3, 16, 32, 32, 16),      # one tile, dense-ish support
    (48, 64, 64, 16, 0.05, 16, 64, 16, 8),     # 3 token tiles, wide in-tiles
    (8, 24, 40, 2, 0.1, 8, 8, 8, 4),           # awkward sizes (tiles of 8)
]
CASES = ([(*c, jnp.float32, 1e-5) for c in SHAPES]
         + [(*c, jnp.bfloat16, 1e-2) for c in SHAPES[:1]])


def _inputs(tokens, d_in, d_out, rank, density, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed + d_in + d_out), 6)
  x = jax.random.normal(k[0], (tokens, d_in)).astype(dtype)
  a = (jax.random.normal(k[1], (d_in, rank)) / np.sqrt(d_in)).astype(dtype)
  b = jax.random.normal(k[2], (rank, d_out)).astype(dtype)
  idx = ops.draw_support(k[3], d_in, d_out, density)
  v = (jax.random.normal(k[4], idx.shape) / np.sqrt(d_in)).astype(dtype)
  g = jax.random.normal(k[5], (tokens, d_out)).astype(dtype)
  return x, a, b, v, idx, g


@pytest.mark.parametrize("tokens,d_in,d_out,rank,density,bt,bk,bn,chunk,dtype,tol",
                         CASES)
def test_sltrain_kernel_matches_reference(tokens, d_in, d_out, rank, density,
                                          bt, bk, bn, chunk, dtype, tol,
                                          monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)  # unwritten outputs stay NaN
  x, a, b, v, idx, g = _inputs(tokens, d_in, d_out, rank, density, dtype)
  f32 = lambda *z: [t.astype(jnp.float32) for t in z]
  ref = lambda x, a, b, v: ops.sltrain_matmul(*f32(x, a, b, v)[:3], f32(v)[0],
                                              idx, 2.0)
  ker = lambda x, a, b, v: sk.sltrain_matmul_pallas(
      x, a, b, v, idx, 2.0, block_tokens=bt, block_in=bk, block_out=bn,
      chunk=chunk, interpret=True)
  y, r = ker(x, a, b, v), ref(x, a, b, v)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), r, rtol=tol,
                             atol=tol * 4 * float(jnp.abs(r).max()))
  loss = lambda f: lambda *z: jnp.sum(f(*z).astype(jnp.float32) * g)
  ga = jax.grad(loss(ker), argnums=(0, 1, 2, 3))(x, a, b, v)
  gb = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(x, a, b, v)
  for p, q, name in zip(ga, gb, ("dx", "da", "db", "dvalues")):
    scale = float(jnp.abs(q).max())
    np.testing.assert_allclose(np.asarray(p, np.float32), np.asarray(q),
                               rtol=tol, atol=tol * 4 * scale, err_msg=name)
  assert set(poisoned) == {"sltrain_fwd", "sltrain_dvalues"}


def test_dvalues_writes_only_the_support(monkeypatch):
  """Masked stores: every entry of the support is written, the padding past
  it is not (it belongs to no tile)."""
  poison_pallas_outputs(monkeypatch)
  x, _, _, _, idx, g = _inputs(32, 64, 96, 4, 0.05, jnp.float32)
  bt, bk, bn, chunk = 16, 16, 32, 8
  ts = sk.tile_support(idx, 64, 96, bk, bn, chunk)
  dv = sk._call_dvals(x, g, ts, bt, bk, bn, chunk, True, "cpu")
  assert bool(jnp.isfinite(dv[:idx.shape[0]]).all())
  assert bool(jnp.isnan(dv[idx.shape[0]:]).all())


def test_tile_support_groups_entries_by_tile():
  idx = ops.draw_support(jax.random.key(3), 32, 48, 0.2)
  ts = sk.tile_support(idx, 32, 48, 8, 16, 4)
  r, c = np.asarray(idx) // 48, np.asarray(idx) % 48
  off = np.asarray(ts.offsets)
  assert off[0] == 0 and off[-1] == idx.shape[0]
  for t in range(len(off) - 1):
    members = np.asarray(ts.order)[off[t]:off[t + 1]]
    assert all((r[m] // 8) * 3 + c[m] // 16 == t for m in members)


def test_precomputed_orders_skip_the_sort():
  """support_orders (what the layer stores at init) gives the same forward
  and gradients as sorting in the call, and the traced step has no sort."""
  d_in, d_out = 128, 192  # default tiles: 64 x 64, three output tiles
  x, a, b, v, idx, g = _inputs(32, d_in, d_out, 8, 0.05, jnp.float32)
  orders = sk.support_orders(idx, d_in, d_out)
  t_idx = sk.transposed_indices(idx, d_in, d_out)
  for o, i, cols in ((orders[0], idx, d_out), (orders[1], t_idx, d_in)):
    tiles = np.asarray(sk._tile_of(i, cols, 64, 64))[np.asarray(o)]  # pylint: disable=protected-access
    assert sorted(np.asarray(o).tolist()) == list(range(idx.shape[0]))
    assert (np.diff(tiles) >= 0).all()
  def run(orders):
    f = lambda x, a, b, v: sk.sltrain_matmul_pallas(
        x, a, b, v, idx, 2.0, orders=orders, block_tokens=16, interpret=True)
    loss = lambda *z: jnp.sum(f(*z) * g)
    return f(x, a, b, v), jax.grad(loss, argnums=(0, 1, 2, 3))(x, a, b, v), (
        str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 3)))(x, a, b, v)))
  y0, g0, jaxpr0 = run(None)
  y1, g1, jaxpr1 = run(orders)
  sorts = lambda jaxpr: len(re.findall(r"\bsort\[", jaxpr))  # the primitive
  assert sorts(jaxpr0) >= 1 and sorts(jaxpr1) == 0
  np.testing.assert_array_equal(y0, y1)
  for p, q in zip(g0, g1):
    np.testing.assert_array_equal(p, q)
  with pytest.raises(ValueError, match="support_orders"):
    sk.sltrain_matmul_pallas(x, a, b, v, idx, 2.0, orders=orders[:1],
                             interpret=True)


def test_supported_names_the_constraint():
  assert "Triton" in sk.supported(64, 64, 64, 4, 64, 64, 64, 32, "cuda")
  assert "multiple" in sk.supported(60, 64, 64, 16, 64, 64, 64, 32, "cuda")
  assert "Triton-only" in sk.supported(64, 128, 128, 16, 64, 128, 128, 32, "tpu")
  assert sk.supported(64, 128, 128, 16, 64, 64, 64, 32, "cuda") is None
  with pytest.raises(ValueError, match="SLTrain kernel"):
    x, a, b, v, idx, _ = _inputs(8, 64, 64, 4, 0.1, jnp.float32)
    sk.sltrain_matmul_pallas(x, a, b, v, idx, 1.0, platform="cuda",
                             interpret=False)


@pytest.mark.parametrize("grad", [False, True])
def test_cross_lowering_for_h100(grad):
  ad = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                   num_cores=1, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",),
                                   (jax.sharding.AxisType.Explicit,),
                                   abstract_device=ad)
  d_in, d_out, r, t = 256, 512, 16, 256
  nnz = int(0.03 * d_in * d_out)
  fwd = lambda x, a, b, v, i: sk.sltrain_matmul_pallas(
      x, a, b, v, i, 2.0, block_tokens=64, block_in=64, block_out=64,
      chunk=32, interpret=False, platform="cuda")
  f = fwd if not grad else jax.grad(
      lambda *z: jnp.sum(fwd(*z).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  s = jax.ShapeDtypeStruct
  args = [s((t, d_in), jnp.bfloat16), s((d_in, r), jnp.bfloat16),
          s((r, d_out), jnp.bfloat16), s((nnz,), jnp.bfloat16),
          s((nnz,), jnp.int32)]
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "sltrain_fwd" in text and (not grad or "sltrain_dvalues" in text)


def test_layer_with_pallas_impl_matches_xla():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from structmat.layers import make_linear  # pylint: disable=import-outside-toplevel
  from tests.helpers import randomize  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  kw = dict(features=48, rank=4, density=0.1, alpha=8.0)
  xla = make_linear("sltrain", **kw)
  pal = make_linear("sltrain", impl="pallas", **kw)
  v = nn.unbox(xla.init(jax.random.key(1), x))
  v = {"params": randomize(v["params"]), "structure": v["structure"]}
  orders = nn.unbox(v["structure"])["tile_orders"]
  np.testing.assert_array_equal(orders, sk.support_orders(
      nn.unbox(v["structure"])["indices"], 32, 48))
  np.testing.assert_allclose(pal.apply(v, x), xla.apply(v, x), atol=1e-4)
  g = lambda m: jax.grad(lambda p: jnp.sum(m.apply(
      {"params": p, "structure": v["structure"]}, x) ** 2))(v["params"])
  for a, b in zip(jax.tree.leaves(g(pal)), jax.tree.leaves(g(xla))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
