"""Shared memory the Monarch Triton kernels ask for, compiled offline for sm_90.

No GPU needed: a pip ``triton`` compiles the Triton modules Pallas lowers for
"cuda" on this CPU and reports what each kernel asks for, beside the estimate
the kernel plans with (``monarch.smem_estimate``, ``dw_smem_estimate``) and
the 227 KiB an H100/H200 block may use. Triton 3.6 here asked exactly what the
H200's XLA (jax 0.11.2) asked for where it refused bfloat16 weight gradients
(and more in float32). Triton is no dependency of structmat; put it beside:

  .venv/bin/pip install --no-deps --target /tmp/triton triton==3.6.0
  PYTHONPATH=/tmp/triton .venv/bin/python tools/triton_smem.py
  PYTHONPATH=/tmp/triton .venv/bin/python tools/triton_smem.py \\
      --presets=llama_60m --dtypes=bfloat16 --tokens=4096

Every Monarch layer of the presets named (LLaMA-7B's take minutes each to
compile), at the tile ``impl="pallas"`` takes (``fit_block_tokens``, the
weight gradients' ``dw_block_tokens``). A row per kernel; OVER marks what the
GPU would refuse, UNDER an estimate below what Triton asked for.
"""
import contextlib
import io
import os
import re
import sys
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from structmat import ops  # pylint: disable=wrong-import-position
from structmat.kernels import monarch as mk  # pylint: disable=wrong-import-position
from structmat.models.family import linear_shapes, preset_config  # pylint: disable=wrong-import-position
from tests.helpers import cross_lower  # pylint: disable=wrong-import-position

_PRESETS = flags.DEFINE_list(
    "presets", ["llama_60m", "llama_130m", "llama_350m", "gpt2_small",
                "gpt2_medium"], "Presets whose Monarch layers to compile.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Dtypes.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call.")
H100_SMEM = 227 * 1024


def triton_modules(fn, args):
  """{kernel name: (Triton module text, num_warps)} of fn's gradient."""
  pl = mk.pl
  original, warps = pl.pallas_call, {}

  def debug(*a, name=None, compiler_params=None, **k):
    warps[name] = getattr(compiler_params, "num_warps", 4)
    return original(*a, name=name, compiler_params=compiler_params,
                    debug=True, **k)

  pl.pallas_call, out = debug, io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      cross_lower(fn, args, "cuda", tuple(range(len(args))))
      cross_lower(fn, args, "cuda")   # the forward alone (grad drops it)
  finally:
    pl.pallas_call = original
  modules = {}
  for part in out.getvalue().split("The Triton module for pallas_call ")[1:]:
    head, body = part.split("\n", 1)
    name = head.split()[0].rstrip(":")
    body = body[body.index("module"):].split("\n#loc")[0]
    # Locations Triton's parser does not take: ' "name"(#loc3)', ' [unknown]'.
    modules[name] = (re.sub(r' "[^"\n]*"\(#loc[0-9]*\)| \[unknown\]', "",
                            body), warps.get(name, 4))
  return modules


def shared_bytes(module: str, num_warps: int) -> int:
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  with tempfile.NamedTemporaryFile("w", suffix=".ttir") as f:
    f.write(module)
    f.flush()
    kernel = triton.compile(f.name, target=GPUTarget("cuda", 90, 32), options=dict(
        num_warps=num_warps, num_stages=mk.TRITON_STAGES))
  return kernel.metadata.shared


def main(_):
  done = set()
  print("preset      site  n_in  n_out dtype     bt  kernel        step  "
        "asked_KiB  estimate_KiB")
  for preset in _PRESETS.value:
    cfg = preset_config(preset, "monarch")
    nb = dict(cfg.linear_kwargs)["nblocks"]
    for site, (d_in, d_out) in linear_shapes(cfg).items():
      for dtype in map(jnp.dtype, _DTYPES.value):
        if (d_in, d_out, nb, dtype) in done:
          continue
        done.add((d_in, d_out, nb, dtype))
        w1, w2, _, _ = ops.monarch_shapes(d_in, d_out, nb)
        p, g, s = w1[2], w1[1] // w2[0], w2[1]
        pp, gg, ss = mk.padded_dims(p, g, s)
        width = mk.chunk_width(pp, gg, ss, dtype.itemsize)
        bt = mk.fit_block_tokens(_TOKENS.value, w1, w2, dtype.itemsize, "cuda")
        step = mk.dw_block_tokens(bt, p, gg, s, width, dtype.itemsize)
        estimates = {
            "monarch_fwd": mk.smem_estimate(bt, min(pp, width), gg,
                                            min(ss, width), dtype.itemsize),
            "monarch_dw": step and mk.dw_smem_estimate(
                step, p, gg, s, width, dtype.itemsize)}
        args = [jax.ShapeDtypeStruct(v, dtype)
                for v in ((_TOKENS.value, w1[0] * p), w1, w2)]
        fn = lambda x, a, b, bt=bt: mk.monarch_matmul_pallas(
            x, a, b, block_tokens=bt, interpret=False, platform="cuda")
        for name, (module, warps) in sorted(triton_modules(fn, args).items()):
          asked, est = shared_bytes(module, warps), estimates.get(name)
          flag = ("OVER" if asked > H100_SMEM else
                  "UNDER" if est is not None and est < asked else "")
          print(f"{preset:11s} {site:5s} {d_in:5d} {d_out:6d} {dtype.name:9s}"
                f" {bt:3d} {name:13s} {step if name == 'monarch_dw' else '':4}"
                f"  {asked / 1024:9.1f}  "
                f"{'' if est is None else f'{est / 1024:12.1f}':>12} {flag}",
                flush=True)
        if step is None:
          print(f"{preset:11s} {site:5s} {d_in:5d} {d_out:6d} {dtype.name:9s}"
                f" {bt:3d} monarch_dw: XLA (even 16-token steps overflow)")


if __name__ == "__main__":
  app.run(main)
