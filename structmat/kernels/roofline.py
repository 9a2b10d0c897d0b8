"""Predicted GPU times of a Monarch product's two XLA forms, from H200 rates.

``impl="auto"`` uses them to choose, on GPUs, between the structured path
(``ops.monarch_matmul``: two batched matmuls and the permutations, memory
bound) and the materialized one (``ops.monarch_matmul_dense``: build the
(in, out) matrix once per call, then one dense matmul, compute bound). The
structured path moves about eight activation-sized passes per product, so
below a width of roughly 4 x itemsize x (matmul rate / copy rate) ~ 1900
features in bf16 (~2000 in float32) one dense matmul of the same layer is
faster on an H200, in spite of its larger FLOP count.

Checked against H200 measurements (forward): n=4096 in 16 blocks at 16384
tokens predicts 0.39 ms structured (measured 0.381) and 0.85 dense (0.795)
in bf16, 0.78 structured (0.626) in float32, whose matmul rate is taken from
that point's dense row; n=512 in 4 blocks at 65536 tokens 0.19 structured
(0.169) in bf16; the 60M preset trains at 51.2 ms per step with dense layers and 76.3 ms with
structured Monarch ones.
"""
from structmat.kernels.triton_backend import GPU_PLATFORMS

# Matmul rates by bytes per element and the device-to-device copy rate,
# measured on an H200: 646 TFLOP/s bf16 (the guide's number; a dense 4096 x
# 4096 product at 16384 tokens reached 691), 349 float32 (that product took
# 1.575 ms in float32: XLA's default precision runs it on TF32 tensor cores).
MATMUL_FLOPS = {2: 646e12, 4: 349e12}
COPY_BYTES = 2.77e12
# Materialize only when it is predicted clearly faster: the model ignores
# launch overheads and cuBLAS's efficiency at small widths.
MARGIN = 0.75


def _seconds(flops: float, nbytes: float, itemsize: int) -> float:
  rate = MATMUL_FLOPS.get(itemsize, min(MATMUL_FLOPS.values()))
  return max(flops / rate, nbytes / COPY_BYTES)


def structured_seconds(tokens: int, w1_shape, w2_shape, itemsize: int) -> float:
  """The structured forward: ~8 passes (x, stage-1 output, its permutation,
  stage-2 output and the output permutation, each read and written)."""
  k, q, p = w1_shape
  l, s, r = w2_shape
  flops = 2 * tokens * (k * q * p + l * s * r)
  nbytes = 2 * tokens * itemsize * (k * p + k * q + l * r + l * s)
  return _seconds(flops, nbytes, itemsize)


def dense_seconds(tokens: int, w1_shape, w2_shape, itemsize: int) -> float:
  """Materialize and one dense (tokens, n_in) @ (n_in, n_out) matmul. The
  build is charged as a structured product of n_in 'tokens' (the identity),
  how W was built until session 15; ``ops.monarch_to_dense`` now builds it
  as one batched matmul of the regrouped factors (5-15x fewer FLOPs), so
  this overstates it, which keeps small-token calls (launch-bound, where
  the GPU measurements were split) on the structured path as before."""
  n_in = w1_shape[0] * w1_shape[2]
  n_out = w2_shape[0] * w2_shape[1]
  build = structured_seconds(n_in, w1_shape, w2_shape, itemsize)
  return build + _seconds(2 * tokens * n_in * n_out,
                          itemsize * (tokens * (n_in + n_out) + n_in * n_out),
                          itemsize)


def materialize_problem(tokens: int, w1_shape, w2_shape, itemsize: int,
                        platform: str) -> str | None:
  """None when ``impl="auto"`` should run the materialized dense product, else
  why not."""
  if platform not in GPU_PLATFORMS:
    return f"measured on GPUs only (platform {platform})"
  dense = dense_seconds(tokens, w1_shape, w2_shape, itemsize)
  structured = structured_seconds(tokens, w1_shape, w2_shape, itemsize)
  if dense > MARGIN * structured:
    return (f"predicted {1e3 * dense:.3f} ms dense vs {1e3 * structured:.3f} "
            "ms structured")
  return None
