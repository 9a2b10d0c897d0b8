"""Model FLOPs per token for MFU: the structured products as they run."""
from structmat.layers import make_linear
from structmat.models.llama import SITES


def site_shapes(cfg) -> dict:
  """site -> (in_features, out_features)."""
  hd = cfg.head_dim
  return {"q": (cfg.d_model, cfg.n_heads * hd), "k": (cfg.d_model, cfg.kv_heads * hd),
          "v": (cfg.d_model, cfg.kv_heads * hd), "o": (cfg.n_heads * hd, cfg.d_model),
          "gate": (cfg.d_model, cfg.d_ff), "up": (cfg.d_model, cfg.d_ff),
          "down": (cfg.d_ff, cfg.d_model)}


def train_flops_per_token(cfg, seq_len: int) -> float:
  """3 x forward FLOPs: linears (structured counts), attention scores, head.

  Attention counts QK^T and AV over the full (not causal-halved) length, the
  convention of the MFU numbers quoted in DEVELOPERS.md / PaLM.
  """
  linears = 0
  for site in SITES:
    name, kwargs = cfg.linear_for(site)
    d_in, d_out = site_shapes(cfg)[site]
    linears += make_linear(name, features=d_out, **kwargs).flops_per_token(d_in)
  attention = 4 * seq_len * cfg.n_heads * cfg.head_dim
  head = 2 * cfg.d_model * cfg.vocab_size
  return 3.0 * (cfg.n_layers * (linears + attention) + head)
