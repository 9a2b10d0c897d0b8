"""Offline downstream tasks derived from the embedded corpus.

Both are built at run time from the standard library, like the pretraining
corpus, and split by file path (crc32) so no file is in both splits:

  stdlib_docs   causal-LM domain shift: the English prose of each source file
                (module, class and function docstrings and comments) without
                its code. The base model saw this text only interleaved with
                code.
  stdlib_topic  sentence classification: 400-character windows of code from
                two package families, label 0 = email (text/mail handling),
                1 = asyncio (concurrency); the classes are balanced by
                subsampling the larger one. Features {"sentence", "label"}, as
                GLUE's single-sentence tasks.
"""
import ast
import io
import os
import random
import tokenize
import zlib

import tensorflow_datasets as tfds

from structmat.data.corpus import split_of, stdlib_files, stdlib_root

TOPICS = ("email/", "asyncio/")
TOPIC_VALIDATION_PERCENT = 20   # a few files per class need a larger share
WINDOW = 400


def prose_of(source: str) -> str:
  """Docstrings and comments of a Python source, in file order."""
  parts = []
  try:
    tree = ast.parse(source)
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                           ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
          parts.append((getattr(node, "lineno", 0), doc))
  except (SyntaxError, ValueError):
    pass
  try:
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
      if tok.type == tokenize.COMMENT and len(tok.string) > 2:
        parts.append((tok.start[0], tok.string.lstrip("#").strip()))
  except (tokenize.TokenError, IndentationError, SyntaxError):
    pass
  return "\n".join(text for _, text in sorted(parts, key=lambda p: p[0]))


def _read(rel: str) -> str:
  with open(os.path.join(stdlib_root(), rel), encoding="utf-8",
            errors="replace") as f:
    return f.read()


def topic_split(relpath: str) -> str:
  return ("validation" if zlib.crc32(relpath.encode()) % 100
          < TOPIC_VALIDATION_PERCENT else "train")


class StructmatStdlibDocs(tfds.core.GeneratorBasedBuilder):
  """tfds builder ``structmat_stdlib_docs``: {"text", "path"}, prose only."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Docstrings and comments of the stdlib sources."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    files = stdlib_files()
    return {s: self._generate_examples([f for f in files if split_of(f) == s])
            for s in ("train", "validation")}

  def _generate_examples(self, files):
    for rel in files:
      text = prose_of(_read(rel))
      if len(text) > 200:
        yield rel, {"text": text, "path": rel}


class StructmatStdlibTopic(tfds.core.GeneratorBasedBuilder):
  """tfds builder ``structmat_stdlib_topic``: {"sentence", "label"}."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "email (0) vs asyncio (1) code windows."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["email", "asyncio"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    files = [f for f in stdlib_files() if f.startswith(TOPICS)]
    return {s: self._generate_examples([f for f in files if topic_split(f) == s])
            for s in ("train", "validation")}

  def _generate_examples(self, files):
    by_label = {0: [], 1: []}
    for rel in files:
      label = TOPICS.index(rel.split("/")[0] + "/")
      text = _read(rel)
      for i in range(0, len(text) - WINDOW + 1, WINDOW):
        chunk = text[i:i + WINDOW]
        if chunk.strip():
          by_label[label].append((f"{rel}:{i}", chunk))
    n = min(len(v) for v in by_label.values())
    rng = random.Random(0)  # deterministic balancing
    for label, rows in by_label.items():
      for key, chunk in sorted(rng.sample(rows, n)):
        yield key, {"sentence": chunk, "label": label}
