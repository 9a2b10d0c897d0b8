"""LowRank: W = U V, the low-rank baseline of GaLore/SLTrain and WeLore's LRCs."""
import math

import flax.linen as nn

from structmat import ops
from structmat.layers import init as sm_init
from structmat.layers.base import StructuredLinear, require


class LowRank(StructuredLinear):
  """y = (x U) V + b.

  Params: ``u`` (in, rank) ~ U(+-1/sqrt(in)), ``v`` (rank, features) ~
  U(+-1/sqrt(rank)) (torch nn.Linear init of each factor).
  """
  rank: int = 128

  def check(self, in_features):
    require(1 <= self.rank <= min(in_features, self.features),
            f"rank={self.rank} must be in [1, min(in, features)="
            f"{min(in_features, self.features)}] for a {in_features}->"
            f"{self.features} layer; lower rank.")

  def make_params(self, in_features):
    in_axis, out_axis = self.kernel_axes
    return {
        "u": self.factor("u", (in_features, self.rank), (in_axis, "rank"),
                         sm_init.uniform(1 / math.sqrt(in_features)),
                         in_features, self.rank),
        "v": self.factor("v", (self.rank, self.features), ("rank", out_axis),
                         sm_init.uniform(1 / math.sqrt(self.rank)),
                         self.rank, self.features),
    }

  def compute(self, x, p):
    return ops.lowrank_matmul(x, p["u"], p["v"])

  def kernel_from(self, p, in_features):
    return p["u"] @ p["v"]

  @nn.nowrap
  def param_count(self, in_features):
    return self.rank * (in_features + self.features) + self.bias_count()

  @nn.nowrap
  def flops_per_token(self, in_features):
    return 2 * self.rank * (in_features + self.features)
