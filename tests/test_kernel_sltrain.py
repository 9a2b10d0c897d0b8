"""SLTrain reconstruct-and-multiply kernel: interpret mode against the XLA
reference (forward and every gradient), poisoned outputs, cross-lowering."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.kernels import sltrain as sk
from structmat.kernels.lowering import cross_lower
from tests.helpers import (check_kernel, check_orders_skip_the_sort,
                           poison_pallas_outputs, sltrain_inputs as _inputs)

# (tokens, in, out, rank, density, block_tokens, block_in, block_out, chunk)
SHAPES = [
    (32, 64, 96, 4, 0.05, 16, 16, 32, 8),      # rectangular, several tiles
    (16, 32, 32, 8, 0.3, 16, 32, 32, 16),      # one tile, dense-ish support
    (48, 64, 64, 16, 0.05, 16, 64, 16, 8),     # 3 token tiles, wide in-tiles
    (8, 24, 40, 2, 0.1, 8, 8, 8, 4),           # awkward sizes (tiles of 8)
    (16, 36, 100, 4, 0.1, 16, 16, 32, 8),      # no tile divides: zero-padded
]
CASES = ([(*c, jnp.float32, 1e-5) for c in SHAPES]
         + [(*c, jnp.bfloat16, 1e-2) for c in SHAPES[:1]])


@pytest.mark.parametrize("tokens,d_in,d_out,rank,density,bt,bk,bn,chunk,dtype,tol",
                         CASES)
def test_sltrain_kernel_matches_reference(tokens, d_in, d_out, rank, density,
                                          bt, bk, bn, chunk, dtype, tol,
                                          monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)  # unwritten outputs stay NaN
  x, a, b, v, idx, g = _inputs(tokens, d_in, d_out, rank, density, dtype)
  ker = lambda x, a, b, v: sk.sltrain_matmul_pallas(
      x, a, b, v, idx, 2.0, block_tokens=bt, block_in=bk, block_out=bn,
      chunk=chunk, interpret=True)
  ref = lambda x, a, b, v: ops.sltrain_matmul(x, a, b, v, idx, 2.0)
  check_kernel(ker, ref, (x, a, b, v), g, tol, ("dx", "da", "db", "dvalues"))
  assert set(poisoned) == {"sltrain_fwd", "sltrain_dvalues"}


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5),
                                       (jnp.bfloat16, 1e-2)])
def test_low_rank_term_in_rank_slices(dtype, tol, monkeypatch):
  """The forward sums its low-rank term over slices of the rank (whole, a
  (bt, r) @ (r, bn) dot staged 384 KiB of shared memory at LLaMA-1B's rank
  512 in float32): here 16 bytes a row, so rank 32 takes 8 or 4 slices."""
  monkeypatch.setattr(sk, "RANK_CHUNK_BYTES", 16)
  poisoned = poison_pallas_outputs(monkeypatch)
  x, a, b, v, idx, g = _inputs(32, 64, 96, 32, 0.05, dtype)
  ker = lambda x, a, b, v: sk.sltrain_matmul_pallas(
      x, a, b, v, idx, 2.0, block_tokens=16, block_in=16, block_out=32,
      chunk=8, interpret=True)
  ref = lambda x, a, b, v: ops.sltrain_matmul(x, a, b, v, idx, 2.0)
  check_kernel(ker, ref, (x, a, b, v), g, tol, ("dx", "da", "db", "dvalues"))
  assert set(poisoned) == {"sltrain_fwd", "sltrain_dvalues"}


def test_jitted_bfloat16_gradients():
  """Under jit in interpret mode XLA:CPU folded dx's transposed factors into
  the kernel's bfloat16 dots and could not run them (benchmark_kernels' bf16
  row, impl=pallas training in bfloat16); dx now takes them materialized."""
  x, a, b, v, idx, g = _inputs(64, 64, 64, 16, 0.03, jnp.bfloat16)
  check_kernel(lambda x, a, b, v: sk.sltrain_matmul_pallas(
      x, a, b, v, idx, 2.0, interpret=True),
               lambda x, a, b, v: ops.sltrain_matmul(x, a, b, v, idx, 2.0),
               (x, a, b, v), g, 1e-2, ("dx", "da", "db", "dvalues"), jit=True)


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


def test_dvalues_picks_entries_exactly_on_gpus(monkeypatch, capsys):
  """Triton runs float32 dots as TF32 unless told otherwise: the dvalues
  kernel's one-hot pick of its accumulated G must lower to an IEEE dot (an
  exact selection), while G's accumulation stays TF32 as XLA's default is."""
  orig = sk.pl.pallas_call
  monkeypatch.setattr(sk.pl, "pallas_call",
                      lambda *a, **k: orig(*a, **{**k, "debug": True}))
  s = jax.ShapeDtypeStruct
  args = [s((64, 64), jnp.float32), s((64, 16), jnp.float32),
          s((16, 64), jnp.float32), s((100,), jnp.float32),
          s((100,), jnp.int32)]
  cross_lower(lambda x, a, b, v, i: sk.sltrain_matmul_pallas(
      x, a, b, v, i, 2.0, block_tokens=32, interpret=False, platform="cuda"),
              args, "cuda", (3,))
  module = capsys.readouterr().out.split(
      "The Triton module for pallas_call sltrain_dvalues")[1]
  dots = [line for line in module.splitlines() if "tt.dot" in line]
  assert len(dots) == 2, dots
  assert sum("inputPrecision = tf32" in d for d in dots) == 1, dots


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
  check_orders_skip_the_sort(
      lambda x, a, b, v, orders: sk.sltrain_matmul_pallas(
          x, a, b, v, idx, 2.0, orders=orders, block_tokens=16,
          interpret=True),
      (x, a, b, v), g, orders)
  with pytest.raises(ValueError, match="support_orders"):
    sk.sltrain_matmul_pallas(x, a, b, v, idx, 2.0, orders=orders[:1],
                             interpret=True)


def test_padded_dim_plans_whole_tiles():
  """Dims no Triton tile divides are padded to whole tiles of the cap (so the
  layer's stored orders stay valid); interpret mode keeps tiles of 8."""
  assert sk.padded_dim(2048, 64, "cuda") == (64, 2048)
  assert sk.padded_dim(5461, 64, "cuda") == (64, 5504)   # LLaMA-1B's MLP
  assert sk.padded_dim(200, 64, "cuda") == (64, 256)     # tile_for: 8
  assert sk.padded_dim(200, 64, "cpu") == (8, 200)
  assert sk.padded_dim(48, 64, "cuda") == (64, 64)
  assert sk.padded_dim(24, 64, "cpu") == (24, 24)
  assert sk.padded_dim(100, 32, "cpu") == (32, 128)


def test_every_preset_layer_runs_on_gpus():
  """impl="pallas" takes every SLTrain linear of the LLaMA and GPT-2
  presets on a GPU, in bfloat16 and float32, within the shared-memory
  budget (LLaMA-1B's 5461-wide MLP used to be refused: no tile divides it;
  GPT-2's rank 192, not a power of two, now pads to 256; LLaMA-1B's rank
  512 in float32 asked for 384 KiB before the low-rank term went in
  slices)."""
  from structmat.models.family import linear_shapes, preset_config  # pylint: disable=import-outside-toplevel
  for preset in ("llama_60m", "llama_130m", "llama_350m", "llama_1b",
                 "gpt2_small", "gpt2_medium"):
    cfg = preset_config(preset, "sltrain")
    rank = sk.padded_rank(dict(cfg.linear_kwargs)["rank"], "cuda")
    for site, (d_in, d_out) in linear_shapes(cfg).items():
      (bk, d_in_p), (bn, d_out_p) = (sk.padded_dim(d_in, 64, "cuda"),
                                     sk.padded_dim(d_out, 64, "cuda"))
      for itemsize in (2, 4):
        why = sk.supported(4096, d_in_p, d_out_p, rank, 128, bk, bn, 32,
                           "cuda", itemsize)
        assert why is None, (preset, site, itemsize, why)
        assert sk.smem_estimate(128, bk, bn, rank, itemsize) <= 208 * 1024
  assert sk.padded_rank(192, "cuda") == 256 and sk.padded_rank(4, "cpu") == 16
  # 256-token tiles: bfloat16 fits, float32 overflows (Triton 3.6 asked for
  # 400 KiB in dvalues at n=4096), and supported says so.
  assert sk.supported(4096, 4096, 4096, 128, 256, 64, 64, 32, "cuda", 2) is None
  assert "fewer tokens" in sk.supported(4096, 4096, 4096, 128, 256, 64, 64,
                                        32, "cuda", 4)


def test_padded_dims_keep_the_stored_orders():
  """100 x 150 pads to 128 x 192 at the default 64-wide tiles; the orders
  the layer stores for the unpadded support still skip the sort."""
  d_in, d_out = 100, 150
  x, a, b, v, idx, g = _inputs(32, d_in, d_out, 8, 0.05, jnp.float32)
  check_orders_skip_the_sort(
      lambda x, a, b, v, orders: sk.sltrain_matmul_pallas(
          x, a, b, v, idx, 2.0, orders=orders, block_tokens=16,
          interpret=True),
      (x, a, b, v), g, sk.support_orders(idx, d_in, d_out))


def test_supported_names_the_constraint():
  assert "Triton" in sk.supported(64, 64, 64, 4, 64, 64, 64, 32, "cuda")
  assert "multiple" in sk.supported(60, 64, 64, 16, 64, 64, 64, 32, "cuda")
  assert "Triton-only" in sk.supported(64, 128, 128, 16, 64, 128, 128, 32, "tpu")
  assert sk.supported(64, 128, 128, 16, 64, 64, 64, 32, "cuda") is None
  with pytest.raises(ValueError, match="SLTrain kernel"):
    x, a, b, v, idx, _ = _inputs(8, 64, 64, 4, 0.1, jnp.float32)
    sk.sltrain_matmul_pallas(x, a, b, v, idx, 1.0, platform="cuda",
                             interpret=False)


@pytest.mark.parametrize("grad,d_in", [(False, 256), (True, 256),
                                        (True, 200)])   # 200: padded to 256
def test_cross_lowering_for_h100(grad, d_in):
  d_out, r, t = 512, 16, 256
  nnz = int(0.03 * d_in * d_out)
  fwd = lambda x, a, b, v, i: sk.sltrain_matmul_pallas(
      x, a, b, v, i, 2.0, block_tokens=64, block_in=64, block_out=64,
      chunk=32, interpret=False, platform="cuda")
  s = jax.ShapeDtypeStruct
  args = [s((t, d_in), jnp.bfloat16), s((d_in, r), jnp.bfloat16),
          s((r, d_out), jnp.bfloat16), s((nnz,), jnp.bfloat16),
          s((nnz,), jnp.int32)]
  text = cross_lower(fwd, args, "cuda", (0, 1, 2, 3) if grad else None)
  assert "sltrain_fwd" in text and (not grad or "sltrain_dvalues" in text)


def test_wide_token_tiles_take_more_warps():
  """256-token tiles hold a (256, 64) float32 accumulator: the forward and dx
  take eight warps there (four spilled 564 bytes a thread, offline), four at
  128 tokens; dvalues keeps four."""
  assert (sk.fwd_warps(128, 64), sk.fwd_warps(256, 64)) == (4, 8)
  d_in, d_out, r, t = 256, 512, 16, 512
  s = jax.ShapeDtypeStruct
  args = [s((t, d_in), jnp.bfloat16), s((d_in, r), jnp.bfloat16),
          s((r, d_out), jnp.bfloat16), s((int(0.03 * d_in * d_out),),
                                         jnp.bfloat16),
          s((int(0.03 * d_in * d_out),), jnp.int32)]
  for bt, warps in ((128, "4"), (256, "8")):
    text = cross_lower(lambda x, a, b, v, i, bt=bt: sk.sltrain_matmul_pallas(
        x, a, b, v, i, 2.0, block_tokens=bt, interpret=False,
        platform="cuda"), args, "cuda", (0, 1, 2, 3))
    found = re.findall(r'name = "(\w+)"[^}]*?num_warps = (\d+)', text)
    assert ("sltrain_fwd", warps) in found and (
        "sltrain_dvalues", "4") in found, found


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
