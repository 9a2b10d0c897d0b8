"""The two-pass Monarch's weight gradients as token-reduction kernels
(``monarch_two_pass_dw``): interpret mode against XLA, tiles, cross-lowering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import ops
from structmat.kernels import monarch_two_pass as m2
from structmat.kernels import monarch_two_pass_dw as dwk
from structmat.kernels.lowering import cross_lower
from tests.helpers import check_kernel, poison_pallas_outputs
from tests.test_kernel_monarch_two_pass import CASES   # the two-pass's own
from tests.test_kernels import _monarch_inputs


@pytest.mark.parametrize("tokens,bt,s1,s2,dtype,tol", CASES)
def test_two_pass_with_dw_kernels_matches_reference(tokens, bt, s1, s2, dtype,
                                                    tol, monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)  # unwritten outputs stay NaN
  x, w1, w2, g = _monarch_inputs(tokens + sum(s1) + 7, tokens, s1, s2, dtype)
  ker = lambda x, w1, w2: m2.monarch_matmul_two_pass(
      x, w1, w2, block_tokens=bt, interpret=True, dw_kernel=True)
  check_kernel(ker, ops.monarch_matmul, (x, w1, w2), g, tol,
               ("dx", "dw1", "dw2"))
  assert set(poisoned) == {"monarch2_fwd", "monarch2_dx", "monarch2_dw1",
                           "monarch2_dw2"}


# (tokens, A, C, M, g): what each exercises.
SUMS = [
    (64, 3, 40, 4, 16),     # c padded to a 64-wide chunk
    (128, 2, 344, 4, 32),   # c in three 128-wide chunks: the last masked
    (64, 2, 48, 8, 5),      # g padded to 16, masked
    (64, 2, 32, 16, 128),   # m in chunks (16 * 128 * 16 > ACC_ELEMENTS)
    (512, 1, 16, 2, 16),    # several token chunks, summed by XLA
]


@pytest.mark.parametrize("tokens,a,c,m,g", SUMS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5),
                                       (jnp.bfloat16, 1e-2)])
def test_token_sum_matches_einsum(tokens, a, c, m, g, dtype, tol, monkeypatch):
  poisoned = poison_pallas_outputs(monkeypatch)
  ku, kv = jax.random.split(jax.random.key(tokens + a * c + m * g))
  u = jax.random.normal(ku, (tokens, a, c)).astype(dtype)
  v = jax.random.normal(kv, (tokens, m, a, g)).astype(dtype)
  tiles = dwk.plan(tokens, a, c, m, g, dtype.dtype.itemsize, "cpu")
  got = dwk.token_sum(u, v, tiles, True, "cpu", "sum")
  ref = np.einsum("tac,tmag->acmg", np.asarray(u, np.float64),
                  np.asarray(v, np.float64))
  assert poisoned[0] == "sum" and got.shape == ref.shape
  err = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
  assert err < tol, err
  # Padding reads as zeros (interpret mode would read NaN past the array,
  # and the next block's data past g): masked, as a GPU needs.
  raw = np.asarray(dwk.padded_sum(u, v, tiles, True, "cpu", "sum"))
  assert raw.shape[1] % tiles.cc == 0 and raw.shape[3] == tiles.gg
  assert not raw[:, c:].any() and not raw[..., g:].any()
  if g == 128:
    assert tiles.mc < m
  if tokens == 512:
    assert tiles.chunks > 1


def test_plan_tiles():
  """At the issue's shape (n=4096 in 16 blocks): 64-row chunks of s or p
  against all 16 (k or l) x 16 (g) columns, 64 KB accumulators, 64-token
  steps, four token chunks (256 programs: two per SM); wider g takes fewer
  m at once; shapes the kernel cannot take give None (XLA's contraction
  runs)."""
  t = dwk.plan(16384, 16, 256, 16, 16, 2, "cuda")
  assert t == dwk.Plan(cc=64, mc=16, gg=16, bt=64, chunks=4)
  assert t.cc * t.mc * t.gg == dwk.ACC_ELEMENTS
  assert dwk.smem_estimate(t.bt, t.cc, t.mc, t.gg, 2) <= 224 * 1024
  wide = dwk.plan(16384, 4, 1024, 4, 256, 4, "cuda")   # 4096 in 4, float32
  assert wide.mc * wide.gg * wide.cc <= dwk.ACC_ELEMENTS and wide.cc >= 16
  assert dwk.smem_estimate(wide.bt, wide.cc, wide.mc, wide.gg, 4) <= (
      224 * 1024)
  assert dwk.plan(16384, 4, 64, 3, 16, 2, "cuda") is None     # m = 3
  assert dwk.plan(16384, 4, 64, 4, 2048, 2, "cuda") is None   # g too wide
  assert dwk.plan(40, 4, 64, 4, 16, 2, "cuda") is None        # tokens % 16


def test_dw_kernel_falls_back_where_it_cannot_tile(monkeypatch):
  """g = 2048 (2 blocks of q = 4096 over l = 2) is wider than an accumulator
  holds at 16 rows: both weight gradients stay XLA's, with the same
  values."""
  x, w1, w2, g = _monarch_inputs(5, 16, (2, 4096, 8), (2, 8, 4096))
  assert dwk.plan(16, 2, 8, 2, 2048, 4, "cpu") is None
  run = lambda **kw: jax.vjp(lambda *a: m2.monarch_matmul_two_pass(
      *a, block_tokens=16, interpret=True, **kw), x, w1, w2)[1](g)
  poisoned = poison_pallas_outputs(monkeypatch)
  for a, b in zip(run(dw_kernel=True), run()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert "monarch2_dw1" not in poisoned and "monarch2_dw2" not in poisoned


@pytest.mark.parametrize("tokens,s1,s2", [
    (256, (16, 256, 256), (16, 256, 256)),   # 4096 in 16 blocks
    (256, (4, 128, 128), (4, 344, 128)),      # LLaMA-60M gate: s chunked
    (256, (4, 1024, 1024), (4, 1024, 1024)),  # 4096 in 4: g = 256
])
def test_dw_kernels_cross_lower_for_hopper(tokens, s1, s2):
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
          for s in ((tokens, s1[0] * s1[2]), s1, s2)]
  bt = m2.fit_block_tokens(tokens, s1, s2, 2, "cuda")
  fn = lambda *a: m2.monarch_matmul_two_pass(
      *a, block_tokens=bt, interpret=False, platform="cuda", dw_kernel=True)
  text = cross_lower(fn, args, "cuda", (0, 1, 2))
  assert "monarch2_dw1" in text and "monarch2_dw2" in text


# What Triton 3.6 asked compiling both kernels for sm_90 offline (KiB;
# ``tools/triton_smem.py --kernel=monarch2 --dw_kernel``, 16384 tokens), the
# same for dw1 and dw2 at these shapes; every one compiled to wgmma, with no
# spills and every loop load pipelined. (n_in, n_out, nblocks, itemsize).
TRITON_ASKED = {
    (4096, 4096, 16, 2): 88, (4096, 4096, 16, 4): 88,
    (4096, 4096, 4, 2): 131, (4096, 4096, 4, 4): 131,
    (512, 1376, 4, 2): 80, (512, 1376, 4, 4): 160, (1376, 512, 4, 2): 80,
    (768, 768, 4, 2): 88, (8192, 8192, 16, 2): 140,
}


@pytest.mark.parametrize("shape,asked", TRITON_ASKED.items())
def test_smem_estimate_bounds_what_triton_asked(shape, asked):
  n_in, n_out, nb, itemsize = shape
  w1, w2, _, _ = ops.monarch_shapes(n_in, n_out, nb)
  k, l, p, s, g = w1[0], w2[0], w1[2], w2[1], w1[1] // w2[0]
  for dims in ((l, s, k, g), (k, p, l, g)):      # dw2, dw1
    t = dwk.plan(16384, *dims, itemsize, "cuda")
    est = dwk.smem_estimate(t.bt, t.cc, t.mc, t.gg, itemsize)
    assert asked * 1024 <= est <= 224 * 1024, (dims, t)


def test_impl_names_the_dw_kernels():
  """impl="pallas:two_pass_dw" (ops, layers, config) runs the two-pass
  kernel with these weight gradients; "pallas:two_pass" keeps XLA's."""
  from tests.test_kernels import _eqns, _kernel_name
  x, w1, w2, g = _monarch_inputs(4, 32, (4, 16, 16), (4, 16, 16))
  for impl, dw in (("pallas:two_pass_dw", {"monarch2_dw1", "monarch2_dw2"}),
                   ("pallas:two_pass", set())):
    fn = lambda x, w1, w2, impl=impl: ops.monarch_matmul(x, w1, w2, impl=impl)
    grad = lambda x, w1, w2, fn=fn: jax.vjp(fn, x, w1, w2)[1](g)
    names = {_kernel_name(e) for e in _eqns(grad, x, w1, w2)
             if e.primitive.name == "pallas_call"}
    assert names - {"monarch2_fwd"} == {"monarch2_dx"} | dw, (impl, names)
    _, vjp = jax.vjp(ops.monarch_matmul, x, w1, w2)
    for a, b in zip(grad(x, w1, w2), vjp(g)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,distinct", [("llama_60m", 10),
                                             ("llama_130m", 8)])
def test_dw_train_step_cross_lowers_for_hopper(preset, distinct):
  """A preset's train step (two layers) with impl="pallas:two_pass_dw"
  lowers for an abstract H100: per Monarch shape (attention, MLP in, MLP
  out) the forward, dx, dw1 and dw2 kernels, nothing else."""
  from tests.helpers import preset_step_kernels
  found = preset_step_kernels(preset, "cuda", n_layers=2,
                              impl="pallas:two_pass_dw")
  assert found == {"calls": {"triton": 12}, "distinct": {"triton": distinct}}
