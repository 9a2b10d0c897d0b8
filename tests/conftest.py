import os
import sys

# Tests import `tests.helpers` and the repository packages from the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A session-wide tfds data dir: the embedded corpus is built once."""
  path = str(tmp_path_factory.mktemp("tfds"))
  os.environ["STRUCTMAT_DATA_DIR"] = path
  return path
