"""TPU SLTrain kernel (W column blocks rebuilt once in VMEM): interpret mode
against the XLA reference (forward and every gradient), poisoned outputs,
the TPU interpreter's race detection, cross-lowering for a TPU v5e,
dispatch."""
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

from structmat import ops
from structmat.kernels import sltrain as sk
from structmat.kernels import sltrain_tpu as stk
from structmat.kernels.lowering import cross_lower
from tests.helpers import (check_kernel, check_orders_skip_the_sort, on_tpu,
                           poison_pallas_outputs, sltrain_inputs as _inputs)

# (tokens, in, out, rank, density, block_tokens)
SHAPES = [
    (256, 128, 256, 8, 0.05, 128),    # one 256-wide block of four 64-tiles
    (256, 256, 128, 16, 0.05, 256),   # narrowing; 256-token tiles
    (384, 128, 384, 8, 0.05, 128),    # three 128-wide blocks, three tiles
    (256, 128, 128, 4, 0.3, 128),     # ~1200 entries per tile: 10 chunks
    (128, 96, 200, 4, 0.05, 128),     # off whole lanes: padded to 128 x 256
]
CASES = ([(*c, jnp.float32, 1e-5) for c in SHAPES]
         + [(*c, jnp.bfloat16, 1e-2) for c in (SHAPES[0], SHAPES[-1])])


def _check(ker, x, a, b, v, idx, g, tol, jit=False):
  ref = lambda x, a, b, v: ops.sltrain_matmul(x, a, b, v, idx, 2.0)
  check_kernel(ker, ref, (x, a, b, v), g, tol, ("dx", "da", "db", "dvalues"),
               jit=jit)


@pytest.mark.parametrize("tokens,d_in,d_out,rank,density,bt,dtype,tol", CASES)
def test_matches_reference(tokens, d_in, d_out, rank, density, bt, dtype, tol,
                           monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)  # unwritten outputs stay NaN
  x, a, b, v, idx, g = _inputs(tokens, d_in, d_out, rank, density, dtype)
  orders = sk.support_orders(idx, d_in, d_out)   # as the layer stores them
  _check(lambda x, a, b, v: stk.sltrain_matmul_tpu(
      x, a, b, v, idx, 2.0, orders=orders, block_tokens=bt, interpret=True),
         x, a, b, v, idx, g, tol)
  assert set(poisoned) == {"sltrain_tpu_fwd", "sltrain_tpu_dvalues"}


def test_jitted_bfloat16_gradients():
  """Under jit, XLA:CPU folded b.T into W^T's low-rank product and hit a
  bfloat16 x bfloat16 -> float32 dot it lacks (benchmark_kernels' bf16 row);
  the product now runs in float32, which is exact for 16-bit factors."""
  x, a, b, v, idx, g = _inputs(256, 256, 256, 16, 0.03, jnp.bfloat16)
  _check(lambda x, a, b, v: stk.sltrain_matmul_tpu(
      x, a, b, v, idx, 2.0, block_tokens=256, interpret=True),
         x, a, b, v, idx, g, 1e-2, jit=True)


def test_padded_support_layout():
  """Every tile's entries start a fresh 128-entry row, in tile order, and
  the slots hold each entry's row and column within its tile."""
  d_in, d_out = 128, 256
  idx = ops.draw_support(jax.random.key(3), d_in, d_out, 0.3)
  ps = stk.padded_support(idx, d_in, d_out)
  rows, cols = np.asarray(ps.rows).reshape(-1), np.asarray(ps.cols).reshape(-1)
  start, count = np.asarray(ps.start), np.asarray(ps.count)
  flat = np.asarray(idx)[np.asarray(ps.order)]
  r, c = flat // d_out, flat % d_out
  tile = (r // 64) * (d_out // 64) + c // 64
  pos = np.asarray(ps.pos)
  assert (np.diff(tile) >= 0).all()                       # tile order
  first = np.searchsorted(tile, tile)                      # tile's first entry
  np.testing.assert_array_equal(pos, start[tile] * 128 + np.arange(len(pos))
                                - first)                   # consecutive slots
  assert (pos // 128 < (start + count)[tile]).all()
  np.testing.assert_array_equal(rows[pos], r % 64)
  np.testing.assert_array_equal(cols[pos], c % 64)
  assert (np.diff(start) == count[:-1]).all()
  assert ps.rows.shape[0] >= start[-1] + count[-1]


@pytest.mark.parametrize("d_in,d_out", [(128, 256), (96, 344)])
def test_stored_orders_skip_the_sort(d_in, d_out):
  """Also for dims padded to whole lanes (96 x 344 -> 128 x 384 at the
  unpadded layer's 32 x 8 tiles, whose orders the layer stores)."""
  x, a, b, v, idx, g = _inputs(128, d_in, d_out, 4, 0.05, jnp.float32)
  check_orders_skip_the_sort(
      lambda x, v, orders: stk.sltrain_matmul_tpu(
          x, a, b, v, idx, 2.0, orders=orders, block_tokens=128,
          interpret=True),
      (x, v), g, sk.support_orders(idx, d_in, d_out))


@pytest.mark.parametrize("d_in,d_out", [(128, 384), (96, 344)])
def test_tpu_interpreter_finds_no_races(d_in, d_out):
  """Two cores, NaN-filled uninitialized memory, race detection: the
  forward's parallel column blocks and the in-order dvalues grid. 96 x 344:
  x's tiles padded in VMEM scratch (NaN until the kernel zeroes the pad
  lanes), the last of three column blocks 88 of 128 lanes inside y and dy
  (the rest read as NaN, never stored)."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                 uninitialized_memory="nan")
  x, a, b, v, idx, g = _inputs(256, d_in, d_out, 8, 0.05, jnp.float32, seed=1)
  _check(lambda x, a, b, v: stk.sltrain_matmul_tpu(
      x, a, b, v, idx, 2.0, block_tokens=128, interpret=params),
         x, a, b, v, idx, g, 1e-5)
  assert ipc.races is not None and not ipc.races.races_found


@pytest.mark.parametrize("grad", [False, True])
def test_cross_lowering_for_tpu(grad):
  # The 60M preset's MLP up-projection: 512 -> 1376 (padded to 1408), rank
  # 128, 3% support.
  d_in, d_out, r, t = 512, 1376, 128, 4096
  nnz = int(0.03 * d_in * d_out)
  assert stk.supported(t, d_in, d_out, r, nnz, 256) is None
  fwd = lambda x, a, b, v, i, o: stk.sltrain_matmul_tpu(
      x, a, b, v, i, 2.0, orders=o, block_tokens=256, interpret=False)
  s = jax.ShapeDtypeStruct
  args = [s((t, d_in), jnp.bfloat16), s((d_in, r), jnp.bfloat16),
          s((r, d_out), jnp.bfloat16), s((nnz,), jnp.bfloat16),
          s((nnz,), jnp.int32), s((2, nnz), jnp.int32)]
  text = cross_lower(fwd, args, "tpu", (0, 1, 2, 3) if grad else None)
  # The gradient of a sum needs dx and dvalues, not the forward's output.
  names = {"sltrain_tpu_fwd"} | ({"sltrain_tpu_dvalues"} if grad else set())
  assert all(n in text for n in names)
  assert text.count("tpu_custom_call") == len(names)


def test_values_reach_the_kernel_in_float32():
  """libtpu refused the bfloat16 kernels ("cannot statically prove that
  index in dimension 0 is a multiple of 8": a chunk row read at a
  data-dependent index from a packed 16-bit array), so the values' padded
  layout is float32 whatever their dtype."""
  x, a, b, v, idx, _ = _inputs(128, 128, 128, 4, 0.1, jnp.bfloat16)
  ps = stk.padded_support(idx, 128, 128)
  laid = stk._layout_values(v, ps)   # pylint: disable=protected-access
  assert laid.dtype == jnp.float32 and laid.shape == ps.rows.shape
  np.testing.assert_array_equal(
      np.asarray(laid).reshape(-1)[np.asarray(ps.pos)],
      np.asarray(v.astype(jnp.float32))[np.asarray(ps.order)])


# Scoped VMEM (MiB) libtpu 0.0.42 allocated for a TPU v5e, the larger of
# the forward and dvalues kernels, operands left in HBM (tools/
# tpu_compile.py --kernels=sltrain_tpu, session 21; the benchmark's n x n,
# rank n/32, 3%, 256-token tiles): (n, itemsize) -> MiB.
LIBTPU_VMEM_MIB = {(1024, 2): 3.66, (1024, 4): 5.55, (4096, 2): 26.09,
                   (4096, 4): 30.52}


@pytest.mark.parametrize("key", sorted(LIBTPU_VMEM_MIB))
def test_vmem_estimate_bounds_what_libtpu_allocated(key):
  n, itemsize = key
  nnz = int(0.03 * n * n)
  d_in, d_out, tk, tn = stk.padded_dims(n, n)
  est = stk.vmem_estimate(d_in, d_out, n // 32, nnz, 256, itemsize,
                          (tk, tn)) / 2**20
  assert LIBTPU_VMEM_MIB[key] <= est <= LIBTPU_VMEM_MIB[key] + 5


def test_supported_names_the_constraint():
  assert "multiple of 128" in stk.supported(256, 128, 128, 4, 100, 64)
  assert "not a multiple" in stk.supported(200, 128, 128, 4, 100, 128)
  # Feature counts off whole lanes are padded, keeping the default tiles
  # where they divide the padded dims.
  assert stk.supported(256, 96, 128, 4, 100, 128) is None
  assert stk.padded_dims(1376, 5461) == (1408, 5504, 32, 64)
  assert stk.padded_dims(48, 128) == (128, 128, 64, 64)  # tile 48 cannot stay
  assert "VMEM" in stk.supported(4096, 8192, 8192, 512, 2_000_000, 512)
  assert stk.supported(256, 128, 256, 8, 100, 128) is None
  x, a, b, v, idx, _ = _inputs(100, 128, 128, 4, 0.1, jnp.float32)
  with pytest.raises(ValueError, match="TPU SLTrain kernel"):
    stk.sltrain_matmul_tpu(x, a, b, v, idx, 1.0, interpret=True)


def test_auto_takes_the_tpu_kernel_on_tpus(monkeypatch):
  from structmat.kernels import dispatch
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "tpu")

  def kernel_names(tokens, d_in, d_out):
    s = jax.ShapeDtypeStruct
    nnz = d_in * d_out // 32
    args = [s((tokens, d_in), jnp.bfloat16), s((d_in, 8), jnp.bfloat16),
            s((8, d_out), jnp.bfloat16), s((nnz,), jnp.bfloat16),
            s((nnz,), jnp.int32)]
    jaxpr = str(jax.make_jaxpr(lambda x, a, b, v, i: dispatch.sltrain(
        x, a, b, v, i, 2.0, "auto"))(*args))
    return {n for n in ("sltrain_tpu_fwd", "sltrain_fwd") if n in jaxpr}

  assert kernel_names(512, 128, 256) == {"sltrain_tpu_fwd"}
  assert kernel_names(512, 96, 256) == set()     # padded: never timed
  assert "pads to 128 -> 256" in stk.padding_problem(96, 256)
  assert stk.padding_problem(128, 256) is None
  assert kernel_names(100, 128, 256) == set()    # tokens not tiled


def test_tile_shrinks_to_fit_the_chip(monkeypatch):
  """Dispatch takes 256-token tiles where they fit the chip's VMEM budget,
  else 128: a TPU v4 core (12 MiB budget) runs a 2048-wide float32 layer
  at 128 (256 needs ~14 MiB), a v5e at 256."""
  from structmat.kernels import dispatch, target
  seen = []

  def fake(x, a, b, v, i, scale, *, block_tokens, orders=None):
    del a, v, i, scale, orders
    seen.append(block_tokens)
    return jnp.zeros((*x.shape[:-1], b.shape[1]), x.dtype)
  monkeypatch.setattr(stk, "sltrain_matmul_tpu", fake)
  s = jax.ShapeDtypeStruct
  n, nnz = 2048, 2048 * 2048 * 3 // 100
  args = [s((16384, n), jnp.float32), s((n, 64), jnp.float32),
          s((64, n), jnp.float32), s((nnz,), jnp.float32),
          s((nnz,), jnp.int32)]
  call = lambda *a: dispatch.sltrain(*a[:4], a[4], 1.0, "pallas")
  for kind in ("TPU v4", "TPU v5 lite"):
    with on_tpu(kind), target.targeting("tpu"):
      jax.make_jaxpr(call)(*args)
  assert seen == [128, 256]
