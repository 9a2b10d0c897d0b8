"""Packing documents into fixed-length sequences, in a resumable order.

Each epoch visits a split's documents (each followed by EOS) in a seeded
permutation, dealt round-robin to min(batch_size, #documents) streams; row r of
every batch is cut from stream r % #streams. Batches therefore mix many
documents (one stream alone would fill a batch from one or two files), and the
whole position is a few integers per stream (epoch, document, token offset):
``state()`` returns them and ``PackedBatches(..., state=...)`` resumes exactly
there, so a restarted run sees exactly the data it would have seen.
Checkpoints store the state.
"""
import numpy as np


class _Stream:
  """Documents order_e[index::count] of every epoch e, concatenated."""

  def __init__(self, batches, index, count, epoch, doc, offset):
    self.b, self.index, self.count = batches, index, count
    self.epoch, self.doc, self.offset = epoch, doc, offset
    self._docs = self.b.order(epoch)[index::count]
    self._tokens = None

  def take(self, n: int) -> list[int]:
    out = []
    while len(out) < n:
      if self._tokens is None:
        text = self.b.source[self._docs[self.doc]]
        self._tokens = self.b.tok.encode(text) + [self.b.tok.eos_id]
      piece = self._tokens[self.offset:self.offset + n - len(out)]
      out.extend(piece)
      self.offset += len(piece)
      if self.offset >= len(self._tokens):
        self.doc, self.offset, self._tokens = self.doc + 1, 0, None
        if self.doc >= len(self._docs):
          self.epoch, self.doc = self.epoch + 1, 0
          self._docs = self.b.order(self.epoch)[self.index::self.count]
    return out


class PackedBatches:
  """Iterator of int32 (batch_size, seq_len + 1) token arrays.

  Inputs are ``batch[:, :-1]``, targets ``batch[:, 1:]``.
  """

  def __init__(self, source, tokenizer, batch_size: int, seq_len: int,
               seed: int = 0, shuffle: bool = True, state: dict | None = None):
    if len(source) == 0:
      raise ValueError("the data split is empty; check data.name and the split.")
    self.source, self.tok = source, tokenizer
    self.batch_size, self.seq_len = batch_size, seq_len
    self.seed, self.shuffle = seed, shuffle
    self._orders = {}
    count = min(batch_size, len(source))
    positions = (state or {}).get("streams") or [[0, 0, 0]] * count
    if len(positions) != count:
      raise ValueError(f"data state has {len(positions)} streams but this "
                       f"pipeline needs {count}: batch_size changed since the "
                       "checkpoint; restore with the same config.batch_size.")
    self._streams = [_Stream(self, i, count, *map(int, p))
                     for i, p in enumerate(positions)]

  def order(self, epoch: int):
    """The document permutation of an epoch (cached: streams share it)."""
    if epoch not in self._orders:
      n = len(self.source)
      self._orders = {k: v for k, v in self._orders.items() if k >= epoch - 1}
      self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n)
                             if self.shuffle else np.arange(n))
    return self._orders[epoch]

  def state(self) -> dict:
    return {"streams": [[s.epoch, s.doc, s.offset] for s in self._streams]}

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    count = len(self._streams)
    rows = [self._streams[r % count].take(self.seq_len + 1)
            for r in range(self.batch_size)]
    return np.asarray(rows, np.int32)


def eval_batches(source, tokenizer, batch_size: int, seq_len: int,
                 max_batches: int, exact: bool = False) -> list[np.ndarray]:
  """Fixed validation batches: one pass in natural order, padded with pad_id.

  Stops after ``max_batches`` batches or at the end of the split (the last
  batch padded), never wrapping around, so each token is counted once. With
  ``exact`` the list is padded with all-pad batches to exactly max_batches
  (every process of a multi-host run must run the same number of steps).
  """
  stream = PackedBatches(source, tokenizer, 1, seq_len, shuffle=False)
  total = sum(len(tokenizer.encode(source[i])) + 1 for i in range(len(source)))
  n_seq = min(max_batches * batch_size, max(1, total // (seq_len + 1)))
  rows = [next(stream)[0] for _ in range(n_seq)]
  pad = (-len(rows)) % batch_size
  rows += [np.full(seq_len + 1, tokenizer.pad_id, np.int32)] * pad
  arr = np.stack(rows)
  out = [arr[i:i + batch_size] for i in range(0, len(arr), batch_size)]
  if exact:
    out = out[:max_batches]
    out += [np.full_like(out[0], tokenizer.pad_id)] * (max_batches - len(out))
  return out


def unigram_log_perplexity(train_batches, eval_batch_list, vocab_size: int,
                           pad_id: int) -> float:
  """Validation cross-entropy (nats/token) of an add-one unigram model."""
  counts = np.ones(vocab_size, np.float64)
  for b in train_batches:
    np.add.at(counts, b[:, 1:].ravel(), 1)
  logp = np.log(counts / counts.sum())
  targets = np.concatenate([b[:, 1:].ravel() for b in eval_batch_list])
  targets = targets[targets != pad_id]
  return float(-logp[targets].mean())
