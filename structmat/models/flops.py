"""Model FLOPs per token for MFU: the structured products as they run."""
from structmat.layers import make_linear
from structmat.models.family import linear_shapes, linear_sites


def train_flops_per_token(cfg, seq_len: int) -> float:
  """3 x forward FLOPs: linears (structured counts), attention scores, head.

  Attention counts QK^T and AV over the full (not causal-halved) length, the
  convention of the MFU numbers quoted in DEVELOPERS.md / PaLM.
  """
  linears = 0
  for layer in range(cfg.n_layers):
    for site in linear_sites(cfg):
      name, kwargs = cfg.linear_for(site, layer)
      d_in, d_out = linear_shapes(cfg)[site]
      linears += make_linear(name, features=d_out,
                             **kwargs).flops_per_token(d_in)
  attention = 4 * seq_len * cfg.n_heads * cfg.head_dim
  head = 2 * cfg.d_model * cfg.vocab_size
  return 3.0 * (linears + cfg.n_layers * attention + head)
