"""tools/device_check.sh, the prepared GPU check: its kernel-numerics step
and its benchmark steps run (tiny, interpreted) on the CPU, so a renamed or
re-signed kernel or benchmark API breaks here rather than in a scarce GPU
session."""
import json
import os
import subprocess
import sys


def _run_quick(steps: str, out_dir, **env_vars) -> str:
  """The script's tiny version of ``steps`` (PYTHON: this interpreter; more
  variables in ``env_vars``); its output after checking it exited
  cleanly."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, QUICK="1", STEPS=steps, OUT=str(out_dir),
             PYTHON=sys.executable, **env_vars)
  p = subprocess.run(["bash", "tools/device_check.sh"], cwd=root, env=env,
                     capture_output=True, text=True, timeout=600)
  out = p.stdout + p.stderr
  assert p.returncode == 0, out[-3000:]
  return out


def test_kernel_numerics_step_runs_quick(tmp_path):
  out = _run_quick("2", tmp_path)
  lines = [l for l in out.splitlines() if "value, grads" in l or "ERROR" in l]
  kinds = {l.split("]")[1].split()[0] for l in lines}
  assert kinds == {"monarch", "blockdiag", "sltrain"}, out[-3000:]
  assert len(lines) == 21 and all(l.endswith("OK") for l in lines), (
      "\n".join(lines))
  assert sum("monarch two-pass" in l for l in lines) == 5
  assert sum("monarch two-pass dwk" in l for l in lines) == 1


def test_benchmark_steps_run_quick(tmp_path):
  """Steps 3, 5, 6, 8 and 9 (kernel benchmark, layer-sized Monarch,
  impl=pallas against xla in training, SLTrain tiles, two-pass Monarch),
  tiny and interpreted: each writes
  its JSON with every row timed (bar the interpreted two-warpgroup row, which
  says why), and step 6 compares the losses and prints where its time
  went."""
  out = _run_quick("3 5 6 8 9", tmp_path)
  for sub in ("", "f32", "attention", "mlp", "mlp130", "sltrain", "two_pass",
              "two_pass_layers"):
    rows = json.load(open(tmp_path / sub / "benchmark_kernels.json"))["rows"]
    assert rows, sub
    for r in rows:
      if r["impl"] == "monarch mgpu 2wg":
        assert "interpreted" in r.get("error", "")
      else:
        assert r.get("error") is None and r["fwd_ms"] > 0, (sub, r)
  for run in ("xla", "pallas", "1block"):
    row, = json.load(open(tmp_path / f"pallas_llama_tiny_{run}.json"))["rows"]
    assert row["compile_s"] > 0 and len(row["losses"]) >= 2
    assert row["n_layers"] == (1 if run == "1block" else 2)
  assert "llama_tiny monarch: compiled in" in out
  assert "llama_tiny pallas vs xla step" in out, out[-3000:]


def test_training_step_takes_a_named_monarch_kernel(tmp_path):
  """Step 6 with S6_IMPLS times the named kernels (the two-pass Monarch)
  against impl=xla in training, and compares their losses."""
  out = _run_quick("6", tmp_path, S6_IMPLS="xla pallas:two_pass")
  run = json.load(open(tmp_path / "pallas_llama_tiny_pallas_two_pass.json"))
  assert run["meta"]["impl"] == "pallas:two_pass"
  assert len(run["rows"][0]["losses"]) >= 2
  assert not (tmp_path / "pallas_llama_tiny_1block.json").exists()
  assert "llama_tiny pallas:two_pass vs xla step" in out, out[-3000:]
