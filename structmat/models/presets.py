"""Size presets (GaLore/SLTrain LLaMA shapes) and per-size structure defaults."""
import dataclasses

from structmat.models.llama import LlamaConfig

# (d_model, d_ff, n_layers, n_heads)
SIZES = {
    "llama_tiny": (64, 172, 2, 4),        # CPU tests: seconds per step
    "llama_small": (128, 344, 4, 4),      # laptop CPU studies
    "llama_20m": (256, 688, 4, 4),
    "llama_60m": (512, 1376, 8, 8),
    "llama_130m": (768, 2048, 12, 12),
    "llama_350m": (1024, 2736, 24, 16),
    "llama_1b": (2048, 5461, 24, 32),
    "llama_7b": (4096, 11008, 32, 32),
}
# GPT-2 sizes (d_model, d_ff, n_layers, n_heads): the Monarch paper's
# GPT-2-S/M (124M/355M dense with GPT-2's 50257-token vocabulary); 1024
# learned positions.
GPT2_SIZES = {
    "gpt2_tiny": (64, 256, 2, 4),         # CPU tests
    "gpt2_small": (768, 3072, 12, 12),
    "gpt2_medium": (1024, 4096, 24, 16),
    "gpt2_large": (1280, 5120, 36, 20),
}
GPT2_MAX_LEN = 1024


def gpt2_dims(preset: str, seq_len: int = 0) -> dict:
  """GPT2Config size fields of a GPT2_SIZES preset: 1024 positions, or
  ``seq_len`` when longer."""
  return dict(zip(("d_model", "d_ff", "n_layers", "n_heads"),
                  GPT2_SIZES[preset]), norm_eps=1e-5,
              max_len=max(GPT2_MAX_LEN, seq_len))
# Papers' per-size structure settings (GaLore/SLTrain): rank, SLTrain alpha.
RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256,
         "llama_1b": 512, "llama_7b": 1024}
SLTRAIN_ALPHA = {"llama_60m": 32.0, "llama_130m": 16.0, "llama_350m": 16.0,
                 "llama_1b": 8.0, "llama_7b": 8.0}


# The fields a preset fixes; model="custom" takes them from the caller.
DIM_FIELDS = ("d_model", "d_ff", "n_layers", "n_heads")


def default_linear_kwargs(preset: str, linear: str, d_model: int = 0) -> dict:
  """The papers' hyper-parameters for ``linear`` at ``preset``'s size."""
  d_model = d_model or SIZES[preset][0]
  rank = RANKS.get(preset, max(8, d_model // 4))
  if linear == "lowrank":
    return {"rank": rank}
  if linear == "sltrain":
    return {"rank": rank, "density": 0.03,
            "alpha": SLTRAIN_ALPHA.get(preset, 32.0)}
  if linear == "monarch":
    return {"nblocks": 4}
  if linear == "btt":
    return {"nblocks": 4, "rank": 4}
  if linear == "nola":
    return {"rank": 8, "num_basis": 64}
  if linear == "phm":
    return {"n": 4, "rank": None, "rule_init_std": 0.5}
  return {}


def llama_config(preset: str, linear: str = "dense", vocab_size: int = 32000,
                 max_len: int = 1024, **overrides) -> LlamaConfig:
  """A LlamaConfig for a size preset; structure kwargs in ``overrides`` win.

  Model fields in ``overrides`` (d_model, rope_theta, ...) replace the
  preset's. ``preset="custom"`` has no sizes of its own: d_model, d_ff,
  n_layers and n_heads must come in ``overrides`` (a Hugging Face import's
  dimensions, say).

  Example: ``llama_config("llama_60m", "sltrain", rank=64)``.
  """
  if preset != "custom" and preset not in SIZES:
    raise ValueError(f"model={preset!r} is not a preset; use one of "
                     f"{sorted(SIZES)} or 'custom' (with config.model_dims).")
  dims = dict(zip(DIM_FIELDS, SIZES[preset])) if preset in SIZES else {}
  model_fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  model_over = {k: v for k, v in overrides.items() if k in model_fields}
  dims.update(model_over)
  missing = [f for f in DIM_FIELDS if f not in dims]
  if missing:
    raise ValueError(f"model='custom' needs {missing} in config.model_dims, "
                     'e.g. \'{"d_model": 512, "d_ff": 1376, "n_layers": 8, '
                     '"n_heads": 8}\'.')
  kwargs = default_linear_kwargs(preset, linear, dims["d_model"])
  kwargs.update({k: v for k, v in overrides.items() if k not in model_fields})
  return LlamaConfig(vocab_size=vocab_size, max_len=max_len, linear=linear,
                     linear_kwargs=tuple(sorted(kwargs.items())), **dims)
