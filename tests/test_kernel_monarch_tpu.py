"""TPU Monarch kernel (tokens in lanes): interpret mode against the XLA
reference (forward and gradients), poisoned outputs, the TPU interpreter's
race detection, cross-lowering for a TPU v5e, dispatch."""
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

from structmat import ops
from structmat.kernels import monarch_tpu as mt
from structmat.kernels import mosaic_tpu
from structmat.kernels.lowering import cross_lower
from tests.helpers import (check_kernel, on_tpu, poison_pallas_outputs,
                           preset_step_kernels)

# (tokens, block_tokens, w1 (k, q, p), w2 (l, s, r))
SHAPES = [
    (256, 128, (4, 64, 32), (8, 16, 32)),      # k != l, two token tiles
    (512, 256, (2, 64, 64), (4, 64, 32)),      # 128 -> 256, two lane chunks
    (384, 128, (4, 128, 32), (8, 64, 64)),     # 128 -> 512, three tiles
    (256, 128, (2, 128, 128), (2, 128, 128)),  # 128-wide blocks
    (256, 128, (16, 16, 8), (2, 64, 128)),     # 8-wide input blocks
    # Feature counts off whole lanes, padded per block in VMEM
    # (padded_blocks): 128 -> 344 (s: 43 -> 48 rows, the pad never stored)
    # and 344 -> 128 (p: x's blocks read at unaligned offsets), as
    # LLaMA-60M's 512 <-> 1376 MLP.
    (256, 128, (8, 64, 16), (8, 43, 64)),
    (128, 128, (8, 64, 43), (8, 16, 64)),
]
CASES = ([(*c, jnp.float32, 1e-5) for c in SHAPES]
         + [(*c, jnp.bfloat16, 1e-2) for c in SHAPES[1:3]]   # g >= 16
         # s = 43 padded to 48 (16-row bfloat16 tiles)
         + [(256, 128, (8, 128, 16), (8, 43, 128), jnp.bfloat16, 1e-2)])


def _inputs(tokens, s1, s2, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed + tokens + sum(s1)), 4)
  x = jax.random.normal(keys[0], (tokens, s1[0] * s1[2])).astype(dtype)
  w1 = (jax.random.normal(keys[1], s1) / np.sqrt(s1[2])).astype(dtype)
  w2 = (jax.random.normal(keys[2], s2) / np.sqrt(s2[2])).astype(dtype)
  g = jax.random.normal(keys[3], (tokens, s2[0] * s2[1])).astype(dtype)
  return x, w1, w2, g


def _check(ker, x, w1, w2, g, tol):
  check_kernel(ker, ops.monarch_matmul, (x, w1, w2), g, tol,
               ("dx", "dw1", "dw2"))


@pytest.mark.parametrize("tokens,bt,s1,s2,dtype,tol", CASES)
def test_matches_reference(tokens, bt, s1, s2, dtype, tol, monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)  # unwritten outputs stay NaN
  x, w1, w2, g = _inputs(tokens, s1, s2, dtype)
  assert mt.supported(tokens, s1, s2, bt, x.dtype.itemsize) is None
  _check(lambda *a: mt.monarch_matmul_tpu(*a, block_tokens=bt, interpret=True),
         x, w1, w2, g, tol)
  assert set(poisoned) == {"monarch_tpu_fwd", "monarch_tpu_bwd"}


SPLIT = {"monarch_tpu_fwd", "monarch_tpu_dx", "monarch_tpu_dw1",
         "monarch_tpu_dw2"}


@pytest.mark.parametrize("tokens,bt,s1,s2,dtype,tol",
                         [(*c, jnp.float32, 1e-5) for c in SHAPES]
                         + [CASES[-1], CASES[-3],
                            # p = 120 padded to a whole 128 lanes: x's
                            # blocks are not lane-aligned, dw1 reads all x.
                            (256, 128, (1, 64, 120), (4, 16, 16),
                             jnp.float32, 1e-5)])
def test_split_backward_matches_reference(tokens, bt, s1, s2, dtype, tol,
                                          monkeypatch):
  """The three-kernel backward (for factors whose fused backward exceeds
  VMEM), forced at small shapes: dw1 reads its own block of x where blocks
  are whole lanes ((2, 128, 128)), every block otherwise."""
  poisoned = poison_pallas_outputs(monkeypatch)
  x, w1, w2, g = _inputs(tokens, s1, s2, dtype, seed=2)
  _check(lambda *a: mt.monarch_matmul_tpu(*a, block_tokens=bt,
                                          backward="split", interpret=True),
         x, w1, w2, g, tol)
  assert set(poisoned) == SPLIT


@pytest.mark.parametrize("backward", ["fused", "split"])
@pytest.mark.parametrize("tokens,s1,s2", [
    (512, (2, 64, 64), (4, 64, 32)),
    # p = 43 and s = 43 padded to 48 in VMEM: the pad rows of the scratch
    # must be zeroed (0 * NaN), the unaligned blocks read and written.
    (256, (8, 64, 43), (8, 43, 64))])
def test_tpu_interpreter_finds_no_races(tokens, s1, s2, backward):
  """The TPU interpreter on two cores, with NaN-filled uninitialized memory
  (scratch included) and race detection: the "parallel" forward, the
  "arbitrary" backward that accumulates the weight gradients, and the split
  backward's (block "parallel", token tile "arbitrary") weight gradients."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                 uninitialized_memory="nan")
  x, w1, w2, g = _inputs(tokens, s1, s2, jnp.float32, seed=1)
  _check(lambda *a: mt.monarch_matmul_tpu(*a, block_tokens=128,
                                          backward=backward,
                                          interpret=params),
         x, w1, w2, g, 1e-5)
  assert ipc.races is not None and not ipc.races.races_found


def test_permuted_rows_roundtrip():
  w1 = jax.random.normal(jax.random.key(0), (4, 32, 16))
  w1p = mt.permute_w1(w1, 4)
  # Row li*g + j of the permuted block is row j*l + li of the original.
  np.testing.assert_array_equal(w1p[2, 1 * 8 + 3], w1[2, 3 * 4 + 1])
  np.testing.assert_array_equal(mt.unpermute_w1(w1p, 4), w1)


def _lower(tokens, s1, s2, bt, grad, dtype=jnp.bfloat16):
  fwd = lambda *a: mt.monarch_matmul_tpu(*a, block_tokens=bt, interpret=False)
  args = [jax.ShapeDtypeStruct(s, dtype)
          for s in ((tokens, s1[0] * s1[2]), s1, s2)]
  return cross_lower(fwd, args, "tpu", (0, 1, 2) if grad else None)


@pytest.mark.parametrize("tokens,s1,s2,bt,dtype", [
    # The reference point: n=4096, 16 blocks of 256.
    (1024, (16, 256, 256), (16, 256, 256), 128, jnp.bfloat16),
    (1024, (8, 128, 128), (8, 128, 128), 512, jnp.bfloat16),
    (512, (2, 64, 64), (4, 64, 32), 256, jnp.float32),
    (512, (4, 128, 128), (4, 344, 128), 256, jnp.bfloat16),   # 60M MLP up
    (512, (4, 128, 344), (4, 128, 128), 256, jnp.bfloat16),   # and down
])
@pytest.mark.parametrize("grad", [False, True])
def test_cross_lowering_for_tpu(tokens, s1, s2, bt, dtype, grad):
  assert mt.supported(tokens, s1, s2, bt, jnp.dtype(dtype).itemsize) is None
  text = _lower(tokens, s1, s2, bt, grad, dtype)
  # The gradient of a sum needs only the backward kernel (XLA drops the
  # forward's unused output).
  assert text.count("tpu_custom_call") == 1
  assert ("monarch_tpu_bwd" if grad else "monarch_tpu_fwd") in text


# LLaMA-7B's Monarch factors (4 blocks of 1024; the MLP's 2752-row w2 and
# 2752-wide w1 blocks): the fused backward needs 71-142 MiB of VMEM.
SEVEN_B = [((4, 1024, 1024), (4, 1024, 1024)),
           ((4, 1024, 1024), (4, 2752, 1024)),
           ((4, 1024, 2752), (4, 1024, 1024))]


@pytest.mark.parametrize("s1,s2", SEVEN_B)
def test_cross_lowering_the_split_backward_for_tpu(s1, s2):
  bt = mt.fit_block_tokens(16384, s1, s2, 2)
  assert mt.backward_form(bt, s1, s2, 2) == "split"
  text = _lower(2 * bt, s1, s2, bt, True)
  assert text.count("tpu_custom_call") == 3
  assert all(n in text for n in SPLIT - {"monarch_tpu_fwd"})


def test_backward_form():
  """Factors take the fused backward wherever some tile fits it, the split
  one only where none does (7B), and then still bound every kernel."""
  for s1, s2 in SEVEN_B:
    bt = mt.fit_block_tokens(16384, s1, s2, 2)
    assert mt.supported(16384, s1, s2, bt, 2) is None
    assert mt.backward_form(bt, s1, s2, 2) == "split"
    assert mt.vmem_estimate(bt, s1, s2, 2, True) > mosaic_tpu.vmem_budget()
    assert max(mt.split_vmem_estimates(bt, s1, s2, 2).values()) <= (
        mosaic_tpu.vmem_budget())
  # The 16 blocks of 256: the fused backward fits at 256 tokens in
  # bfloat16 (128 in float32), and the tile stays there, though the split
  # one would take 512 (256).
  sixteen = ((16, 256, 256), (16, 256, 256))
  for itemsize, bt in ((2, 256), (4, 128)):
    assert mt.fit_block_tokens(16384, *sixteen, itemsize) == bt
    assert mt.backward_form(bt, *sixteen, itemsize) == "fused"
    assert mt.backward_form(2 * bt, *sixteen, itemsize) == "split"
  # n = 8192 in 16 blocks of 512 runs only split (refused before).
  assert mt.backward_form(128, (16, 512, 512), (16, 512, 512), 2) == "split"
  with pytest.raises(ValueError, match="backward='both'"):
    mt.monarch_matmul_tpu(jnp.ones((128, 128)), jnp.ones((4, 32, 32)),
                          jnp.ones((4, 32, 32)), block_tokens=128,
                          backward="both", interpret=True)


def test_vmem_budget_follows_the_chip():
  """A TPU v4 core has 16 MiB of VMEM (libtpu's v4 compile of the
  reference shape failed: "Used 20.00M of 16.00M vmem"), a v5p's 64, a
  v5e's and v6e's 128: the limit is min(64 MiB, VMEM) and the budget an
  eighth (at least 4 MiB) under it, so on v4 the tile shrinks or the
  kernel is refused, naming the budget."""
  expect = {"TPU v4": (16, 12), "TPU v5": (64, 56), "TPU v5 lite": (64, 56),
            "TPU v6 lite": (64, 56)}
  for kind, (limit, budget) in expect.items():
    with on_tpu(kind):
      assert mosaic_tpu.vmem_capacity() >= limit << 20
      assert (mosaic_tpu.vmem_limit(), mosaic_tpu.vmem_budget()) == (
          limit << 20, budget << 20), kind
  # Off TPUs (interpret mode) the kernels plan as for a v5e.
  assert mosaic_tpu.vmem_budget() == 56 << 20
  sixteen = ((16, 256, 256), (16, 256, 256))
  assert mt.fit_block_tokens(16384, *sixteen, 2) == 256
  with on_tpu("TPU v4"):
    assert "budget 12 MiB" in mt.supported(16384, *sixteen, 128, 2)
    # n = 1024 in 4 blocks: 512-token tiles on a v5e, 256 on a v4; 2048 in
    # 4 blocks: 512 and the fused backward, 128 and the split one.
    four = ((4, 256, 256), (4, 256, 256))
    assert mt.fit_block_tokens(16384, *four, 2) == 256
    assert mt.backward_form(256, *four, 2) == "fused"
    wide = ((4, 512, 512), (4, 512, 512))
    assert mt.fit_block_tokens(16384, *wide, 2) == 128
    assert mt.backward_form(128, *wide, 2) == "split"
  assert mt.fit_block_tokens(16384, *four, 2) == 512
  assert mt.fit_block_tokens(16384, *wide, 2) == 512
  assert mt.backward_form(512, *wide, 2) == "fused"


def test_supported_names_the_constraint():
  assert "multiples of 128" in mt.supported(256, (4, 64, 32), (8, 16, 32), 64)
  # Feature counts off whole lanes are padded per block, q/l is not.
  assert mt.supported(256, (2, 32, 32), (2, 32, 32), 128) is None
  assert mt.padded_blocks((2, 32, 32), (2, 32, 32), 2) == (64, 64)
  assert mt.padded_blocks((4, 128, 344), (4, 344, 128), 2) == (352, 352)
  assert mt.padded_blocks((4, 192, 192), (4, 192, 192), 2) == (192, 192)
  assert "pad to (64, 64)" in mt.padding_problem((2, 32, 32), (2, 32, 32), 2)
  assert mt.padding_problem((4, 192, 192), (4, 192, 192), 2) is None
  assert "not divisible" in mt.supported(256, (4, 48, 32), (64, 16, 3), 128)
  # g = q/l = 8 rows: a whole VMEM tile in float32, half of one in bfloat16.
  assert mt.supported(256, (4, 64, 32), (8, 16, 32), 128, 4) is None
  assert "multiples of 16" in mt.supported(256, (4, 64, 32), (8, 16, 32), 128, 2)
  # Over VMEM: a smaller tile is the fix while there is one, else 16 bits.
  assert "fewer tokens" in mt.supported(16384, (16, 512, 512), (16, 512, 512),
                                        256)
  assert "16-bit" in mt.supported(16384, (16, 512, 512), (16, 512, 512), 128,
                                  4)
  assert "use smaller blocks" in mt.supported(16384, (4, 2048, 2048),
                                              (4, 2048, 2048), 128, 2)
  with pytest.raises(ValueError, match="cannot run"):
    mt.monarch_matmul_tpu(jnp.ones((100, 128)), jnp.ones((4, 64, 32)),
                          jnp.ones((8, 16, 32)), interpret=True)


def test_fit_block_tokens():
  sixteen = ((16, 256, 256), (16, 256, 256))
  assert mt.fit_block_tokens(16384, *sixteen, 2) == 256   # VMEM-bound
  assert mt.fit_block_tokens(16384, *sixteen, 4) == 128
  assert mt.supported(16384, *sixteen, 128, 4) is None
  assert mt.fit_block_tokens(16384, (4, 128, 128), (4, 128, 128), 2) == 512
  assert mt.fit_block_tokens(384, (4, 128, 128), (4, 128, 128), 2) == 128


# Scoped VMEM (MiB) libtpu 0.0.42 allocated compiling each kernel for a TPU
# v5e with every operand left in HBM, its worst case (tools/tpu_compile.py
# --kernels=monarch_tpu --sizes=2048,4096 --nblocks=4,16 --tokens=16384
# --block_tokens=BT --monarch_backward=fused; forward: session 21, backward:
# session 26, after it stopped copying in w2, which it never read: one w2
# less than session 21's): (n, nblocks, block_tokens, itemsize) ->
# (forward, backward).
LIBTPU_VMEM_MIB = {
    (2048, 4, 128, 2): (8.00, 20.50), (2048, 4, 128, 4): (15.00, 31.00),
    (2048, 4, 256, 2): (12.49, 27.49), (2048, 4, 256, 4): (22.00, 42.00),
    (2048, 4, 512, 2): (20.58, 40.58), (2048, 4, 512, 4): (36.00, 64.00),
    (4096, 4, 128, 2): (24.34, 69.34), (4096, 4, 128, 4): (46.31, 102.32),
    (4096, 4, 256, 2): (34.41, 84.41), (4096, 4, 512, 2): (50.85, 110.85),
    (4096, 16, 128, 2): (12.00, 27.00), (4096, 16, 128, 4): (22.00, 42.00),
    (4096, 16, 256, 2): (20.00, 40.00), (4096, 16, 256, 4): (36.00, 64.00),
    (4096, 16, 512, 2): (36.00, 66.07),
}


@pytest.mark.parametrize("key", sorted(LIBTPU_VMEM_MIB))
def test_vmem_estimate_bounds_what_libtpu_allocated(key):
  """The estimate the tiles are planned with bounds the TPU compiler's
  allocation (a tile it accepts compiles) and stays within 3 MiB of it (it
  does not refuse tiles that fit: before session 21 it was up to 8 MiB over,
  which kept n=4096 in 16 blocks at 128-token tiles and refused float32)."""
  n, nb, bt, itemsize = key
  w1, w2, _, _ = ops.monarch_shapes(n, n, nb)
  for backward, allocated in zip((False, True), LIBTPU_VMEM_MIB[key]):
    est = mt.vmem_estimate(bt, w1, w2, itemsize, backward) / 2**20
    assert allocated <= est <= allocated + 3, (backward, est, allocated)


# The split backward's kernels as libtpu 0.0.42 compiled them (session 26,
# as above with --monarch_backward=split, and LLaMA-7B's layers at the
# tiles the kernel picks: --sizes=4096,4096x11008,11008x4096 --nblocks=4
# --dtypes=bfloat16): (in, out, nblocks, block_tokens, itemsize) ->
# {kernel: (MiB at the kernels' own limit, worst case)}. At its own limit
# libtpu gave the float32 2048 / 4 dw kernels up to 4 MiB more than in the
# worst case; the 8 MiB between the budget and the limit covers that.
LIBTPU_SPLIT_VMEM_MIB = {
    (4096, 4096, 4, 512, 2): {"dx": (46.36, 54.36), "dw1": (32.84, 32.84),
                              "dw2": (41.67, 41.67)},
    (4096, 11008, 4, 128, 2): {"dx": (24.11, 46.11), "dw1": (30.75, 30.75),
                               "dw2": (26.49, 39.99)},
    (11008, 4096, 4, 128, 2): {"dx": (16.92, 46.42), "dw1": (16.31, 38.31),
                               "dw2": (23.38, 31.38)},
    (2048, 2048, 4, 128, 4): {"dx": (11.00, 15.00), "dw1": (10.00, 8.00),
                              "dw2": (14.25, 10.25)},
    (2048, 2048, 4, 512, 4): {"dx": (32.00, 36.00), "dw1": (22.05, 20.05),
                              "dw2": (33.05, 29.05)},
    (4096, 4096, 4, 128, 4): {"dx": (14.31, 46.31), "dw1": (16.00, 24.00),
                              "dw2": (28.50, 28.50)},
    (4096, 4096, 16, 256, 2): {"dx": (20.00, 22.00), "dw1": (10.75, 9.25),
                               "dw2": (16.38, 14.88)},
    (4096, 4096, 16, 512, 4): {"dx": (56.04, 64.04), "dw1": (26.50, 27.00),
                               "dw2": (49.50, 49.50)},
}


@pytest.mark.parametrize("key", sorted(LIBTPU_SPLIT_VMEM_MIB))
def test_split_vmem_estimates_bound_what_libtpu_allocated(key):
  """Each split kernel's estimate bounds its worst case (within 7 MiB: the
  7B MLP's 2752-wide blocks are 5.5-6.5 MiB over) and its allocation at its
  own limit within the budget's 8 MiB headroom."""
  n_in, n_out, nb, bt, itemsize = key
  w1, w2, _, _ = ops.monarch_shapes(n_in, n_out, nb)
  est = mt.split_vmem_estimates(bt, w1, w2, itemsize)
  for kernel, (own, worst) in LIBTPU_SPLIT_VMEM_MIB[key].items():
    e = est["monarch_tpu_" + kernel] / 2**20
    assert worst <= e <= worst + 7 and own <= e + 4, (kernel, e, own, worst)


def test_auto_takes_the_tpu_kernel_on_tpus(monkeypatch):
  from structmat.kernels import dispatch
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "tpu")

  def kernel_names(tokens, w1_shape, w2_shape):
    x = jax.ShapeDtypeStruct((tokens, w1_shape[0] * w1_shape[2]), jnp.bfloat16)
    w1 = jax.ShapeDtypeStruct(w1_shape, jnp.bfloat16)
    w2 = jax.ShapeDtypeStruct(w2_shape, jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(
        lambda x, a, b: dispatch.monarch(x, a, b, None, "auto"))(x, w1, w2))
    return {n for n in ("monarch_tpu_fwd", "monarch_fwd") if n in jaxpr}

  sixteen = ((16, 256, 256), (16, 256, 256))
  assert kernel_names(16384, *sixteen) == {"monarch_tpu_fwd"}
  assert kernel_names(16384, (64, 64, 64), (64, 64, 64)) == set()  # q/l = 1
  assert kernel_names(100, *sixteen) == set()        # tokens not tiled
  # LLaMA-60M's MLP (344-wide blocks): padded, unmeasured, so XLA.
  assert kernel_names(16384, (4, 128, 128), (4, 344, 128)) == set()
  # LLaMA-7B's 1024-wide blocks: the split backward (XLA before session 26).
  assert kernel_names(16384, *SEVEN_B[1]) == {"monarch_tpu_fwd"}


def test_pallas_train_step_lowers_each_kernel_once_for_tpus():
  """The impl="pallas" train step of LLaMA-60M's Monarch model, lowered for a
  TPU v5e, holds the same Mosaic TPU kernels at one block as at three: each
  kernel product is lowered once per shape (``kernels.shared_trace``), not
  once per call site (before: 14 calls per block, 10 distinct modules at
  two blocks)."""
  kernels = lambda n: preset_step_kernels("llama_60m", "tpu", n_layers=n)
  one = kernels(1)
  assert one == kernels(3)
  # Forward and backward of the attention (512 = 4 x 128) and of the MLP's
  # two shapes (padded 344-wide blocks under impl="pallas"), one each.
  assert one == {"calls": {"mosaic_tpu": 6}, "distinct": {"mosaic_tpu": 6}}
