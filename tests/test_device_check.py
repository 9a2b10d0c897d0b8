"""tools/device_check.sh, the prepared GPU check: its kernel-numerics step
runs (tiny, interpreted) on the CPU, so a renamed or re-signed kernel API
breaks here rather than in a scarce GPU session."""
import os
import subprocess
import sys


def test_kernel_numerics_step_runs_quick(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, QUICK="1", STEPS="2", OUT=str(tmp_path),
             PYTHON=sys.executable)
  p = subprocess.run(["bash", "tools/device_check.sh"], cwd=root, env=env,
                     capture_output=True, text=True, timeout=600)
  out = p.stdout + p.stderr
  assert p.returncode == 0, out[-3000:]
  lines = [l for l in out.splitlines() if "value, grads" in l or "ERROR" in l]
  kinds = {l.split("]")[1].split()[0] for l in lines}
  assert kinds == {"monarch", "blockdiag", "sltrain"}, out[-3000:]
  assert len(lines) == 16 and all(l.endswith("OK") for l in lines), (
      "\n".join(lines))
