import os
import sys

# Tests import `tests.helpers` and the repository packages from the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tests compile hundreds of small XLA programs and run them on tiny
# shapes, so compiling dominates: LLVM at -O0 halves that (measured on the
# 2-core CI machine: the layer tests 92 -> 46 s, the launcher tests 71 ->
# 40 s). It changes code generation only, not what XLA computes. Set before
# jax is imported; launcher subprocesses inherit it, and the multi-device
# tests add their device count to it.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A session-wide tfds data dir: the embedded corpus is built once."""
  path = str(tmp_path_factory.mktemp("tfds"))
  os.environ["STRUCTMAT_DATA_DIR"] = path
  return path


@pytest.fixture
def monkeypatch(monkeypatch):  # pylint: disable=redefined-outer-name
  """pytest's monkeypatch, whose every patch also drops the kernel products'
  shared traces (``structmat.kernels.shared_trace``): a trace made before a
  patch would otherwise outlive it (a budget, a tile, a poisoned
  ``pallas_call``), and the test would check the unpatched kernel."""
  from structmat.kernels import shared_trace  # pylint: disable=import-outside-toplevel
  patch = monkeypatch.setattr

  def setattr_and_clear(*args, **kwargs):
    patch(*args, **kwargs)
    shared_trace.clear()

  monkeypatch.setattr = setattr_and_clear
  yield monkeypatch
  shared_trace.clear()  # the traces made under the patches (undone next)
