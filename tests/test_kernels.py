"""Pallas kernels: interpret mode against the XLA reference, and cross-lowering."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from structmat import ops
from structmat.kernels import blockdiag as bd
from structmat.kernels import monarch as mk
from structmat.kernels import portable
from structmat.kernels import roofline
from structmat.kernels import blockdiag_matmul_pallas, supported
from structmat.kernels.lowering import cross_lower
from tests.helpers import check_kernel, poison_pallas_outputs

SHAPES = [  # (tokens, block_tokens, (k, q, p))
    (64, 16, (4, 32, 32)),
    (32, 32, (2, 8, 16)),      # rectangular blocks
    (128, 64, (2, 128, 64)),
    (48, 16, (3, 16, 8)),      # awkward: 3 blocks, 48 tokens
    (32, 16, (2, 256, 256)),   # 256-wide: two output tiles, input in chunks
]


# Every shape in float32, the first two in bfloat16 too (interpret mode is slow).
CASES = ([(*c, jnp.float32, 1e-5) for c in SHAPES]
         + [(*c, jnp.bfloat16, 1e-2) for c in SHAPES[:2]])


@pytest.mark.parametrize("tokens,bt,wshape,dtype,tol", CASES)
def test_blockdiag_kernel_matches_reference(tokens, bt, wshape, dtype, tol,
                                            monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)  # unwritten outputs stay NaN
  k1, k2, k3 = jax.random.split(jax.random.key(sum(wshape) + tokens), 3)
  k, q, p = wshape
  x = jax.random.normal(k1, (tokens, k * p)).astype(dtype)
  w = (jax.random.normal(k2, wshape) / np.sqrt(p)).astype(dtype)
  g = jax.random.normal(k3, (tokens, k * q)).astype(dtype)
  ker = lambda x, w: blockdiag_matmul_pallas(x, w, block_tokens=bt,
                                             interpret=True)
  check_kernel(ker, ops.blockdiag_matmul, (x, w), g, tol, ("dx", "dw"),
               fwd_atol=tol * 4)
  assert set(poisoned) == {"blockdiag_fwd", "blockdiag_dw"}


def test_blockdiag_kernel_in_small_chunks(monkeypatch):
  """A tiny shared-memory budget forces 16-wide input chunks and 16-token
  weight-gradient steps: many loop iterations, still the reference."""
  poison_pallas_outputs(monkeypatch)
  monkeypatch.setattr(bd, "SMEM_BUDGET", 12 * 1024)
  assert bd.tiling(32, 64, 64, 4, "gpu") == (64, 16)
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(k1, (64, 2 * 64))
  w = jax.random.normal(k2, (2, 64, 64)) / 8
  g = jax.random.normal(k3, (64, 2 * 64))
  ker = lambda x, w: blockdiag_matmul_pallas(x, w, block_tokens=32,
                                             interpret=True)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)
  np.testing.assert_allclose(ker(x, w), ops.blockdiag_matmul(x, w),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(loss(ker), argnums=(0, 1))(x, w),
                  jax.grad(loss(ops.blockdiag_matmul), argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_shared_memory_model():
  kib = 1024
  # The H200's verdicts on whole blocks, 128-token tiles, bfloat16: 256-wide
  # blocks overflowed 227 KiB, 64-wide ones compiled (forward and dw).
  assert bd.smem_estimate(128, 256, 256, 2, looped=False) > 227 * kib
  assert bd.smem_estimate(128, 64, 64, 2, looped=False) <= bd.SMEM_BUDGET
  assert bd.smem_estimate(64, 64, 128, 2, looped=True) <= bd.SMEM_BUDGET
  # Tiling keeps every block size within budget, whole blocks on TPU.
  for inner in (64, 256, 1024, 4096):
    for itemsize in (2, 4):
      tile, chunk = bd.tiling(128, inner, inner, itemsize, "gpu")
      assert tile == min(inner, 128) and 16 <= chunk <= 128
      assert bd.smem_estimate(128, tile, chunk, itemsize,
                              chunk < inner) <= bd.SMEM_BUDGET
  # On TPUs whole inputs, output tiles of at most 512 (n=8192 in 4 blocks of
  # 2048 did not compile whole: tools/tpu_compile.py).
  assert bd.tiling(128, 1024, 512, 2, "tpu") == (512, 512)
  assert bd.tiling(128, 384, 2048, 2, "tpu") == (384, 2048)
  assert bd.tiling(128, 640, 640, 4, "tpu") == (128, 640)   # 128 divides
  # The fused Monarch: the same H200 runs (n=4096, 16 blocks) compiled with
  # 64-token tiles and overflowed with 128; the 60M preset's shapes compiled.
  assert "shared memory" in mk.supported(16384, (16, 256, 256), (16, 256, 256),
                                         128, "gpu", 2)
  assert mk.fit_block_tokens(16384, (16, 256, 256), (16, 256, 256), 2,
                             "gpu") == 64
  assert mk.fit_block_tokens(65536, (4, 128, 128), (4, 128, 128), 2,
                             "gpu") == 128
  assert mk.fit_block_tokens(100, (4, 16, 16), (4, 16, 16), 4, "cpu") == 100


@pytest.mark.parametrize("tokens,bt,wshape,dtype,tol", [
    (96, 32, (2, 256, 384), jnp.float32, 1e-5),   # 2 x 3 tiles, 3 steps
    (64, 32, (1, 256, 128), jnp.bfloat16, 1e-2),
])
def test_blockdiag_tpu_tiles_in_the_tpu_interpreter(tokens, bt, wshape, dtype,
                                                    tol, monkeypatch):
  """The TPU forms (``platform="tpu"``) in the TPU interpreter: forward in
  output tiles, the weight gradient accumulated over a sequential token
  axis, in 128-wide tiles here (TPU_TILE shrunk) so that every block has
  several."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  poisoned = poison_pallas_outputs(monkeypatch)
  monkeypatch.setattr(bd, "TPU_TILE", 128)
  k1, k2, k3 = jax.random.split(jax.random.key(sum(wshape)), 3)
  k, q, p = wshape
  x = jax.random.normal(k1, (tokens, k * p)).astype(dtype)
  w = (jax.random.normal(k2, wshape) / np.sqrt(p)).astype(dtype)
  g = jax.random.normal(k3, (tokens, k * q)).astype(dtype)
  ker = lambda x, w: blockdiag_matmul_pallas(
      x, w, block_tokens=bt, interpret=pltpu.InterpretParams(),
      platform="tpu")
  check_kernel(ker, ops.blockdiag_matmul, (x, w), g, tol, ("dx", "dw"),
               fwd_atol=tol * 4)
  assert set(poisoned) == {"blockdiag_fwd", "blockdiag_dw"}


# Scoped VMEM (MiB) libtpu 0.0.42 allocated for the TPU block-diagonal
# kernels, every operand left in HBM (tools/tpu_compile.py --kernels=
# blockdiag, session 21; 128-token tiles): (n, nblocks, itemsize) ->
# (forward, weight gradient).
BLOCKDIAG_LIBTPU_MIB = {
    (4096, 4, 2): (2.95, 2.50), (4096, 4, 4): (5.50, 3.00),
    (4096, 16, 4): (1.00, 1.00), (8192, 4, 2): (5.70, 2.50),
    (8192, 4, 4): (10.50, 3.00), (8192, 16, 2): (1.50, 2.50),
    (8192, 16, 4): (3.05, 3.00),
}


@pytest.mark.parametrize("key", sorted(BLOCKDIAG_LIBTPU_MIB))
def test_blockdiag_vmem_estimates_bound_what_libtpu_allocated(key):
  n, nb, itemsize = key
  q = p = n // nb
  assert supported(16384, (nb, q, p), 128, "tpu", itemsize) is None
  tile = bd.tiling(128, q, p, itemsize, "tpu")[0]
  tq, tp = bd.dw_tiles_tpu(q, p, 128, itemsize)
  est = (bd.vmem_estimate(128, tile, p, itemsize) / 2**20,
         bd.dw_vmem_estimate(128, tq, tp, itemsize) / 2**20)
  for e, allocated in zip(est, BLOCKDIAG_LIBTPU_MIB[key]):
    assert allocated <= e <= allocated + 3, (est, allocated)


def test_blockdiag_tpu_refuses_what_no_tile_fits():
  assert "fewer tokens" in supported(16384, (1, 16384, 16384), 1024, "tpu", 4)
  assert supported(16384, (1, 16384, 16384), 128, "tpu", 2) is None


def test_poisoning_catches_an_unwritten_element(monkeypatch):
  """The poisoned outputs the reference tests run with can fail: a kernel
  that skips the last row of each tile leaves NaNs behind."""
  from jax.experimental import pallas as pl
  poisoned = poison_pallas_outputs(monkeypatch)

  def lazy_copy(x_ref, y_ref):
    y_ref[:7, :] = x_ref[:7, :]

  x = jax.random.normal(jax.random.key(0), (16, 8))
  y = pl.pallas_call(lazy_copy, jax.ShapeDtypeStruct(x.shape, x.dtype),
                     grid=(2,), in_specs=[pl.BlockSpec((8, 8), lambda i: (i, 0))],
                     out_specs=pl.BlockSpec((8, 8), lambda i: (i, 0)),
                     interpret=True, name="lazy")(x)
  assert poisoned == ["lazy"]
  assert np.isnan(np.asarray(y[7::8])).all()
  np.testing.assert_array_equal(y[:7], x[:7])


def _lower(platform, x_shape, w_shape, bt, grad):
  fwd = lambda x, w: blockdiag_matmul_pallas(x, w, block_tokens=bt,
                                             interpret=False, platform=platform)
  args = (jax.ShapeDtypeStruct(x_shape, jnp.bfloat16),
          jax.ShapeDtypeStruct(w_shape, jnp.bfloat16))
  return cross_lower(fwd, args, platform, (0, 1) if grad else None)


@pytest.mark.parametrize("platform,x_shape,w_shape,bt", [
    ("cuda", (256, 4 * 32), (4, 32, 32), 64),
    ("cuda", (512, 8 * 64), (8, 128, 64), 128),
    ("cuda", (256, 4 * 1024), (4, 1024, 1024), 128),
    ("tpu", (256, 2 * 128), (2, 128, 128), 64),
    ("tpu", (128, 4 * 128), (4, 256, 128), 32),
])
@pytest.mark.parametrize("grad", [False, True])
def test_cross_lowering(platform, x_shape, w_shape, bt, grad):
  assert supported(x_shape[0], w_shape, bt, platform) is None
  assert _lower(platform, x_shape, w_shape, bt, grad)


def test_cross_lower_names_the_platforms():
  with pytest.raises(ValueError, match="'cuda', 'tpu'"):
    cross_lower(lambda x: x, (jnp.ones(4),), "rocm")


def test_kernel_bodies_compare_what_each_call_lowers():
  """``lowering.kernel_bodies``: MLIR string escapes decoded; a Mosaic GPU
  module this JAX cannot parse back is compared as its bytes (no error), and
  calls differing only in their location count once."""
  from structmat.kernels import lowering  # pylint: disable=import-outside-toplevel
  assert lowering._mlir_string(r'a\\b\"c\41\00') == b'a\\b"cA\x00'  # pylint: disable=protected-access
  call = ('%{i} = stablehlo.custom_call @mosaic_gpu_v2(%arg0) {{mhlo.backend_'
          'config = {{kernel_hash = "\\0{i}", module = "{m}"}}}} : (tensor<8x'
          'f32>) -> tensor<8xf32> loc(#loc{i})\n')
  text = "".join(call.format(i=i, m=m) for i, m in enumerate("aab"))
  text += call.format(i=3, m="a").replace("mosaic_gpu_v2", "__gpu$xla.gpu.triton")
  bodies = lowering.kernel_bodies(text)
  assert {k: len(v) for k, v in bodies.items()} == {"mosaic_gpu": 3,
                                                     "triton": 1}
  assert lowering.kernel_modules(text)["distinct"] == {"mosaic_gpu": 2,
                                                        "triton": 1}


def test_scoped_vmem_reads_a_compiled_tpu_module():
  """``lowering.scoped_vmem`` on the text of a compiled TPU module (the
  shape of libtpu 0.0.42's): each kernel's largest scoped allocation over
  its calls, and how many of its operands and results XLA placed in VMEM."""
  from structmat.kernels.lowering import scoped_vmem  # pylint: disable=import-outside-toplevel
  cfg = ('backend_config={"flag_configs":[],"scoped_memory_configs":[],'
         '"used_scoped_memory_configs":[{"memory_space":"1","offset":"0",'
         '"size":"%d"}]}')
  hlo = "\n".join([
      "  %w.1 = bf16[16,256,256]{2,1,0:T(8,128)(2,1)S(1)} copy(%p)",
      "  %x.2 = bf16[512,4096]{1,0:T(8,128)(2,1)} parameter(0)",
      "  %monarch_tpu_bwd.1 = (bf16[512,4096]{1,0}, f32[16,256,256]{2,1,0:"
      "T(8,128)S(1)}) custom-call(%x.2, %w.1, /*index=2*/%x.2), "
      "custom_call_target=\"tpu_custom_call\", " + cfg % (13 << 20),
      "  %monarch_tpu_bwd.7 = (bf16[512,4096]{1,0}) custom-call(%x.2), "
      "custom_call_target=\"tpu_custom_call\", " + cfg % (9 << 20),
      "  %fusion.3 = f32[8]{0} fusion(%x.2), " + cfg % (1 << 20),
      "  %monarch_tpu_fwd = bf16[512,4096]{1,0} custom-call(%x.2, %w.1), "
      "custom_call_target=\"tpu_custom_call\", " + cfg % (3 << 19)])
  assert scoped_vmem(hlo, ["monarch_tpu_bwd", "monarch_tpu_fwd",
                           "monarch_tpu_bwd"]) == {
                               "monarch_tpu_bwd": (13.0, 2),
                               "monarch_tpu_fwd": (1.5, 1)}
  assert scoped_vmem(hlo, ["fusion"]) == {}   # not a custom call
  assert scoped_vmem(hlo) == scoped_vmem(hlo, ["monarch_tpu_bwd",
                                               "monarch_tpu_fwd"])


def test_supported_names_the_constraint():
  assert "{'q': 24}" in supported(256, (4, 24, 32), 64, "gpu")
  assert ">= 16, got {'q': 8}" in supported(256, (4, 8, 32), 64, "gpu")
  assert "(q, p) = (64, 64) in multiples of 128" in supported(
      256, (4, 64, 64), 64, "tpu")
  assert "multiple" in supported(100, (4, 32, 32), 64, "gpu")
  assert supported(100, (4, 24, 32), 4, "cpu") is None


@pytest.mark.parametrize("platform,why", [
    ("tpu", "multiples of 128"), ("cuda", "power-of-two")])
def test_kernel_refuses_what_its_backend_cannot_compile(platform, why):
  """Compiled, the kernel checks ``supported`` first: LLaMA-60M's MLP in 4
  blocks (344 x 128) raises naming the constraint, where it used to reach
  the backend (Mosaic TPU's lowering error; on GPUs 8-wide Triton dots);
  interpreted it runs."""
  x, w = jnp.ones((128, 512), jnp.bfloat16), jnp.ones((4, 344, 128),
                                                     jnp.bfloat16)
  with pytest.raises(ValueError, match=f"block-diagonal kernel.*{why}"):
    cross_lower(lambda x, w: blockdiag_matmul_pallas(
        x, w, interpret=False, platform=platform), (x, w), platform)
  assert blockdiag_matmul_pallas(x, w, interpret=True).shape == (128, 1376)



MONARCH_SHAPES = [  # (tokens, block_tokens, w1 shape, w2 shape)
    (64, 32, (4, 16, 16), (4, 16, 16)),     # square, n = 64, 4 blocks
    (32, 16, (4, 8, 16), (4, 12, 8)),       # rectangular 64 -> 48
    (16, 8, (2, 8, 8), (4, 6, 4)),          # k != l
    (32, 32, (8, 64, 32), (8, 128, 64)),    # 256 -> 1024 (in_ext < out_ext rule)
    (48, 16, (4, 32, 32), (4, 32, 32)),     # 48 tokens: 3 tiles
    # Blocks padded to powers of two (masked loads and stores): LLaMA-130M's
    # and GPT-2's 768 = 4 x 192 attention projections (q/l = 48), and
    # 96 -> 72 with p=24, q/l=12, s=18.
    (32, 32, (4, 192, 192), (4, 192, 192)),
    (32, 16, (4, 48, 24), (4, 18, 48)),
    # Blocks wider than a Triton tile, walked in 256-wide chunks: LLaMA-60M's
    # MLP, 512 -> 1376 (s = 344 pads to 512: a full and a partial chunk)
    # and 1376 -> 512 (p = 344).
    (32, 32, (4, 128, 128), (4, 344, 128)),
    (32, 32, (4, 128, 344), (4, 128, 128)),
]


MONARCH_CASES = ([(*c, jnp.float32, 1e-5) for c in MONARCH_SHAPES]
                 + [(*c, jnp.bfloat16, 1e-2) for c in MONARCH_SHAPES[:2]])


def _monarch_inputs(seed, tokens, s1, s2, dtype=jnp.float32):
  """Random x (tokens, k*p), w1 (k, q, p), w2 (l, s, r) at unit-variance
  outputs, and a cotangent g (tokens, l*s)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (tokens, s1[0] * s1[2])).astype(dtype)
  w1 = (jax.random.normal(keys[1], s1) / np.sqrt(s1[2])).astype(dtype)
  w2 = (jax.random.normal(keys[2], s2) / np.sqrt(s2[2])).astype(dtype)
  g = jax.random.normal(keys[3], (tokens, s2[0] * s2[1])).astype(dtype)
  return x, w1, w2, g


@pytest.mark.parametrize("tokens,bt,s1,s2,dtype,tol", MONARCH_CASES)
def test_monarch_kernel_matches_reference(tokens, bt, s1, s2, dtype, tol,
                                          monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)  # unwritten outputs stay NaN
  x, w1, w2, g = _monarch_inputs(tokens + sum(s1), tokens, s1, s2, dtype)
  ker = lambda x, w1, w2: mk.monarch_matmul_pallas(x, w1, w2, block_tokens=bt,
                                                   interpret=True)
  check_kernel(ker, ops.monarch_matmul, (x, w1, w2), g, tol,
               ("dx", "dw1", "dw2"))
  assert set(poisoned) == {"monarch_fwd", "monarch_dx", "monarch_dw"}


def _eqns(fn, *args):
  """Every equation of fn's jaxpr, nested ones (jit, custom_vjp, loops)
  included; not the kernels' bodies inside a pallas_call."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      if eqn.primitive.name == "pallas_call":
        continue
      for v in eqn.params.values():
        for inner in v if isinstance(v, (tuple, list)) else (v,):
          inner = getattr(inner, "jaxpr", inner)
          if hasattr(inner, "eqns"):
            yield from walk(inner)
  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def _kernel_name(eqn) -> str:
  return str(getattr(eqn.params.get("name_and_src_info"), "name", None)
             or eqn.params.get("name"))    # jax 0.10 / later


def _activation_transposes(fn, tokens, *args):
  """Shapes of the transposes outside any kernel whose operand has a
  ``tokens`` axis (the weights' regrouping transposes do not)."""
  return [e.invars[0].aval.shape for e in _eqns(fn, *args)
          if e.primitive.name == "transpose"
          and tokens in e.invars[0].aval.shape]


def test_monarch_forward_stores_the_output_permutation():
  """Triton (and interpret mode, which tests it) writes y once, P2 in its
  strided stores: no activation-sized transpose follows the forward kernel,
  while the backward undoes P2 on dy in XLA. Mosaic TPU, whose blocks
  cannot stride, still writes block-major blocks that XLA permutes."""
  tokens, s1, s2 = 96, (4, 16, 24), (2, 36, 32)   # padded blocks, k != l
  x, w1, w2, g = _monarch_inputs(3, tokens, s1, s2)
  fwd = lambda x, w1, w2: mk.monarch_matmul_pallas(
      x, w1, w2, block_tokens=32, interpret=True)
  assert _activation_transposes(fwd, tokens, x, w1, w2) == []
  grad = lambda x, w1, w2: jax.vjp(fwd, x, w1, w2)[1](g)
  assert _activation_transposes(grad, tokens, x, w1, w2) == [(tokens, 36, 2)]
  # strided_p2=False (the benchmark's comparison): XLA permutes, same values
  unstrided = lambda x, w1, w2: mk.monarch_matmul_pallas(
      x, w1, w2, block_tokens=32, interpret=True, strided_p2=False)
  assert _activation_transposes(unstrided, tokens, x, w1, w2) == [(2, 96, 36)]
  ref = ops.monarch_matmul(x, w1, w2)
  for f in (fwd, unstrided):
    np.testing.assert_allclose(f(x, w1, w2), ref, rtol=1e-5, atol=1e-5)
  s1, s2 = (2, 256, 128), (2, 128, 256)             # TPU-aligned blocks
  x, w1, w2, _ = _monarch_inputs(4, 64, s1, s2)
  tpu = lambda x, w1, w2, **kw: mk.monarch_matmul_pallas(
      x, w1, w2, block_tokens=32, interpret=False, platform="tpu", **kw)
  assert _activation_transposes(tpu, 64, x, w1, w2) == [(2, 64, 128)]
  with pytest.raises(ValueError, match="strided_p2=True: Mosaic TPU"):
    tpu(x, w1, w2, strided_p2=True)


def _grids(fn, *args):
  """{pallas_call name: its grid} of fn traced (not lowered)."""
  return {_kernel_name(e): tuple(e.params["grid_mapping"].grid)
          for e in _eqns(fn, *args) if e.primitive.name == "pallas_call"}


def test_gpu_grids_launch_programs_that_share_an_input_together():
  """Triton launches the first grid axis fastest, a TPU steps the last one
  fastest: on GPUs the programs that read the same activation tile (the
  Monarch forward's l output blocks and dx's k input blocks, a
  block-diagonal block's output tiles, SLTrain's output tiles) come first,
  on TPUs last; the values do not change (interpret mode runs the GPU
  order)."""
  grid, specs, out = portable.launch_order(
      "cuda", (8, 2, 3), [pl.BlockSpec((4, 4), lambda i, j, c: (i, 10 * j + c))],
      pl.BlockSpec((4,), lambda i, j, c: (c,)))
  assert grid == (3, 2, 8)
  assert specs[0].index_map(2, 1, 5) == (5, 12) and out.index_map(2, 1, 5) == (2,)
  assert portable.launch_order("tpu", (8, 2, 3), specs, out)[0] == (8, 2, 3)

  s1, s2 = (2, 256, 128), (2, 128, 256)   # k = l = 2; 512 tokens in 32s
  x, w1, w2, g = _monarch_inputs(5, 512, s1, s2, jnp.bfloat16)
  fn = lambda plat: (lambda x, w1, w2: jax.vjp(
      lambda *a: mk.monarch_matmul_pallas(*a, block_tokens=32,
                                          interpret=False, platform=plat),
      x, w1, w2)[1](g))
  for plat, order in (("cuda", (2, 16)), ("tpu", (16, 2))):
    grids = _grids(fn(plat), x, w1, w2)
    assert grids["monarch_fwd"] == grids["monarch_dx"] == order, (plat, grids)

  xb = jax.random.normal(jax.random.key(6), (256, 2 * 256), jnp.bfloat16)
  wb = jax.random.normal(jax.random.key(7), (2, 512, 256), jnp.bfloat16)
  fb = lambda plat: lambda x, w: bd.blockdiag_matmul_pallas(
      x, w, block_tokens=128, interpret=False, platform=plat)
  # (output tiles of a block, blocks, token tiles); reversed on TPUs, whose
  # tile is the whole 512-wide block
  assert _grids(fb("cuda"), xb, wb)["blockdiag_fwd"] == (4, 2, 2)
  assert _grids(fb("tpu"), xb, wb)["blockdiag_fwd"] == (2, 2, 1)
  np.testing.assert_allclose(
      np.asarray(bd.blockdiag_matmul_pallas(xb[:64], wb, block_tokens=32,
                                            interpret=True), np.float32),
      np.asarray(ops.blockdiag_matmul(xb[:64], wb), np.float32),
      rtol=2e-2, atol=2e-1)

  from structmat.kernels import sltrain as sk   # pylint: disable=import-outside-toplevel
  xs = jnp.ones((256, 128), jnp.bfloat16)
  a, b = jnp.ones((128, 16), jnp.bfloat16), jnp.ones((16, 256), jnp.bfloat16)
  idx = jnp.arange(0, 128 * 256, 97, dtype=jnp.int32)
  vals = jnp.ones(idx.shape, jnp.bfloat16)
  fs = lambda x: sk.sltrain_matmul_pallas(x, a, b, vals, idx, 1.0,
                                          block_tokens=128, interpret=False,
                                          platform="cuda")
  assert _grids(fs, xs)["sltrain_fwd"] == (256 // sk.DEFAULT_TILE, 2)


@pytest.mark.parametrize("i,loops", [(0, True), (2, True), (6, True),
                                     (7, False), (8, False)])
def test_monarch_whole_blocks_loop(i, loops):
  """Whole blocks (square, k != l, padded) sum their k (dx: l) steps in a
  loop, which the H200 ran 2x faster than the unrolled sum (session 14);
  blocks walked in chunks unroll, as their per-chunk operands would
  multiply by the loop's pipeline stages."""
  tokens, bt, s1, s2 = MONARCH_SHAPES[i]
  x, w1, w2, _ = _monarch_inputs(0, tokens, s1, s2)
  prims = _kernel_primitives(lambda x, w1, w2: mk.monarch_matmul_pallas(
      x, w1, w2, block_tokens=bt, interpret=True), x, w1, w2)
  assert ("scan" in prims["monarch_fwd"]) == loops, prims


def _kernel_primitives(fn, *args):
  """{pallas_call name: the primitives of its kernel's top level}."""
  return {_kernel_name(e): {k.primitive.name for k in e.params["jaxpr"].eqns}
          for e in _eqns(fn, *args) if e.primitive.name == "pallas_call"}


@pytest.mark.parametrize("tile,tokens,bt,s1,s2,dtype,tol", [
    (16, 32, 16, (4, 16, 64), (4, 64, 16), jnp.float32, 1e-5),  # 4 whole
    (16, 32, 16, (2, 32, 40), (2, 40, 32), jnp.float32, 1e-5),  # 16+16+8
    (16, 16, 16, (4, 16, 24), (2, 36, 32), jnp.float32, 1e-5),  # k != l
    (16, 32, 16, (2, 32, 40), (2, 40, 32), jnp.bfloat16, 1e-2),
    # 32-wide tiles: 40 = 32 + a last chunk narrowed to 16 (8 real), and
    # 72 (k != l) = 32 + 32 + 16 (8 real)
    (32, 32, 16, (2, 32, 40), (2, 40, 32), jnp.float32, 1e-5),
    (32, 16, 16, (2, 96, 72), (4, 48, 48), jnp.float32, 1e-5),
])
def test_monarch_kernel_in_chunks(tile, tokens, bt, s1, s2, dtype, tol,
                                  monkeypatch):
  """Blocks wider than a Triton tile (here a 16- or 32-wide one, so small
  shapes take several chunks, the last one partial and narrowed to the
  power of two that holds its columns): forward, dx and dw walk p and s
  chunk by chunk; an unwritten chunk stays NaN."""
  monkeypatch.setattr(mk, "MAX_TRITON_BLOCK", tile)
  # the 60M MLP's 344-wide blocks: 256 + 128, not 256 + 256
  assert mk._chunks(344, 512, 256) == [(0, 256, 256), (256, 128, 88)]  # pylint: disable=protected-access
  poisoned = poison_pallas_outputs(monkeypatch)
  x, w1, w2, g = _monarch_inputs(tokens + sum(s2), tokens, s1, s2, dtype)
  assert mk.supported(tokens, s1, s2, bt, "gpu") is None
  ker = lambda x, w1, w2: mk.monarch_matmul_pallas(x, w1, w2, block_tokens=bt,
                                                   interpret=True)
  check_kernel(ker, ops.monarch_matmul, (x, w1, w2), g, tol,
               ("dx", "dw1", "dw2"))
  assert set(poisoned) == {"monarch_fwd", "monarch_dx", "monarch_dw"}


def test_monarch_kernel_in_narrowed_chunks(monkeypatch):
  """Where 16-token tiles of whole blocks overflow shared memory (a budget
  shrunk here so 32-wide blocks take 16-wide chunks), the chunks narrow
  instead of the kernel refusing the shape: float32, forward and gradients,
  an unwritten chunk stays NaN; auto still declines chunked blocks."""
  s1, s2 = (4, 64, 32), (4, 32, 64)   # p = s = 32, q/l = 16
  assert mk.chunk_width(32, 16, 32, 4) == 32 and not mk.chunked(s1, s2, 4)
  for budget in ("SMEM_BUDGET", "LOOP_SMEM_BUDGET"):  # unrolled and looped
    monkeypatch.setattr(mk, budget, 6000)
  assert mk.chunk_width(32, 16, 32, 4) == 16 and mk.chunked(s1, s2, 4)
  assert mk.supported(32, s1, s2, 16, "gpu", 4) is None
  assert "16-wide chunks" in mk.supported(32, s1, s2, 32, "gpu", 4)
  assert "wider than 16" in mk.padding_problem(s1, s2, "gpu", 4)
  # The shrunk budget would send the weight gradients to XLA: keep the
  # kernel's (interpreted, it has no shared memory to overflow).
  monkeypatch.setattr(mk, "dw_block_tokens", lambda bt, *_: bt)
  poisoned = poison_pallas_outputs(monkeypatch)
  x, w1, w2, g = _monarch_inputs(7, 32, s1, s2)
  ker = lambda x, w1, w2: mk.monarch_matmul_pallas(x, w1, w2, block_tokens=16,
                                                   interpret=True)
  check_kernel(ker, ops.monarch_matmul, (x, w1, w2), g, 1e-5,
               ("dx", "dw1", "dw2"))
  assert set(poisoned) == {"monarch_fwd", "monarch_dx", "monarch_dw"}


# Shared memory the weight-gradient kernel asked for, in bytes:
# (n_in, n_out, nblocks, itemsize, token step) -> asked. The H200 (jax
# 0.11.2) refused this one: the forward's estimate had let it through. It
# also refused the 60M MLP in bfloat16 at 64-token steps (260 and 276 KiB,
# what Triton 3.6 asked too) when their 344-wide blocks ran as 256 + 256
# columns; as 256 + 128 Triton 3.6 asks 204 and 220 KiB (below).
H200_DW_REFUSED = {(768, 768, 4, 4, 64): 311296}
# Triton 3.6 compiling the kernel for sm_90 on this CPU (tools/triton_smem.py
# --force_block_tokens): whole blocks, chunks of 256 and 128, several chunks
# of both p and s, narrowed last chunks (344 = 256 + 128, 320 = 256 + 64,
# 192 = 128 + 64).
TRITON_DW_ASKED = {
    (1024, 1024, 4, 2, 64): 278528, (1024, 4096, 4, 2, 16): 223232,
    (1024, 4096, 4, 4, 16): 421888, (3072, 768, 4, 4, 64): 901120,
    (1280, 1280, 4, 2, 32): 180224, (4096, 4096, 16, 2, 64): 184320,
    (512, 512, 4, 2, 128): 196608, (768, 768, 4, 4, 32): 155648,
    (512, 1376, 4, 2, 64): 208896, (1376, 512, 4, 2, 64): 225280,
    (512, 1376, 4, 4, 64): 417792}


def _dw_estimate(n, m, nb, itemsize, bt):
  s1, s2, _, _ = ops.monarch_shapes(n, m, nb)
  p, g, s = s1[2], s1[1] // s2[0], s2[1]
  pp, gg, ss = mk.padded_dims(p, g, s)
  width = mk.chunk_width(pp, gg, ss, itemsize)
  return (mk.dw_smem_estimate(bt, p, gg, s, width, itemsize),
          mk.dw_block_tokens(bt, p, gg, s, width, itemsize))


@pytest.mark.parametrize("shape,asked", [*H200_DW_REFUSED.items(),
                                         *TRITON_DW_ASKED.items()])
def test_dw_estimate_bounds_what_triton_asked(shape, asked):
  """The weight gradients' pipelined loops ask for more shared memory than
  the forward's tile: their estimate is never below what a compiler asked
  for (nor a quarter above Triton's), and the step dw_block_tokens takes (if
  any) fits the budget."""
  estimate, step = _dw_estimate(*shape)
  assert asked <= estimate
  if shape in TRITON_DW_ASKED:   # and not far above (the H200 asked less in
    assert estimate <= 1.25 * asked   # float32 than Triton 3.6 does)
  bt = shape[-1]
  assert step is None or (16 <= step <= bt and bt % step == 0)
  if step is not None:
    assert _dw_estimate(*shape[:-1], step)[0] <= mk.LOOP_SMEM_BUDGET
  if shape[:4] in ((512, 1376, 4, 2), (1376, 512, 4, 2)):
    assert step == bt      # the 60M MLP's whole 64-token steps fit now
  if shape in H200_DW_REFUSED:
    n, m, nb, itemsize, _ = shape
    s1, s2, _, _ = ops.monarch_shapes(n, m, nb)
    assert mk.supported(4096, s1, s2, bt, "cuda", itemsize) is None
    assert step is None or step < bt


def test_monarch_weight_gradients_in_shorter_steps(monkeypatch):
  """Where the weight gradients' loops would overflow shared memory at the
  forward's token tile, they take shorter steps (here a budget shrunk so 32
  -> 16); where even 16 tokens would, XLA computes them (the fused forward
  and dx stay). Same gradients either way; an unwritten element stays NaN."""
  s1, s2 = (2, 32, 40), (2, 40, 32)    # p = s = 40: 16 + 16 + 8 chunks
  monkeypatch.setattr(mk, "MAX_TRITON_BLOCK", 16)
  _, gg, _ = mk.padded_dims(40, 16, 40)
  fwd = mk.smem_estimate(32, 16, gg, 16, 4)
  dw = lambda bt: mk.dw_smem_estimate(bt, 40, gg, 40, 16, 4)
  assert fwd < dw(16) < dw(32)
  x, w1, w2, g = _monarch_inputs(11, 64, s1, s2)
  ker = lambda x, w1, w2: mk.monarch_matmul_pallas(x, w1, w2, block_tokens=32,
                                                   interpret=True)
  for budget, step, kernels in (
      (dw(16), 16, {"monarch_fwd", "monarch_dx", "monarch_dw"}),
      (dw(16) - 1, None, {"monarch_fwd", "monarch_dx"})):
    monkeypatch.setattr(mk, "LOOP_SMEM_BUDGET", budget)
    assert mk.supported(64, s1, s2, 32, "gpu", 4) is None
    assert mk.dw_block_tokens(32, 40, gg, 40, 16, 4) == step
    poisoned = poison_pallas_outputs(monkeypatch)
    check_kernel(ker, ops.monarch_matmul, (x, w1, w2), g, 1e-5,
                 ("dx", "dw1", "dw2"))
    assert set(poisoned) == kernels


def test_every_monarch_preset_layer_runs_on_gpus():
  """impl="pallas" takes every Monarch linear of the LLaMA and GPT-2 presets
  on a GPU in bfloat16 and float32 (float32 from 130M on, and LLaMA-7B's q/l
  = 256 in any dtype, used to overflow 256-wide chunks); 16-bit presets keep
  their whole 256-wide chunks."""
  from structmat.models.family import linear_shapes, preset_config  # pylint: disable=import-outside-toplevel
  from structmat.models.presets import GPT2_SIZES, SIZES  # pylint: disable=import-outside-toplevel
  widths = {}
  for preset in [p for p in SIZES if p.startswith("llama")] + list(GPT2_SIZES):
    cfg = preset_config(preset, "monarch")
    nb = dict(cfg.linear_kwargs)["nblocks"]
    for site, (d_in, d_out) in linear_shapes(cfg).items():
      w1, w2, _, _ = ops.monarch_shapes(d_in, d_out, nb)
      for itemsize in (2, 4):
        bt = mk.fit_block_tokens(65536, w1, w2, itemsize, "cuda")
        why = mk.supported(65536, w1, w2, bt, "cuda", itemsize)
        assert why is None, (preset, site, itemsize, why)
        p, g, s = w1[2], w1[1] // w2[0], w2[1]
        if site == "down":   # the MLP's widest blocks
          widths[preset, itemsize] = mk.chunk_width(*mk.padded_dims(p, g, s),
                                                    itemsize)
  assert widths["llama_60m", 4] == widths["llama_1b", 2] == 256
  assert widths["llama_130m", 4] == widths["llama_7b", 2] == 128
  assert widths["llama_7b", 4] == 64


def test_monarch_gathered_weights_roundtrip():
  w1 = jax.random.normal(jax.random.key(0), (4, 8, 16))
  w2 = jax.random.normal(jax.random.key(1), (4, 12, 8))
  a, b = mk.gather_weights(w1, w2)
  back1, back2 = mk.scatter_weight_grads(a, b)
  np.testing.assert_array_equal(back1, w1)
  np.testing.assert_array_equal(back2, w2)


def _lower_monarch(platform, tokens, s1, s2, bt, grad):
  fwd = lambda *a: mk.monarch_matmul_pallas(*a, block_tokens=bt,
                                            interpret=False, platform=platform)
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
          for s in ((tokens, s1[0] * s1[2]), s1, s2)]
  return cross_lower(fwd, args, platform, (0, 1, 2) if grad else None)


@pytest.mark.parametrize("platform,tokens,s1,s2,bt", [
    ("cuda", 256, (4, 64, 64), (4, 64, 64), 64),
    ("cuda", 512, (4, 128, 128), (4, 256, 128), 64),
    ("cuda", 256, (4, 192, 192), (4, 192, 192), 32),   # padded to 256 / 64
    ("cuda", 256, (4, 128, 128), (4, 344, 128), 64),   # 60M MLP: chunked s
    ("cuda", 256, (4, 128, 344), (4, 128, 128), 64),   # chunked p
    ("cuda", 256, (4, 512, 512), (4, 512, 512), 16),   # 2048 in 4 blocks
    ("cuda", 64, (4, 1024, 1024), (4, 1024, 1024), 16),  # 7B: 128-wide chunks
    ("tpu", 256, (4, 512, 512), (4, 512, 512), 64),
])
@pytest.mark.parametrize("grad", [False, True])
def test_monarch_cross_lowering(platform, tokens, s1, s2, bt, grad):
  assert mk.supported(tokens, s1, s2, bt, platform) is None
  assert _lower_monarch(platform, tokens, s1, s2, bt, grad)


def test_monarch_supported_names_the_constraint():
  assert "divisible" in mk.supported(64, (4, 6, 16), (4, 16, 6), 16, "gpu")
  assert "power-of-two" in mk.supported(96, (4, 32, 32), (4, 32, 32), 48, "gpu")
  # p and s wider than a tile are chunked; q/l (each dot's width) is not.
  assert "q/l=512" in mk.supported(64, (2, 1024, 64), (2, 64, 1024), 16, "gpu")
  assert mk.supported(64, (4, 384, 384), (4, 384, 384), 16, "gpu") is None
  assert "wider than 256" in mk.padding_problem((4, 512, 512), (4, 512, 512),
                                                "gpu")
  assert mk.supported(64, (32, 32, 32), (32, 32, 32), 64, "cpu") is None
  # Blocks are padded to powers of two; auto declines heavy padding.
  assert mk.padded_dims(192, 48, 192) == (256, 64, 256)
  assert mk.padded_dims(192, 48, 192, pad=False) == (192, 48, 192)
  assert mk.supported(64, (4, 192, 192), (4, 192, 192), 32, "gpu") is None
  assert "p=192 pads to 256" in mk.padding_problem((4, 192, 192), (4, 192, 192), "gpu")
  assert mk.padding_problem((4, 128, 128), (4, 128, 128), "gpu") is None
  assert "g=1 pads to 16" in mk.padding_problem((32, 32, 32), (32, 32, 32), "gpu")
  assert "p=129" in mk.padding_problem((2, 64, 129), (2, 64, 64), "gpu")
  assert mk.padding_problem((32, 32, 32), (32, 32, 32), "tpu") is None
  with pytest.raises(ValueError, match="cannot run"):
    mk.monarch_matmul_pallas(jnp.ones((8, 24)), jnp.ones((4, 6, 6)),
                             jnp.ones((4, 6, 6)), interpret=True)


@pytest.mark.parametrize("name,kw", [("monarch", dict(nblocks=4)),
                                     ("btt", dict(nblocks=4, rank=2)),
                                     ("blockdiag", dict(nblocks=4))])
def test_layers_with_pallas_impl_match_xla(name, kw):
  import flax.linen as nn
  from structmat.layers import make_linear
  from tests.helpers import randomize
  x = jax.random.normal(jax.random.key(0), (2, 8, 64))
  xla = make_linear(name, features=64, **kw)
  pal = make_linear(name, features=64, impl="pallas", **kw)
  v = {"params": randomize(nn.unbox(xla.init(jax.random.key(1), x))["params"])}
  np.testing.assert_allclose(pal.apply(v, x), xla.apply(v, x), atol=1e-4)
  g = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2))(v["params"])
  for a, b in zip(jax.tree.leaves(g(pal)), jax.tree.leaves(g(xla))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_dispatch():
  from structmat.kernels import dispatch
  x = jax.random.normal(jax.random.key(0), (16, 32))
  w = jax.random.normal(jax.random.key(1), (2, 8, 16))
  np.testing.assert_allclose(ops.blockdiag_matmul(x, w, impl="pallas"),
                             ops.blockdiag_matmul(x, w), atol=1e-5)
  # auto on the CPU runs XLA (no kernel call): same numbers either way.
  np.testing.assert_allclose(ops.blockdiag_matmul(x, w, impl="auto"),
                             ops.blockdiag_matmul(x, w), atol=1e-6)
  assert not dispatch.choose("auto", lambda p: None)   # CPU
  assert dispatch.choose("pallas", lambda p: "anything")
  with pytest.raises(ValueError, match="impl"):
    dispatch.choose("cuda", lambda p: None)
  # A shape the kernel refuses under impl="pallas" says what to use instead.
  with pytest.raises(ValueError, match="cannot run.*impl='auto' runs XLA"):
    ops.monarch_matmul(jnp.ones((8, 24)), jnp.ones((4, 6, 6)),
                       jnp.ones((4, 6, 6)), impl="pallas")


def test_auto_keeps_xla_where_the_kernel_was_measured_slower(monkeypatch):
  """On a GPU, auto takes the fused Monarch kernel only where an H200 timed it
  ahead of XLA, and the block-diagonal and SLTrain Triton kernels nowhere."""
  from structmat.kernels import dispatch
  from structmat.kernels import sltrain as sk
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  bf16 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  kernel_in = lambda f, *args: "pallas_call" in str(jax.make_jaxpr(f)(*args))

  def uses_kernel(tokens, w1_shape, w2_shape):
    x = bf16((tokens, w1_shape[0] * w1_shape[2]))
    return kernel_in(lambda x, a, b: dispatch.monarch(x, a, b, None, "auto"),
                     x, bf16(w1_shape), bf16(w2_shape))

  sixteen = ((16, 256, 256), (16, 256, 256))      # q/l = 16
  assert not uses_kernel(16384, *sixteen)          # 1.58 vs 0.827 ms fwd+bwd
  assert not uses_kernel(1024, *sixteen)           # 0.130 vs 0.061 ms
  # The 60M attention: materialized at training batches (below), the kernel
  # (measured ahead of XLA there) at 512 tokens, where building W costs as
  # much as the product.
  assert uses_kernel(512, (4, 128, 128), (4, 128, 128))
  assert uses_kernel(1024, (8, 256, 256), (8, 256, 256))    # n=2048, q/l=32
  # 130M's attention blocks (192) pad to 256: 2.2x slower at 65536 tokens,
  # also slower at 512; besides, 32-token tiles re-read the factors 10.7x.
  attn_130m = ((4, 192, 192), (4, 192, 192))
  assert not uses_kernel(65536, *attn_130m)
  assert not uses_kernel(512, *attn_130m)
  assert "10.7x" in mk.slower_than_xla(65536, *attn_130m, "gpu", 32)
  assert mk.slower_than_xla(1024, *attn_130m, "gpu", 32) is None
  assert "pads to 256" in mk.padding_problem(*attn_130m, "gpu")
  assert mk.slower_than_xla(65536, (4, 128, 128), (4, 128, 128), "gpu", 128) is None
  assert mk.factor_rereads(*sixteen, 64) == 4.0
  assert not uses_kernel(512, (32, 32, 32), (32, 32, 32))   # q/l = 1 -> 16
  assert "q/l=16" in mk.slower_than_xla(512, *sixteen, "gpu")
  assert mk.slower_than_xla(16384, *sixteen, "tpu") is None
  # Blocks wider than a Triton tile run in chunks, never timed: XLA.
  assert not uses_kernel(512, (4, 512, 512), (4, 512, 512))

  # Materialized Monarch: one dense matmul where the roofline predicts it
  # faster than the structured path (small widths, many tokens), on GPUs.
  calls = []
  dense = ops.monarch_matmul_dense
  monkeypatch.setattr(ops.monarch, "monarch_matmul_dense",
                      lambda *a: calls.append(a[1].shape) or dense(*a))
  for tokens, shapes, materialized in (
      (65536, ((4, 128, 128), (4, 128, 128)), True),    # 60M attention
      (65536, ((4, 128, 128), (4, 344, 128)), True),    # 60M MLP up
      (65536, ((4, 192, 192), (4, 192, 192)), True),    # 130M attention
      (512, ((4, 128, 128), (4, 128, 128)), False),     # W costs the product
      (16384, sixteen, False),                          # n=4096: structured
      (65536, ((4, 512, 512), (4, 512, 512)), False)):  # n=2048: borderline
    calls.clear()
    kernel = uses_kernel(tokens, *shapes)
    assert bool(calls) == materialized, (tokens, shapes)
    assert not (kernel and materialized)
  for platform in ("cpu", "tpu"):
    assert "GPUs only" in roofline.materialize_problem(
        65536, (4, 128, 128), (4, 128, 128), 2, platform)
  assert "dense vs" in roofline.materialize_problem(16384, *sixteen, 2, "gpu")
  # float32 (TF32 matmuls, twice the bytes): the crossover moves little.
  wide, narrow = ((4, 512, 512),) * 2, ((4, 256, 256),) * 2
  assert roofline.materialize_problem(65536, *narrow, 4, "gpu") is None
  assert "dense vs" in roofline.materialize_problem(65536, *wide, 4, "gpu")

  x, w = bf16((4096, 1024)), bf16((16, 64, 64))
  assert not kernel_in(lambda x, w: dispatch.blockdiag(x, w, "auto"), x, w)
  assert kernel_in(lambda x, w: dispatch.blockdiag(x, w, "pallas"), x, w)
  assert "1.4x" in bd.slower_than_xla("gpu") and bd.slower_than_xla("tpu") is None
  n, r = 256, 16
  idx = ops.draw_support(jax.random.key(0), n, n, 0.03)
  sl = lambda impl: lambda x, a, b, v: dispatch.sltrain(x, a, b, v, idx, 1.0, impl)
  args = (bf16((512, n)), bf16((n, r)), bf16((r, n)), bf16(idx.shape))
  assert not kernel_in(sl("auto"), *args)
  assert kernel_in(sl("pallas"), *args)
  assert "11x" in sk.slower_than_xla("gpu") and sk.slower_than_xla("tpu") is None


def test_benchmark_times_the_forward_with_the_backward():
  """The forward+backward row runs the forward kernel: its loss, sum(y * g),
  is linear in y, so with jax.grad alone jit dropped the forward (its
  gradient needs only g), as the benchmark did until session 17."""
  from experiments import benchmark_kernels as bk   # pylint: disable=import-outside-toplevel
  S = jax.ShapeDtypeStruct
  args = (S((512, 512), jnp.bfloat16), S((4, 128, 128), jnp.bfloat16),
          S((4, 128, 128), jnp.bfloat16))
  fn = lambda x, a, b: mk.monarch_matmul_pallas(
      x, a, b, block_tokens=128, interpret=False, platform="cuda")
  g = jnp.ones((512, 512), jnp.bfloat16)
  text = cross_lower(bk.fwd_bwd(fn, g, 3), args, "cuda")
  assert all(name in text for name in ("monarch_fwd", "monarch_dx",
                                       "monarch_dw")), "a kernel is missing"
  grad_only = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * g),
                               argnums=(0, 1, 2)))
  assert "monarch_fwd" not in cross_lower(grad_only, args, "cuda")


def test_benchmark_kernels_smoke(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-m", "experiments.benchmark_kernels",
                      "--sizes=128", "--tokens=128", "--dtypes=float32", "--nblocks=4",
                      "--quick", "--interpret", f"--output_dir={tmp_path}"],
                     cwd=root, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(tmp_path / "benchmark_kernels.json"))["rows"]
  assert {r["impl"] for r in rows} >= {"monarch pallas", "blockdiag pallas",
                                       "monarch two-pass",
                                       "monarch two-pass bt128",
                                       "monarch two-pass p2 xla",
                                       "monarch two-pass dwk",
                                       "blockdiag gmm", "monarch tpu",
                                       "monarch tpu split",
                                       "sltrain tpu",
                                       "monarch xla", "monarch materialized",
                                       "dense"}
  assert all(r.get("numerics_ok") for r in rows), rows
  assert all(r["predicted_fwd_ms"] > 0 for r in rows
             if r["impl"] in ("monarch xla", "monarch materialized"))
  # The Mosaic GPU kernels (16-bit only), through Mosaic GPU's interpreter;
  # two warpgroups interpreted under jit can hang: a row says so instead.
  p = subprocess.run([sys.executable, "-m", "experiments.benchmark_kernels",
                      "--sizes=128", "--tokens=64", "--dtypes=bfloat16", "--nblocks=2",
                      "--quick", "--interpret",
                      "--impls=monarch xla,monarch mgpu,monarch mgpu 2wg",
                      f"--output_dir={tmp_path}"],
                     cwd=root, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(tmp_path / "benchmark_kernels.json"))["rows"]
  assert [r["impl"] for r in rows] == ["monarch xla", "monarch mgpu",
                                       "monarch mgpu 2wg"]
  assert all(r.get("numerics_ok") for r in rows[:2]), rows
  assert "hang" in rows[2]["error"], rows[2]


def test_benchmark_kernels_rectangular_sizes(tmp_path):
  """IN:OUT sizes (a layer's own shape: LLaMA-60M's MLP is 512:1376) time
  n -> n_out products, each row checked against its float32 reference."""
  import subprocess
  import sys
  from experiments import benchmark_kernels as bk  # pylint: disable=import-outside-toplevel
  assert bk.parse_size("512:1376") == (512, 1376)
  assert bk.parse_size("64") == (64, 64)
  for bad in ("512x1376", "1:2:3", "0", ""):
    with pytest.raises(ValueError, match="IN:OUT"):
      bk.parse_size(bad)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-m", "experiments.benchmark_kernels",
                      "--sizes=64:96,96:64", "--tokens=64", "--dtypes=float32",
                      "--nblocks=4", "--quick", "--interpret",
                      "--impls=dense,monarch xla,monarch materialized,"
                      "monarch pallas,monarch pallas bt32,sltrain xla,"
                      "sltrain pallas",
                      f"--output_dir={tmp_path}"],
                     cwd=root, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(tmp_path / "benchmark_kernels.json"))["rows"]
  assert [(r["n"], r["n_out"]) for r in rows] == [(64, 96)] * 7 + [(96, 64)] * 7
  assert all(r.get("numerics_ok") for r in rows), rows
  assert "64:96" in p.stdout


def _run_benchmark_script(script: str):
  """Runs ``script`` (which imports experiments.benchmark_kernels and patches
  what it needs) in a fresh interpreter; it must print OK last."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-c", script], cwd=root,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0 and p.stdout.strip().endswith("OK"), (
      p.stdout[-2000:] + p.stderr[-3000:])


def test_benchmark_gpu_sweep_skips_chunked_monarch():
  """On a GPU (patched here), a sweep leaves the chunked Monarch Triton rows
  out (with a row saying so) unless --impls names them."""
  script = (
      "import jax, jax.numpy as jnp\n"
      "from absl import flags\n"
      "from experiments import benchmark_kernels as bk\n"
      "flags.FLAGS(['bk'])\n"
      "jax.default_backend = lambda: 'gpu'\n"
      "rows = {r['impl']: r for r in bk.rows_for(512, 16, jnp.float32, 1, 1,"
      " False)}\n"
      "assert 'skipped: blocks wider' in rows['monarch pallas']['error']\n"
      "assert 'fwd_ms' in rows['monarch xla'], rows\n"
      "print('OK')\n")
  _run_benchmark_script(script)


def test_benchmark_builds_sltrain_inputs_only_for_its_rows():
  """Drawing an SLTrain support keys all n * n_out positions (seconds at
  n=8192 on this CPU): a sweep without SLTrain rows never draws one, and
  each row records its wall seconds."""
  script = (
      "import jax.numpy as jnp\n"
      "from absl import flags\n"
      "from experiments import benchmark_kernels as bk\n"
      "from structmat import ops\n"
      "flags.FLAGS(['bk', '--impls=dense,monarch xla'])\n"
      "def no(*a): raise AssertionError('support drawn')\n"
      "ops.draw_support = no\n"
      "rows = list(bk.rows_for(64, 16, jnp.float32, 4, 1, True))\n"
      "assert [r['impl'] for r in rows] == ['dense', 'monarch xla'], rows\n"
      "assert all(r['row_s'] > 0 and r['numerics_ok'] for r in rows), rows\n"
      "flags.FLAGS.impls = ['sltrain xla']\n"
      "row, = bk.rows_for(64, 16, jnp.float32, 4, 1, True)\n"
      "assert 'support drawn' in row['error'], row\n"
      "print('OK')\n")
  _run_benchmark_script(script)
