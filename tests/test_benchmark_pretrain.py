"""experiments.benchmark_pretrain: rows, and nothing measured lost on a failure."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, linears, *flags):
  out = tmp_path / "bench.json"
  p = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_pretrain",
       "--presets=llama_tiny", f"--linears={linears}", "--batch_size=2",
       "--seq_len=16", "--vocab_size=256", "--repeats=2", f"--output={out}",
       *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  rows = json.load(open(out))["rows"] if out.exists() else None
  return p, rows


def test_rows_and_losses(tmp_path):
  p, rows = _run(tmp_path, "dense,monarch")
  assert p.returncode == 0, p.stderr[-3000:]
  assert [r["linear"] for r in rows] == ["dense", "monarch"]
  for r in rows:
    assert r["tokens_per_sec"] > 0 and r["params"] > 0
    assert len(r["losses"]) >= 2 and all(v > 0 for v in r["losses"])
    # Where the time went before the first timed step, row by row, also in
    # the log as each part ends (a run a timeout stops shows which it was).
    for part in ("lowered", "compiled", "first step"):
      assert f"llama_tiny {r['linear']}: {part} in " in p.stdout, p.stdout
    assert min(r["lower_s"], r["compile_s"], r["first_step_s"]) > 0
    # XLA's layers on the CPU: no kernel calls in the module.
    assert r["module_mb"] > 0 and r["kernel_calls"] == {}, r
  assert rows[0]["step_vs_dense"] == 1.0
  assert rows[1]["params"] < rows[0]["params"]


def test_rows_written_before_a_later_row_fails(tmp_path):
  """A run stopped part-way (a device timeout, a bad row) keeps its rows."""
  p, rows = _run(tmp_path, "dense,no_such_linear")
  assert p.returncode != 0
  assert [r["linear"] for r in rows] == ["dense"]


def test_sltrain_kernel_block_same_losses(tmp_path):
  """--kernel_block reaches the SLTrain layers: the same steps (same init and
  batches) give the same losses with W built whole or in blocks."""
  p, whole = _run(tmp_path, "sltrain")
  assert p.returncode == 0, p.stderr[-3000:]
  p, blocked = _run(tmp_path, "sltrain", "--kernel_block=8")
  assert p.returncode == 0, p.stderr[-3000:]
  assert (whole[0]["kernel_block"], blocked[0]["kernel_block"]) == (0, 8)
  for u, v in zip(blocked[0]["losses"], whole[0]["losses"]):
    assert abs(u - v) <= 1e-5 * abs(v), (u, v)


def test_n_layers_override(tmp_path):
  """--n_layers builds fewer blocks than the preset (a one-block model prices
  each block's lowering and compile); the row says how many it had."""
  p, rows = _run(tmp_path, "monarch", "--n_layers=1")
  assert p.returncode == 0, p.stderr[-3000:]
  p, full = _run(tmp_path, "monarch")
  assert (rows[0]["n_layers"], full[0]["n_layers"]) == (1, 2)
  assert rows[0]["params"] < full[0]["params"]


def test_remat_same_losses_less_memory(tmp_path):
  """--remat reaches the blocks: the same steps give the same losses, and
  XLA's plan for the step (CPU) holds less with recomputation."""
  more = ("--batch_size=8", "--seq_len=32")   # activations worth saving
  p, none = _run(tmp_path, "monarch", *more)
  assert p.returncode == 0, p.stderr[-3000:]
  p, full = _run(tmp_path, "monarch", "--remat=full", *more)
  assert p.returncode == 0, p.stderr[-3000:]
  assert (none[0]["remat"], full[0]["remat"]) == ("none", "full")
  for u, v in zip(full[0]["losses"], none[0]["losses"]):
    assert abs(u - v) <= 1e-5 * abs(v), (u, v)
  assert full[0]["step_memory_mb"] < none[0]["step_memory_mb"]
