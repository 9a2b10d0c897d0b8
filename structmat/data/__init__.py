"""Data: the embedded corpus builder, tfds sources, tokenizers and packing."""
from structmat.data.pipeline import PackedBatches, eval_batches
from structmat.data.sources import open_split
from structmat.data.tokenizers import make_tokenizer
