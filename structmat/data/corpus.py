"""The embedded default corpus: the Python standard library's source files.

Found at run time on every machine (``sysconfig``'s stdlib path), without test
directories; each file is one document. The split is a deterministic function
of the file's path relative to the stdlib root (crc32), so every machine with
the same Python version gets the same split, and the corpus needs no download.
"""
import os
import sysconfig
import zlib

import tensorflow_datasets as tfds

VALIDATION_PERCENT = 3
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages",
              "dist-packages", "lib2to3"}


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
  """Sorted paths (relative to root) of the stdlib's .py files, tests excluded."""
  root = root or stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _SKIP_DIRS and not d.startswith("test"))
    for name in filenames:
      if name.endswith(".py") and not name.startswith("test_"):
        out.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(out)


def split_of(relpath: str) -> str:
  return ("validation" if zlib.crc32(relpath.encode()) % 100 < VALIDATION_PERCENT
          else "train")


class StructmatStdlib(tfds.core.GeneratorBasedBuilder):
  """tfds builder ``structmat_stdlib``: {"text", "path"} per stdlib source file."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Python stdlib sources, tests excluded."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    files = stdlib_files()
    return {split: self._generate_examples([f for f in files
                                            if split_of(f) == split])
            for split in ("train", "validation")}

  def _generate_examples(self, files):
    root = stdlib_root()
    for rel in files:
      with open(os.path.join(root, rel), encoding="utf-8",
                errors="replace") as f:
        text = f.read()
      if text.strip():
        yield rel, {"text": text, "path": rel}
