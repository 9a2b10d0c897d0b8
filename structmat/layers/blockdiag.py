"""Block-diagonal linear (fly's / Monarch Mixer's BlockdiagLinear).

One block-diagonal factor, no permutation: nblocks independent (out_blk x
in_blk) maps, a 1/nblocks share of the dense parameters and FLOPs. Monarch
Mixer (M2) uses it in its MLPs; fly's Monarch is two of them with
permutations. The product runs through ``ops.blockdiag_matmul`` (``impl``
picks the Pallas kernel, see ``structmat.kernels.dispatch``).
"""
import math

import flax.linen as nn
import jax.numpy as jnp
import jax.scipy.linalg

from structmat import ops
from structmat.layers import init as sm_init
from structmat.layers.base import StructuredLinear, require
from structmat.layers.monarch import BLOCK_AXES


class Blockdiag(StructuredLinear):
  """fly's BlockdiagLinear: y = truncate(blockdiag(w) shuffle(pad(x))) + b.

  Block sizes ceil(in/nblocks), ceil(out/nblocks) (input zero-padded, output
  truncated). ``w`` (nblocks, out_blk, in_blk) ~ U(+-1/sqrt(in_blk)) (fly's
  dense kaiming init rescaled by sqrt(nblocks)); bias U(+-1/sqrt(out)).
  ``shuffle``: ShuffleNet's channel shuffle of the (padded) input first,
  index g*C + c -> c*G + g with G = nblocks groups of C channels.
  """
  nblocks: int = 4
  shuffle: bool = False
  impl: str = "xla"  # "auto" | "xla" | "pallas": see structmat.kernels.dispatch

  @nn.nowrap
  def blocks(self, in_features: int) -> tuple[int, int]:
    return (math.ceil(in_features / self.nblocks),
            math.ceil(self.features / self.nblocks))

  def check(self, in_features):
    require(1 <= self.nblocks <= min(in_features, self.features),
            f"nblocks={self.nblocks} does not fit a {in_features}->"
            f"{self.features} layer: use 1 <= nblocks <= "
            f"{min(in_features, self.features)}.")

  def make_params(self, in_features):
    p, q = self.blocks(in_features)
    return {"w": self.factor("w", (self.nblocks, q, p), BLOCK_AXES,
                             sm_init.uniform(1 / math.sqrt(p)), p, q)}

  def _shuffled(self, n: int):
    """Source index of each shuffled input position (length n = padded in)."""
    return jnp.arange(n).reshape(self.nblocks, -1).T.reshape(-1)

  def compute(self, x, p):
    n = p["w"].shape[0] * p["w"].shape[2]
    if n > x.shape[-1]:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])
    if self.shuffle:
      x = x[..., self._shuffled(n)]
    y = ops.blockdiag_matmul(x, p["w"], impl=self.impl)
    return y[..., :self.features]

  def kernel_from(self, p, in_features):
    # Built block by block (independent of the product): row k*p + i,
    # column k*q + o holds w[k, o, i]; the shuffle permutes the rows.
    kernel = jax.scipy.linalg.block_diag(*jnp.transpose(p["w"], (0, 2, 1)))
    if self.shuffle:
      kernel = jnp.zeros_like(kernel).at[self._shuffled(kernel.shape[0])].set(
          kernel)
    return kernel[:in_features, :self.features]

  def bias_bound(self, in_features):
    return 1.0 / math.sqrt(self.features)

  @nn.nowrap
  def param_count(self, in_features):
    p, q = self.blocks(in_features)
    return self.nblocks * p * q + self.bias_count()

  @nn.nowrap
  def flops_per_token(self, in_features):
    p, q = self.blocks(in_features)
    return 2 * self.nblocks * p * q
