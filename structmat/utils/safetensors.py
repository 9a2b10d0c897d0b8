"""Read and write the safetensors format with NumPy alone.

The format is an 8-byte little-endian header length, a JSON header mapping
each tensor name to {dtype, shape, data_offsets} (plus an optional
"__metadata__" of strings), then the raw little-endian bytes. Writing our own
~40 lines keeps torch and the `safetensors` package out of the runtime
dependencies (they are test-only extras). bfloat16 comes from ml_dtypes, which
jax already needs.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
           "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def load_file(path: str) -> dict[str, np.ndarray]:
  """name -> array for one .safetensors file."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, "
                       f"not one of {sorted(_DTYPES)}.")
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], _DTYPES[info["dtype"]]).reshape(
        info["shape"]).copy()
  return out


def save_file(tensors: dict[str, np.ndarray], path: str,
              metadata: dict[str, str] | None = None) -> None:
  """Write name -> array as one .safetensors file (C order, little-endian)."""
  header, chunks, offset = {}, [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be saved.")
    raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for raw in chunks:
      f.write(raw)


def load_dir(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face checkpoint directory: model.safetensors,
  or the shards listed in model.safetensors.index.json."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    files = sorted(set(json.load(open(index))["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(
        f"{path} holds neither model.safetensors nor model.safetensors.index."
        "json; save the model with safe_serialization=True (PyTorch .bin "
        "checkpoints are not read).")
  out = {}
  for name in files:
    out.update(load_file(os.path.join(path, name)))
  return out
