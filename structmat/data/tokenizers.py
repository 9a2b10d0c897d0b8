"""Tokenizers: byte-level, sentencepiece trained offline (cached) or loaded,
and Hugging Face tokenizer.json files (the optional `tokenizers` package).

Every tokenizer has ``vocab_size``, ``pad_id`` (0 unless a loaded tokenizer
names one), ``eos_id``, ``encode(str) -> list[int]`` and
``decode(list[int]) -> str``.
"""
import hashlib
import json
import os
import tempfile

from absl import logging
import numpy as np
import sentencepiece as spm


class ByteTokenizer:
  """UTF-8 bytes shifted by 3: pad 0, bos 1, eos 2; vocab 259."""
  pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(int(i) - self.offset for i in ids
                 if int(i) >= self.offset).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A sentencepiece model; pad 0, unk 1, bos 2, eos 3 when trained here."""

  def __init__(self, model_file: str):
    if not os.path.exists(model_file):
      raise FileNotFoundError(f"data.tokenizer_model={model_file!r} does not "
                              "exist; give an existing sentencepiece .model.")
    self.model_file = model_file
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id()
    # Models trained elsewhere (T5, LLaMA) may have no pad piece (-1): use 0,
    # which the loss mask then skips; T5's pad is 0 already.
    self.pad_id = max(self._sp.pad_id(), 0)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


def _special_tokens(directory: str) -> dict:
  """bos/eos/pad token strings from the files a HF tokenizer ships with."""
  out = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path) as f:
        conf = json.load(f)
      for key in ("bos_token", "eos_token", "pad_token"):
        v = conf.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v:
          out[key] = v
  return out


class HFTokenizer:
  """A Hugging Face tokenizer.json, ids as the checkpoint has them.

  ``vocab_size`` is the larger of the tokenizer's size (added tokens
  included) and ``model_vocab`` (checkpoints often pad the embedding rows).
  eos (the document separator) comes from tokenizer_config.json or
  special_tokens_map.json beside the file; pad, which the loss skips, is the
  pad token, else bos (which text never encodes to), else 0.
  """

  def __init__(self, path: str, model_vocab: int = 0):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError("data.tokenizer='hf' reads tokenizer.json with the "
                        "tokenizers package: pip install -e '.[hf]'.") from None
    if not os.path.exists(path):
      raise FileNotFoundError(f"data.tokenizer_model={path!r} does not exist; "
                              "give a Hugging Face tokenizer.json.")
    self.model_file = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                          model_vocab)
    ids = {k: self._tok.token_to_id(v)
           for k, v in _special_tokens(os.path.dirname(path)).items()}
    if ids.get("eos_token") is None:
      raise ValueError(f"{path}: no eos_token in tokenizer_config.json or "
                       "special_tokens_map.json beside it; the pipeline "
                       "separates documents with it.")
    self.eos_id = ids["eos_token"]
    self.bos_id = ids.get("bos_token")
    self.pad_id = next((ids[k] for k in ("pad_token", "bos_token")
                        if ids.get(k) is not None), 0)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def _training_lines(source, max_chars: int, seed: int):
  """Lines of documents in a seeded order until max_chars characters."""
  order = np.random.default_rng(seed).permutation(len(source))
  total = 0
  for i in order:
    for line in source[i].splitlines():
      if line.strip():
        total += len(line)
        yield line
    if total >= max_chars:
      return


def train_sentencepiece(source, vocab_size: int, model_file: str,
                        max_chars: int = 20_000_000, seed: int = 0) -> str:
  """Train a unigram model on ``source`` texts; written atomically to model_file.

  Code-friendly settings: whitespace kept as is (indentation is signal),
  byte fallback (no unknown characters), newline and tab as symbols.
  """
  os.makedirs(os.path.dirname(model_file) or ".", exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(model_file) or ".") as tmp:
    prefix = os.path.join(tmp, "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(source, max_chars, seed),
        model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=["\n", "\t"], max_sentence_length=16384,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=os.cpu_count(),
        hard_vocab_limit=False,  # small corpora: at most vocab_size pieces
        minloglevel=2)
    os.replace(prefix + ".model", model_file)
  return model_file


def cached_path(vocab_size: int, cache_dir: str, cache_key: str) -> str:
  """Where a sentencepiece model trained on ``cache_key``'s data is cached."""
  tag = hashlib.sha1(cache_key.encode()).hexdigest()[:10]
  return os.path.join(cache_dir, f"sp_{vocab_size}_{tag}.model")


def make_tokenizer(kind: str, vocab_size: int = 0, model_file: str = "",
                   source=None, cache_dir: str = "", cache_key: str = ""):
  """Build the tokenizer a config asks for.

  Args:
    kind: "byte", "sentencepiece" or "hf" (a Hugging Face tokenizer.json).
    vocab_size: sentencepiece vocabulary when training one; for "hf", the
      model's vocabulary when it exceeds the tokenizer's (padded embeddings).
    model_file: an existing sentencepiece model (T5/LLaMA tokenizers) or, for
      "hf", the tokenizer.json; when empty, a sentencepiece model is trained
      on ``source`` and cached in ``cache_dir``.
    source: training texts (a TextSource), only needed to train.
    cache_dir, cache_key: where trained models are cached, and a name that
      identifies the training data (dataset and split).
  """
  if kind == "byte":
    return ByteTokenizer()
  if kind == "hf":
    if not model_file:
      raise ValueError("data.tokenizer='hf' needs data.tokenizer_model="
                       "path/to/tokenizer.json.")
    return HFTokenizer(model_file, vocab_size)
  if kind != "sentencepiece":
    raise ValueError(f"data.tokenizer={kind!r}; use 'byte', 'sentencepiece' "
                     "or 'hf'.")
  if model_file:
    return SentencePieceTokenizer(model_file)
  if vocab_size < 300:
    raise ValueError(f"data.vocab_size={vocab_size} is too small for "
                     "sentencepiece with byte fallback; use >= 300.")
  path = cached_path(vocab_size, cache_dir, cache_key)
  if not os.path.exists(path):
    logging.info("Training a %d-piece sentencepiece model -> %s", vocab_size, path)
    train_sentencepiece(source, vocab_size, path)
  return SentencePieceTokenizer(path)
