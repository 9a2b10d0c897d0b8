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
from structmat.kernels.lowering import cross_lower
from tests.helpers import (check_kernel, poison_pallas_outputs,
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


@pytest.mark.parametrize("tokens,s1,s2", [
    (512, (2, 64, 64), (4, 64, 32)),
    # p = 43 and s = 43 padded to 48 in VMEM: the pad rows of the scratch
    # must be zeroed (0 * NaN), the unaligned blocks read and written.
    (256, (8, 64, 43), (8, 43, 64))])
def test_tpu_interpreter_finds_no_races(tokens, s1, s2):
  """The TPU interpreter on two cores, with NaN-filled uninitialized memory
  (scratch included) and race detection: the "parallel" forward and the
  "arbitrary" backward that accumulates the weight gradients."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                 uninitialized_memory="nan")
  x, w1, w2, g = _inputs(tokens, s1, s2, jnp.float32, seed=1)
  _check(lambda *a: mt.monarch_matmul_tpu(*a, block_tokens=128,
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
  assert "use smaller blocks" in mt.supported(16384, (16, 512, 512),
                                              (16, 512, 512), 128, 2)
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
# --block_tokens=BT, session 21): (n, nblocks, block_tokens, itemsize) ->
# (forward, backward).
LIBTPU_VMEM_MIB = {
    (2048, 4, 128, 2): (8.00, 22.50), (2048, 4, 128, 4): (15.00, 35.00),
    (2048, 4, 256, 2): (12.49, 29.49), (2048, 4, 256, 4): (22.00, 46.00),
    (2048, 4, 512, 2): (20.58, 42.58), (2048, 4, 512, 4): (36.00, 68.00),
    (4096, 4, 128, 2): (24.34, 77.34), (4096, 4, 128, 4): (46.31, 118.32),
    (4096, 4, 256, 2): (34.41, 92.41), (4096, 4, 512, 2): (50.85, 118.85),
    (4096, 16, 128, 2): (12.00, 29.00), (4096, 16, 128, 4): (22.00, 46.00),
    (4096, 16, 256, 2): (20.00, 42.00), (4096, 16, 256, 4): (36.00, 68.00),
    (4096, 16, 512, 2): (36.00, 68.07),
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
