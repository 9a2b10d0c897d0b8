"""WeLore threshold search, checkpoint conversion, and the compress launcher."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat import compress
from structmat.compress import welore
from structmat.models import Llama, llama_config
from structmat.train.init_ckpt import load_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spectra(seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for i, (shape, decay) in enumerate([((64, 64), 0.5), ((64, 128), 0.9),
                                      ((128, 64), 0.99), ((32, 96), 0.0)]):
    n = min(shape)
    s = np.sort(rng.uniform(0.1, 1, n))[::-1] * np.exp(-decay * np.arange(n) / 4)
    out[f"m{i}"] = (shape, s)
  return out


def test_normalized_spectrum_and_plan():
  s = np.array([5.0, 3.0, 1.0])
  np.testing.assert_allclose(welore.normalized_spectrum(s), [1.0, 0.5, 0.0])
  p = welore.plan({"a": ((3, 4), s)}, tau=0.6, min_ratio=0.4999)[0]
  assert p.kept_rank == 1 and p.lrc  # 2 of 3 dropped
  p = welore.plan({"a": ((3, 4), s)}, tau=0.2, min_ratio=0.4999)[0]
  assert p.kept_rank == 2 and not p.lrc and p.params_after == 12


@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_find_tau_hits_target_and_is_minimal(target):
  spectra = _spectra()
  tau = welore.find_tau(spectra, target)
  assert welore.reduction(welore.plan(spectra, tau)) >= target
  assert welore.reduction(welore.plan(spectra, tau - 1e-6)) < target
  taus = np.linspace(0, 1, 50)
  reds = [welore.reduction(welore.plan(spectra, t)) for t in taus]
  assert np.all(np.diff(reds) >= -1e-12)  # monotone, so bisection is valid
  with pytest.raises(ValueError, match="reduction"):
    welore.find_tau(spectra, 1.5)


def _dense_model(seed=0):
  cfg = llama_config("llama_tiny", "dense", vocab_size=64)
  params = Llama(cfg).init(jax.random.key(seed), jnp.ones((1, 8), jnp.int32))["params"]
  import flax.linen as nn
  return cfg, nn.unbox(params)


def test_convert_welore_lrcs_are_truncated_svds():
  cfg, params = _dense_model()
  new, overrides, info = compress.convert(cfg, params, "welore", 0.3)
  assert info["reduction"] >= 0.3
  assert overrides and all(name == "lowrank" for _, name, _ in overrides)
  for site, _, kw in overrides:
    i, s = site.split(".")
    group = "attn" if s in ("q", "k", "v", "o") else "mlp"
    kernel = np.asarray(params[f"layer_{i}"][group][s]["kernel"])
    lr = new[f"layer_{i}"][group][s]
    rank = dict(kw)["rank"]
    assert lr["u"].shape == (kernel.shape[0], rank)
    sv = np.linalg.svd(kernel, compute_uv=False)
    err = np.linalg.norm(np.asarray(lr["u"] @ lr["v"]) - kernel)
    np.testing.assert_allclose(err, np.sqrt(np.sum(sv[rank:] ** 2)), rtol=1e-3)
  # The converted model runs with the per-layer overrides.
  new_cfg = llama_config("llama_tiny", "dense", vocab_size=64, overrides=overrides)
  logits = Llama(new_cfg).apply({"params": new}, jnp.ones((1, 8), jnp.int32))
  assert np.all(np.isfinite(logits))
  pattern = compress.lrc_trainable_pattern(overrides)
  assert "norm" in pattern


@pytest.mark.parametrize("method", ["lowrank", "monarch"])
def test_convert_uniform_methods(method):
  cfg, params = _dense_model()
  new, overrides, info = compress.convert(cfg, params, method, 0.5,
                                          pattern=r"0\.(up|down)", nblocks=4)
  assert [o[0] for o in overrides] == ["0.up", "0.down"]
  assert info["reduction"] > 0.3
  new_cfg = llama_config("llama_tiny", "dense", vocab_size=64, overrides=overrides)
  out = Llama(new_cfg).apply({"params": new}, jnp.ones((1, 8), jnp.int32))
  assert np.all(np.isfinite(out))
  with pytest.raises(ValueError, match="pattern"):
    compress.convert(cfg, params, method, 0.5, pattern="nothing")
  with pytest.raises(ValueError, match="method"):
    compress.convert(cfg, params, "svd", 0.5)


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_compress_launcher_then_lrc_only_training(tmp_path, data_dir):
  del data_dir
  src = tmp_path / "dense"
  p = _run("experiments.pretrain", "--config=configs/pretrain.py:tiny=1",
           f"--workdir={src}")
  assert p.returncode == 0, p.stdout + p.stderr
  out = tmp_path / "welore"
  p = _run("experiments.compress",
           "--config=configs/compress.py:method=welore,reduction=0.3",
           f"--init={src}", f"--workdir={out}")
  assert p.returncode == 0, p.stdout + p.stderr
  summary = json.load(open(out / "compress_summary.json"))
  assert summary["achieved_reduction_of_selected"] >= 0.3
  assert "LRCs" in open(out / "report.txt").read()
  assert json.load(open(out / "report.json"))
  ft = tmp_path / "ft"
  p = _run("experiments.pretrain", "--config=configs/pretrain.py:tiny=1",
           f"--init={out}", f"--workdir={ft}")
  assert p.returncode == 0, p.stdout + p.stderr
  assert "initialized from" in p.stdout and "trainable parameters:" in p.stdout
  final = json.load(open(ft / "summary.json"))
  assert 0 < final["trainable_parameters"] < final["parameters"]
  # Frozen (non-LRC) parameters are unchanged by training.
  before, _, meta = load_init(str(out))
  after, _, _ = load_init(str(ft))
  import re
  rx = re.compile(meta["trainable"])
  from structmat.train.partition import path_str
  flat_b = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(before)[0]}
  flat_a = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(after)[0]}
  assert flat_a.keys() == flat_b.keys()
  changed = {k for k in flat_a if not np.array_equal(flat_a[k], flat_b[k])}
  assert changed and all(rx.fullmatch(k) for k in changed)
  assert any(not rx.fullmatch(k) for k in flat_a)  # something stayed frozen


def test_study_config_subsets():
  from configs.studies import pretrain_methods
  c = pretrain_methods.get_config("tiny=1,runs=dense+galore")
  assert [r[0] for r in c.runs] == ["dense", "galore"]
  with pytest.raises(ValueError, match="include dense"):
    pretrain_methods.get_config("runs=galore")
  with pytest.raises(ValueError, match="unknown study argument"):
    pretrain_methods.get_config("steps=3")
