"""impl = "auto" | "xla" | "pallas": which implementation an op runs.

"xla" is the reference in ``structmat.ops``; "pallas" runs the kernel (in
interpret mode on the CPU) and raises if the shapes do not fit it; "auto" runs
the kernel on GPU/TPU when the shapes meet its constraints (and no measurement
says XLA wins there) and XLA otherwise
(the CPU always gets XLA: interpret mode is for testing), logging the reason
at debug level. On H200s only the fused Monarch kernel beat XLA (q/l >= 32,
unpadded blocks: the 60M preset's attention), so on GPUs auto runs the
block-diagonal and SLTrain Triton kernels nowhere; impl="pallas" still does
(and, on a Hopper GPU, the Mosaic GPU Monarch kernel where the Triton one
cannot take the shapes, e.g. on a JAX without the Triton backend).
Before any kernel, auto on GPUs runs a Monarch product as one dense matmul
of its materialized matrix where ``roofline`` predicts that faster than the
structured path (at 256 x 256 bf16 tokens: every layer of LLaMA-60M, the
attention of 130M and 350M; their MLPs and all of 1B stay structured).
"""
import functools

from absl import logging
import jax

from structmat.kernels import roofline, shards, target

IMPLS = ("auto", "xla", "pallas")
# impl="pallas:<name>" names one of an op's kernels (off TPUs): Monarch's
# "fused" (the default), "two_pass" (``monarch_two_pass``, session 19),
# "two_pass_dw" (the same with its weight gradients as kernels, session 20)
# or "mgpu" (Mosaic GPU, Hopper).
KERNELS = {"monarch": ("fused", "two_pass", "two_pass_dw", "mgpu")}


def split_impl(impl: str, op: str) -> tuple[str, str | None]:
  """("pallas", kernel) for impl="pallas:kernel", else (impl, None);
  raises naming the choices for an unknown impl or a kernel ``op`` lacks."""
  mode, _, kernel = impl.partition(":")
  if mode not in IMPLS or (kernel and mode != "pallas"):
    raise ValueError(f"impl={impl!r}; use one of {IMPLS}, or 'pallas:<kernel>' "
                     f"with a kernel of {KERNELS}.")
  if kernel and kernel not in KERNELS.get(op, ()):
    raise ValueError(
        f"impl={impl!r}: {op} has no kernel {kernel!r}; "
        + (f"use one of {KERNELS[op]}" if op in KERNELS else
           f"{op} has one kernel: use impl='pallas'"))
  return mode, kernel or None


def choose(impl: str, why_not) -> bool:
  """True to run the kernel. ``why_not(platform)`` -> None or a reason."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; use one of {IMPLS}.")
  if impl == "xla":
    return False
  platform = target.platform()
  if impl == "pallas":
    return True
  if platform == "cpu":
    logging.debug("impl=auto: XLA on the CPU (kernels run only interpreted)")
    return False
  reason = why_not(platform)
  if reason:
    logging.debug("impl=auto: XLA fallback: %s", reason)
    return False
  return True


def forced(kernel, *args, **kwargs):
  """Run ``kernel`` (per token shard inside ``shards.over``: XLA cannot
  split a kernel); a shape it refuses names the way out: impl="pallas"
  forces kernels on every layer, "auto" runs XLA where they cannot."""
  try:
    return shards.per_shard(kernel, *args, **kwargs)
  except ValueError as e:
    raise ValueError(f"impl='pallas': {e}. impl='auto' runs XLA for shapes a "
                     "kernel cannot take (and where XLA measured faster).") from e


def monarch(x, w1, w2, bias, impl: str, block_tokens: int = 128):
  """The fused kernel for the platform: the TPU kernel (tokens in lanes) on
  TPUs, the portable one (Triton) elsewhere, interpreted on the CPU; under
  impl="pallas" the Mosaic GPU one where only it takes the shapes.
  impl="pallas:two_pass" or "pallas:mgpu" runs that kernel (off TPUs);
  "pallas:fused" the fused one without the Mosaic GPU fallback."""
  from structmat.kernels import monarch as mk  # pylint: disable=import-outside-toplevel
  from structmat.kernels import monarch_tpu as mt  # pylint: disable=import-outside-toplevel
  from structmat.ops import monarch as ref  # pylint: disable=import-outside-toplevel
  impl, named = split_impl(impl, "monarch")
  if named and target.platform() == "tpu":
    raise ValueError(f"impl='pallas:{named}': TPUs run the Mosaic TPU Monarch "
                     "kernel; use impl='pallas'")
  if named:
    y = forced(_named_monarch(named, x, w1, w2, block_tokens), x, w1, w2)
    return y if bias is None else y + bias.astype(y.dtype)
  tokens = shards.local_tokens(x.size // x.shape[-1])
  itemsize = x.dtype.itemsize  # the kernel computes in x's dtype
  if impl == "auto":
    why = roofline.materialize_problem(tokens, w1.shape, w2.shape, itemsize,
                                       target.platform())
    if why is None:
      logging.debug("impl=auto: Monarch %s -> %s materialized (dense matmul)",
                    w1.shape, w2.shape)
      return ref.monarch_matmul_dense(x, w1, w2, bias)
  if target.platform() == "tpu":
    bt = mt.fit_block_tokens(tokens, w1.shape, w2.shape, itemsize)
    why_not = lambda plat: (
        mt.supported(tokens, w1.shape, w2.shape, bt, itemsize)
        or mt.padding_problem(w1.shape, w2.shape, itemsize))
    kernel = functools.partial(mt.monarch_matmul_tpu, block_tokens=bt)
  else:
    bt = mk.fit_block_tokens(tokens, w1.shape, w2.shape, itemsize,
                             target.platform(), block_tokens)
    why_not = lambda plat: (
        mk.supported(tokens, w1.shape, w2.shape, bt, plat, itemsize)
        or mk.slower_than_xla(tokens, w1.shape, w2.shape, plat, bt)
        or mk.padding_problem(w1.shape, w2.shape, plat, itemsize))
    kernel = functools.partial(mk.monarch_matmul_pallas, block_tokens=bt)
    if impl == "pallas":
      kernel = _portable_or_mgpu(kernel, tokens, w1.shape, w2.shape, bt,
                                 x.dtype)
  if not choose(impl, why_not):
    return ref.monarch_matmul(x, w1, w2, bias)
  y = forced(kernel, x, w1, w2)
  return y if bias is None else y + bias.astype(y.dtype)


def _named_monarch(name: str, x, w1, w2, block_tokens: int):
  """The Monarch kernel impl="pallas:<name>" runs, at the tile it fits."""
  from structmat.kernels import monarch as mk  # pylint: disable=import-outside-toplevel
  from structmat.kernels import monarch_mgpu as mg  # pylint: disable=import-outside-toplevel
  from structmat.kernels import monarch_two_pass as m2  # pylint: disable=import-outside-toplevel
  tokens = shards.local_tokens(x.size // x.shape[-1])
  itemsize = x.dtype.itemsize
  if name == "mgpu":
    return mg.monarch_matmul_mgpu
  two_pass = name.startswith("two_pass")
  fit = m2 if two_pass else mk
  bt = fit.fit_block_tokens(tokens, w1.shape, w2.shape, itemsize,
                            target.platform(), block_tokens)
  if two_pass:
    return functools.partial(m2.monarch_matmul_two_pass, block_tokens=bt,
                             dw_kernel=name == "two_pass_dw")
  return functools.partial(mk.monarch_matmul_pallas, block_tokens=bt)


def _portable_or_mgpu(portable, tokens, w1_shape, w2_shape, bt, dtype):
  """impl="pallas" off TPUs: the portable (Triton) Monarch kernel, or the
  Mosaic GPU one (forward and gradients) where the portable one cannot take
  the shapes (a JAX without Pallas' Triton backend, deprecated in 0.12, keeps
  Monarch kernels on Hopper GPUs) or would pad its blocks (``mgpu_first``)
  and the Mosaic GPU one takes them."""
  from structmat.kernels import monarch as mk  # pylint: disable=import-outside-toplevel
  from structmat.kernels import monarch_mgpu as mg  # pylint: disable=import-outside-toplevel
  platform = target.platform()
  why = (mk.supported(tokens, w1_shape, w2_shape, bt, platform,
                      jax.numpy.dtype(dtype).itemsize)
         or mgpu_first(w1_shape, w2_shape, platform))
  if why is None or mg.hardware_problem(platform) or mg.supported(
      tokens, w1_shape, w2_shape, dtype):
    return portable
  logging.debug("impl=pallas: Monarch %s -> %s through Mosaic GPU (not the "
                "portable kernel: %s)", w1_shape, w2_shape, why)
  return mg.monarch_matmul_mgpu


def mgpu_first(w1_shape, w2_shape, platform: str) -> str | None:
  """Why impl="pallas" on a GPU should prefer the Mosaic GPU Monarch to the
  Triton one that would run, or None: Triton pads blocks to powers of two
  and Mosaic GPU takes them as they are. H200, 768 = 4 x 192, bf16, forward
  + backward ms, Mosaic GPU (its own dw) vs Triton: 0.073 vs 0.108 at 4096
  tokens, 0.814 vs 1.202 at 65536, 0.067 vs 0.066 at 512 (session 14). Not
  on the CPU, whose interpreter stands in for both and runs Triton's code
  far faster."""
  from structmat.kernels import monarch as mk  # pylint: disable=import-outside-toplevel
  if platform not in mk.GPU_PLATFORMS:
    return None
  dims = mk.block_dims(w1_shape, w2_shape)
  if mk.padded_dims(*dims) != dims:
    return (f"Triton pads blocks (p, q/l, s) = {dims} to "
            f"{mk.padded_dims(*dims)}; Mosaic GPU trained 1.5x faster at "
            "768 = 4 x 192 on an H200")
  return None


def blockdiag(x, w, impl: str, block_tokens: int = 128):
  from structmat.kernels import blockdiag as bk  # pylint: disable=import-outside-toplevel
  from structmat.ops import blockdiag as ref  # pylint: disable=import-outside-toplevel
  impl, _ = split_impl(impl, "blockdiag")
  tokens = shards.local_tokens(x.size // x.shape[-1])
  bt = min(block_tokens, tokens)
  if not choose(impl, lambda plat: bk.supported(tokens, w.shape, bt, plat,
                                                x.dtype.itemsize)
                or bk.slower_than_xla(plat)):
    return ref.blockdiag_matmul(x, w)
  return forced(bk.blockdiag_matmul_pallas, x, w, block_tokens=bt)


def sltrain(x, a, b, values, indices, scale, impl: str, orders=None,
            block_tokens: int = 128, block: int = 0):
  """The reconstruct-and-multiply kernel for the platform: W column blocks
  rebuilt once in VMEM on TPUs (``sltrain_tpu``), the portable (Triton)
  kernel elsewhere, interpreted on the CPU. ``block``: the XLA fallback's
  (``ops.sltrain_matmul``)."""
  from structmat.kernels import sltrain as sk  # pylint: disable=import-outside-toplevel
  from structmat.kernels import sltrain_tpu as stk  # pylint: disable=import-outside-toplevel
  from structmat.ops import sparse_lowrank as ref  # pylint: disable=import-outside-toplevel
  impl, _ = split_impl(impl, "sltrain")
  tokens = shards.local_tokens(x.size // x.shape[-1])
  d_in, d_out = a.shape[0], b.shape[1]
  if target.platform() == "tpu":
    problem = lambda bt: stk.supported(tokens, d_in, d_out, a.shape[1],
                                       indices.shape[0], bt, x.dtype.itemsize)
    # 256-token tiles where they fit the chip's VMEM, else 128 (a v4 core).
    bt = next((bt for bt in (256, 128) if problem(bt) is None),
              256 if tokens % 256 == 0 else 128)
    why_not = lambda plat: problem(bt) or stk.padding_problem(d_in, d_out)
    kernel = functools.partial(stk.sltrain_matmul_tpu, block_tokens=bt)
  else:
    bt = min(block_tokens, tokens)

    def why_not(plat):
      (bk, d_in_p), (bn, d_out_p) = (sk.padded_dim(d_in, sk.DEFAULT_TILE, plat),
                                     sk.padded_dim(d_out, sk.DEFAULT_TILE, plat))
      return sk.supported(tokens, d_in_p, d_out_p,
                          sk.padded_rank(a.shape[1], plat), bt, bk, bn,
                          sk.DEFAULT_CHUNK, plat, x.dtype.itemsize
                          ) or sk.slower_than_xla(plat)
    kernel = functools.partial(sk.sltrain_matmul_pallas, block_tokens=bt)
  if not choose(impl, why_not):
    return ref.sltrain_matmul(x, a, b, values, indices, scale, block=block)
  return forced(kernel, x, a, b, values, indices, scale, orders=orders)
