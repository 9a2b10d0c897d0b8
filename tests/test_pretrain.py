"""Pretraining launcher: every linear family trains, resume equivalence, errors."""
import functools
import json
import re
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from structmat.models import Llama
from structmat.train import densify, loop, steps
from structmat.train.state import create_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**fields):
  c = pretrain_config.get_config("tiny=1")
  for k, v in fields.items():
    target, key = c, k
    if "." in k:
      sub, key = k.split(".")
      target = c[sub]
    target[key] = v
  return c


def losses(workdir, key="train_loss"):
  """{step: value}, the last write of each step winning (resumed runs rewrite)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        out[row["step"]] = row[key]
  return out


@pytest.mark.parametrize("linear", ["dense", "lowrank", "monarch", "btt",
                                    "blockdiag", "phm", "sltrain"])
def test_every_family_trains(linear, tmp_path, data_dir):
  del data_dir
  c = tiny(linear=linear, log_every_steps=1, total_steps=6, lr=1e-2)
  summary = loop.train_and_evaluate(c, str(tmp_path))
  train = losses(str(tmp_path))
  assert sorted(train) == list(range(1, 7))
  assert all(np.isfinite(list(train.values())))
  assert np.mean([train[5], train[6]]) < train[1], train
  assert np.isfinite(summary["eval_loss"]) and summary["tokens_seen"] == 6 * 4 * 32
  # tokens/s from step 2 on: the first step (the compile) is timed apart.
  assert summary["first_step_s"] > 0 and summary["tokens_per_sec_this_run"] > 0
  for name in ("config.json", "summary.json", "metrics.jsonl"):
    assert os.path.exists(tmp_path / name)
  assert os.listdir(tmp_path / "tensorboard")


def test_galore_trains_and_resumes(tmp_path, data_dir):
  del data_dir
  c = tiny(optimizer="galore", log_every_steps=1, total_steps=8, lr=1e-2)
  c.galore.rank, c.galore.update_proj_gap = 4, 3
  loop.train_and_evaluate(c, str(tmp_path / "a"))
  train = losses(str(tmp_path / "a"))
  assert np.mean([train[7], train[8]]) < train[1], train
  args = ["--config=configs/pretrain.py:tiny=1,optimizer=galore,galore_rank=4",
          "--config.galore.update_proj_gap=3", "--config.checkpoint_every_steps=4"]
  rc, out = _run(tmp_path / "ref", *args)
  assert rc == 0, out
  for stop in ("5", "0"):  # crash mid-gap (checkpoint at 4, refreshes at 0, 3, 6)
    rc, out = _run(tmp_path / "crash", *args, f"--config.stop_after_steps={stop}")
  assert rc == 0, out
  ref, got = losses(tmp_path / "ref"), losses(tmp_path / "crash")
  np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref],
                             rtol=1e-6)


def _launch(workdir, *args):
  config = [a for a in args if a.startswith("--config=")]
  args = [a for a in args if not a.startswith("--config=")]
  cmd = [sys.executable, "-m", "experiments.pretrain",
         *(config or ["--config=configs/pretrain.py:tiny=1"]),
         f"--workdir={workdir}", "--config.log_every_steps=1", *args]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run(workdir, *args, timeout=300):
  proc = _launch(workdir, *args)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def test_resume_across_densify_matches_uninterrupted(tmp_path, data_dir):
  del data_dir
  args = ["--config=configs/pretrain.py:tiny=1,linear=monarch",
          "--config.densify_at=0.5", "--config.checkpoint_every_steps=2"]
  rc, out = _run(tmp_path / "ref", *args)
  assert rc == 0, out
  # A simulated crash after step 5 (checkpoint 4: before the switch) exits
  # with status 3; the restart resumes and matches the uninterrupted run.
  rc, out = _run(tmp_path / "crash", *args, "--config.stop_after_steps=5")
  assert rc == 3, out
  rc, out = _run(tmp_path / "crash", *args)
  assert rc == 0 and "resumed from step 4" in out, out
  ref, got = losses(tmp_path / "ref"), losses(tmp_path / "crash")
  np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref],
                             rtol=1e-6)


def test_resume_after_sigkill(tmp_path, data_dir):
  """A real kill mid-run: the restart resumes and every train and eval loss
  matches the uninterrupted run (this also covers resuming after a crash)."""
  del data_dir
  steps = ["--config.total_steps=40", "--config.checkpoint_every_steps=5",
           "--config.eval_every_steps=20"]
  rc, out = _run(tmp_path / "ref", *steps)
  assert rc == 0, out
  proc = _launch(tmp_path / "kill", *steps)
  ckpt = tmp_path / "kill" / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(ckpt) if d.isdigit()] if ckpt.exists() else []
    if done and max(int(d) for d in done) >= 10:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  rc, out = _run(tmp_path / "kill", *steps)
  assert rc == 0 and "resumed from step" in out, out
  ref, got = losses(tmp_path / "ref"), losses(tmp_path / "kill")
  assert sorted(got) == list(range(1, 41))
  np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref],
                             rtol=1e-6)
  ev_ref = losses(tmp_path / "ref", "eval_loss")
  ev = losses(tmp_path / "kill", "eval_loss")
  assert sorted(ev_ref) == [20, 40]
  np.testing.assert_allclose(ev[40], ev_ref[40], rtol=1e-6)


def test_dry_run_prints_total(tmp_path):
  rc, out = _run(tmp_path, "--dry_run")
  assert rc == 0, out
  last = [l for l in out.splitlines() if l.startswith("total parameters:")]
  assert last and int(last[-1].split(":")[1]) > 0
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.pretrain",
       "--config=configs/pretrain.py:model=llama_60m,linear=sltrain", "--dry_run"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert "total parameters: 43529832" in proc.stdout, proc.stdout + proc.stderr
  assert not os.listdir(tmp_path)


def test_cross_lower_preflight(capsys):
  """The train step of a config, lowered for an abstract H100 and TPU v5e as
  they would choose kernels (no accelerator, no data): SLTrain's kernels on
  both; a block-diagonal layer whose blocks the TPU kernel cannot take
  fails with the kernel's reason."""
  from structmat.train import preflight  # pylint: disable=import-outside-toplevel
  assert preflight.report(tiny(linear="sltrain", impl="pallas"),
                          ["cuda", "tpu"])
  out = capsys.readouterr().out
  assert "cuda: lowered in" in out and "triton 9 (6 distinct)" in out, out
  assert "tpu: lowered in" in out and "mosaic_tpu 9 (6 distinct)" in out, out
  r = preflight.lower_train_step(tiny(linear="dense", impl="pallas"), "cuda")
  assert r["calls"] == {} and r["module_mb"] > 0
  assert not preflight.report(tiny(linear="blockdiag", impl="pallas"),
                              ["tpu"])
  assert ("tpu: FAILS: impl='pallas': the block-diagonal kernel cannot run"
          in capsys.readouterr().out)


def test_cross_lower_flag(tmp_path):
  """--dry_run --cross_lower=...: exit status 1 when a platform fails;
  --cross_lower without --dry_run is a usage error."""
  args = ["--config=configs/pretrain.py:tiny=1,linear=blockdiag",
          "--config.impl=pallas"]
  rc, out = _run(tmp_path, *args, "--dry_run", "--cross_lower=tpu")
  assert rc == 1 and "total parameters:" in out and "tpu: FAILS" in out, out
  rc, out = _run(tmp_path, *args, "--cross_lower=tpu")
  assert rc != 0 and "go with --dry_run" in out, out
  assert not os.listdir(tmp_path)


_COMPILE_ON_DEVICES = """
import json
from configs import pretrain
from structmat.train import preflight
import jax
out = {}
for name, devices, mesh in (("data", jax.devices(), dict(data=-1)),
                            ("fsdp", jax.devices()[:2], dict(data=1, fsdp=-1))):
  c = pretrain.get_config("tiny=1,linear=monarch")
  c.impl = "pallas"
  c.mesh.update(mesh)
  out[name] = preflight.compile_step(c, devices)
print(json.dumps(out))
"""


def test_compile_step_on_given_devices():
  """``preflight.compile_step`` (what --tpu_topology runs on a TPU slice's
  chips) compiles the train loop's step on the devices it is given, the
  config's mesh over them, and reports per-device memory: on 4 fake CPU
  devices, data-parallel over all 4, then fsdp over the first 2, whose
  state arguments are sharded, so smaller per device. (libtpu's compile
  of the same for TPU chips is run by hand: WORKSPACE.)"""
  env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [
      os.environ.get("XLA_FLAGS", ""),
      "--xla_force_host_platform_device_count=4"])))
  p = subprocess.run([sys.executable, "-c", _COMPILE_ON_DEVICES], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  data, fsdp = r["data"], r["fsdp"]
  assert data["devices"] == 4 and data["mesh"] == dict(data=4, fsdp=1,
                                                       tensor=1), data
  assert fsdp["devices"] == 2 and fsdp["mesh"] == dict(data=1, fsdp=2,
                                                       tensor=1), fsdp
  for x in (data, fsdp):
    assert x["temp_gib"] > 0 and x["argument_gib"] > 0 and x["compile_s"] > 0
    assert x["total_gib"] == pytest.approx(
        x["argument_gib"] + x["temp_gib"] + x["output_gib"])
  # 0.77 here: the tiny model's odd-sized dims (vocab 259) stay replicated.
  assert fsdp["argument_gib"] < 0.85 * data["argument_gib"], (fsdp, data)


def test_tpu_topology_flag(tmp_path):
  """--tpu_topology: a name libtpu cannot give (or no libtpu, as in CI)
  is a usage error that names the flag and the fix; without --dry_run it
  is a usage error too."""
  args = ["--config=configs/pretrain.py:tiny=1,linear=monarch"]
  rc, out = _run(tmp_path, *args, "--dry_run", "--tpu_topology=v5e:3x3")
  assert rc != 0 and "--tpu_topology='v5e:3x3'" in out, out
  assert "pip install --no-deps --target" in out or "v5e:4x4" in out, out
  rc, out = _run(tmp_path, *args, "--tpu_topology=v5e:2x2")
  assert rc != 0 and "go with --dry_run" in out, out
  assert not os.listdir(tmp_path)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  del data_dir
  c = tiny(total_steps=30, lr=1e30, warmup_steps=1, grad_clip=0.0,
           checkpoint_every_steps=1, log_every_steps=100)
  with pytest.raises(loop.NonFiniteLoss, match=r"at step \d+") as err:
    loop.train_and_evaluate(c, str(tmp_path))
  bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  # Every checkpoint predates the failing step (its loss was checked first).
  assert saved and saved[-1] < bad_step


def test_config_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="config.warmup_steps"):
    loop.train_and_evaluate(tiny(warmup_steps=100), str(tmp_path))
  with pytest.raises(ValueError, match="compute_dtype"):
    loop.validate_config(tiny(compute_dtype="fp8"))
  with pytest.raises(ValueError, match="unknown config argument"):
    pretrain_config.get_config("modle=llama_60m")
  with pytest.raises(ValueError, match="model="):
    loop.dry_run(pretrain_config.get_config("model=llama_2m"))


def test_config_selects_structure_and_overrides():
  c = pretrain_config.get_config("model=llama_60m,linear=sltrain,rank=64,"
                                 "overrides=q=dense;up=lowrank:rank=32")
  cfg = loop.model_config(c, 32000)
  assert cfg.linear_for("k") == ("sltrain", {"alpha": 32.0, "density": 0.03,
                                             "rank": 64})
  assert cfg.linear_for("q") == ("dense", {})
  assert cfg.linear_for("up") == ("lowrank", {"rank": 32})
  c = pretrain_config.get_config("model=llama_60m,linear=sltrain,kernel_block=256")
  assert loop.model_config(c, 32000).linear_for("k")[1]["kernel_block"] == 256


def test_densify_preserves_function_and_moments():
  c = tiny(linear="monarch")
  cfg = loop.model_config(c, 259)
  model = Llama(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 259)
  tx = loop.make_optimizer(c)
  state = create_state(model, tx, 0, tokens)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   pad_id=0))
  state, _ = step(state, tokens)
  new_cfg, new_model, new_state = loop._densify(cfg, tx, state)  # pylint: disable=protected-access
  assert densify.monarch_sites(new_cfg) == []
  assert set(new_state.params["layer_0"]["mlp"]["up"]) == {"kernel"}
  np.testing.assert_allclose(
      new_model.apply({"params": new_state.params}, tokens),
      model.apply({"params": state.params}, tokens), atol=1e-4)
  # Moments of unchanged parameters (and the count) carry over; the new dense
  # kernels start from zero moments.
  adam_old, adam_new = state.opt_state[1][0], new_state.opt_state[1][0]
  assert int(adam_new.count) == int(adam_old.count) == 1
  np.testing.assert_array_equal(adam_new.mu["embed"]["embedding"],
                                adam_old.mu["embed"]["embedding"])
  assert float(jnp.abs(adam_old.mu["embed"]["embedding"]).max()) > 0
  assert float(jnp.abs(adam_new.mu["layer_0"]["mlp"]["up"]["kernel"]).max()) == 0


@pytest.mark.parametrize("linear,dtype,model_dims,tol", [
    ("monarch", "bfloat16", "", 1e-3),
    ("blockdiag", "float32", "", 1e-5),
    # The SLTrain kernel tiles features by 64: llama_tiny's 172-wide MLP
    # does not fit, so this run widens it to 128.
    ("sltrain", "bfloat16", '{"d_ff": 128}', 1e-3)])
def test_pallas_impl_trains_like_xla(linear, dtype, model_dims, tol, tmp_path,
                                     data_dir):
  """Issue 6, item 5 on the CPU: the launcher with impl=pallas (kernels in
  interpret mode, forward and custom VJPs) gives impl=xla's losses."""
  del data_dir
  runs = {}
  for impl in ("xla", "pallas"):
    c = tiny(linear=linear, impl=impl, compute_dtype=dtype, total_steps=4,
             warmup_steps=1, log_every_steps=1, lr=1e-2)
    if model_dims:
      c.model_dims = model_dims
    loop.train_and_evaluate(c, str(tmp_path / impl))
    runs[impl] = losses(str(tmp_path / impl))
  assert sorted(runs["pallas"]) == [1, 2, 3, 4]
  # bfloat16: 1e-3 (the runs differ by ~1e-4 here), tight enough that a
  # kernel gradient with the wrong sign shows by the third step.
  np.testing.assert_allclose([runs["pallas"][s] for s in (1, 2, 3, 4)],
                             [runs["xla"][s] for s in (1, 2, 3, 4)], rtol=tol)


def test_gpt2_presets(tmp_path, data_dir):
  """model=gpt2_*: the GPT-2 family from scratch (the Monarch paper's GPT-2
  experiments). gpt2_small with GPT-2's vocabulary has exactly Hugging Face
  GPT-2 small's 124,439,808 parameters; a tiny Monarch GPT-2 trains, and
  reverse sparsification (densify_at) switches it to dense mid-run."""
  del data_dir
  c = pretrain_config.get_config("model=gpt2_small")
  assert (c.family, c.seq_len, c.lr) == ("gpt2", 1024, 6e-4)
  with c.unlocked():
    c.data.vocab_size = 50257
  assert loop.dry_run(c) == 124_439_808
  # Monarch (4 blocks) on every linear: the paper's GPT-2-S/M counts (124M ->
  # 72M, 355M -> 165M) to rounding.
  for model, paper in (("gpt2_small", 72e6), ("gpt2_medium", 165e6)):
    m = pretrain_config.get_config(f"model={model},linear=monarch")
    with m.unlocked():
      m.data.vocab_size = 50257
    assert abs(loop.dry_run(m) / paper - 1) < 0.015, model
  with pytest.raises(ValueError, match="gpt2_small"):
    loop.model_config(pretrain_config.get_config("model=gpt2_2m"), 259)
  custom = pretrain_config.get_config("model=gpt2_small")
  with custom.unlocked():
    custom.model, custom.model_dims = "custom", '{"d_model": 64}'
  with pytest.raises(ValueError, match=r"model_dims.*missing \['d_ff'"):
    loop.model_config(custom, 259)
  c = pretrain_config.get_config("model=gpt2_tiny,tiny=1,linear=monarch")
  with c.unlocked():
    c.log_every_steps, c.total_steps, c.lr, c.densify_at = 1, 6, 1e-2, 0.5
  assert c.model == "gpt2_tiny" and c.data.tokenizer == "byte"
  summary = loop.train_and_evaluate(c, str(tmp_path))
  train = losses(str(tmp_path))
  assert sorted(train) == list(range(1, 7)), train
  assert np.mean([train[5], train[6]]) < train[1], train
  assert np.isfinite(summary["eval_loss"])
  kinds = {r["kind"] for r in summary["parameters_by_kind"]}
  assert kinds == {"embeddings", "norms", "attention/kernel", "attention/bias",
                   "mlp/kernel", "mlp/bias"}, kinds   # densified: no w1, w2
