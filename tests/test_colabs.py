"""Every notebook in colabs/ runs top to bottom (small settings); a cell error fails."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  # TMPDIR: notebooks make their work folders with tempfile (Colab's /tmp);
  # here they go under the test's folder, which pytest cleans.
  env = dict(os.environ, STRUCTMAT_NOTEBOOK_SMALL="1", MPLBACKEND="Agg",
             STRUCTMAT_NOTEBOOK_OUT=str(tmp_path), TMPDIR=str(tmp_path))
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "run_notebook.py"), path],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  # Colab-first: the first code cell installs structmat from the repository.
  import json
  with open(path) as f:
    first = next(c for c in json.load(f)["cells"] if c["cell_type"] == "code")
  assert "pip" in "".join(first["source"])
