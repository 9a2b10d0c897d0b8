"""Build colabs/*.ipynb from the percent-format sources in colabs/src/.

  python colabs/src/build.py

Sources are plain Python with `# %%` (code) and `# %% [markdown]` cells, so
diffs stay readable; the notebooks are what Colab opens and the tests run.
"""
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def cells_of(text: str):
  cells, kind, lines = [], None, []

  def flush():
    if kind is None:
      return
    body = "\n".join(lines).strip("\n")
    if kind == "markdown":
      body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#")
                       for l in body.splitlines())
    src = [l + "\n" for l in body.splitlines()]
    if src:
      src[-1] = src[-1].rstrip("\n")
    cell = {"cell_type": kind, "metadata": {}, "source": src}
    if kind == "code":
      cell.update(execution_count=None, outputs=[])
    cells.append(cell)

  for line in text.splitlines():
    if line.startswith("# %%"):
      flush()
      kind, lines = ("markdown" if "[markdown]" in line else "code"), []
    else:
      lines.append(line)
  flush()
  return cells


def main():
  for src in sorted(glob.glob(os.path.join(HERE, "*.py"))):
    if os.path.basename(src) == "build.py":
      continue
    with open(src) as f:
      nb = {"cells": cells_of(f.read()), "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3",
                                        "display_name": "Python 3"},
                         "language_info": {"name": "python"},
                         "colab": {"provenance": []}}}
    out = os.path.join(os.path.dirname(HERE),
                       os.path.basename(src)[:-3] + ".ipynb")
    with open(out, "w") as f:
      json.dump(nb, f, indent=1)
      f.write("\n")
    print("wrote", out)


if __name__ == "__main__":
  main()
