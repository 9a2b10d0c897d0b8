"""Monarch (Dao et al. 2022) and Block Tensor-Train (Qiu et al. 2024) layers."""
import math

import flax.linen as nn
import jax.numpy as jnp

from structmat import ops
from structmat.layers import init as sm_init
from structmat.layers.base import StructuredLinear, require

BLOCK_AXES = ("monarch_blocks", "monarch_rows", None)


class Monarch(StructuredLinear):
  """fly's MonarchLinear: y = truncate(P2 R2 P1 R1 pad(x)) + b.

  Block sizes ceil(in/nblocks), ceil(out/nblocks); the input is zero-padded
  and the output truncated. Params ``w1`` (nblocks, q, in_blk) and ``w2``
  (nblocks, out_blk, q) in fly's layout (q = in_blk if padded in < padded out,
  else out_blk), each ~ U(+-1/sqrt(block fan-in)); bias U(+-1/sqrt(out)).
  """
  nblocks: int = 4
  impl: str = "xla"  # "auto" | "xla" | "pallas[:kernel]": see kernels.dispatch

  def inner(self, in_features: int) -> int | None:
    """Per-block intermediate size q; None: fly's rule."""
    return None

  @nn.nowrap
  def shapes(self, in_features):
    return ops.monarch_shapes(in_features, self.features, self.nblocks,
                              self.inner(in_features))

  def check(self, in_features):
    require(self.nblocks >= 1 and
            self.nblocks <= min(in_features, self.features),
            f"nblocks={self.nblocks} does not fit a {in_features}->"
            f"{self.features} layer: use 1 <= nblocks <= "
            f"{min(in_features, self.features)}.")

  def make_params(self, in_features):
    (k, q, p), (l, s, r), _, _ = self.shapes(in_features)
    return {
        "w1": self.factor("w1", (k, q, p), BLOCK_AXES,
                          sm_init.uniform(1 / math.sqrt(p)), p, q),
        "w2": self.factor("w2", (l, s, r), BLOCK_AXES,
                          sm_init.uniform(1 / math.sqrt(r)), r, s),
    }

  def compute(self, x, p):
    return self.compute_with_bias(x, p, None)

  def compute_with_bias(self, x, p, bias):
    in_ext = p["w1"].shape[0] * p["w1"].shape[2]
    out_ext = p["w2"].shape[0] * p["w2"].shape[1]
    pad = in_ext - x.shape[-1]
    if pad:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    if bias is not None and out_ext > self.features:
      bias = jnp.pad(bias, (0, out_ext - self.features))
    y = ops.monarch_matmul(x, p["w1"], p["w2"], bias, impl=self.impl)
    return y[..., :self.features] if out_ext > self.features else y

  def kernel_from(self, p, in_features):
    return ops.monarch_to_dense(p["w1"], p["w2"])[:in_features, :self.features]

  def bias_bound(self, in_features):
    return 1.0 / math.sqrt(self.features)

  @nn.nowrap
  def param_count(self, in_features):
    (w1, w2, _, _) = self.shapes(in_features)
    return math.prod(w1) + math.prod(w2) + self.bias_count()

  @nn.nowrap
  def flops_per_token(self, in_features):
    (w1, w2, _, _) = self.shapes(in_features)
    return 2 * (math.prod(w1) + math.prod(w2))


class BTT(Monarch):
  """Block Tensor-Train with two cores; Monarch is its rank-1 case.

  The Monarch product with intermediate q = nblocks * rank: every (output
  block, input block) pair of the dense matrix then has rank ``rank``. With
  nblocks = sqrt(n) and rank 1 it is the square Monarch matrix. Parameters:
  rank * nblocks * (in_ext + out_ext).
  """
  rank: int = 1

  def inner(self, in_features):
    return self.nblocks * self.rank

  def check(self, in_features):
    super().check(in_features)
    blk = min(math.ceil(in_features / self.nblocks),
              math.ceil(self.features / self.nblocks))
    require(1 <= self.rank <= blk,
            f"rank={self.rank} must be in [1, {blk}] (the smaller block size "
            f"of a {in_features}->{self.features} layer with nblocks="
            f"{self.nblocks}); lower rank.")
