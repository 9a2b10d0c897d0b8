"""Mosaic GPU Monarch forward, dx and weight gradients: Mosaic GPU's
interpreter against the XLA reference (its buffers start as NaN, so an
element the kernel never writes fails), gradients through the custom VJP,
and cross-lowering for an H100."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.kernels import monarch as mk
from structmat.kernels import monarch_mgpu as mg
from structmat.kernels import monarch_mgpu_dw as mdw
from structmat.kernels.lowering import cross_lower, kernel_bodies
from tests.helpers import check_kernel, preset_step_kernels

SHAPES = [  # (tokens, w1 shape, w2 shape)
    (128, (2, 64, 64), (2, 64, 64)),      # square, q/l = 32 (64-byte swizzle)
    (192, (4, 64, 32), (4, 48, 64)),      # 128 -> 192, q/l = 16 (32 bytes)
    (64, (2, 96, 48), (2, 48, 96)),       # q/l = 48: a 96-byte row
    (64, (4, 192, 192), (4, 192, 192)),   # LLaMA-130M attention: one x buffer
]


def _inputs(tokens, s1, s2, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(tokens + sum(s1) + sum(s2)), 4)
  x = jax.random.normal(keys[0], (tokens, s1[0] * s1[2]), dtype)
  w1 = (jax.random.normal(keys[1], s1) / np.sqrt(s1[2])).astype(dtype)
  w2 = (jax.random.normal(keys[2], s2) / np.sqrt(s2[2])).astype(dtype)
  g = jax.random.normal(keys[3], (tokens, s2[0] * s2[1]), dtype)
  return x, w1, w2, g


@pytest.mark.parametrize("tokens,s1,s2", SHAPES)
def test_forward_matches_reference(tokens, s1, s2):
  x, w1, w2, _ = _inputs(tokens, s1, s2)
  assert mg.supported(tokens, s1, s2, x.dtype) is None
  y = mg.monarch_matmul_mgpu(x, w1, w2, interpret=True)
  ref = ops.monarch_matmul(*(v.astype(jnp.float32) for v in (x, w1, w2)))
  assert y.dtype == x.dtype and y.shape == ref.shape
  scale = float(jnp.abs(ref).max())
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=1e-2 * scale)


def test_token_loop_and_chunks(monkeypatch):
  """A CTA streams several tiles when the grid is smaller than the tile
  count (here 2 SMs: one chunk of four tiles per output block)."""
  monkeypatch.setattr(mg, "SMS", 2)
  assert mg._chunks(4, 2) == 1 and mg._chunks(6, 1) == 2  # pylint: disable=protected-access
  test_forward_matches_reference(256, (2, 64, 64), (2, 64, 64))


def _count(monkeypatch, module, name):
  """Record the first argument's shape of every call to module.name."""
  calls = []
  fn = getattr(module, name)
  monkeypatch.setattr(
      module, name,
      lambda v, *a, **kw: calls.append(v.shape) or fn(v, *a, **kw))
  return calls


@pytest.mark.parametrize("tokens,s1,s2", SHAPES[:2])
def test_gradients(tokens, s1, s2, monkeypatch):
  """dx runs the same kernel on the transposed product; dw1, dw2 run the
  Mosaic GPU weight-gradient kernels where p and s are multiples of 64 (the
  first shape), else the portable kernels' backward (the second: p = 32)."""
  calls = _count(monkeypatch, mg, "_blockwise")
  portable = _count(monkeypatch, mk, "backward")
  x, w1, w2, g = _inputs(tokens, s1, s2)
  assert mg.supported(tokens, s1, s2, x.dtype, transposed=True) is None
  check_kernel(lambda *a: mg.monarch_matmul_mgpu(*a, interpret=True),
               ops.monarch_matmul, (x, w1, w2), g, 1e-2, ("dx", "dw1", "dw2"))
  # the forward (x) and dx (dy with P2 undone): both through the kernel
  assert (tokens, s1[0] * s1[2]) in calls and (tokens, s2[0] * s2[1]) in calls
  own_dw = mdw.supported(tokens, s1, s2, x.dtype) is None
  assert own_dw == (s1[2] % 64 == 0) and bool(portable) != own_dw


@pytest.mark.parametrize("tokens,s1,s2", [
    (192, (2, 128, 64), (4, 64, 64)),     # k != l, q/l = 32, three tiles
    (64, (4, 192, 192), (4, 192, 192)),   # LLaMA-130M attention, q/l = 48
])
def test_weight_gradients_in_mosaic_gpu(tokens, s1, s2, monkeypatch):
  """dw1 and dw2 through the two wgmma chains (dU from x^T and dy, dB from
  dy^T and x), nothing through the portable kernels or XLA's VJP."""
  chains = _count(monkeypatch, mdw, "_chain")
  monkeypatch.setattr(mk, "backward", None)  # the portable path would fail
  x, w1, w2, g = _inputs(tokens, s1, s2)
  check_kernel(lambda *a: mg.monarch_matmul_mgpu(*a, interpret=True),
               ops.monarch_matmul, (x, w1, w2), g, 1e-2, ("dx", "dw1", "dw2"))
  k, _, p = s1
  l, s, _ = s2
  want = [(tokens, k * p), (tokens, l * s)]  # x, then dy: transposed views
  if not mdw.views(True):  # jax 0.10.2's interpreter: XLA transposes them
    want = [v[::-1] for v in want]
  assert chains == want


def test_portable_weight_gradients_on_request(monkeypatch):
  """own_dw=False (the benchmark's A/B row) sends dw1, dw2 to the portable
  kernels although the Mosaic GPU ones take the shapes."""
  chains = _count(monkeypatch, mdw, "_chain")
  portable = _count(monkeypatch, mk, "backward")
  x, w1, w2, g = _inputs(64, (2, 64, 64), (2, 64, 64))
  check_kernel(lambda *a: mg.monarch_matmul_mgpu(*a, interpret=True,
                                                 own_dw=False),
               ops.monarch_matmul, (x, w1, w2), g, 1e-2, ("dx", "dw1", "dw2"))
  assert len(portable) == 1 and not chains


def _races_found() -> bool:
  """What the interpreter's race detector saw in the last kernel it ran."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # pylint: disable=g-import-not-at-top
  return gpu_callbacks.get_races().races_found


@pytest.mark.parametrize("tokens,s1,s2,wgs", [
    (192, (2, 64, 64), (2, 64, 64), 1),
    (192, (2, 64, 64), (2, 64, 64), 2),      # three tiles: one warpgroup idles
    (256, (4, 192, 192), (4, 192, 192), 2),  # 130M attention: dw two, fwd one
])
def test_race_free(tokens, s1, s2, wgs, monkeypatch):
  """Each kernel (forward, dx, dU, dB), with one warpgroup per CTA or two,
  matches the reference and the interpreter's race detector finds no race
  in it (two warpgroups sharing one stage-1 buffer is caught: checked by
  hand)."""
  monkeypatch.setattr(mg, "DETECT_RACES", True)
  monkeypatch.setattr(mg, "SMS", 2)   # one chunk per block (pair): 3-4 tiles
  races = []
  for module, name in ((mg, "_blockwise"), (mdw, "_chain")):
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, functools.partial(
        lambda f, *a, **kw: (out := f(*a, **kw),
                             races.append(_races_found()))[0], fn))
  x, w1, w2, g = _inputs(tokens, s1, s2)
  check_kernel(lambda *a: mg.monarch_matmul_mgpu(*a, interpret=True,
                                                 warpgroups=wgs),
               ops.monarch_matmul, (x, w1, w2), g, 1e-2, ("dx", "dw1", "dw2"))
  assert len(races) == 5 and not any(races)  # forward twice (check, grad)
  assert mg.warpgroups_fit(s1, s2, 2) == (s1[2] == 64)
  assert mdw._fit_wgs(s1[2], s2[1], s1[1] // s2[0], 2, 2) == 2  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="warpgroups"):
    mg.monarch_matmul_mgpu(x, w1, w2, warpgroups=3)


def test_weight_gradients_one_buffer_and_chunks(monkeypatch):
  """256-wide blocks with q/l = 64 leave room for one pair of token tiles
  (the next tile loads after the wgmmas), and with 8 SMs each of the four
  block pairs splits its four tiles into two chunks summed by XLA."""
  monkeypatch.setattr(mg, "SMS", 8)
  s1, s2 = (2, 128, 256), (2, 256, 128)
  assert mdw._slots(*mdw._problems(s1, s2)[0], 2) == 1  # pylint: disable=protected-access
  assert mg._chunks(4, 4) == 2  # pylint: disable=protected-access
  x, w1, w2, g = _inputs(256, s1, s2)
  dw1, dw2 = mdw.weight_grads(x, mg._undo_p2(g, 2), w1, w2, True)  # pylint: disable=protected-access
  f32 = lambda v: v.astype(jnp.float32)
  _, vjp = jax.vjp(lambda u, v: ops.monarch_matmul(f32(x), u, v), f32(w1),
                   f32(w2))
  for got, want in zip((dw1, dw2), vjp(f32(g))):
    np.testing.assert_allclose(got, want,
                               atol=1e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("tokens,s1,s2", [
    (4096, (4, 128, 128), (4, 128, 128)),   # LLaMA-60M attention
    (4096, (4, 192, 192), (4, 192, 192)),   # LLaMA-130M / GPT-2 attention
])
@pytest.mark.parametrize("grad", [False, True])
def test_cross_lowering_for_h100(tokens, s1, s2, grad):
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
          for s in ((tokens, s1[0] * s1[2]), s1, s2)]
  text = cross_lower(lambda *a: mg.monarch_matmul_mgpu(
      *a, interpret=False, platform="cuda"), args, "cuda",
                     (0, 1, 2) if grad else None)
  assert "mosaic_gpu" in text
  if grad:  # dw1, dw2 through Mosaic GPU too: no Triton kernel left
    assert text.count("mosaic_gpu") > 1 and "monarch_dw" not in text


def test_two_warpgroups_cross_lower_for_h100():
  """Forward and gradients with two consumer warpgroups (LLaMA-60M's
  attention: every kernel takes both), lowered for an H100."""
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
          for s in ((4096, 512), (4, 128, 128), (4, 128, 128))]
  text = cross_lower(lambda *a: mg.monarch_matmul_mgpu(
      *a, interpret=False, platform="cuda", warpgroups=2), args, "cuda",
                     (0, 1, 2))
  assert text.count("mosaic_gpu") > 1 and "monarch_dw" not in text


def test_default_warpgroups_as_measured():
  """Two warpgroups where the forward takes them (LLaMA-60M's attention:
  1.25x faster forward on an H200), one where only dw would (130M's), one
  when interpreted; the default call lowers exactly the explicit one."""
  s60, s130 = (4, 128, 128), (4, 192, 192)
  assert mg.default_warpgroups(s60, s60, 2, interpret=False) == 2
  assert mg.default_warpgroups(s130, s130, 2, interpret=False) == 1
  assert mg.default_warpgroups(s60, s60, 2, interpret=True) == 1
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
          for s in ((4096, 512), s60, s60)]
  # What each lowering's kernels compute (jaxlib 0.11 numbers every Mosaic
  # GPU lowering, so the texts themselves never match there).
  lower = lambda **kw: kernel_bodies(cross_lower(
      lambda *a: mg.monarch_matmul_mgpu(*a, interpret=False, platform="cuda",
                                        **kw), args, "cuda"))
  assert lower() == lower(warpgroups=2) != lower(warpgroups=1)


def test_supported_names_the_constraint():
  bf16 = jnp.bfloat16
  assert "16-bit" in mg.supported(64, (2, 64, 64), (2, 64, 64), jnp.float32)
  assert "tile" in mg.supported(96, (2, 64, 64), (2, 64, 64), bf16)
  assert "multiples of 16" in mg.supported(64, (4, 32, 16), (4, 48, 32), bf16)
  assert "shared memory" in mg.supported(64, (16, 256, 256), (16, 256, 256), bf16)
  # q/l = 64 allows the 128-byte swizzle: p and s must be multiples of 64.
  assert "multiples of 64" in mg.supported(64, (2, 128, 48), (2, 64, 128), bf16)
  assert "divisible" in mg.supported(64, (4, 6, 16), (4, 16, 6), bf16)
  assert mg.x_slots((4, 128, 128), (4, 128, 128), 2) == 2
  assert mg.x_slots((4, 192, 192), (4, 192, 192), 2) == 1
  # The forward fits, dx's transposed problem (512-wide outputs) does not.
  assert mg.supported(64, (4, 64, 512), (4, 16, 64), bf16) is None
  assert "256" in mg.supported(64, (4, 64, 512), (4, 16, 64), bf16,
                               transposed=True)
  # The weight gradients: p and s are wgmma's M; accumulator registers.
  assert mdw.supported(64, (4, 128, 128), (4, 128, 128), bf16) is None
  assert "multiples of 64" in mdw.supported(64, (4, 64, 32), (4, 48, 64), bf16)
  assert "registers" in mdw.supported(64, (1, 256, 256), (1, 256, 256), bf16)
  assert "shared memory" in mdw.supported(64, (2, 32, 1024), (2, 1024, 32),
                                          bf16)
  assert "16-bit" in mdw.supported(64, (4, 128, 128), (4, 128, 128),
                                   jnp.float32)
  assert mg.hardware_problem("cpu") is None  # the interpreter
  assert "NVIDIA" in mg.hardware_problem("tpu")
  with pytest.raises(ValueError, match="Mosaic GPU"):
    mg.monarch_matmul_mgpu(jnp.ones((64, 128), jnp.float32),
                           jnp.ones((2, 64, 64)), jnp.ones((2, 64, 64)))


@pytest.mark.parametrize("n,b,mosaic", [(768, 192, True), (512, 128, False)])
def test_pallas_on_hopper_prefers_mosaic_gpu_to_padded_triton(
    monkeypatch, n, b, mosaic):
  """impl="pallas" on a (faked) Hopper GPU: 192-wide blocks, which Triton
  pads to 256, go through Mosaic GPU (forward, dx, dU, dB); 128-wide ones
  stay with Triton (forward, dx, dw). The CPU interpreter keeps Triton."""
  from structmat.kernels import dispatch  # pylint: disable=import-outside-toplevel
  x, w, _, _ = _inputs(4096, (4, b, b), (4, b, b))
  # A fresh function per trace: jax caches traces per function.
  jaxpr = lambda: str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(
      dispatch.monarch(x, w, w, None, "pallas").astype(jnp.float32)),
                                              argnums=(0, 1)))(x, w))
  cpu = jaxpr()
  assert cpu.count("pallas_call") == 3 and "grid_names" not in cpu
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(mg, "hardware_problem", lambda platform: None)
  gpu = jaxpr()
  assert (gpu.count("grid_names"), gpu.count("pallas_call")) == (
      (4, 0) if mosaic else (0, 3))
  why = dispatch.mgpu_first((4, b, b), (4, b, b), "gpu")
  assert (why is not None) == mosaic and (not mosaic or "256" in why)


@pytest.mark.parametrize("preset,mosaic,triton,distinct", [
    # 768 = 4 x 192 attention: Mosaic GPU (forward and dx are one module,
    # dU and dB another); MLPs 768 <-> 2048: Triton, in chunks.
    ("llama_130m", 4, 6, (2, 6)),
    ("llama_60m", 0, 9, (0, 9)),   # 512 = 4 x 128 attention: Triton
])
def test_pallas_train_step_cross_lowers_for_hopper(preset, mosaic, triton,
                                                   distinct):
  """The whole train step of a preset's Monarch model (two layers) with
  impl="pallas", as a Hopper GPU would trace it, lowers for an abstract H100:
  the four attention projections take four Mosaic GPU kernels (forward, dx,
  dU, dB) where Triton would pad, else three Triton ones, and the MLP
  projections three Triton kernels each (in chunks). Each product is lowered
  once per shape (``shared_trace``), whatever the depth and the sites: before,
  every site lowered its own kernels, and each backward's kernels carried
  its site's source lines (4 distinct Mosaic GPU dx modules for q, k, v, o)."""
  found = preset_step_kernels(preset, "cuda", n_layers=2)
  count = lambda what: tuple(found[what].get(k, 0)
                             for k in ("mosaic_gpu", "triton"))
  assert count("calls") == (mosaic, triton), found
  assert count("distinct") == distinct, found
  assert set(found["calls"]) <= {"mosaic_gpu", "triton"}, found


def test_targeting_chooses_for_the_abstract_device():
  """kernels.target: the platform kernels are chosen for is the host's
  backend, or inside ``targeting`` (which ``cross_lower`` enters) the
  abstract device's, whose Hopper compute capability Mosaic GPU assumes."""
  from structmat.kernels import target  # pylint: disable=import-outside-toplevel
  assert target.platform() == jax.default_backend() and not target.abstract()
  assert "compute capability" in mg.hardware_problem("gpu")  # this CPU host
  with target.targeting("cuda"):
    assert target.platform() == "gpu" and target.abstract()
    assert mg.hardware_problem("gpu") is None
    with target.targeting("tpu"):
      assert target.platform() == "tpu"
    assert target.platform() == "gpu"
  assert target.platform() == jax.default_backend() and not target.abstract()
