"""Every layer against its explicit dense materialization, plus counts and errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import layers as L
from structmat.layers import init as sm_init
from tests.helpers import assert_close, randomize

LINEAR_CASES = [
    ("dense", {}),
    ("lowrank", dict(rank=6)),
    ("monarch", dict(nblocks=4)),
    ("monarch", dict(nblocks=3)),
    ("btt", dict(nblocks=4, rank=2)),
    ("blockdiag", dict(nblocks=4)),
    ("blockdiag", dict(nblocks=3, shuffle=True)),
    ("phm", dict(n=4, rank=None, rule_init_std=1.0)),
    ("phm", dict(n=4, rank=2, rule_init_std=1.0)),
    ("sltrain", dict(rank=4, density=0.1, alpha=8.0)),
    ("nola", dict(rank=4, num_basis=16, variant="basis")),
    ("lora", dict(rank=3, alpha=6.0)),
]
SHAPES = [((5, 48), 40), ((2, 3, 40), 64), ((7, 64), 64)]


def _init(module, x, seed=0):
  variables = nn.unbox(module.init(jax.random.key(seed), x))
  variables = dict(variables)
  variables["params"] = randomize(variables["params"], seed + 1)
  return variables


def _dense_apply(module, variables, x):
  kernel = module.apply(variables, x.shape[-1], method="to_dense")
  bias = variables["params"].get("bias", 0.0)
  return x @ kernel + bias


@pytest.mark.parametrize("name,kw", LINEAR_CASES)
@pytest.mark.parametrize("x_shape,features", SHAPES)
def test_linear_matches_dense_reference(name, kw, x_shape, features):
  x = jax.random.normal(jax.random.key(len(x_shape)), x_shape)
  module = L.make_linear(name, features=features, **kw)
  variables = _init(module, x)
  y = module.apply(variables, x)
  assert y.shape == x_shape[:-1] + (features,)
  assert_close(y, _dense_apply(module, variables, x), rtol=1e-4, atol=1e-4)
  assert_close(jax.jit(module.apply)(variables, x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", LINEAR_CASES)
def test_linear_gradients_match_dense_reference(name, kw):
  x = jax.random.normal(jax.random.key(1), (6, 40))
  module = L.make_linear(name, features=48, **kw)
  variables = _init(module, x)
  other = {k: v for k, v in variables.items() if k != "params"}
  g = jax.random.normal(jax.random.key(2), (6, 48))

  def loss(params, x, fn):
    return jnp.sum(fn(module, {"params": params, **other}, x) * g)

  structured = lambda m, v, x: m.apply(v, x)
  ga = jax.grad(loss, argnums=(0, 1))(variables["params"], x, structured)
  gb = jax.grad(loss, argnums=(0, 1))(variables["params"], x, _dense_apply)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    assert_close(a, b, rtol=1e-4, atol=1e-4)
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(ga))


@pytest.mark.parametrize("name,kw", LINEAR_CASES)
@pytest.mark.parametrize("d_in,features", [(48, 40), (64, 128)])
def test_param_count_and_logical_axes(name, kw, d_in, features):
  module = L.make_linear(name, features=features, **kw)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, d_in)))
  boxed = jax.tree.leaves(shapes["params"],
                          is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  for b in boxed:
    assert len(b.names) == len(b.value.shape)
  count = sum(int(np.prod(b.value.shape)) for b in boxed)
  assert count == module.param_count(d_in)
  assert module.flops_per_token(d_in) > 0
  if name not in ("dense", "nola", "lora"):  # adapters: dense base + delta
    dense = L.make_linear("dense", features=features)
    assert module.param_count(d_in) < dense.param_count(d_in)


def test_monarch_counts_and_reference_layout():
  # fly: in_ext < out_ext -> w1 (nb, in_blk, in_blk), w2 (nb, out_blk, in_blk).
  m = L.Monarch(features=100, nblocks=4)
  p = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 30)))["params"]
  assert p["w1"].value.shape == (4, 8, 8) and p["w2"].value.shape == (4, 25, 8)
  p = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 130)))["params"]
  assert p["w1"].value.shape == (4, 25, 33) and p["w2"].value.shape == (4, 25, 25)
  # Reference init: U(+-1/sqrt(block fan-in)), bias U(+-1/sqrt(out)).
  big = nn.unbox(L.Monarch(features=256, nblocks=4).init(
      jax.random.key(0), jnp.ones((1, 256))))["params"]
  assert float(jnp.abs(big["w1"]).max()) <= 1 / 8 + 1e-6
  assert float(jnp.abs(big["w1"]).max()) > 0.9 / 8
  assert float(jnp.abs(big["bias"]).max()) <= 1 / 16 + 1e-6


def test_btt_rank1_square_is_monarch_sqrt_n():
  x = jax.random.normal(jax.random.key(0), (3, 64))
  btt = L.BTT(features=64, nblocks=8, rank=1)
  mon = L.Monarch(features=64, nblocks=8)
  vb = btt.init(jax.random.key(1), x)
  vm = mon.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, vb) == jax.tree.map(jnp.shape, vm)
  assert btt.param_count(64) == 2 * 64 * 8 + 64


def test_mup_init_std():
  m = L.Monarch(features=512, nblocks=4, init_scheme="mup")
  p = nn.unbox(m.init(jax.random.key(0), jnp.ones((1, 512))))["params"]
  for name in ("w1", "w2"):
    _, fan_out, fan_in = p[name].shape
    np.testing.assert_allclose(float(jnp.std(p[name])),
                               sm_init.mup_std(fan_in, fan_out), rtol=0.05)
  with pytest.raises(ValueError, match="init_scheme"):
    L.Dense(features=4, init_scheme="bogus").init(jax.random.key(0), jnp.ones((1, 4)))


def test_dtype_and_param_dtype():
  x = jnp.ones((2, 32), jnp.bfloat16)
  for name, kw in LINEAR_CASES:
    m = L.make_linear(name, features=32, dtype=jnp.bfloat16, **kw)
    v = m.init(jax.random.key(0), x)
    assert all(l.dtype in (jnp.float32, jnp.int32, jnp.uint32)
               for l in jax.tree.leaves(nn.unbox(v)))
    assert m.apply(v, x).dtype == jnp.bfloat16, name


@pytest.mark.parametrize("name,kw,match", [
    ("phm", dict(n=5), "n=5"),
    ("phm", dict(n=4, rank=50), "rank"),
    ("sltrain", dict(density=0.0), "density"),
    ("sltrain", dict(density=1.5), "density"),
    ("sltrain", dict(rank=100), "rank"),
    ("lowrank", dict(rank=100), "rank"),
    ("monarch", dict(nblocks=64), "nblocks"),
    ("btt", dict(nblocks=4, rank=40), "rank"),
])
def test_bad_arguments_name_the_field(name, kw, match):
  with pytest.raises(ValueError, match=match):
    L.make_linear(name, features=48, **kw).init(jax.random.key(0), jnp.ones((1, 32)))


def test_registry_errors():
  with pytest.raises(ValueError, match="known structure"):
    L.make_linear("butterfly", features=4)
  with pytest.raises(ValueError, match="nblocks"):
    L.make_linear("lowrank", features=4, nblocks=2)


class TwoSparse(nn.Module):
  order: tuple = ("a", "b")

  @nn.compact
  def __call__(self, x):
    out = {}
    for name in self.order:
      out[name] = L.SparsePlusLowRank(16, rank=2, density=0.2, name=name)(x)
    return out["a"] + out["b"]


def test_sltrain_support_is_per_layer_and_order_free():
  x = jnp.ones((1, 16))
  s1 = TwoSparse(("a", "b")).init(jax.random.key(0), x)["structure"]
  s2 = TwoSparse(("b", "a")).init(jax.random.key(0), x)["structure"]
  ia, ib = nn.unbox(s1)["a"]["indices"], nn.unbox(s1)["b"]["indices"]
  assert ia.dtype == jnp.int32 and ia.shape == (int(0.2 * 256),)
  assert not np.array_equal(ia, ib)
  assert np.array_equal(ia, nn.unbox(s2)["a"]["indices"])
  # Official init: lora_b = 0, so the layer starts as sparse + bias.
  p = nn.unbox(TwoSparse().init(jax.random.key(0), x))["params"]
  assert float(jnp.abs(p["a"]["lora_b"]).max()) == 0.0


class SharedRuleModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    rule = L.PHMRule(4, name="shared_rule")
    for i in range(3):
      x = L.CompacterAdapter(reduction_factor=32, rule=rule, name=f"adapter{i}")(x)
    return x


def test_compacter_counts_and_shared_rule():
  x = jax.random.normal(jax.random.key(0), (2, 768))
  p = nn.unbox(SharedRuleModel().init(jax.random.key(1), x))["params"]
  assert p["shared_rule"]["rule"].shape == (4, 4, 4)
  per_adapter = [sum(l.size for l in jax.tree.leaves(p[f"adapter{i}"]))
                 for i in range(3)]
  assert per_adapter == [2376] * 3
  assert L.CompacterAdapter(reduction_factor=32).param_count(768) == 2376
  assert sum(l.size for l in jax.tree.leaves(p)) == 3 * 2376 + 64
  # The rule is shared: its gradient collects contributions from every adapter.
  p = randomize(p, 3)
  g = jax.grad(lambda p: jnp.sum(SharedRuleModel().apply({"params": p}, x) ** 2))(p)
  assert float(jnp.abs(g["shared_rule"]["rule"]).max()) > 0


def test_compacter_adapter_matches_dense():
  x = jax.random.normal(jax.random.key(0), (3, 64))
  m = L.CompacterAdapter(reduction_factor=8, n=4)
  v = {"params": randomize(nn.unbox(m.init(jax.random.key(1), x))["params"], 2)}
  p = v["params"]
  h = x @ L.phm.PHMLinear(8).apply(
      {"params": {**p["down"], "rule": p["rule"]}}, 64, method="to_dense")
  h = nn.gelu(h + p["down"]["bias"], approximate=False)
  up = L.phm.PHMLinear(64).apply(
      {"params": {**p["up"], "rule": p["rule"]}}, 8, method="to_dense")
  assert_close(m.apply(v, x), x + h @ up + p["up"]["bias"], atol=1e-5)


def test_lora_adapter():
  x = jax.random.normal(jax.random.key(0), (4, 24))
  m = L.AdaptedLinear(16, adapter=L.LoRA(16, rank=4, alpha=8.0))
  v = nn.unbox(m.init(jax.random.key(1), x))
  assert float(jnp.abs(v["params"]["adapter"]["lora_b"]).max()) == 0.0
  v = {"params": randomize(v["params"], 5)}
  merged = m.apply(v, 24, method="to_dense")
  a = v["params"]["adapter"]
  ref = v["params"]["kernel"] + 2.0 * a["lora_a"] @ a["lora_b"]
  assert_close(merged, ref, atol=1e-5)
  assert_close(m.apply(v, x), x @ ref + v["params"]["bias"], atol=1e-5)
  assert L.LoRA(16, rank=4).param_count(24) == 4 * 40


@pytest.mark.parametrize("variant", ["offset", "basis"])
def test_nola_adapter(variant):
  x = jax.random.normal(jax.random.key(0), (4, 24))
  m = L.NOLA(16, rank=4, num_basis=(10, 6), variant=variant, chunk=4)
  v = nn.unbox(m.init(jax.random.key(1), x))
  assert set(v["params"]) == {"coef_a", "coef_b"}
  assert v["params"]["coef_a"].shape == (10,) and v["params"]["coef_b"].shape == (6,)
  delta0 = m.apply(v, x)
  if variant == "offset":
    assert float(jnp.abs(delta0).max()) == 0.0
  else:
    assert float(jnp.abs(delta0).max()) > 0.0
    np.testing.assert_allclose(v["params"]["coef_a"], 0.1)
  v = {"params": randomize(v["params"], 2), "structure": v["structure"]}
  # Independent reference: stacked bases from the same per-layer key.
  from structmat.ops import nola
  key = jax.random.wrap_key_data(v["structure"]["nola_key"])
  kd = [jax.random.key_data(jax.random.fold_in(key, i)) for i in range(3)]
  ba = nola.nola_bases_dense(kd[0], 10, (24, 4))
  bb = nola.nola_bases_dense(kd[1], 6, (4, 16))
  a = jnp.tensordot(v["params"]["coef_a"], ba, 1)
  b = jnp.tensordot(v["params"]["coef_b"], bb, 1)
  if variant == "offset":
    a = a + m.offset(kd[2], 24)
  ref = (a @ b) * m.scale()
  assert_close(m.apply(v, 24, method="to_dense"), ref, atol=1e-5)
  assert_close(m.apply(v, x), x @ ref, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(m.apply({"params": p, "structure": v["structure"]}, x) ** 2))(v["params"])
  gr = jax.grad(lambda p: jnp.sum((x @ ((m.offset(kd[2], 24) * (variant == "offset")
                                        + jnp.tensordot(p["coef_a"], ba, 1))
                                       @ jnp.tensordot(p["coef_b"], bb, 1))
                                   * m.scale()) ** 2))(v["params"])
  for k in ("coef_a", "coef_b"):
    assert_close(g[k], gr[k], rtol=1e-4, atol=1e-4)


def test_nola_keys_differ_per_layer_and_no_basis_in_params():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return (L.NOLA(8, rank=2, num_basis=16, name="q")(x)
              + L.NOLA(8, rank=2, num_basis=16, name="v")(x))
  v = Two().init(jax.random.key(0), jnp.ones((1, 32)))
  s = nn.unbox(v["structure"])
  assert not np.array_equal(s["q"]["nola_key"], s["v"]["nola_key"])
  assert max(l.size for l in jax.tree.leaves(nn.unbox(v["params"]))) == 16


def test_nola_gpt2_medium_count():
  # METHODS.md: GPT-2 M, rank 8, k = l = 512 on q and v: 49,152 parameters.
  m = L.NOLA(1024, rank=8, num_basis=512)
  assert 24 * 2 * m.param_count(1024) == 49152
