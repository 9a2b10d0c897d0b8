"""The TPU kernels compiled offline by libtpu: whether the TPU compiler takes
them, and the VMEM each gets, without a TPU.

Cross-lowering (the tests, ``--cross_lower=tpu``) runs Pallas' lowering for a
TPU but no compiler: Mosaic's layout passes and VMEM allocation run only in
libtpu, at compile time. libtpu compiles for a TPU topology described
without hardware (``jax.experimental.topologies``), so on this CPU it shows
a kernel's compile errors, and the compiled module names the scoped VMEM
each kernel got (``lowering.scoped_vmem``). The kernels plan their tiles
with ``vmem_estimate``s, which must bound that. XLA may place small
operands (the factors, say) in VMEM itself, and then the kernel does not
copy them into its own buffers; in a train step it may not, so each case
compiles twice: at the kernels' own limits (does it compile, and what it
got there) and with every kernel's limit near the chip's VMEM, which leaves
XLA no room: the worst case (a note says how many operands XLA still put
in VMEM). libtpu is no dependency of structmat (684 MB; with it in the venv
every jax process would look for a TPU): install the version the running
jax's ``[tpu]`` extra pins (jax 0.10.2: libtpu 0.0.42; 0.11.2: 0.0.48; 0.12:
0.0.50) beside it. It locks /tmp/libtpu_lockfile per process;
ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets two run at once.

  .venv/bin/pip install --no-deps --target /tmp/libtpu "libtpu==0.0.42.*"
  PYTHONPATH=/tmp/libtpu .venv/bin/python tools/tpu_compile.py
  PYTHONPATH=/tmp/libtpu .venv/bin/python tools/tpu_compile.py \\
      --kernels=monarch_tpu --sizes=4096 --nblocks=16 --tokens=16384 \\
      --block_tokens=256                 # a tile the estimate would refuse
  PYTHONPATH=/tmp/libtpu .venv/bin/python tools/tpu_compile.py \
      --kernels=monarch_tpu --sizes=4096,4096x11008 --nblocks=4 \
      --tokens=16384 --dtypes=bfloat16   # LLaMA-7B: the split backward
  PYTHONPATH=/tmp/libtpu .venv/bin/python tools/tpu_compile.py \\
      --kernels=sltrain_tpu --sizes=512x1376,5461x2048 --tokens=16384
  PYTHONPATH=/tmp/libtpu .venv/bin/python tools/tpu_compile.py --kernels= \\
      --presets=llama_60m,llama_130m --batch=64x256   # whole train steps

Rows: a kernel's forward ("fwd": the function) and gradients ("grad": of
every argument), then each Mosaic kernel in that module: MiB of scoped VMEM
as compiled here, in the worst case, and the estimate it was planned with;
OVER where the estimate is below the worst case (the kernel could pick a
tile that does not compile), or ERROR with libtpu's message. A preset row
compiles the launcher's whole train step (bf16, impl=pallas, the preset's
AdamW) on one chip and gives the device memory XLA plans for it (arguments,
temporaries), or libtpu's out-of-HBM message with what it needed. JSON
lands in --output_dir.
"""
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from structmat import ops  # pylint: disable=wrong-import-position
from structmat.kernels import blockdiag as bk  # pylint: disable=wrong-import-position
from structmat.kernels import blockdiag_gmm as gmm  # pylint: disable=wrong-import-position
from structmat.kernels import monarch_tpu as mt  # pylint: disable=wrong-import-position
from structmat.kernels import mosaic_tpu  # pylint: disable=wrong-import-position
from structmat.kernels import shared_trace, target  # pylint: disable=wrong-import-position
from structmat.kernels.lowering import scoped_vmem  # pylint: disable=wrong-import-position
from structmat.kernels import sltrain as sk  # pylint: disable=wrong-import-position
from structmat.kernels import sltrain_tpu as stk  # pylint: disable=wrong-import-position
from structmat.train import preflight  # pylint: disable=wrong-import-position

_KERNELS = flags.DEFINE_list(
    "kernels", ["monarch_tpu", "blockdiag", "gmm", "sltrain_tpu"],
    "Kernels to compile at the benchmark's shapes (experiments."
    "benchmark_kernels): monarch_tpu, blockdiag (the Pallas block-diagonal "
    "kernel on TPUs), gmm (megablox), sltrain_tpu.")
_SIZES = flags.DEFINE_list(
    "sizes", ["1024", "4096", "8192"], "Widths n; monarch_tpu and "
    "sltrain_tpu also take in x out (512x1376: LLaMA-60M's MLP, off whole "
    "lanes).")
_NBLOCKS = flags.DEFINE_list("nblocks", ["4", "16", "64"], "Monarch and "
                             "block-diagonal blocks.")
_TOKENS = flags.DEFINE_list("tokens", ["16384", "512"], "Token counts.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Dtypes.")
_PRESETS = flags.DEFINE_list(
    "presets", [], "Presets whose whole impl=pallas train step to compile, "
    "Monarch and SLTrain (e.g. llama_60m,llama_130m).")
_BATCH = flags.DEFINE_string("batch", "256x256", "A preset step's rows x "
                             "tokens per row (the presets' 65,536).")
_N_LAYERS = flags.DEFINE_integer(
    "n_layers", 0, "A preset step's blocks (0: the preset's): fewer still "
    "compile every layer shape where the whole model outgrows a chip's HBM.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:2x2", "The deviceless TPU topology (libtpu's names: "
    "v5e:2x2, v6e:2x2, v5p:2x2x1, v4:2x2x1); one chip compiles.")
_BT = flags.DEFINE_integer(
    "block_tokens", 0, "monarch_tpu, sltrain_tpu: this token tile whatever "
    "their VMEM estimates say (0: the tile they pick), to see what libtpu "
    "asks for (calibration).")
_BACKWARD = flags.DEFINE_enum(
    "monarch_backward", "", ["", "fused", "split"], "monarch_tpu: this "
    "backward form (empty: the one the kernel picks for the tile).")
_PROBE = flags.DEFINE_bool("probe", True, "Also compile every case with "
                           "the kernels' limits near the chip's VMEM, for "
                           "their worst case.")
_OUT = flags.DEFINE_string("output_dir", "runs/tpu_compile", "JSON dir.")

S = jax.ShapeDtypeStruct


@contextlib.contextmanager
def vmem_limit(limit: int | None):
  """Inside, ``pl.pallas_call`` sets every Mosaic TPU kernel's scoped-VMEM
  limit to ``limit`` (None: as the kernel asks)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  original = pl.pallas_call

  def call(*args, compiler_params=None, **kwargs):
    if isinstance(compiler_params, pltpu.CompilerParams) and limit is not None:
      compiler_params = dataclasses.replace(compiler_params,
                                            vmem_limit_bytes=limit)
    return original(*args, compiler_params=compiler_params, **kwargs)
  pl.pallas_call = call
  try:
    yield
  finally:
    pl.pallas_call = original
    shared_trace.clear()   # no shared trace keeps a changed limit


def first_line(e: Exception) -> str:
  text = f"{type(e).__name__}: {e}"
  return next((line for line in text.splitlines() if line.strip()), text)[:300]


def compile_on(device, fn, args, limit: int | None = None):
  """Lower ``fn(*args)`` (ShapeDtypeStructs, placed on the topology's
  ``device``) choosing kernels as a TPU would, with every kernel's
  scoped-VMEM ``limit`` (None: its own), and compile it with libtpu:
  (compiled, seconds to compile)."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  placed = jax.tree.map(lambda a: S(a.shape, a.dtype, sharding=sharding),
                        args)
  with vmem_limit(limit):
    shared_trace.clear()   # trace again, through the limit
    # jax.default_device: Pallas' TPU lowering asks the default device what
    # chip it lowers for (a block's tiling), which would be this CPU.
    with target.targeting("tpu"), jax.default_device(device):
      # A fresh function each time: jax.jit would reuse a trace (and the
      # limits baked into it) of the same one.
      lowered = jax.jit(lambda *a: fn(*a)).lower(*placed)
    t0 = time.perf_counter()
    compiled = lowered.compile()
  return compiled, time.perf_counter() - t0


def vmem_capacity(device) -> int:
  """The chip's VMEM per core, from Pallas' table (v5e's 128 MiB where the
  table lacks the chip)."""
  try:
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=import-outside-toplevel
    with jax.default_device(device):
      return tpu_info.get_tpu_info().vmem_capacity_bytes
  except Exception:  # pylint: disable=broad-except
    return 128 << 20


def grad_of(fn, argnums):
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                  argnums=argnums)


def monarch_case(size, nb, tokens, dtype):
  """(fn, args, grad argnums, {kernel: estimate bytes}, note) or a refusal."""
  w1, w2, n_in, _ = ops.monarch_shapes(*size, nb)
  it = dtype.itemsize
  bt = _BT.value or mt.fit_block_tokens(tokens, w1, w2, it)
  if why := mt.supported(tokens, w1, w2, bt, it):
    return why
  pp, ss = mt.padded_blocks(w1, w2, it)   # as ``supported`` plans them
  pw1, pw2 = (*w1[:2], pp), (w2[0], ss, w2[2])
  backward = _BACKWARD.value or mt.backward_form(bt, pw1, pw2, it)
  est = {"monarch_tpu_fwd": mt.vmem_estimate(bt, pw1, pw2, it, False),
         "monarch_tpu_bwd": mt.vmem_estimate(bt, pw1, pw2, it, True),
         **mt.split_vmem_estimates(bt, pw1, pw2, it, pp != w1[2])}
  fn = functools.partial(mt.monarch_matmul_tpu, block_tokens=bt,
                         backward=backward, interpret=False)
  return (fn, [S((tokens, n_in), dtype), S(w1, dtype), S(w2, dtype)],
          (0, 1, 2), est, f"bt {bt}, {backward} backward")


def blockdiag_case(n, nb, tokens, dtype):
  w = (nb, n // nb, n // nb)
  bt = min(128, tokens)
  if why := bk.supported(tokens, w, bt, "tpu", dtype.itemsize):
    return why
  it = dtype.itemsize
  tile = bk.tiling(bt, w[1], w[2], it, "tpu")[0]
  tq, tp = bk.dw_tiles_tpu(w[1], w[2], bt, it)
  # The forward kernel also runs dx (the same block sizes here).
  est = {"blockdiag_fwd": bk.vmem_estimate(bt, tile, w[2], it),
         "blockdiag_dw": bk.dw_vmem_estimate(bt, tq, tp, it)}
  fn = functools.partial(bk.blockdiag_matmul_pallas, block_tokens=bt,
                         interpret=False, platform="tpu")
  return (fn, [S((tokens, n), dtype), S(w, dtype)], (0, 1), est,
          f"bt {bt}, tile {tile}, dw {tq} x {tp}")


def gmm_case(n, nb, tokens, dtype):
  w = (nb, n // nb, n // nb)
  fn = functools.partial(gmm.blockdiag_matmul_gmm, interpret=False)
  tiling = gmm.default_tiling(tokens, w[2], w[1])
  return (fn, [S((tokens, n), dtype), S(w, dtype)], (0, 1), {},
          f"tiling {tiling}")


@functools.cache
def _support(n_in: int, n_out: int, density: float = 0.03):
  """The benchmark's SLTrain support at n_in x n_out and its tile orders
  (drawn on the CPU: the kernel takes them as constants here)."""
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    idx = ops.draw_support(jax.random.key(n_in), n_in, n_out, density)
    return idx, sk.support_orders(idx, n_in, n_out)


def sltrain_case(size, nb, tokens, dtype):
  del nb
  n, n_out = size
  rank, bt = max(16, n // 32), min(_BT.value or 256, tokens)
  idx, orders = _support(n, n_out)
  if why := stk.supported(tokens, n, n_out, rank, idx.shape[0], bt,
                          dtype.itemsize):
    return why
  d_in, d_out, tk, tn = stk.padded_dims(n, n_out)
  est = stk.vmem_estimate(d_in, d_out, rank, idx.shape[0], bt,
                          dtype.itemsize, (tk, tn),
                          (d_in > n, d_out > n_out))
  fn = lambda x, a, b, v: stk.sltrain_matmul_tpu(
      x, a, b, v, idx, 1.0, orders=orders, block_tokens=bt, interpret=False)
  args = [S((tokens, n), dtype), S((n, rank), dtype), S((rank, n_out), dtype),
          S(idx.shape, dtype)]
  # One estimate, the largest of the kernels'.
  return (fn, args, (0, 1, 2, 3), {"*": est},
          f"bt {bt}, rank {rank}, {idx.shape[0]} entries")


CASES = dict(monarch_tpu=monarch_case, blockdiag=blockdiag_case, gmm=gmm_case,
             sltrain_tpu=sltrain_case)


def kernel_rows(device, label, made):
  """Compile one case, forward and gradients, at the kernels' own VMEM
  limits (does it compile?) and again with every limit near the chip's VMEM
  (``--probe``): XLA then has no room to place a kernel's operands in VMEM
  itself, so each kernel's scoped VMEM is its worst case, what its
  estimate has to bound."""
  if isinstance(made, str):
    yield dict(label=label, mode="-", result="refused: " + made)
    return
  fn, args, argnums, est, note = made
  starve = vmem_capacity(device) - (1 << 20)
  for mode, f in (("fwd", fn), ("grad", grad_of(fn, argnums))):
    try:
      compiled, secs = compile_on(device, f, args)
    except Exception as e:  # pylint: disable=broad-except
      yield dict(label=label, mode=mode, note=note, result="ERROR " +
                 first_line(e))
      continue
    own = scoped_vmem(compiled.as_text())
    yield dict(label=label, mode=mode, note=note, result=f"ok {secs:.1f} s")
    worst, why = {}, ""
    if _PROBE.value:
      try:
        worst = scoped_vmem(compile_on(device, f, args, starve)[0].as_text())
      except Exception as e:  # pylint: disable=broad-except
        why = "worst case: " + first_line(e)
    for name in sorted(own):
      e = est.get(name, est.get("*"))
      w, placed = worst.get(name, (None, 0))
      yield dict(label=label, mode=mode, kernel=name, used_mib=own[name][0],
                 worst_mib=w, still_in_vmem=placed,
                 est_mib=None if e is None else e / (1 << 20),
                 result="OVER" if (w is not None and e is not None
                                   and e < w * (1 << 20)) else why)


def preset_rows(device, preset: str, linear: str):
  """Compile a preset's whole impl=pallas train step on one chip: the
  launcher's config (``preflight.compile_step``, what ``--dry_run
  --tpu_topology`` runs on a whole slice) at --batch rows x tokens."""
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  rows, length = map(int, _BATCH.value.split("x"))
  config = pretrain.get_config(f"model={preset},linear={linear}")
  config.update(dict(impl="pallas", compute_dtype="bfloat16",
                     batch_size=rows, seq_len=length))
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  if _N_LAYERS.value:
    config.model_dims = json.dumps(dict(n_layers=_N_LAYERS.value))
  label = f"{preset} {linear} {rows}x{length}" + (
      f" {_N_LAYERS.value} blocks" if _N_LAYERS.value else "")
  try:
    r = preflight.compile_step(config, [device])
  except Exception as e:  # pylint: disable=broad-except
    # Out of HBM is an answer too: how much the step needs (then fewer
    # rows per chip, or fsdp over more chips).
    return [dict(label=label, mode="step", result="ERROR " + first_line(e))]
  return [dict(label=label, mode="step", result=f"ok {r['compile_s']:.1f} s",
               kernels=r["vmem_mib"], argument_gib=r["argument_gib"],
               temp_gib=r["temp_gib"], output_gib=r["output_gib"])]


def show(r: dict) -> str:
  mib = lambda v: "" if v is None else f"{v:.2f}"
  if "kernel" in r:
    placed = (f" ({r['still_in_vmem']} operands in VMEM)"
              if r["still_in_vmem"] else "")
    return (f"    {r['kernel']:20s} {mib(r['used_mib']):>7s} "
            f"{mib(r['worst_mib']):>7s} {mib(r['est_mib']):>7s}  "
            f"{r['result']}{placed}")
  extra = ""
  if "temp_gib" in r:
    extra = (f"  args {r['argument_gib']:.2f} GiB, temps "
             f"{r['temp_gib']:.2f} GiB; kernels' scoped MiB {r['kernels']}")
  return (f"{r['label']:34s} {r['mode']:5s} {r['result']}"
          f"{'  ' + r['note'] if r.get('note') else ''}{extra}")


def main(_):
  unknown = set(_KERNELS.value) - set(CASES)
  if unknown:
    raise ValueError(f"--kernels: unknown {sorted(unknown)}; use {list(CASES)}")
  try:
    device = preflight.topology_devices(_TOPOLOGY.value)[0]
  except ValueError as e:   # no libtpu, or a name it does not know
    raise SystemExit(str(e).replace("--tpu_topology", "--topology")) from e
  print(f"{device.device_kind} ({_TOPOLOGY.value}), jax {jax.__version__}, "
        f"VMEM {vmem_capacity(device) >> 20} MiB; kernel rows: scoped MiB "
        "as compiled here, worst case, estimate", flush=True)
  if _BT.value:   # the kernels' own checks would refuse the tiles to probe
    mosaic_tpu.budget_override = 1 << 40
  results = []
  for name in _KERNELS.value:
    for size in _SIZES.value:
      n, _, n_out = size.partition("x")
      n, n_out = int(n), int(n_out or n)
      if name not in ("sltrain_tpu", "monarch_tpu") and n_out != n:
        print(f"{name} n={size}: skipped (in x out sizes are for "
              "monarch_tpu and sltrain_tpu)", flush=True)
        continue
      for nb in (map(int, _NBLOCKS.value) if name != "sltrain_tpu" else [0]):
        for tokens in map(int, _TOKENS.value):
          for dtype in map(jnp.dtype, _DTYPES.value):
            label = (f"{name} n={size}" + (f"/{nb}" if nb else "")
                     + f" t={tokens} {dtype.name}")
            # Tiles are planned for the topology's chip (its VMEM budget).
            with jax.default_device(device):
              made = (CASES[name]((n, n_out), nb, tokens, dtype)
                      if name in ("sltrain_tpu", "monarch_tpu")
                      else CASES[name](n, nb, tokens, dtype))
            for r in kernel_rows(device, label, made):
              r.update(case=name, n=n, nblocks=nb, tokens=tokens,
                       dtype=dtype.name)
              print(show(r), flush=True)
              results.append(r)
  for preset in _PRESETS.value:
    for linear in ("monarch", "sltrain"):
      for r in preset_rows(device, preset, linear):
        print(show(r), flush=True)
        results.append(r)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "tpu_compile.json")
  with open(path, "w") as f:
    json.dump(dict(device=device.device_kind, topology=_TOPOLOGY.value,
                   jax=jax.__version__, rows=results), f, indent=1,
              default=lambda v: v.item() if isinstance(v, np.generic)
              else str(v))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
