"""LLaMA model: shapes and parameter counts per preset and structure (no allocation)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat.layers import LINEARS
from structmat.models import Llama, llama_config
from structmat.models.llama import SITES


def count(cfg, length=8):
  shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0),
                          jnp.ones((1, length), jnp.int32))
  return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(nn.unbox(shapes["params"])))


@pytest.mark.parametrize("linear,expected", [
    ("dense", 58.1e6), ("lowrank", 42.8e6), ("sltrain", 43.5e6)])
def test_60m_counts_match_official(linear, expected):
  n = count(llama_config("llama_60m", linear))
  assert round(n / 1e6, 1) == round(expected / 1e6, 1), n


@pytest.mark.parametrize("preset,full,lowrank,sltrain", [
    ("llama_130m", 134.1e6, 94.0e6, 96.5e6),
    ("llama_350m", 368.0e6, 185.2e6, 194.3e6),
    ("llama_1b", 1339.1e6, 609.3e6, 645.5e6)])
def test_larger_presets_match_official(preset, full, lowrank, sltrain):
  for linear, expected in (("dense", full), ("lowrank", lowrank),
                           ("sltrain", sltrain)):
    n = count(llama_config(preset, linear))
    assert abs(n - expected) / expected < 2e-3, (preset, linear, n)


@pytest.mark.parametrize("linear", sorted(LINEARS))
@pytest.mark.parametrize("preset", ["llama_tiny", "llama_60m", "llama_7b"])
def test_every_family_builds(preset, linear):
  # Two blocks at the preset's widths: every per-layer shape is checked, and
  # tracing 32 identical 7B blocks abstractly would only cost time.
  cfg = llama_config(preset, linear, n_layers=2,
                     vocab_size=256 if preset == "llama_tiny" else 32000)
  out = jax.eval_shape(lambda: Llama(cfg).init_with_output(
      jax.random.key(0), jnp.ones((2, 8), jnp.int32))[0])
  assert out.shape == (2, 8, cfg.vocab_size)
  if linear not in ("dense", "nola", "lora"):  # adapters add to a dense base
    assert count(cfg) < count(llama_config(preset, "dense", n_layers=2,
                                           vocab_size=cfg.vocab_size))


def test_overrides_and_grouped_kv():
  cfg = llama_config("llama_tiny", "monarch", vocab_size=64, n_kv_heads=2,
                     overrides=tuple((s, "dense", ()) for s in SITES[:4]))
  p = nn.unbox(jax.eval_shape(Llama(cfg).init, jax.random.key(0),
                              jnp.ones((1, 4), jnp.int32))["params"])
  attn, mlp = p["layer_0"]["attn"], p["layer_0"]["mlp"]
  assert set(attn["q"]) == {"kernel"} and attn["k"]["kernel"].shape == (64, 32)
  assert set(mlp["up"]) == {"w1", "w2"}


def test_forward_is_causal():
  cfg = llama_config("llama_tiny", "monarch", vocab_size=64)
  model = Llama(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
  v = model.init(jax.random.key(1), tokens)
  a = model.apply(v, tokens)
  b = model.apply(v, tokens.at[:, 7:].set(3))
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="model="):
    llama_config("llama_3m")
  with pytest.raises(ValueError, match="n_kv_heads"):
    cfg = llama_config("llama_tiny", vocab_size=64, n_kv_heads=3)
    jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_attention_impls_agree(heads, kv_heads):
  from structmat.models.llama import attend
  k = jax.random.split(jax.random.key(heads + kv_heads), 3)
  q = jax.random.normal(k[0], (2, 9, heads, 8))
  kk = jax.random.normal(k[1], (2, 9, kv_heads, 8))
  v = jax.random.normal(k[2], (2, 9, kv_heads, 8))
  ref = attend(q, kk, v, "naive")
  np.testing.assert_allclose(attend(q, kk, v, "xla"), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(attend(q, kk, v, "auto"), ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="attention"):
    attend(q, kk, v, "flash")


@pytest.mark.parametrize("preset,linear,impl", [
    ("llama_tiny", "monarch", "xla"), ("llama_tiny", "sltrain", "pallas"),
    ("gpt2_tiny", "dense", "xla")])
def test_remat_keeps_loss_and_gradients(preset, linear, impl):
  """config.remat "full" / "dots" / "linears" recompute blocks in the backward (a
  checkpoint in the gradient's jaxpr) and change nothing else: the same
  parameter paths, loss and gradients as "none" (LLaMA with a Compacter
  adapter, whose PHM rule is shared from outside the rematerialized
  blocks; SLTrain's kernels, interpreted, run again in the backward)."""
  from structmat.models.family import build_model, preset_config  # pylint: disable=import-outside-toplevel
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, 64)
  kw = (dict(adapters=(("after", "mlp"), ("reduction_factor", 4)))
        if preset.startswith("llama") else {})
  got = {}
  for remat in ("none", "full", "dots", "linears"):
    model = build_model(preset_config(preset, linear, vocab_size=64,
                                      max_len=32, remat=remat, impl=impl,
                                      **kw))
    v = model.init(jax.random.key(1), tokens[:1])
    loss = lambda p: jnp.mean(  # noqa: E731
        jax.nn.log_softmax(model.apply({**v, "params": p}, tokens))[..., 3])
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(v["params"]))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none")
    got[remat] = jax.jit(jax.value_and_grad(loss))(v["params"])
  ref = got.pop("none")
  for remat, out in got.items():
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=remat)


def test_remat_linears_keeps_the_structured_products():
  """remat="linears" keeps every linear layer's output, so the backward
  runs no layer's forward again: as many Monarch forward kernels in the
  gradient as without remat, fewer than under "full" or "dots" (which
  recompute the batched products)."""
  import re  # pylint: disable=import-outside-toplevel
  from structmat.models.family import build_model, preset_config  # pylint: disable=import-outside-toplevel
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, 64)
  calls = {}
  for remat in ("none", "full", "dots", "linears"):
    model = build_model(preset_config("llama_tiny", "monarch", vocab_size=64,
                                      max_len=32, remat=remat,
                                      impl="pallas"))
    v = model.init(jax.random.key(1), tokens[:1])
    loss = lambda p: jnp.sum(model.apply({**v, "params": p}, tokens))  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(v["params"]))
    calls[remat] = len(re.findall(r"name=monarch_fwd\b", jaxpr))
  assert calls["none"] > 0
  assert calls["linears"] == calls["none"] < calls["full"] == calls["dots"]


def test_remat_names_the_field():
  with pytest.raises(ValueError, match="remat='blocks'.*'full'"):
    cfg = llama_config("llama_tiny", vocab_size=64, remat="blocks")
    jax.eval_shape(Llama(cfg).init, jax.random.key(0),
                   jnp.ones((1, 4), jnp.int32))
