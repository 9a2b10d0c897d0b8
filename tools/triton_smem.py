"""The Triton kernels compiled offline for sm_90: shared memory, registers,
spills and tensor-core instructions, without a GPU.

A pip ``triton`` compiles the Triton modules Pallas lowers for "cuda" on this
CPU, and its bundled ptxas reports registers and spills. Triton 3.6 asked
exactly the shared memory the H200's XLA (jax 0.11.2) asked for where it
refused bfloat16 Monarch weight gradients (and more in float32), so a kernel
change can be checked here before a GPU session spends its minutes on a
compile error. Triton is no dependency of structmat; put it beside:

  .venv/bin/pip install --no-deps --target /tmp/triton triton==3.6.0
  PYTHONPATH=/tmp/triton .venv/bin/python tools/triton_smem.py
  PYTHONPATH=/tmp/triton .venv/bin/python tools/triton_smem.py \\
      --kernel=sltrain --presets=llama_60m,llama_1b --dtypes=bfloat16
  PYTHONPATH=/tmp/triton .venv/bin/python tools/triton_smem.py \\
      --kernel=sltrain --shapes=4096:4096:128 --force_block_tokens=256 \\
      --chunk=64 --dtypes=bfloat16       # SLTrain at other tiles
  PYTHONPATH=/tmp/triton .venv/bin/python tools/triton_smem.py \\
      --shapes=4096:4096:16 --tokens=16384        # a benchmark shape

The Triton module is the running JAX's lowering; the GPU image runs jax
0.11.2, which pip serves on Python 3.12 here (a venv with jax==0.11.2,
jaxlib==0.11.2 and structmat, Triton 3.6 installed for that Python):
``PYTHONPATH=/tmp/triton312:. /tmp/v11/bin/python tools/triton_smem.py``.

Every layer of the presets named (LLaMA-7B's Monarch MLP takes minutes to
compile) at the tiles ``impl="pallas"`` takes: for Monarch
``fit_block_tokens`` and the weight gradients' ``dw_block_tokens``, beside
the estimates they plan with (``smem_estimate`` for the forward and, p and s
swapped, dx; ``dw_smem_estimate``); for
SLTrain the default tiles (``padded_dim``), noting ``smem_estimate`` (its
largest kernel's). A row per kernel; OVER marks
what the GPU would refuse (227 KiB a block), UNDER an estimate below what
Triton asked for; wgmma / mma count the tensor-core instructions in the PTX,
loop_ld the tensor loads in loops that Triton did not prefetch.
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from structmat import ops  # pylint: disable=wrong-import-position
from structmat.kernels import monarch as mk  # pylint: disable=wrong-import-position
from structmat.kernels import monarch_two_pass as m2  # pylint: disable=wrong-import-position
from structmat.kernels import monarch_two_pass_dw as dwk  # pylint: disable=wrong-import-position
from structmat.kernels import shared_trace  # pylint: disable=wrong-import-position
from structmat.kernels import sltrain as sk  # pylint: disable=wrong-import-position
from structmat.models.family import linear_shapes, preset_config  # pylint: disable=wrong-import-position
from structmat.kernels.lowering import cross_lower  # pylint: disable=wrong-import-position

_KERNEL = flags.DEFINE_enum(
    "kernel", "monarch", ["monarch", "monarch2", "sltrain"],
    "Which kernels (monarch2: monarch_two_pass's stage 2, forward and dx).")
_PRESETS = flags.DEFINE_list(
    "presets", ["llama_60m", "llama_130m", "llama_350m", "gpt2_small",
                "gpt2_medium"], "Presets whose layers to compile.")
_SHAPES = flags.DEFINE_list(
    "shapes", [], "Instead of presets, Monarch 'n_in:n_out:nblocks' or "
    "SLTrain 'n_in:n_out:rank' shapes.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Dtypes.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call.")
_FORCE_BT = flags.DEFINE_integer(
    "force_block_tokens", 0, "This token tile (Monarch: and dw step) whatever "
    "the estimates say, to see what Triton asks for (calibration).")
_DW_KERNEL = flags.DEFINE_bool(
    "dw_kernel", False, "monarch2: the weight gradients as token-reduction "
    "kernels (monarch2_dw1, monarch2_dw2) instead of XLA's contractions.")
_CHUNK = flags.DEFINE_integer(
    "chunk", 0, "SLTrain: sparse entries placed per step (0: the default, "
    "sltrain.DEFAULT_CHUNK).")
H100_SMEM = 227 * 1024
S = jax.ShapeDtypeStruct


def triton_modules(fn, args, grad_argnums):
  """{kernel name: (Triton module text, num_warps)} of fn and its gradient."""
  pl = mk.pl   # jax.experimental.pallas, shared by every kernel module
  original = pl.pallas_call

  def debug(*a, name=None, compiler_params=None, **k):
    # Each call's warps ride in its printed name: calls sharing a name (the
    # SLTrain forward and dx) may take different ones.
    warps = getattr(compiler_params, "num_warps", 4)
    return original(*a, name=f"{name}__w{warps}",
                    compiler_params=compiler_params, debug=True, **k)

  pl.pallas_call, out = debug, io.StringIO()
  shared_trace.clear()  # trace the kernels again, through `debug`
  try:
    with contextlib.redirect_stdout(out):
      cross_lower(fn, args, "cuda", grad_argnums)
      cross_lower(fn, args, "cuda")   # the forward alone (grad drops it)
  finally:
    pl.pallas_call = original
    shared_trace.clear()  # no trace keeps the debug flag
  modules = {}
  for part in out.getvalue().split("The Triton module for pallas_call ")[1:]:
    head, body = part.split("\n", 1)
    name, warps = head.split()[0].rstrip(":").rsplit("__w", 1)
    while name in modules:   # a kernel called twice (SLTrain's fwd for dx)
      name += "'"
    body = body[body.index("module"):].split("\n#loc")[0]
    # Locations Triton's parser does not take: ' "name"(#loc3)', ' [unknown]'.
    modules[name] = (re.sub(r' "[^"\n]*"\(#loc[0-9]*\)| \[unknown\]', "",
                            body), int(warps))
  return modules


def loop_loads(ttgir: str) -> int:
  """Tensor loads inside ``scf.for`` bodies of Triton GPU IR that Triton did
  not turn into prefetches (cp.async / TMA): each waits on memory where it
  stands. Triton pipelines the innermost loops' loads that feed dots; the
  SLTrain forward's 2-byte values and the x block of its outer loop stalled
  so (2 at session 17's code). A load issued a step ahead by the kernel
  itself, as that x block now is, still counts (1 now): the column says
  where to read the IR, not what is wrong."""
  count, loops = 0, []   # indentation of the enclosing loops
  for line in ttgir.splitlines():
    indent = len(line) - len(line.lstrip())
    while loops and indent <= loops[-1] and not line.strip().startswith(
        "scf.yield"):
      loops.pop()
    if "scf.for" in line:
      loops.append(indent)
    elif loops and " tt.load " in line and "tensor<" in line.split(
        "tt.load", 1)[1]:
      count += 1
  return count


def compile_report(module: str, num_warps: int) -> dict:
  """Shared bytes, registers, spill bytes, tensor-core instructions and
  unprefetched loads in loops (``loop_loads``)."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(module)
    kernel = triton.compile(
        path, target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=mk.TRITON_STAGES))
    ptx = kernel.asm["ptx"]
    with open(os.path.join(tmp, "kernel.ptx"), "w") as f:
      f.write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__),
                         "backends/nvidia/bin/ptxas")
    info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o",
                           os.devnull], capture_output=True, text=True,
                          check=True).stderr
  regs = re.search(r"Used (\d+) registers", info)
  spills = re.search(r"(\d+) bytes spill stores", info)
  return dict(shared=kernel.metadata.shared,
              regs=int(regs.group(1)) if regs else -1,
              spills=int(spills.group(1)) if spills else 0,
              wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync"),
              loop_loads=loop_loads(kernel.asm["ttgir"]))


def monarch_case(d_in, d_out, nb, dtype, tokens):
  """(label, fn, args, grad argnums, {kernel: estimate}, note)."""
  w1, w2, _, _ = ops.monarch_shapes(d_in, d_out, nb)
  p, g, s = w1[2], w1[1] // w2[0], w2[1]
  pp, gg, ss = mk.padded_dims(p, g, s)
  it = dtype.itemsize
  width = mk.chunk_width(pp, gg, ss, it)
  bt = _FORCE_BT.value or mk.fit_block_tokens(tokens, w1, w2, it, "cuda")
  step = _FORCE_BT.value or mk.dw_block_tokens(bt, p, gg, s, width, it)
  if _FORCE_BT.value:
    mk.supported = lambda *a, **k: None
    mk.dw_block_tokens = lambda bt, *a: bt
  looped, pw, sw = max(pp, ss) <= width, min(pp, width), min(ss, width)
  estimates = {"monarch_fwd": mk.smem_estimate(bt, pw, gg, sw, it, looped),
               "monarch_dx": mk.smem_estimate(bt, sw, gg, pw, it, looped),
               "monarch_dw": step and mk.dw_smem_estimate(step, p, gg, s,
                                                          width, it)}
  fn = lambda x, a, b: mk.monarch_matmul_pallas(
      x, a, b, block_tokens=bt, interpret=False, platform="cuda")
  args = [S((tokens, w1[0] * p), dtype), S(w1, dtype), S(w2, dtype)]
  note = f"bt {bt}, dw " + (f"{step}" if step else "in XLA")
  return fn, args, (0, 1, 2), estimates, note


def monarch2_case(d_in, d_out, nb, dtype, tokens):
  w1, w2, _, _ = ops.monarch_shapes(d_in, d_out, nb)
  p, g, s = w1[2], w1[1] // w2[0], w2[1]
  it = dtype.itemsize
  bt = _FORCE_BT.value or m2.fit_block_tokens(tokens, w1, w2, it, "cuda")
  if _FORCE_BT.value:
    m2.supported = lambda *a, **k: None
  estimates = {"monarch2_fwd": m2.smem_estimate(bt, g, s, it),
               "monarch2_dx": m2.smem_estimate(bt, g, p, it)}
  note = f"bt {bt}"
  if _DW_KERNEL.value:   # out (a, c, m, g): dw2 (l, s, k, g), dw1 (k, p, l, g)
    for name, dims in (("monarch2_dw2", (w2[0], s, w1[0], g)),
                       ("monarch2_dw1", (w1[0], p, w2[0], g))):
      t = dwk.plan(tokens, *dims, it, "cuda")
      if t:
        estimates[name] = dwk.smem_estimate(t.bt, t.cc, t.mc, t.gg, it)
      note += f", {name[-3:]} " + (
          f"cc {t.cc} mc {t.mc} bt {t.bt} x{t.chunks}" if t else "in XLA")
  fn = lambda x, a, b: m2.monarch_matmul_two_pass(
      x, a, b, block_tokens=bt, interpret=False, platform="cuda",
      dw_kernel=_DW_KERNEL.value)
  args = [S((tokens, w1[0] * p), dtype), S(w1, dtype), S(w2, dtype)]
  return fn, args, (0, 1, 2), estimates, note


def sltrain_case(d_in, d_out, rank, dtype, tokens, density=0.03):
  nnz = jax.eval_shape(lambda: ops.draw_support(
      jax.random.key(0), d_in, d_out, density)).shape[0]
  bt = _FORCE_BT.value or 128
  chunk = _CHUNK.value or sk.DEFAULT_CHUNK
  fn = lambda x, a, b, v, i: sk.sltrain_matmul_pallas(
      x, a, b, v, i, 1.0, block_tokens=bt, chunk=chunk, interpret=False,
      platform="cuda")
  args = [S((tokens, d_in), dtype), S((d_in, rank), dtype),
          S((rank, d_out), dtype), S((nnz,), dtype), S((nnz,), jnp.int32)]
  # One estimate for the largest of the kernels (sltrain.smem_estimate).
  (bk, d_in_p), (bn, d_out_p) = (sk.padded_dim(d_in, sk.DEFAULT_TILE, "cuda"),
                                 sk.padded_dim(d_out, sk.DEFAULT_TILE, "cuda"))
  est = sk.smem_estimate(bt, bk, bn, rank, dtype.itemsize)
  if _FORCE_BT.value:
    sk.supported = lambda *a, **k: None
  return (fn, args, (0, 1, 2, 3), {}, f"bt {bt}, chunk {chunk}, rank {rank}, "
          f"{nnz} entries, largest estimated {est / 1024:.0f} KiB")


def cases():
  """(label, shape tuple) of every layer asked for, without repeats."""
  if _SHAPES.value:
    for spec in _SHAPES.value:
      yield spec, tuple(int(v) for v in spec.split(":"))
    return
  seen = set()
  for preset in _PRESETS.value:
    linear = "sltrain" if _KERNEL.value == "sltrain" else "monarch"
    cfg = preset_config(preset, linear)
    kw = dict(cfg.linear_kwargs)
    third = kw["rank"] if linear == "sltrain" else kw["nblocks"]
    for site, (d_in, d_out) in linear_shapes(cfg).items():
      if (d_in, d_out) not in seen:
        seen.add((d_in, d_out))
        yield f"{preset}.{site}", (d_in, d_out, third)


def main(_):
  make = dict(monarch=monarch_case, monarch2=monarch2_case,
              sltrain=sltrain_case)[_KERNEL.value]
  print(f"{'layer':18s} {'shape':16s} {'dtype':9s} {'kernel':18s} "
        "asked_KiB est_KiB  regs spill_B wgmma  mma loop_ld  tiles")
  for label, shape in cases():
    for dtype in map(jnp.dtype, _DTYPES.value):
      fn, args, argnums, estimates, note = make(*shape, dtype, _TOKENS.value)
      for name, (module, warps) in sorted(
          triton_modules(fn, args, argnums).items()):
        r, est = compile_report(module, warps), estimates.get(name)
        flag = ("OVER" if r["shared"] > H100_SMEM else
                "UNDER" if est is not None and est < r["shared"] else "")
        est_s = "" if est is None else f"{est / 1024:.0f}"
        print(f"{label:18s} {str(shape):16s} {dtype.name:9s} {name:18s} "
              f"{r['shared'] / 1024:9.0f} {est_s:>7s} {r['regs']:5d} "
              f"{r['spills']:7d} {r['wgmma']:5d} {r['mma']:4d} "
              f"{r['loop_loads']:7d}  {note} {flag}",
              flush=True)


if __name__ == "__main__":
  app.run(main)
