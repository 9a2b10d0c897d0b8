"""Per-process data: which shards a process reads, and their joint position.

A split is cut into ``host_shards`` shards (``tfds.even_splits``; default: one
per process); process i reads shards [i*k, (i+1)*k) with k = host_shards /
process_count and fills its local batch with equal row blocks from each. With
host_shards > 1 on a single process, the data a multi-host run sees can be
reproduced on one machine. The position of every process is gathered into the
checkpoint (orbax writes the JSON from process 0 only).
"""
import json

import jax
from jax.experimental import multihost_utils
import numpy as np

from structmat.data.pipeline import PackedBatches


def my_shards(host_shards: int) -> list[int]:
  count, index = jax.process_count(), jax.process_index()
  host_shards = host_shards or count
  if host_shards % count:
    raise ValueError(f"config.data.host_shards={host_shards} must be a "
                     f"multiple of the process count {count}.")
  k = host_shards // count
  return list(range(index * k, (index + 1) * k))


class HostBatches:
  """This process's local batches: row blocks from each of its shards."""

  def __init__(self, sources, tokenizer, local_batch: int, seq_len: int,
               seed: int, state: dict | None = None):
    if local_batch % len(sources):
      raise ValueError(f"the per-process batch {local_batch} must be divisible "
                       f"by the {len(sources)} data shards this process reads "
                       "(config.batch_size / config.data.host_shards).")
    rows = local_batch // len(sources)
    states = (state or {}).get("shards") or [None] * len(sources)
    self._parts = [PackedBatches(src, tokenizer, rows, seq_len, seed=seed,
                                 state=st) for src, st in zip(sources, states)]

  def state(self) -> dict:
    return {"shards": [p.state() for p in self._parts]}

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    return np.concatenate([next(p) for p in self._parts])


def gather_states(state: dict) -> list[dict]:
  """Every process's data state (a list indexed by process), on every process."""
  if jax.process_count() == 1:
    return [state]
  data = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  every = multihost_utils.process_allgather(buf)
  return [json.loads(bytes(every[i][:int(sizes[i][0])]).decode())
          for i in range(jax.process_count())]
