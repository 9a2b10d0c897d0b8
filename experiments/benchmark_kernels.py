r"""Kernel benchmark (GPU/TPU): dense, XLA Monarch, ragged_dot Monarch, Pallas kernels.

  python -m experiments.benchmark_kernels --output_dir=$OUT          # full sweep
  python -m experiments.benchmark_kernels --sizes=256 --tokens=256 --dtypes=float32 --quick

For each size in --sizes (n, square, or IN:OUT, e.g. 512:1376 for
LLaMA-60M's MLP), token count in --tokens and dtype: forward and
forward+backward time of a dense n x n (IN x OUT) matmul, the XLA Monarch path
(``ops.monarch_matmul``), Monarch through ``jax.lax.ragged_dot``, the fused
Pallas Monarch kernel (Triton; on GPUs also the Mosaic GPU forward), the
Pallas block-diagonal kernel (and on TPUs megablox
gmm and the TPU Monarch and SLTrain kernels), and SLTrain (rank
n/32, 3% support) through XLA (dense W materialized) and the Pallas
reconstruct-and-multiply kernel; the bytes
each must move (x, y and weights once), achieved bandwidth, and its share of
the measured copy bandwidth (a copy of x, timed in the same run). Every row
checks its numbers against the float32 XLA reference first (Triton has
miscompiled before). Each row prints its wall seconds (compiles included)
as it ends, and the JSON in --output_dir is rewritten after every row, so a
sweep a timeout stops keeps what it measured. Table last. On the CPU the Pallas
rows run in interpret mode only with --interpret (slow; for smoke tests).
"""
import functools
import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from structmat import ops
from structmat.kernels import blockdiag_matmul_pallas
from structmat.kernels.blockdiag_gmm import blockdiag_matmul_gmm
from structmat.kernels import monarch as mk
from structmat.kernels import monarch_mgpu as mg
from structmat.kernels import monarch_tpu as mt
from structmat.kernels import monarch_two_pass as m2
from structmat.kernels import roofline
from structmat.kernels import sltrain as sk
from structmat.kernels import sltrain_tpu as stk
from structmat.utils.timing import format_table, time_fn

_SIZES = flags.DEFINE_list("sizes", ["1024", "4096", "8192"], "Widths: n "
                           "(square) or IN:OUT (a rectangular layer).")
_TOKENS = flags.DEFINE_list("tokens", ["16384", "512"], "Token counts.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "dtypes.")
_NBLOCKS = flags.DEFINE_list("nblocks", ["4", "16", "64"], "Monarch blocks "
                              "(4: compute-bound at large n; 64 = sqrt(4096): "
                              "memory-bound).")
_IMPLS = flags.DEFINE_list("impls", [], "Rows to run, by name (e.g. 'monarch "
                           "xla,monarch pallas'); empty: all.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls.")
_QUICK = flags.DEFINE_bool("quick", False, "Few repeats (smoke test).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run Pallas rows on the CPU "
                               "in interpret mode.")
_OUT = flags.DEFINE_string("output_dir", "runs/benchmark_kernels", "JSON dir.")


def ragged_monarch(x, w1, w2):
  """Monarch through jax.lax.ragged_dot (grouped matmuls), for comparison."""
  k, q, p = w1.shape
  l, s, r = w2.shape
  b = x.shape[0]
  xt = x.reshape(b, k, p).transpose(1, 0, 2).reshape(k * b, p)
  sizes = jnp.full((k,), b, jnp.int32)
  h = jax.lax.ragged_dot(xt, w1.transpose(0, 2, 1), sizes).reshape(k, b, q)
  z = h.transpose(1, 0, 2).reshape(b, r, l).transpose(2, 0, 1).reshape(l * b, r)
  o = jax.lax.ragged_dot(z, w2.transpose(0, 2, 1), jnp.full((l,), b, jnp.int32))
  return o.reshape(l, b, s).transpose(1, 2, 0).reshape(b, s * l)


def parse_size(text: str) -> tuple[int, int]:
  """'4096' -> (4096, 4096); '512:1376' -> (512, 1376)."""
  parts = text.split(":")
  try:
    dims = tuple(int(v) for v in parts)
  except ValueError:
    dims = ()
  if len(dims) not in (1, 2) or min(dims) < 1:
    raise ValueError(f"--sizes: {text!r} is neither n nor IN:OUT (positive "
                     "integers, e.g. 4096 or 512:1376).")
  return dims[0], dims[-1]


def rows_for(n, tokens, dtype, nb, repeats, interpret, n_out=None):
  """Every row at one configuration, yielded as each is measured: (tokens,
  n) inputs, n -> n_out (default n) layers, Monarch in ``nb`` blocks (fly's
  factor shapes)."""
  n_out = n_out or n
  keys = jax.random.split(jax.random.key(n_out + tokens), 4)
  s1, s2, _, _ = ops.monarch_shapes(n, n_out, nb)
  x = jax.random.normal(keys[0], (tokens, n), dtype)
  w = (jax.random.normal(keys[1], (n, n_out)) / np.sqrt(n)).astype(dtype)
  w1 = (jax.random.normal(keys[2], s1) / np.sqrt(s1[2])).astype(dtype)
  w2 = (jax.random.normal(keys[3], s2) / np.sqrt(s2[2])).astype(dtype)
  wb = w1  # block-diagonal: the first Monarch factor alone

  @functools.cache
  def sl():
    """SLTrain's (a, b, values), support and its tile orders, at the paper's
    settings: rank n/32 (128 at 4096), 3% support. Built only for SLTrain
    rows: drawing the support keys all n * n_out positions (3 s at n=8192
    on a 2-core CPU) and its tile orders sort it twice."""
    rank = max(16, min(n, n_out) // 32)
    sa = (jax.random.normal(keys[1], (n, rank)) / np.sqrt(n)).astype(dtype)
    sb = (jax.random.normal(keys[2], (rank, n_out))
          / np.sqrt(rank)).astype(dtype)
    sidx = ops.draw_support(keys[3], n, n_out, 0.03)
    sv = (jax.random.normal(keys[0], sidx.shape) / np.sqrt(n)).astype(dtype)
    # The orders as the layer stores them.
    return (sa, sb, sv), sidx, sk.support_orders(sidx, n, n_out)

  sidx = lambda: sl()[1]
  itemsize = jnp.dtype(dtype).itemsize
  inner = 1 if jax.default_backend() == "cpu" else 10
  copy_s = time_fn(jax.jit(lambda x: x + 1), x, repeats=repeats, inner=inner)
  copy_bw = 2 * x.size * itemsize / copy_s
  pallas_ok = jax.default_backend() != "cpu" or interpret
  bt = min(128, tokens)
  # (name, fn(x, *weights), weights or a function giving them, for SLTrain's
  # built on demand): forward+backward differentiates the input and every
  # weight against a random cotangent (a constant cotangent lets XLA skip
  # work).
  cases = [
      ("dense", lambda x, w: x @ w, (w,)),
      ("monarch xla", ops.monarch_matmul, (w1, w2)),
      # What impl="auto" runs on GPUs at small widths (kernels/roofline.py).
      ("monarch materialized", ops.monarch_matmul_dense, (w1, w2)),
      ("monarch ragged_dot", ragged_monarch, (w1, w2)),
      ("blockdiag xla", ops.blockdiag_matmul, (wb,)),
      ("sltrain xla", lambda x, a, b, v: ops.sltrain_matmul(
          x, a, b, v, sidx(), 1.0), lambda: sl()[0]),
      # W built a quarter at a time, none of it kept for the backward
      # (the layer's kernel_block).
      ("sltrain blocked", lambda x, a, b, v: ops.sltrain_matmul(
          x, a, b, v, sidx(), 1.0, block=max(1, n // 4)), lambda: sl()[0]),
  ]
  if pallas_ok:
    interp = interpret or None
    # "monarch pallas": the tile impl="auto" would take (the largest of at
    # most 128 tokens whose shared memory fits).
    mbt = mk.fit_block_tokens(tokens, w1.shape, w2.shape, itemsize,
                              "cpu" if interpret else jax.default_backend())
    tbt = m2.fit_block_tokens(tokens, w1.shape, w2.shape, itemsize,
                              "cpu" if interpret else jax.default_backend())
    cases += [
        ("monarch pallas", lambda x, a, b: mk.monarch_matmul_pallas(
            x, a, b, block_tokens=mbt, interpret=interp), (w1, w2)),
        # The output permutation left to XLA, as before session 17 (it now
        # rides in the kernel's l-strided stores): which is faster needs a GPU.
        ("monarch pallas p2 xla", lambda x, a, b: mk.monarch_matmul_pallas(
            x, a, b, block_tokens=mbt, interpret=interp, strided_p2=False),
         (w1, w2)),
        ("monarch pallas bt64", lambda x, a, b: mk.monarch_matmul_pallas(
            x, a, b, block_tokens=min(64, tokens), interpret=interp), (w1, w2)),
        # Chunked blocks spill at 64-128 tokens, not at 32 (bf16; offline
        # compiler, tools/triton_smem.py): which is faster needs a GPU.
        ("monarch pallas bt32", lambda x, a, b: mk.monarch_matmul_pallas(
            x, a, b, block_tokens=min(32, tokens), interpret=interp), (w1, w2)),
        # XLA's block-diagonal stage 1, then a kernel that reads it once
        # through P1 and writes y once through P2 (session 19): 4 passes
        # over the activations where XLA's path makes 8; at its own tile
        # (fit_block_tokens: 64 tokens at 256-wide outputs), at 128 (half
        # the factor re-reads, an accumulator that spilled offline), and
        # with P2 left to XLA.
        ("monarch two-pass", lambda x, a, b: m2.monarch_matmul_two_pass(
            x, a, b, block_tokens=tbt, interpret=interp), (w1, w2)),
        ("monarch two-pass bt128", lambda x, a, b: m2.monarch_matmul_two_pass(
            x, a, b, block_tokens=min(128, tokens), interpret=interp),
         (w1, w2)),
        ("monarch two-pass p2 xla", lambda x, a, b: m2.monarch_matmul_two_pass(
            x, a, b, block_tokens=tbt, interpret=interp, strided_p2=False),
         (w1, w2)),
        # Its weight gradients as token-reduction kernels reading h and dz
        # in place, where XLA's contractions may copy both (session 20).
        ("monarch two-pass dwk", lambda x, a, b: m2.monarch_matmul_two_pass(
            x, a, b, block_tokens=tbt, interpret=interp, dw_kernel=True),
         (w1, w2)),
        ("blockdiag pallas", lambda x, a: blockdiag_matmul_pallas(
            x, a, block_tokens=bt, interpret=interp), (wb,)),
        ("sltrain pallas", lambda x, a, b, v: sk.sltrain_matmul_pallas(
            x, a, b, v, sidx(), 1.0, orders=sl()[2], block_tokens=bt,
            interpret=interp), lambda: sl()[0]),
        # Each program rebuilds its sparse tiles, so that work per token
        # halves with 256-token tiles (eight warps, sltrain.fwd_warps); fewer,
        # wider placement steps (c64: 64 entries each) shorten the
        # data-dependent chain of one-hot dots. Which wins needs a GPU.
        ("sltrain pallas bt256", lambda x, a, b, v: sk.sltrain_matmul_pallas(
            x, a, b, v, sidx(), 1.0, orders=sl()[2],
            block_tokens=min(256, tokens), interpret=interp),
         lambda: sl()[0]),
        ("sltrain pallas c64", lambda x, a, b, v: sk.sltrain_matmul_pallas(
            x, a, b, v, sidx(), 1.0, orders=sl()[2], block_tokens=bt,
            chunk=64, interpret=interp), lambda: sl()[0]),
    ]
  if (jax.default_backend() == "gpu" or interpret) and itemsize == 2:
    # Mosaic GPU (Hopper; 16-bit), factors resident in shared memory: the
    # forward and dx, and dw1, dw2 (monarch_mgpu_dw, session 12) against
    # the portable kernels' dw (session 8's form); "2wg": two consumer
    # warpgroups per CTA where they fit (session 12).
    for name, own_dw, wgs in (("monarch mgpu", True, 1),
                              ("monarch mgpu 2wg", True, 2),
                              ("monarch mgpu portable dw", False, 1)):
      cases.append((name, functools.partial(
          mg.monarch_matmul_mgpu, interpret=interpret or None, own_dw=own_dw,
          warpgroups=wgs), (w1, w2)))
  if jax.default_backend() == "tpu" or interpret:
    # megablox's grouped matmul, the TPU comparison for the block-diagonal
    # kernel.
    cases.append(("blockdiag gmm", lambda x, a: blockdiag_matmul_gmm(
        x, a, interpret=interpret or None), (wb,)))
    # The TPU Monarch kernel (tokens in lanes), at the largest tile that fits
    # its VMEM budget.
    tpu_bt = mt.fit_block_tokens(tokens, w1.shape, w2.shape, itemsize)
    cases.append(("monarch tpu", lambda x, a, b: mt.monarch_matmul_tpu(
        x, a, b, block_tokens=tpu_bt, interpret=interpret or None), (w1, w2)))
    if mt.backward_form(tpu_bt, w1.shape, w2.shape, itemsize) == "fused":
      # The three-kernel backward the kernel takes where the fused one does
      # not fit VMEM, at the same tile: what splitting costs.
      cases.append(("monarch tpu split", lambda x, a, b: mt.monarch_matmul_tpu(
          x, a, b, block_tokens=tpu_bt, backward="split",
          interpret=interpret or None), (w1, w2)))
    cases.append(("sltrain tpu", lambda x, a, b, v: stk.sltrain_matmul_tpu(
        x, a, b, v, sidx(), 1.0, orders=sl()[2], block_tokens=min(256, tokens),
        interpret=interpret or None), lambda: sl()[0]))
  f32 = lambda a: a.astype(jnp.float32)
  # float32 references, each computed once, when a row of its family first
  # needs it.
  refs = {"dense": lambda: f32(x) @ f32(w),
          "monarch": lambda: ops.monarch_matmul(f32(x), f32(w1), f32(w2)),
          "blockdiag": lambda: ops.blockdiag_matmul(f32(x), f32(wb)),
          "sltrain": lambda: ops.sltrain_matmul(f32(x), *map(f32, sl()[0]),
                                                sidx(), 1.0)}
  refs = {k: functools.cache(v) for k, v in refs.items()}
  if _IMPLS.value:
    unknown = set(_IMPLS.value) - {c[0] for c in cases}
    if unknown:
      raise ValueError(f"--impls: unknown {sorted(unknown)}; rows here are "
                       f"{[c[0] for c in cases]}.")
    cases = [c for c in cases if c[0] in _IMPLS.value]
  # Blocks wider than a Triton tile run in chunks (impl="pallas" only, never
  # taken by auto): unless named in --impls, a GPU sweep skips their compiles.
  skip_chunked = (not _IMPLS.value and jax.default_backend() == "gpu"
                  and mk.chunked(w1.shape, w2.shape, itemsize))
  for name, fn, weights in cases:
    t0 = time.perf_counter()
    try:
      if skip_chunked and name.startswith("monarch pallas"):
        raise ValueError("skipped: blocks wider than a chunk of shared "
                         "memory run in chunks; name the row in --impls to "
                         "time it")
      if interpret and name == "monarch mgpu 2wg":
        # jax's interpreter runs each warpgroup as a nested computation on
        # a thread; under the jit timing uses they starved XLA:CPU's pool.
        raise ValueError("skipped: two interpreted warpgroups can hang under "
                         "jit (jax's Mosaic GPU interpreter); time it on a "
                         "GPU")
      weights = weights() if callable(weights) else weights
      r = _measure(name, fn, x, weights, refs[name.split()[0]](), dtype,
                   repeats, inner, copy_bw)
    except Exception as e:  # pylint: disable=broad-except
      # A kernel that cannot compile for a shape is a row, not a crash: the
      # sweep is one device call.
      r = {"impl": name, "error": f"{type(e).__name__}: {e}"[:300]}
    # Wall seconds of the row, compiles and numerics included: what a
    # device call's timeout has to hold.
    r.update(n=n, n_out=n_out, tokens=tokens, nblocks=nb,
             dtype=jnp.dtype(dtype).name, row_s=time.perf_counter() - t0)
    # The forward time the impl="auto" roofline predicts for the XLA forms
    # (an H200's rates), next to the measured one to check the model.
    predict = {"monarch xla": roofline.structured_seconds,
               "monarch materialized": roofline.dense_seconds}.get(name)
    if predict:
      r["predicted_fwd_ms"] = 1e3 * predict(tokens, w1.shape, w2.shape,
                                            itemsize)
    size = n if n == n_out else f"{n}:{n_out}"
    print(f"  n={size} nb={nb} tokens={tokens} {r['dtype']} {name}: " + (
        f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f} ms, err "
        f"{r['max_rel_err']:.1e}" if "error" not in r else r["error"])
          + f" [{r['row_s']:.0f} s]", flush=True)
    yield r


def fwd_bwd(fn, g, n_args: int):
  """The timed forward+backward of ``fn``: the value of sum(fn(*args) * g)
  with its gradients in all ``n_args`` arguments. The value keeps the
  forward live: with the gradients alone (this benchmark until session 17)
  jit dropped it, as a loss linear in y needs no y for its gradient, so
  those "forward+backward" rows timed the backward only (the kernels'
  forward never ran; XLA's kept the residuals its backward reads)."""
  f32 = lambda a: a.astype(jnp.float32)
  return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f32(fn(*a) * g)),
                                    argnums=tuple(range(n_args))))


def _measure(name, fn, x, weights, ref, dtype, repeats, inner, copy_bw):
  """One row: numerics against ``ref``, forward and forward+backward time."""
  f32 = lambda a: a.astype(jnp.float32)
  itemsize = jnp.dtype(dtype).itemsize
  out = jax.jit(fn)(x, *weights)
  err = float(jnp.max(jnp.abs(f32(out) - ref)) / jnp.max(jnp.abs(ref)))
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
  fwd_s = time_fn(jax.jit(fn), x, *weights, repeats=repeats, inner=inner)
  g = jax.random.normal(jax.random.key(7), out.shape, dtype)
  bwd_s = time_fn(fwd_bwd(fn, g, 1 + len(weights)), x, *weights,
                  repeats=repeats, inner=inner)
  moved = (x.size + out.size + sum(v.size for v in weights)) * itemsize
  return {"impl": name, "max_rel_err": err, "numerics_ok": err < tol,
          "fwd_ms": 1e3 * fwd_s, "fwd_bwd_ms": 1e3 * bwd_s,
          "bytes_MB": moved / 2**20, "GB_per_s": moved / fwd_s / 1e9,
          "pct_copy_roofline": 100 * moved / fwd_s / copy_bw,
          "copy_GB_per_s": copy_bw / 1e9}


def main(argv):
  del argv
  repeats = 2 if _QUICK.value else _REPEATS.value
  rows = []
  meta = {"backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  sizes = [parse_size(v) for v in _SIZES.value]
  os.makedirs(_OUT.value, exist_ok=True)
  for dtype in _DTYPES.value:
    for n, n_out in sizes:
      for tokens in map(int, _TOKENS.value):
        for nb in map(int, _NBLOCKS.value):
          if n % nb or n_out % nb:
            continue
          for row in rows_for(n, tokens, jnp.dtype(dtype), nb, repeats,
                              _INTERPRET.value, n_out):
            rows.append(row)
            # Written after every row: a timed-out sweep keeps its data.
            with open(os.path.join(_OUT.value, "benchmark_kernels.json"),
                      "w") as f:
              json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"\n{meta}\n")
  print(format_table(rows, ["n", "n_out", "nblocks", "tokens", "dtype", "impl",
                            "numerics_ok",
                            "fwd_ms", "predicted_fwd_ms", "fwd_bwd_ms", "GB_per_s",
                            "pct_copy_roofline", "row_s", "error"]))


if __name__ == "__main__":
  app.run(main)
