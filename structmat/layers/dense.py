"""Dense: the baseline every structure is compared with."""
import math

import flax.linen as nn

from structmat.layers import init as sm_init
from structmat.layers.base import StructuredLinear


class Dense(StructuredLinear):
  """y = x W + b with W (in, features), torch nn.Linear init U(+-1/sqrt(in))."""

  def make_params(self, in_features):
    bound = 1.0 / math.sqrt(in_features)
    return {"kernel": self.factor("kernel", (in_features, self.features),
                                  self.kernel_axes, sm_init.uniform(bound),
                                  in_features, self.features)}

  def compute(self, x, p):
    return x @ p["kernel"]

  def kernel_from(self, p, in_features):
    return p["kernel"]

  @nn.nowrap
  def param_count(self, in_features):
    return in_features * self.features + self.bias_count()

  @nn.nowrap
  def flops_per_token(self, in_features):
    return 2 * in_features * self.features
