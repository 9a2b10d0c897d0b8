"""SparsePlusLowRank: SLTrain's W = B (A * alpha / r) + S on a fixed random support."""
import math

import flax.linen as nn

from structmat import ops
from structmat.kernels import target
from structmat.kernels.sltrain import support_orders
from structmat.layers import init as sm_init
from structmat.layers.base import StructuredLinear, require, unbox


class SparsePlusLowRank(StructuredLinear):
  """y = x (scale * a @ b + S) + b, scale = alpha / rank.

  Params: ``lora_a`` (in, rank) ~ U(+-1/sqrt(in)) (the paper's A, transposed),
  ``lora_b`` (rank, features) = 0 (the paper's B), ``values`` (nnz,) ~
  U(+-1/sqrt(in)); bias U(+-1/sqrt(out)). The support, nnz = int(density * in
  * out) sorted int32 flat indices into the (in, out) kernel, is drawn from this
  layer's own key (its path, not construction order) into the non-trainable
  ``structure`` collection, which checkpoints carry. Next to it, ``tile_orders``
  (2, nnz) int32 sorts the support by kernel tile for W and W^T, computed once
  here so that the Pallas kernel (``impl``) never sorts in a training step.
  The scale multiplies in the forward pass, so Adam sees unscaled factors (as
  the official code).

  ``kernel_block`` > 0: the XLA path materializes W that many columns (rows,
  backward) at a time and keeps none of it between the passes
  (``ops.sltrain_blocked``); 0 (default) builds all of W, which autodiff
  keeps until the backward: a dense copy of the layer's weights.
  """
  rank: int = 128
  density: float = 0.03
  alpha: float = 32.0
  impl: str = "xla"  # "auto" | "xla" | "pallas": see structmat.kernels.dispatch
  kernel_block: int = 0

  def check(self, in_features):
    require(0.0 < self.density <= 1.0,
            f"density={self.density} must be in (0, 1]; SLTrain uses 0.03.")
    require(1 <= self.rank <= min(in_features, self.features),
            f"rank={self.rank} must be in [1, {min(in_features, self.features)}]"
            f" for a {in_features}->{self.features} layer; lower rank.")
    require(self.kernel_block >= 0,
            f"kernel_block={self.kernel_block}: use 0 (materialize W whole) "
            "or a positive block width such as 512.")

  @nn.nowrap
  def nnz(self, in_features):
    return max(1, int(self.density * in_features * self.features))

  def make_params(self, in_features):
    in_axis, out_axis = self.kernel_axes
    bound = 1 / math.sqrt(in_features)
    support = self.variable(
        "structure", "indices",
        lambda: nn.with_logical_partitioning(
            lambda k: ops.draw_support(k, in_features, self.features,
                                       self.density), ("sparse",))(
                self.make_rng("params")))
    indices = unbox(support.value)
    orders = self.variable(
        "structure", "tile_orders",
        lambda: nn.LogicallyPartitioned(
            support_orders(indices, in_features, self.features),
            (None, "sparse")))
    return {
        "lora_a": self.factor("lora_a", (in_features, self.rank),
                              (in_axis, "rank"), sm_init.uniform(bound),
                              in_features, self.rank),
        "lora_b": self.factor("lora_b", (self.rank, self.features),
                              ("rank", out_axis), nn.initializers.zeros,
                              self.rank, self.features),
        "values": self.factor("values", (self.nnz(in_features),), ("sparse",),
                              sm_init.uniform(bound), in_features,
                              self.features),
        "indices": indices,
        "tile_orders": unbox(orders.value),
    }

  def compute(self, x, p):
    return ops.sltrain_matmul(x, p["lora_a"], p["lora_b"], p["values"],
                              p["indices"], self.alpha / self.rank,
                              impl=self.impl, orders=p["tile_orders"],
                              block=self.kernel_block)

  @property
  def rebuilds_input(self) -> bool:
    """With ``kernel_block`` on the XLA path the backward rebuilds W a row
    block at a time, and so can rebuild the input (``compute_of``). That
    path runs under impl="xla", and under "auto" off TPUs (which may take
    the TPU kernel; on GPUs auto declines the Triton one)."""
    if not self.kernel_block:
      return False
    return self.impl == "xla" or (self.impl == "auto"
                                  and target.platform() != "tpu")

  def compute_of(self, fn, args, p):
    return ops.sltrain_matmul_blocked_of(
        fn, args, p["lora_a"], p["lora_b"], p["values"], p["indices"],
        self.alpha / self.rank, self.kernel_block)

  def kernel_from(self, p, in_features):
    return ops.sltrain_kernel(p["lora_a"], p["lora_b"], p["values"],
                              p["indices"], self.alpha / self.rank)

  def bias_bound(self, in_features):
    return 1.0 / math.sqrt(self.features)

  @nn.nowrap
  def param_count(self, in_features):
    return (self.rank * (in_features + self.features) + self.nnz(in_features)
            + self.bias_count())

  @nn.nowrap
  def flops_per_token(self, in_features):
    # The structured product: low-rank path plus one MAC per sparse entry.
    return 2 * (self.rank * (in_features + self.features)
                + self.nnz(in_features))
