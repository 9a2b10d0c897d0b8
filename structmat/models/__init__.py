"""Models built from structured layers."""
from structmat.models.llama import Llama, LlamaConfig
from structmat.models.presets import SIZES, llama_config
