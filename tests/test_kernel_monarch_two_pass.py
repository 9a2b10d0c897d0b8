"""Two-pass Monarch (XLA stage 1, Pallas stage 2): interpret mode against the
XLA reference, its layout, tiles and shared-memory model, cross-lowering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.ops.monarch import gather_weights
from structmat.kernels import monarch_two_pass as m2
from structmat.kernels.lowering import cross_lower
from tests.helpers import check_kernel, poison_pallas_outputs
from tests.test_kernels import (MONARCH_SHAPES, _activation_transposes, _eqns,
                                _kernel_name, _monarch_inputs)

# The fused kernel's shapes (square, k != l, padded q/l, chunked p and s),
# plus q/l above K_STEP (dot steps of 64: 4096 in 4 blocks' q/l = 256) and
# q/l = 1 (4096 in 64 blocks' shape, scaled down).
SHAPES = MONARCH_SHAPES + [
    (32, 16, (2, 256, 64), (2, 64, 256)),     # q/l = 128: two steps a block
    (32, 16, (2, 512, 128), (4, 96, 256)),    # q/l = 128, s = 96 padded
    (32, 16, (16, 16, 16), (16, 16, 16)),     # q/l = 1, padded to 16
]
CASES = ([(*c, jnp.float32, 1e-5) for c in SHAPES]
         + [(*c, jnp.bfloat16, 1e-2) for c in SHAPES[:2] + SHAPES[-3:-1]])


@pytest.mark.parametrize("tokens,bt,s1,s2,dtype,tol", CASES)
def test_two_pass_matches_reference(tokens, bt, s1, s2, dtype, tol,
                                    monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)  # unwritten outputs stay NaN
  x, w1, w2, g = _monarch_inputs(tokens + sum(s1) + 1, tokens, s1, s2, dtype)
  ker = lambda x, w1, w2: m2.monarch_matmul_two_pass(
      x, w1, w2, block_tokens=bt, interpret=True)
  check_kernel(ker, ops.monarch_matmul, (x, w1, w2), g, tol,
               ("dx", "dw1", "dw2"))
  assert set(poisoned) == {"monarch2_fwd", "monarch2_dx"}


def test_stage1_weights_lay_out_what_stage2_reads():
  """Block k of x @ w1' is (l, q/l): its [l] is x_k @ A[l, k]^T, the
  gathered factor the fused kernels multiply."""
  x, w1, w2, _ = _monarch_inputs(1, 8, (3, 8, 5), (4, 12, 6))   # q/l = 2
  h = ops.blockdiag_matmul(x, m2.stage1_weights(w1, 4)).reshape(8, 3, 4, 2)
  a, _ = gather_weights(w1, w2)
  np.testing.assert_allclose(
      h, jnp.einsum("tkp,lkgp->tklg", x.reshape(8, 3, 5), a), rtol=1e-5,
      atol=1e-5)


def test_two_pass_moves_activations_only_through_its_two_passes():
  """The forward is XLA's block-diagonal product and one kernel: no
  transpose but the block-diagonal product's own (which XLA on a GPU folds
  into its batched matmul: 2 passes at the copy rate), P1 in the kernel's
  loads and P2 in its stores; ``strided_p2=False`` adds one (XLA's P2), with
  the same values. The backward's kernel is dx."""
  tokens, s1, s2 = 96, (4, 16, 24), (2, 36, 32)   # padded blocks, k != l
  x, w1, w2, g = _monarch_inputs(3, tokens, s1, s2)
  run = lambda **kw: lambda x, w1, w2: m2.monarch_matmul_two_pass(
      x, w1, w2, block_tokens=32, interpret=True, **kw)
  stage1 = lambda x, w1, w2: ops.blockdiag_matmul(x, w1)
  own = _activation_transposes(stage1, tokens, x, w1, w2)
  assert own and _activation_transposes(run(), tokens, x, w1, w2) == own
  unstrided = _activation_transposes(run(strided_p2=False), tokens, x, w1, w2)
  assert unstrided == own + [(tokens, 2, 36)]
  ref = ops.monarch_matmul(x, w1, w2)
  for f in (run(), run(strided_p2=False)):
    np.testing.assert_allclose(f(x, w1, w2), ref, rtol=1e-5, atol=1e-5)
  kernels = lambda fn: [_kernel_name(e) for e in _eqns(fn, x, w1, w2)
                        if e.primitive.name == "pallas_call"]
  assert kernels(run()) == ["monarch2_fwd"]
  grad = lambda x, w1, w2: jax.vjp(run(), x, w1, w2)[1](g)
  assert sorted(kernels(grad)) == ["monarch2_dx", "monarch2_fwd"]


def test_tiles_fit_registers_and_shared_memory():
  """128-token tiles where a (bt, <= 256) float32 accumulator stays within
  64 KB, 64 at 256-wide outputs (128 spilled, offline), fewer where the
  loop's buffers would not fit; ``supported`` names what fails."""
  fit = lambda n, nb, dt=2, tokens=16384: m2.fit_block_tokens(
      tokens, *ops.monarch_shapes(n, n, nb)[:2], dt, "cuda")
  assert fit(4096, 16) == 64                  # s = 256
  assert fit(1024, 16) == 128                 # s = 64
  assert fit(4096, 4) == 64 and fit(4096, 4, 4) == 32   # f32: 240 KiB at 64
  assert fit(4096, 16, tokens=48) == 48       # no power of two divides
  shapes = ops.monarch_shapes(4096, 4096, 4)[:2]
  assert "shared memory" in m2.supported(16384, *shapes, 128, "cuda", 4)
  assert "Triton-only" in m2.supported(16384, *shapes, 64, "tpu")
  assert "power of two" in m2.supported(96, *shapes, 48, "cuda")
  assert "not a multiple" in m2.supported(100, *shapes, 64, "cuda")
  assert "multiple of 64" in m2.supported(64, (2, 192, 64), (2, 64, 192), 64,
                                          "cuda")          # q/l = 96
  assert "divisible" in m2.supported(64, (4, 6, 16), (4, 16, 6), 16, "cuda")
  x, w1, w2, _ = _monarch_inputs(0, 64, (2, 192, 64), (2, 64, 192))
  with pytest.raises(ValueError, match="two-pass Monarch kernel cannot"):
    m2.monarch_matmul_two_pass(x, w1, w2, block_tokens=64, platform="cuda",
                               interpret=False)


# What Triton 3.6 asked compiling the kernels for sm_90 offline (KiB;
# ``tools/triton_smem.py --kernel=monarch2``, 16384 tokens, default tiles):
# (n_in, n_out, nblocks, itemsize) -> (block_tokens, forward, dx).
TRITON_ASKED = {
    (4096, 4096, 16, 2): (64, 30, 30), (4096, 4096, 16, 4): (64, 60, 64),
    (4096, 4096, 4, 2): (64, 120, 120), (4096, 4096, 4, 4): (32, 144, 144),
    (8192, 8192, 16, 4): (64, 120, 120), (512, 1376, 4, 2): (64, 60, 36),
    (1376, 512, 4, 4): (64, 72, 120), (768, 768, 4, 2): (64, 120, 120),
    (2736, 1024, 4, 4): (32, 144, 144),
}


@pytest.mark.parametrize("shape,asked", TRITON_ASKED.items())
def test_smem_estimate_bounds_what_triton_asked(shape, asked):
  n_in, n_out, nb, itemsize = shape
  w1, w2, _, _ = ops.monarch_shapes(n_in, n_out, nb)
  bt = m2.fit_block_tokens(16384, w1, w2, itemsize, "cuda")
  p, g, s = w1[2], w1[1] // w2[0], w2[1]
  assert bt == asked[0]
  assert m2.smem_estimate(bt, g, s, itemsize) >= asked[1] * 1024
  assert m2.smem_estimate(bt, g, p, itemsize) >= asked[2] * 1024


@pytest.mark.parametrize("tokens,s1,s2", [
    (256, (16, 256, 256), (16, 256, 256)),   # 4096 in 16 blocks
    (256, (4, 1024, 1024), (4, 1024, 1024)),  # 4096 in 4: q/l = 256 in steps
    (256, (4, 128, 128), (4, 344, 128)),      # LLaMA-60M gate: s chunked
    (256, (4, 128, 344), (4, 128, 128)),      # down: p chunked (dx)
    (256, (4, 192, 192), (4, 192, 192)),      # 130M attention: q/l 48 -> 64
])
@pytest.mark.parametrize("grad", [False, True])
def test_two_pass_cross_lowers_for_hopper(tokens, s1, s2, grad):
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
          for s in ((tokens, s1[0] * s1[2]), s1, s2)]
  bt = m2.fit_block_tokens(tokens, s1, s2, 2, "cuda")
  fn = lambda *a: m2.monarch_matmul_two_pass(*a, block_tokens=bt,
                                             interpret=False, platform="cuda")
  text = cross_lower(fn, args, "cuda", (0, 1, 2) if grad else None)
  # The gradient of a sum needs no y: jax 0.12 drops the forward kernel
  # there, 0.10 and 0.11 keep it.
  assert "monarch2_dx" in text if grad else "monarch2_fwd" in text
  assert 1 <= text.count("__gpu$xla.gpu.triton") <= (2 if grad else 1)


def test_impl_names_a_monarch_kernel():
  """impl="pallas:two_pass" runs this kernel through the ops and layers
  (a config selects it by name); names an op lacks, or on a TPU, raise
  with the choices."""
  from structmat.kernels import dispatch
  x, w1, w2, _ = _monarch_inputs(2, 32, (4, 16, 16), (4, 16, 16))
  ref = ops.monarch_matmul(x, w1, w2)
  for impl, kernel in (("pallas:two_pass", "monarch2_fwd"),
                       ("pallas:fused", "monarch_fwd"), ("pallas", "monarch_fwd")):
    fn = lambda x, w1, w2, impl=impl: ops.monarch_matmul(x, w1, w2, impl=impl)
    names = [_kernel_name(e) for e in _eqns(fn, x, w1, w2)
             if e.primitive.name == "pallas_call"]
    assert names == [kernel], (impl, names)
    np.testing.assert_allclose(fn(x, w1, w2), ref, rtol=1e-5, atol=1e-5)
  bias = jnp.arange(64, dtype=jnp.float32)
  np.testing.assert_allclose(
      ops.monarch_matmul(x, w1, w2, bias, impl="pallas:two_pass"), ref + bias,
      rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no kernel 'nope'.*two_pass"):
    ops.monarch_matmul(x, w1, w2, impl="pallas:nope")
  with pytest.raises(ValueError, match="one kernel: use impl='pallas'"):
    ops.blockdiag_matmul(x, w1, impl="pallas:two_pass")
  with pytest.raises(ValueError, match="pallas:<kernel>"):
    ops.monarch_matmul(x, w1, w2, impl="auto:two_pass")
  from structmat.kernels import target
  with target.targeting("tpu"), pytest.raises(ValueError, match="Mosaic TPU"):
    dispatch.monarch(x, w1, w2, None, "pallas:two_pass")


def test_monarch_layer_takes_the_two_pass_kernel():
  """A MonarchLinear with impl="pallas:two_pass" (interpret mode) matches
  impl="xla" in value and gradients."""
  from structmat import layers
  from tests.helpers import assert_close, randomize
  x = jax.random.normal(jax.random.key(3), (2, 16, 64))
  outs = {}
  for impl in ("xla", "pallas:two_pass"):
    layer = layers.Monarch(features=48, nblocks=4, impl=impl)
    params = randomize(layer.init(jax.random.key(0), x), seed=1)
    loss = lambda p, x: jnp.sum(layer.apply(p, x) ** 2)
    outs[impl] = (layer.apply(params, x), jax.grad(loss, (0, 1))(params, x))
  assert_close(outs["pallas:two_pass"][0], outs["xla"][0], 1e-5, 1e-5)
  for a, b in zip(jax.tree.leaves(outs["pallas:two_pass"][1]),
                  jax.tree.leaves(outs["xla"][1])):
    assert_close(a, b, 1e-4, 1e-5)


@pytest.mark.parametrize("preset,distinct", [("llama_60m", 6),
                                             ("llama_130m", 4)])
def test_two_pass_train_step_cross_lowers_for_hopper(preset, distinct):
  """A preset's whole train step (two layers) with impl="pallas:two_pass"
  lowers for an abstract H100: a forward and a dx Triton kernel per
  Monarch shape (attention, MLP in, MLP out), nothing else; at 130M the
  square attention's dx is its forward and the MLP's dx one direction is the
  other's forward, so XLA compiles 4 modules."""
  from tests.helpers import preset_step_kernels
  found = preset_step_kernels(preset, "cuda", n_layers=2,
                              impl="pallas:two_pass")
  assert found == {"calls": {"triton": 6}, "distinct": {"triton": distinct}}
