"""Model families the launchers train: LLaMA (llama_* presets and Hugging
Face LLaMA/Mistral checkpoints) and GPT-2 (gpt2_* presets and Hugging Face
GPT-2 checkpoints).

One config type per family; ``build_model`` and ``linear_sites`` dispatch on
it, so the train loop, the fine-tuning methods and the exports stay
family-agnostic.
"""
import dataclasses

from structmat.models.gpt2 import GPT2, GPT2_SITES, GPT2Config
from structmat.models.llama import SITES, Llama, site_shapes
from structmat.models.presets import (GPT2_SIZES, default_linear_kwargs,
                                      gpt2_dims, llama_config)

FAMILIES = ("llama", "gpt2")
# The GPT2Config fields config.model_dims may set (the rest come from the
# launcher config: vocabulary, dtype, linear structure).
GPT2_DIMS = ("d_model", "d_ff", "n_layers", "n_heads", "norm_eps", "max_len")


def build_model(cfg):
  """The flax module of a LlamaConfig or GPT2Config."""
  return GPT2(cfg) if isinstance(cfg, GPT2Config) else Llama(cfg)


def linear_sites(cfg) -> tuple:
  """The per-layer linear site names of cfg's family."""
  return GPT2_SITES if isinstance(cfg, GPT2Config) else SITES


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
  """site -> (in_features, out_features) of its linear."""
  if isinstance(cfg, GPT2Config):
    d = cfg.d_model
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
            "fc": (d, cfg.d_ff), "proj": (cfg.d_ff, d)}
  return site_shapes(cfg)


def family_of(cfg) -> str:
  return "gpt2" if isinstance(cfg, GPT2Config) else "llama"


def preset_config(preset: str, linear: str = "dense", vocab_size: int = 32000,
                  max_len: int = 1024, linear_kwargs=None, **fields):
  """The config of any size preset (llama_* or gpt2_*) with the structure's
  default hyper-parameters updated by ``linear_kwargs`` (a dict); ``fields``
  set config fields (dtype, impl, attention, ...) the family has."""
  if preset not in GPT2_SIZES:
    return llama_config(preset, linear, vocab_size=vocab_size,
                        max_len=max_len, **(linear_kwargs or {}), **fields)
  return gpt2_config(vocab_size, linear, gpt2_dims(preset, max_len), preset,
                     linear_kwargs=linear_kwargs, **fields)


def gpt2_config(vocab_size: int, linear: str, dims: dict,
                preset: str = "custom", linear_kwargs=None,
                **fields) -> GPT2Config:
  """A GPT2Config from a launcher config's pieces.

  ``dims`` must give every GPT2_DIMS field (a preset's, or a Hugging Face
  import's in config.model_dims); the structure's hyper-parameters are the
  preset's defaults updated by ``linear_kwargs``; ``fields`` set other
  GPT2Config fields (dtype, impl, attention, overrides)."""
  missing = [f for f in GPT2_DIMS if f not in dims]
  unknown = sorted(set(dims) - set(GPT2_DIMS))
  if missing or unknown:
    raise ValueError(f"config.family='gpt2' needs config.model_dims with "
                     f"exactly {GPT2_DIMS}; missing {missing}, unknown "
                     f"{unknown} (a Hugging Face GPT-2 --init writes them).")
  kwargs = default_linear_kwargs(preset, linear, dims["d_model"])
  kwargs.update(linear_kwargs or {})
  known = {f.name for f in dataclasses.fields(GPT2Config)}
  return GPT2Config(vocab_size=vocab_size, linear=linear,
                    linear_kwargs=tuple(sorted(kwargs.items())),
                    **dims, **{k: v for k, v in fields.items() if k in known})
