"""Execute a notebook's code cells in order, in one namespace; exit 1 on a cell error.

  python tests/run_notebook.py colabs/layers_tour.ipynb

Used by tests/test_colabs.py with STRUCTMAT_NOTEBOOK_SMALL=1 (notebooks shrink
their settings) and MPLBACKEND=Agg. IPython magics are not supported: notebook
cells stay plain Python so that this harness and Colab run the same code.
"""
import json
import sys
import traceback


def main(path: str) -> int:
  with open(path) as f:
    nb = json.load(f)
  namespace = {"__name__": "__main__"}
  cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  for i, cell in enumerate(cells):
    source = "".join(cell["source"])
    print(f"--- cell {i} ---", flush=True)
    try:
      exec(compile(source, f"{path}:cell{i}", "exec"), namespace)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      print(f"FAILED: {path} code cell {i}", file=sys.stderr)
      return 1
  print(f"OK: {path} ({len(cells)} code cells)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
