"""Cross-lowering: compile-free checks of a kernel for hardware this host lacks.

Lowering ``fn`` for an abstract H100 ("cuda": Triton and Mosaic GPU kernels)
or TPU v5e ("tpu": Mosaic TPU kernels) on a CPU runs every kernel's shape
checks and its Pallas lowering, so a shape or lowering error shows up before a
GPU or TPU is lent (the tests do this for every kernel; ``tools/triton_smem.py``
feeds the Triton modules it yields to the offline Triton compiler). Nothing is
compiled or run: numerics need interpret mode or the hardware.
``kernel_modules`` counts the kernels in a lowered module's text: calls, and
distinct modules (what the device compiles; on jaxlib 0.11, every Mosaic GPU
call, see ``kernel_bodies``). ``scoped_vmem`` reads what libtpu allocated
for each Mosaic TPU kernel from a compiled module (``tools/tpu_compile.py``
compiles for a TPU without one).

Example::

    text = cross_lower(lambda x, w1, w2: monarch_matmul(x, w1, w2,
                                                        impl="pallas"),
                       (x, w1, w2), "cuda", grad_argnums=(0, 1, 2))
"""
import collections
import hashlib
import re

import jax
import jax.numpy as jnp

from structmat.kernels import target

DEVICE_KINDS = {"cuda": "NVIDIA H100 80GB HBM3", "tpu": "TPU v5 lite"}


def cross_lower(fn, args, platform: str, grad_argnums=None) -> str:
  """Lower ``fn(*args)`` (or the gradient of its float32 sum over
  ``grad_argnums``) for an abstract H100 (``platform="cuda"``) or TPU v5e
  (``"tpu"``) on this host, choosing kernels as that device would
  (``target.targeting``: ``impl`` dispatch, interpret mode off). Returns
  the lowered module's text."""
  if platform not in DEVICE_KINDS:
    raise ValueError(f"platform={platform!r}; use one of {tuple(DEVICE_KINDS)}")
  ad = jax.sharding.AbstractDevice(device_kind=DEVICE_KINDS[platform],
                                   num_cores=1, platform=platform)
  mesh = jax.sharding.AbstractMesh((1,), ("x",),
                                   (jax.sharding.AxisType.Explicit,),
                                   abstract_device=ad)
  f = fn
  if grad_argnums is not None:
    f = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                 argnums=grad_argnums)
  with jax.sharding.use_abstract_mesh(mesh), target.targeting(platform):
    return jax.jit(f).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()


# custom_call targets of Pallas kernels -> kind.
KERNEL_TARGETS = {"mosaic_gpu_v2": "mosaic_gpu", "mosaic_gpu": "mosaic_gpu",
                  "__gpu$xla.gpu.triton": "triton",
                  "tpu_custom_call": "mosaic_tpu"}
_CALL = re.compile(r"custom_call @(\S+?)\((.*)")


def _mlir_string(escaped: str) -> bytes:
  """The bytes of an MLIR string literal's body (``\\XX``, ``\\\\`` and
  ``\\"`` escapes)."""
  out, i = bytearray(), 0
  while i < len(escaped):
    if escaped[i] != "\\":
      j = escaped.find("\\", i)
      j = len(escaped) if j < 0 else j
      out += escaped[i:j].encode()
      i = j
    elif escaped[i + 1] in "\\\"":
      out.append(ord(escaped[i + 1]))
      i += 2
    else:
      out.append(int(escaped[i + 1:i + 3], 16))
      i += 3
  return bytes(out)


# A dump file name, which jaxlib 0.11 numbers per lowering ("body_0",
# "body_2", ...): two lowerings of one kernel then differ in it and in the
# kernel hash taken over it, and the device compiles both. jaxlib 0.10 sets
# no such attribute and 0.12 names it without a counter.
_DUMP_NAME = "mosaic_gpu.dump_basename"
_MGPU_CONFIG = re.compile(
    r'kernel_hash = "(?:[^"\\]|\\.)*", module = "((?:[^"\\]|\\.)*)"')


def _mosaic_gpu_module(escaped: str) -> str:
  """A digest of a Mosaic GPU kernel's serialized module (the custom call's
  ``module`` attribute) with its dump name dropped, locations kept; of the
  bytes as they are where this JAX cannot parse them back (a count must not
  fail the benchmark that asked for it)."""
  # pylint: disable=import-outside-toplevel
  from jax.interpreters import mlir  # the dialects JAX registers
  from jax.experimental.mosaic.gpu import dialect
  try:
    ctx = mlir.make_ir_context()
    dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True  # jaxlib's own, stable_mosaic_gpu
    with ctx:
      module = mlir.ir.Module.parse(_mlir_string(escaped))
      attrs = module.operation.attributes
      if _DUMP_NAME in attrs:
        del attrs[_DUMP_NAME]
      text = module.operation.get_asm(enable_debug_info=True)
  except Exception:  # pylint: disable=broad-exception-caught
    text = escaped
  return hashlib.sha256(text.encode()).hexdigest()


def kernel_bodies(text: str) -> dict[str, list[str]]:
  """Each Pallas kernel call in a lowered module's text, by kind
  ("mosaic_gpu", "triton", "mosaic_tpu"), as the attributes that say what it
  computes: its source location dropped and, for Mosaic GPU, its module's
  dump name (jaxlib 0.11 numbers it per lowering, so there no two Mosaic GPU
  calls are byte-identical and the device compiles each; what this compares
  is whether they lower the same kernel)."""
  bodies = collections.defaultdict(list)
  for target, rest in _CALL.findall(text):
    kind = KERNEL_TARGETS.get(target)
    if kind:
      # Past the operand list: attributes, types, then the location ref.
      body = re.sub(r"loc\(#[^)]*\)", "", rest.split(")", 1)[1])
      if kind == "mosaic_gpu":
        body = _MGPU_CONFIG.sub(
            lambda m: f"module = {_mosaic_gpu_module(m.group(1))}", body)
      bodies[kind].append(body)
  return dict(bodies)


def kernel_modules(text: str) -> dict[str, dict[str, int]]:
  """The Pallas kernels in a lowered module's text (``cross_lower``'s, or
  ``jax.jit(f).lower(...).as_text()``): {"calls": {kind: n}, "distinct":
  {kind: n}}, kind "mosaic_gpu", "triton" or "mosaic_tpu". A call is one
  custom call in the text (a function that several sites call holds its
  kernels once); calls that lower the same kernel at the same shapes
  (``kernel_bodies``) count as one distinct module, which the device
  compiles once (with jaxlib 0.11, the GPU image's, it compiles every Mosaic
  GPU call)."""
  bodies = kernel_bodies(text)
  return {"calls": {k: len(v) for k, v in bodies.items()},
          "distinct": {k: len(set(v)) for k, v in bodies.items()}}


# In a compiled TPU module's text (``compiled.as_text()``): the scoped VMEM
# a custom call got, and an instruction's name and result type.
_USED = re.compile(r'"used_scoped_memory_configs":\[\{[^}]*"size":"(\d+)"')
_DEF = re.compile(r"\s*(?:ROOT )?(%[^ ]+) = (.*?) [\w-]+\(")


def scoped_vmem(hlo: str, names=None) -> dict[str, tuple[float, int]]:
  """{kernel: (MiB of scoped VMEM libtpu gave it, how many of its operands
  and results XLA placed in VMEM (memory space S(1)) instead)}, the largest
  over a kernel's calls, from the compiled module's text; ``names``: only
  those kernels (default: every Mosaic TPU call, by instruction name less
  its ".N"). What XLA places in VMEM the kernel does not copy into its own
  scoped buffers."""
  defs = {m.group(1): m.group(2) for m in map(_DEF.match, hlo.splitlines())
          if m}
  out = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([^ ]+?)(?:\.\d+)? = (.*?) "
                 r"custom-call\(([^)]*)\)", line)
    used = m and _USED.search(line)
    if not used or (names is None and "tpu_custom_call" not in line) or (
        names is not None and m.group(1) not in names):
      continue
    operands = [o.split("*/")[-1].strip() for o in m.group(3).split(",")]
    in_vmem = m.group(2).count("S(1)") + sum(
        "S(1)" in defs.get(o, "") for o in operands)
    mib = int(used.group(1)) / (1 << 20)
    if mib >= out.get(m.group(1), (-1, 0))[0]:
      out[m.group(1)] = (mib, in_vmem)
  return out
