#!/usr/bin/env bash
# One-call GPU check for the device tool (H100/H200, jax 0.11 cuda preinstalled):
#   1. compiled (not interpreted) kernels against the XLA reference, forward and
#      gradients, f32 and bf16;  2. the kernel benchmark;  3. pretraining
#   throughput of the 60M/130M presets (bf16), XLA vs Pallas Monarch.
# Needs ml-collections, tensorflow-datasets, grain-free deps carried as wheels
# in .whl (see the device README). Results go to $OUT (JSON + logs).
set -uo pipefail
OUT=${OUT:-runs/device_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/kernel_numerics.log"
import jax, jax.numpy as jnp, numpy as np
from structmat import ops
from structmat.kernels import blockdiag_matmul_pallas, monarch as mk
print(jax.devices())
for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 2e-2)):
  for n, nb, t in ((1024, 4, 512), (4096, 4, 16384)):
    k = jax.random.split(jax.random.key(n), 4); b = n // nb
    x = jax.random.normal(k[0], (t, n), dtype)
    w1 = (jax.random.normal(k[1], (nb, b, b)) / b**.5).astype(dtype)
    w2 = (jax.random.normal(k[2], (nb, b, b)) / b**.5).astype(dtype)
    g = jax.random.normal(k[3], (t, n), dtype)
    f32 = lambda *a: [v.astype(jnp.float32) for v in a]
    for name, ker, ref in (
        ("monarch", lambda x, a, c: mk.monarch_matmul_pallas(x, a, c),
         lambda x, a, c: ops.monarch_matmul(*f32(x, a, c))),
        ("blockdiag", lambda x, a, c: blockdiag_matmul_pallas(x, a),
         lambda x, a, c: ops.blockdiag_matmul(*f32(x, a)))):
      loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * g)
      ga = jax.jit(jax.grad(loss(ker), argnums=(0, 1, 2)))(x, w1, w2)
      gb = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(x, w1, w2)
      errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) /
                    (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(ga, gb)]
      y, r = jax.jit(ker)(x, w1, w2), jax.jit(ref)(x, w1, w2)
      e = float(jnp.max(jnp.abs(y.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
      print(name, jnp.dtype(dtype).name, n, t, "fwd", e, "grads", errs,
            "OK" if max([e] + errs) < tol else "FAIL")
PY
timeout 300 python3 -m experiments.benchmark_kernels --output_dir="$OUT" 2>&1 | tee "$OUT/benchmark_kernels.log"
for impl in xla pallas; do
  timeout 240 python3 -m experiments.benchmark_pretrain --presets=llama_60m,llama_130m \
    --linears=dense,monarch --dtype=bfloat16 --vocab_size=32000 --batch_size=256 \
    --seq_len=256 --output="$OUT/benchmark_pretrain_$impl.json" --impl=$impl \
    2>&1 | tee "$OUT/benchmark_pretrain_$impl.log"
done
