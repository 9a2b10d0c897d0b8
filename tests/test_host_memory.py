"""retain_freed_memory: freed large host blocks come back without page faults."""
import subprocess
import sys

import pytest

_PROBE = r"""
import ctypes, ctypes.util, resource, sys
from structmat.utils.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def churn():  # malloc, touch and free 64 MiB, as XLA:CPU does with its temps
  # (not NumPy: it asks for transparent huge pages, which XLA does not)
  ptr = libc.malloc(64 * 2**20); ctypes.memset(ptr, 1, 64 * 2**20); libc.free(ptr)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  churn()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_block(retain: bool) -> tuple[str, float]:
  out = subprocess.run([sys.executable, "-c", _PROBE, "1" if retain else "0"],
                       capture_output=True, text=True, check=True, timeout=120)
  applied, faults = out.stdout.split()
  return applied, float(faults)


def test_retain_freed_memory_stops_page_faults():
  applied, faults_default = _faults_per_block(False)
  assert applied == "False"
  applied, faults_retained = _faults_per_block(True)
  if applied != "True":
    pytest.skip("C library is not glibc: nothing to retain")
  # 64 MiB is 16,384 pages of 4 KiB: the default allocator maps fresh pages
  # for every block, the retained heap reuses warm ones.
  assert faults_default > 8000, faults_default
  assert faults_retained < 100, faults_retained
