#!/usr/bin/env bash
# One-call GPU check for the device tool (H100/H200, jax 0.11 cuda preinstalled):
#   1. pretraining, 60M and 130M Monarch presets, impl=xla against impl=auto
#      (the losses of identical steps and the step times; auto materializes
#      every 60M layer and 130M's attention), and the 60M dense baseline;
#   2. compiled (not interpreted) kernels against the XLA reference, forward and
#      gradients, on fresh random inputs, never-compiled shapes first (elapsed
#      seconds per line);
#   3. the kernel benchmark (bf16 at n=8192: 512 tokens, 64 and 4 blocks;
#      the float32 kernels at n=4096);
#   4. GPT-2 small (124M, 65,536 tokens per step, vocab 50257): dense, Monarch;
#   5. (only when named) layer-sized Monarch: the attention's 512 = 4 x 128
#      (XLA, materialized, Triton, Mosaic GPU), then LLaMA-60M's MLP (512 <->
#      1376 in 4 blocks: XLA, materialized, Triton in chunks at its own tile
#      and at 32 tokens): where impl=pallas loses its time; then 130M's MLP
#      (768 <-> 2048) in its XLA forms: whether auto should materialize it;
#   6. (only when named) a Monarch preset (P6, default llama_130m) with
#      impl=pallas (every Monarch layer a kernel: Triton, chunked MLP blocks,
#      Mosaic GPU for the padded 768 = 4 x 192 attention on Hopper) against
#      impl=xla: losses of identical steps and step times (and each row's
#      lowering, compile and first-step seconds);
#   7. (only when named) SLTrain with W built whole or in blocks
#      (--kernel_block): step time at 60M (256 x 256 tokens) and memory at 1B
#      (1 x 256 tokens, where XLA:CPU measured 19.3 -> 14.3 GB);
#   8. (only when named) the SLTrain kernel at other tiles (n=4096, rank
#      128, 3%, 16384 tokens): 128-token tiles as before, 256-token tiles on
#      eight warps, 64-entry placement steps, beside dense and XLA;
#   9. (only when named) the two-pass Monarch (XLA stage 1, a Pallas stage
#      2 taking P1 and P2 through its loads and stores; "dwk": its weight
#      gradients as kernels) at n=4096 in 16 blocks (16384 and 512 tokens)
#      and the 60M layers (65536), beside dense, XLA and the fused kernel.
# Steps in order of what is still unmeasured. Session 8 on an H200: steps 1-2
# took 400 s, and 15 minutes of device time (start-up included) held steps
# 1-2 in one call and 3 in a second on the warm machine (it goes back after
# 30 s idle: make the second call at once). Session 11: a start took ~35 s,
# STEPS="2 6" 236 s, STEPS="2 6 3" 454 s (steps run in number order).
# Session 14: a start ~40 s; STEPS="2 3 5" 495 s (steps 2, 3's bf16 sweep
# and 5 each ran into their timeouts: their lists now start where they
# stopped), then STEPS=6 (60M) 126 s, then the 60M and 130M impl=auto rows
# by hand 150 s: 826 s held. Session 15: STEPS="5 6" 379 s (130M
# impl=pallas printed no step in its 150 s), then at once STEPS=3 and that
# row again by hand (190 s, 3 repeats: no step either) 425 s: 849 s held.
# Next: first `S2_KINDS=two_pass STEPS="2 9"` (<= 420 s: session 19's
# two-pass Monarch, and session 20's with kernel weight gradients, compiled
# against float32 XLA, value and gradients, then timed at the issue's shape
# and the 60M layers beside XLA and the fused kernel; if "dwk" wins,
# S6_IMPLS="xla pallas:two_pass_dw" below), then at once, if the budget
# holds, STEPS="5 6" P6=llama_60m
# (<= 480 s: session 17's strided P2 and launch order in the fused kernel,
# the benchmark's forward+backward now with its forward, which jax.grad had
# dropped; the 60M impl=pallas step against xla). Later: STEPS=6 (<= 540 s:
# 130M impl=pallas, one block then all twelve, printing lowering, compile
# and first-step seconds), STEPS=1 S1_IMPLS=auto (<= 295 s), STEPS=3 (<=
# 270 s), step 2 (<= 150 s), STEPS=8 (<= 150 s; session 18) and step 4.
# jax 0.11.2, the image's version, passes the whole CPU suite (session 18).
# The benchmarks import neither tfds nor ml_collections, so no wheels are needed.
# Everything lands in $OUT: run.log and the JSON files. QUICK=1 runs a tiny
# version of every step (on the CPU too, kernels interpreted) to check the script.
set -uo pipefail
OUT=${OUT:-runs/device_check}
mkdir -p "$OUT/f32"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}  # the device image's python3 holds jax
exec > >(tee -a "$OUT/run.log") 2>&1
# STEPS="4" (or "3 4") runs only those steps, e.g. in a second call on a warm
# machine when the first ran out of time.
want() { [[ " ${STEPS:-1 2 3 4} " == *" $1 "* ]]; }
SECONDS=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>/dev/null
$PY -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"

if want 1; then
echo "== 1. pretraining [${SECONDS}s]"
if [ "$QUICK" = 1 ]; then
  P="--batch_size=2 --seq_len=16 --vocab_size=256 --repeats=1"; P60=llama_tiny
  P130=gpt2_tiny
else
  P="--batch_size=256 --seq_len=256 --vocab_size=32000"; P60=llama_60m
  P130=llama_130m
fi
# Session 8 (H200): 60M dense 1,280,959 tokens/s, Monarch xla 858,549, auto
# (Triton attention) 928,810; 130M dense 609,706. Session 14: auto
# (materialized) 57.0 / 130.5 ms per step, xla 73.5 / 157 (session 15).
# Session 15 builds the materialized W as one batched matmul of the
# regrouped factors (ops.monarch_to_dense): S1_IMPLS=auto times only that
# (the dense 60M row rides with the first impl). Each 60M row takes 25-50
# s, a 130M Monarch one more than 65 s.
for preset in $P60 $P130; do
  first=1
  for impl in ${S1_IMPLS:-xla auto}; do
    L=monarch; T=120
    [ $preset = $P60 ] && T=75 && [ $first = 1 ] && L=dense,monarch T=100
    first=0
    timeout $T $PY -m experiments.benchmark_pretrain $P --presets=$preset \
      --linears=$L --dtype=bfloat16 --impl=$impl \
      --output="$OUT/pretrain_${preset}_$impl.json"
  done
done
$PY - "$OUT" $P60 $P130 <<'PY'
import json, os, sys
load = lambda name: (json.load(open(f"{sys.argv[1]}/{name}"))["rows"]
                     if os.path.exists(f"{sys.argv[1]}/{name}") else [])
for preset in sys.argv[2:]:
 for r in load(f"pretrain_{preset}_auto.json"):
  base = next((b for b in load(f"pretrain_{preset}_xla.json")
               if b["linear"] == r["linear"]), None)
  if base is None:
    print(r["preset"], "no impl=xla row to compare with"); continue
  print(r["preset"], r["linear"], "auto vs xla step",
        f"{r['step_ms']:.1f} / {base['step_ms']:.1f} ms", "losses",
        [f"{u:.5f}/{v:.5f}" for u, v in zip(r["losses"], base["losses"])],
        "max rel diff", max(abs(u - v) / abs(v) for u, v in zip(r["losses"], base["losses"])))
PY
fi

if want 2; then
echo "== 2. compiled kernels vs XLA reference [${SECONDS}s]"
# S2_KINDS (e.g. "two_pass") checks only those kinds.
QUICK=$QUICK S2_KINDS="${S2_KINDS:-}" timeout 150 $PY - <<'PY'
import os, time
import jax, jax.numpy as jnp
from structmat import ops
from structmat.kernels import blockdiag_matmul_pallas, monarch as mk
from structmat.kernels import monarch_mgpu as mg, sltrain as sk
from structmat.kernels import monarch_two_pass as m2
quick = os.environ["QUICK"] == "1"
bf16, fp32 = jnp.bfloat16, jnp.float32
TOL = {bf16: 2e-2, fp32: 2e-3}
# (kind, dtype, shape), never-compiled code first: the 120 s may not reach
# the end (Triton compiles each shape for seconds). Monarch / blockdiag
# shapes are (n_in, n_out, nblocks, tokens); SLTrain (n_in, n_out, tokens[,
# rank]); Mosaic GPU (n, nblocks, tokens, warpgroups). First the chunked
# blocks whose weight gradients take twice session 11's token step under the
# 224 KiB budget (512 <-> 1376, LLaMA-60M's MLP in 256-wide chunks; 768 f32
# in 128-wide chunks; 2048 -> 768 with 8 warps), then the rest; session 14
# compiled (all OK) the Mosaic GPU forward, dx and dw with one and two
# warpgroups, the looped whole blocks (n=4096 in 16, 512 and 768 in 4, 1024
# f32 in 16) and SLTrain in rank slices and padded ranks: last.
if quick:
  checks = ([("two_pass", d, s) for d in (bf16, fp32) for s in (
                (64, 64, 4, 32), (96, 96, 4, 32))]
            + [("two_pass", bf16, (64, 96, 4, 32, True))]
            + [("monarch", d, s) for d in (bf16, fp32) for s in (
                (64, 64, 4, 32), (96, 96, 4, 32), (256, 688, 2, 32))]
            + [("mgpu", bf16, (128, 2, 128, w)) for w in (1, 2)]
            + [("sltrain", d, s) for d in (bf16, fp32)
               for s in ((256, 256, 64), (64, 100, 64), (64, 96, 64, 24))])
else:
  # Session 19's two-pass Monarch, never compiled: the issue's shape (also
  # with session 20's weight-gradient kernels, dwk), 4 blocks (q/l = 256 in
  # dot steps), the 60M MLP (chunked s and p) and the 130M attention (q/l =
  # 48 padded), bf16 and one f32; then dwk at the 60M MLP.
  checks = ([("two_pass", bf16, (4096, 4096, 16, 16384, dwk))
             for dwk in (False, True)]
            + [("two_pass", bf16, s) for s in (
                (4096, 4096, 4, 16384), (512, 1376, 4, 4096),
                (1376, 512, 4, 4096), (768, 768, 4, 4096))]
            + [("two_pass", fp32, (4096, 4096, 16, 16384))]
            + [("two_pass", bf16, s + (True,)) for s in (
                (512, 1376, 4, 4096), (1376, 512, 4, 4096))]
            + [("monarch", bf16, (2048, 768, 4, 4096)),
             ("monarch", bf16, (512, 1376, 4, 4096)),
             ("monarch", bf16, (1376, 512, 4, 4096)),
             ("monarch", fp32, (768, 768, 4, 4096)),
             ("monarch", fp32, (512, 1376, 4, 4096))]
            + [("monarch", fp32, s) for s in (
                (1024, 1024, 4, 512), (4096, 4096, 16, 16384),
                (2048, 2048, 8, 4096))]
            + [("sltrain", bf16, (512, 1365, 512))]
            + [("monarch", bf16, s) for s in (
                (1024, 1024, 4, 512), (1024, 1024, 16, 16384),
                (2048, 2048, 8, 4096))]
            + [("sltrain", d, s) for d in (bf16, fp32)
               for s in ((1024, 1024, 512), (4096, 4096, 4096))]
            + [("mgpu", bf16, (n, 4, 4096, w)) for n in (512, 768)
               for w in (1, 2)]
            + [("monarch", bf16, (4096, 4096, 16, 16384)),
               ("monarch", bf16, (512, 512, 4, 4096)),
               ("monarch", bf16, (768, 768, 4, 4096)),
               ("monarch", fp32, (1024, 1024, 16, 16384)),
               ("sltrain", fp32, (2048, 5461, 1024, 512)),
               ("sltrain", bf16, (768, 3072, 1024, 192))])
f32 = lambda *a: [v.astype(jnp.float32) for v in a]
t0 = time.time()
_print = print
print = lambda *a, **k: _print(f"[{time.time() - t0:5.0f}s]", *a, **k)
# Relative L2 error of a kernel's result against the float32 reference.
rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b)
                         / (jnp.linalg.norm(b) + 1e-30))
loss = lambda f, g: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * g)


def grads_vs_ref(ker, ref, args, g, jit=True):
  """Relative errors of the value and of every argument's gradient."""
  n = tuple(range(len(args)))
  wrap = jax.jit if jit else (lambda f: f)
  ga = wrap(jax.grad(loss(ker, g), argnums=n))(*args)
  gb = jax.jit(jax.grad(loss(ref, g), argnums=n))(*args)
  return [rel(wrap(ker)(*args), jax.jit(ref)(*args))] + [
      rel(p, q) for p, q in zip(ga, gb)]


def monarch(dtype, n, n_out, nb, t):
  k = jax.random.split(jax.random.key(n * nb + t), 4)
  s1, s2, _, _ = ops.monarch_shapes(n, n_out, nb)
  x = jax.random.normal(k[0], (t, n), dtype)
  w1 = (jax.random.normal(k[1], s1) / s1[2]**.5).astype(dtype)
  w2 = (jax.random.normal(k[2], s2) / s2[2]**.5).astype(dtype)
  g = jax.random.normal(k[3], (t, n_out), dtype)
  # the tile impl="pallas" takes in training (dispatch: at most 128 tokens)
  bt = mk.fit_block_tokens(t, s1, s2, x.dtype.itemsize, jax.default_backend())
  yield "monarch", grads_vs_ref(
      lambda x, a, c: mk.monarch_matmul_pallas(x, a, c, block_tokens=bt),
      lambda x, a, c: ops.monarch_matmul(*f32(x, a, c)), (x, w1, w2), g)
  b = n // nb
  if b & (b - 1) == 0 and n == n_out:  # Triton blocks: powers of two
    yield "blockdiag", grads_vs_ref(
        lambda x, a: blockdiag_matmul_pallas(x, a, block_tokens=min(64, t)),
        lambda x, a: ops.blockdiag_matmul(*f32(x, a)), (x, w1), g[:, :n])


def two_pass(dtype, n, n_out, nb, t, dw_kernel=False):
  k = jax.random.split(jax.random.key(n * nb + t + 1), 4)
  s1, s2, _, _ = ops.monarch_shapes(n, n_out, nb)
  x = jax.random.normal(k[0], (t, n), dtype)
  w1 = (jax.random.normal(k[1], s1) / s1[2]**.5).astype(dtype)
  w2 = (jax.random.normal(k[2], s2) / s2[2]**.5).astype(dtype)
  g = jax.random.normal(k[3], (t, n_out), dtype)
  bt = m2.fit_block_tokens(t, s1, s2, x.dtype.itemsize, jax.default_backend())
  yield "monarch two-pass" + (" dwk" if dw_kernel else ""), grads_vs_ref(
      lambda x, a, c: m2.monarch_matmul_two_pass(x, a, c, block_tokens=bt,
                                                 dw_kernel=dw_kernel),
      lambda x, a, c: ops.monarch_matmul(*f32(x, a, c)), (x, w1, w2), g)


def mgpu(dtype, n, nb, t, wgs=1):
  # The Mosaic GPU forward, dx and (since session 12) dw1, dw2, with wgs
  # consumer warpgroups per CTA where they fit.
  k = jax.random.split(jax.random.key(n + t), 4); b = n // nb
  x = jax.random.normal(k[0], (t, n), dtype)
  w1 = (jax.random.normal(k[1], (nb, b, b)) / b**.5).astype(dtype)
  w2 = (jax.random.normal(k[2], (nb, b, b)) / b**.5).astype(dtype)
  g = jax.random.normal(k[3], (t, n), dtype)
  # Interpreted (QUICK on a CPU), two warpgroups run as nested computations
  # that can starve XLA:CPU's threads under jit(grad) (hung on 2 cores).
  yield f"monarch mgpu {wgs}wg", grads_vs_ref(
      lambda *a: mg.monarch_matmul_mgpu(*a, warpgroups=wgs),
      lambda *a: ops.monarch_matmul(*f32(*a)), (x, w1, w2), g,
      jit=not (quick and wgs > 1))


def sltrain(dtype, n, m, t, r=None):
  # rank n/32 unless given, 3% support (the kernel never writes the dense W).
  k = jax.random.split(jax.random.key(n + t), 5); r = r or max(16, n // 32)
  x = jax.random.normal(k[0], (t, n), dtype)
  a = (jax.random.normal(k[1], (n, r)) / n**.5).astype(dtype)
  b = (jax.random.normal(k[2], (r, m)) / r**.5).astype(dtype)
  idx = ops.draw_support(k[3], n, m, 0.03)
  v = (jax.random.normal(k[4], idx.shape) / n**.5).astype(dtype)
  g = jax.random.normal(k[0], (t, m), dtype)
  yield "sltrain", grads_vs_ref(
      lambda x, a, b, v: sk.sltrain_matmul_pallas(x, a, b, v, idx, 1.0),
      lambda x, a, b, v: ops.sltrain_matmul(*f32(x, a, b, v), idx, 1.0),
      (x, a, b, v), g)


RUN = {"monarch": monarch, "mgpu": mgpu, "sltrain": sltrain,
       "two_pass": two_pass}
only = os.environ["S2_KINDS"].split()
for kind, dtype, shape in checks:
  if only and kind not in only:
    continue
  what = f"{jnp.dtype(dtype).name} {shape}"
  try:
    for name, errs in RUN[kind](dtype, *shape):
      ok = max(errs) < TOL[dtype]
      print(name, what, "value, grads", [f"{e:.1e}" for e in errs],
            "OK" if ok else "FAIL", flush=True)
  except Exception as ex:  # a shape a kernel cannot compile: report, go on
    print(kind, what, "ERROR", f"{type(ex).__name__}: {str(ex)[:400]}",
          flush=True)
PY
fi

if want 3; then
echo "== 3. kernel benchmark [${SECONDS}s]"
if [ "$QUICK" = 1 ]; then
  K="--sizes=64 --tokens=64 --nblocks=4 --quick --interpret"; KF="$K"
else
  # Session 14 timed n=4096 in 16 and 64 blocks at 16384 tokens; session 15
  # n=8192 in 16 blocks at 16384 (Triton 5x slower than XLA) and, in f32 at
  # n=4096 in 16, dense, XLA and materialized, before the timeouts: the
  # rest of n=8192 next (512 tokens first), then the f32 kernels.
  K="--sizes=8192 --tokens=512,16384 --nblocks=64,4,16"
  KF="--sizes=4096 --tokens=16384 --nblocks=16,64"
fi
I="dense,monarch xla,monarch materialized,monarch pallas,monarch pallas bt64,"
I+="blockdiag xla,blockdiag pallas"
IF="monarch xla,monarch pallas,blockdiag xla,blockdiag pallas"
timeout 150 $PY -m experiments.benchmark_kernels $K --impls="$I" \
  --dtypes=bfloat16 --output_dir="$OUT"
timeout 110 $PY -m experiments.benchmark_kernels $KF --impls="$IF" \
  --dtypes=float32 --output_dir="$OUT/f32"
fi

if want 4; then
echo "== 4. GPT-2 small [${SECONDS}s]"
if [ "$QUICK" = 1 ]; then
  G="--presets=gpt2_tiny --batch_size=2 --seq_len=16 --vocab_size=256 --repeats=1"
else
  G="--presets=gpt2_small --batch_size=64 --seq_len=1024 --vocab_size=50257"
fi
timeout 200 $PY -m experiments.benchmark_pretrain $G --linears=dense,monarch \
  --dtype=bfloat16 --impl=auto --output="$OUT/gpt2.json"
fi

if [[ " ${STEPS:-} " == *" 5 "* ]]; then
echo "== 5. layer-sized Monarch: attention and MLP shapes [${SECONDS}s]"
# 768 = 4 x 192 (LLaMA-130M / GPT-2 attention) timed in session 14: Mosaic
# GPU with its own dw 1.5x faster than padded Triton, 1.1x slower than XLA,
# two warpgroups no gain; the materialized matmul 2.9x faster than both.
# 512 = 4 x 128 (LLaMA-60M) at 65536 tokens next (its 4096-token rows were
# launch-bound). Then the MLPs: the 60M step with impl=pallas is 1.27x
# impl=xla's, and these chunked kernels were never timed alone.
if [ "$QUICK" = 1 ]; then
  KP="--sizes=128 --tokens=64 --nblocks=2 --quick --interpret"
  KM="--sizes=64:96 --tokens=64 --nblocks=4 --quick --interpret"
else
  KP="--sizes=512 --nblocks=4 --tokens=65536"
  KM="--sizes=512:1376,1376:512 --nblocks=4 --tokens=65536"
fi
MG="monarch mgpu,monarch mgpu 2wg,monarch mgpu portable dw"
# Session 17: "monarch pallas" stores P2 itself (l-strided stores; its
# programs launch l-fastest), "p2 xla" the block-major output XLA permutes
# as before, and the 344-wide chunks run as 256 + 128 (256 + 256 before).
timeout 100 $PY -m experiments.benchmark_kernels $KP --dtypes=bfloat16 \
  --impls="monarch xla,monarch materialized,dense,monarch pallas,monarch pallas p2 xla,$MG" \
  --output_dir="$OUT/attention"
timeout 140 $PY -m experiments.benchmark_kernels $KM --dtypes=bfloat16 \
  --impls="dense,monarch xla,monarch materialized,monarch pallas,monarch pallas p2 xla,monarch pallas bt32" \
  --output_dir="$OUT/mlp"
# LLaMA-130M's MLP (768 <-> 2048 in 4 blocks), XLA forms only: the roofline
# keeps it structured under auto (materialized predicted 0.79-0.81x, margin
# 0.75), while the 60M MLP's 1376 -> 512, predicted 0.54x, measured 0.79x
# and still won (session 15). Whether 130M's gap to dense is its MLPs.
if [ "$QUICK" = 1 ]; then KM130="$KM"; else
  KM130="--sizes=768:2048,2048:768 --nblocks=4 --tokens=65536"; fi
timeout 60 $PY -m experiments.benchmark_kernels $KM130 --dtypes=bfloat16 \
  --impls="dense,monarch xla,monarch materialized" --output_dir="$OUT/mlp130"
fi

if [[ " ${STEPS:-} " == *" 6 "* ]]; then
echo "== 6. pretraining, Monarch, impl=pallas vs xla [${SECONDS}s]"
# 60M: sessions 11 and 14 (93.0 vs 73.5 ms, losses within 2e-6). 130M:
# session 15's xla row 157 ms; its pallas row printed no step in 150 s (nor
# in 190 s alone): benchmark_pretrain now prints its lowering, compile and
# first-step seconds. First one block with impl=pallas (what each block
# costs to lower and compile), then the whole model both ways. Since
# session 16 each kernel product is lowered once per shape (shared_trace):
# the 12-layer 130M step lowers for an H100 in 2.6 s on the 2-core CPU
# (43 s before) with 2 distinct Mosaic GPU modules (9 before).
if [ "$QUICK" = 1 ]; then
  P="--batch_size=2 --seq_len=16 --vocab_size=256 --repeats=1"; P6=llama_tiny
else
  P="--batch_size=256 --seq_len=256 --vocab_size=32000"; P6=${P6:-llama_130m}
fi
if [ -z "${S6_IMPLS:-}" ]; then
  timeout 90 $PY -m experiments.benchmark_pretrain $P --presets=$P6 \
    --linears=monarch --dtype=bfloat16 --impl=pallas --n_layers=1 \
    --output="$OUT/pallas_${P6}_1block.json"
fi
# S6_IMPLS="xla pallas:two_pass" times session 19's two-pass Monarch in
# training instead of (or beside) the fused kernels.
for impl in ${S6_IMPLS:-xla pallas}; do
  T=120; [ $impl != xla ] && T=330
  timeout $T $PY -m experiments.benchmark_pretrain $P --presets=$P6 \
    --linears=monarch --dtype=bfloat16 --impl=$impl \
    --output="$OUT/pallas_${P6}_${impl/:/_}.json"
done
$PY - "$OUT/pallas_${P6}" ${S6_IMPLS:-xla pallas} <<'PY'
import json, os, sys
rows = {i: json.load(open(f"{sys.argv[1]}_{i.replace(':', '_')}.json"))["rows"]
        for i in sys.argv[2:]
        if os.path.exists(f"{sys.argv[1]}_{i.replace(':', '_')}.json")}
for impl in rows:
  for r, b in zip(rows[impl] if impl != "xla" else [], rows.get("xla", [])):
    print(r["preset"], impl, "vs xla step",
          f"{r['step_ms']:.1f} / {b['step_ms']:.1f} ms", "max rel loss diff",
          max(abs(u - v) / abs(v) for u, v in zip(r["losses"], b["losses"])))
PY
fi

if [[ " ${STEPS:-} " == *" 7 "* ]]; then
echo "== 7. SLTrain, W whole vs in blocks [${SECONDS}s]"
if [ "$QUICK" = 1 ]; then
  RUNS="llama_tiny:2:16:256:8"
else  # preset:batch:seq:vocab:block
  RUNS="llama_60m:256:256:32000:512 llama_1b:1:256:32000:1024"
fi
for run in $RUNS; do
  IFS=: read -r preset batch seq vocab block <<< "$run"
  for kb in 0 $block; do
    timeout 150 $PY -m experiments.benchmark_pretrain --presets=$preset \
      --linears=sltrain --batch_size=$batch --seq_len=$seq \
      --vocab_size=$vocab --dtype=bfloat16 --repeats=3 --kernel_block=$kb \
      --output="$OUT/sltrain_${preset}_kb$kb.json"
  done
done
fi

if [[ " ${STEPS:-} " == *" 8 "* ]]; then
echo "== 8. SLTrain kernel tiles [${SECONDS}s]"
# Session 11 (H200): forward 9.04 ms against dense 0.76 and XLA 0.84 (2.87
# with no sparse entries). Each program rebuilds its sparse tiles, per token
# tile (c/bt of a dense product: "bt256" halves it) in a data-dependent
# chain of one-hot dots ("c64": half as many, twice as wide); the output
# tiles launch first since session 17. Drawing the support takes seconds.
if [ "$QUICK" = 1 ]; then
  KS="--sizes=64 --tokens=64 --quick --interpret"
else
  KS="--sizes=4096 --tokens=16384"
fi
timeout 150 $PY -m experiments.benchmark_kernels $KS --nblocks=16 \
  --dtypes=bfloat16 --output_dir="$OUT/sltrain" \
  --impls="dense,sltrain xla,sltrain pallas,sltrain pallas bt256,sltrain pallas c64"
fi

if [[ " ${STEPS:-} " == *" 9 "* ]]; then
echo "== 9. two-pass Monarch against XLA and the fused kernel [${SECONDS}s]"
# Session 19's form: XLA's block-diagonal stage 1 (measured at the copy
# roofline: 0.092 ms at n=4096 in 16 blocks), a stage-2 kernel reading it
# through P1 and writing y through P2: 4 passes where XLA's Monarch makes 8
# (0.392 / 0.815 ms; the fused kernel 0.781 / 1.551, session 14). The
# issue's shape at 16384 and 512 tokens, then the 60M layers at 65536.
if [ "$QUICK" = 1 ]; then
  K9="--sizes=64 --tokens=64 --nblocks=4 --quick --interpret"
  K9L="--sizes=64:96 --tokens=64 --nblocks=4 --quick --interpret"
else
  K9="--sizes=4096 --tokens=16384,512 --nblocks=16"
  K9L="--sizes=512,512:1376,1376:512 --nblocks=4 --tokens=65536"
fi
T2="monarch two-pass,monarch two-pass bt128,monarch two-pass p2 xla"
T2="$T2,monarch two-pass dwk"
timeout 140 $PY -m experiments.benchmark_kernels $K9 --dtypes=bfloat16 \
  --impls="dense,monarch xla,blockdiag xla,$T2,monarch pallas" \
  --output_dir="$OUT/two_pass"
timeout 130 $PY -m experiments.benchmark_kernels $K9L --dtypes=bfloat16 \
  --impls="dense,monarch xla,monarch materialized,$T2" \
  --output_dir="$OUT/two_pass_layers"
fi
