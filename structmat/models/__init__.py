"""Models built from structured layers."""
from structmat.models.llama import Llama, LlamaClassifier, LlamaConfig
from structmat.models.presets import SIZES, llama_config
from structmat.models.gpt2 import GPT2, GPT2Config
from structmat.models.family import build_model, linear_sites
from structmat.models.hf import load_hf, save_hf
