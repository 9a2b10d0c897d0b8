"""Random-access text sources: the embedded corpus or any tfds dataset.

Default path: array_record files read with ``tfds.data_source`` (no
TensorFlow). Prebuilt tfrecord datasets (c4 on a bucket, say) need
``loader="tfds_load"``, which uses ``tfds.load`` and the optional TensorFlow
extra (``pip install -e '.[tf]'``).
"""
import os

from absl import logging
import tensorflow_datasets as tfds

from structmat.data.corpus import StructmatStdlib

EMBEDDED = "stdlib"
EMBEDDED_NAMES = (EMBEDDED, "stdlib_docs", "stdlib_topic")


def default_data_dir() -> str:
  # An empty variable counts as unset (not as the current directory).
  return os.environ.get("STRUCTMAT_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "structmat", "tfds")


def as_text(value) -> str:
  """Mocked tfds text arrives as str, real text as bytes: accept both."""
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class TextSource:
  """len() and [i] -> str over one split (one host's shard of it)."""

  def __init__(self, records, key: str = "text"):
    self._records = records
    self._key = key

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    return as_text(self._records[int(i)][self._key])


class _TFDSLoadRecords:
  """Materializes a tfds.load split (TensorFlow extra) into a list of dicts."""

  def __init__(self, name, split, data_dir):
    try:
      import tensorflow  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    except ImportError as e:
      raise ImportError("data.loader='tfds_load' needs TensorFlow: "
                        "pip install -e '.[tf]'") from e
    ds = tfds.load(name, split=split, data_dir=data_dir)
    self._rows = list(tfds.as_numpy(ds))

  def __len__(self):
    return len(self._rows)

  def __getitem__(self, i):
    return self._rows[i]


def _builders():
  from structmat.data import downstream  # pylint: disable=import-outside-toplevel
  return {EMBEDDED: StructmatStdlib, "stdlib_docs": downstream.StructmatStdlibDocs,
          "stdlib_topic": downstream.StructmatStdlibTopic}


def build_embedded(data_dir: str, name: str = EMBEDDED) -> str:
  """Build an embedded dataset once (array_record); returns its tfds name."""
  cls = _builders()[name]
  builder = cls(data_dir=data_dir, file_format="array_record")
  if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    logging.info("Building the embedded dataset %s in %s", name,
                 builder.data_dir)
    builder.download_and_prepare()
  return cls.name


def open_records(name: str, split: str, data_dir: str | None = None,
                 loader: str = "data_source"):
  """Random-access records (dicts) of a split: embedded names
  ("stdlib", "stdlib_docs", "stdlib_topic") or any tfds name."""
  data_dir = data_dir or default_data_dir()
  if name in EMBEDDED_NAMES:
    name = build_embedded(data_dir, name)
  if loader == "data_source":
    return tfds.data_source(name, split=split, data_dir=data_dir)
  if loader == "tfds_load":
    return _TFDSLoadRecords(name, split, data_dir)
  raise ValueError(f"data.loader={loader!r}; use 'data_source' or 'tfds_load'.")


def open_split(name: str, split: str, data_dir: str | None = None,
               process_index: int = 0, process_count: int = 1,
               loader: str = "data_source", text_key: str = "text") -> TextSource:
  """One host's shard of ``split`` of dataset ``name`` ("stdlib" or a tfds name).

  Args:
    name: "stdlib" (embedded corpus), "stdlib_docs" (its prose, for
      fine-tuning) or a tfds name such as "c4/en", "lm1b".
    split: tfds split, e.g. "train", "validation".
    data_dir: tfds data directory (default $STRUCTMAT_DATA_DIR or
      ~/.cache/structmat/tfds).
    process_index, process_count: this host's shard (``tfds.even_splits``).
    loader: "data_source" (array_record, default) or "tfds_load" (tfrecord,
      needs TensorFlow).
    text_key: the feature holding the text.
  """
  if process_count > 1:
    split = tfds.even_splits(split, process_count)[process_index]
  return TextSource(open_records(name, split, data_dir, loader), text_key)
