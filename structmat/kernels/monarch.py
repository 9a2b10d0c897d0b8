"""Fused Monarch product as a portable Pallas kernel (Triton on GPU, Mosaic on TPU).

The intermediate never goes to device memory. With w1 (k, q, p) and w2 (l, s, r)
in fly's layout and q divisible by l, the permutation P1 sends columns
q_i = l_i (mod l) of stage-1 block k to stage-2 block l_i, at the contiguous
r-range [k*q/l, (k+1)*q/l). Gathering the weights once (weight-sized, cheap)
into A[l, k] = w1[k, l::l] (q/l, p) and B[l, k] = w2[l][:, k*q/l:(k+1)*q/l]
(s, q/l) makes every step a plain 2-D matmul on contiguous blocks:

    o_l = sum_k (x_k @ A[l, k]^T) @ B[l, k]^T

Forward: one program per (token tile, output block l) sums over k and
stores o_l with the final permutation P2 (block l's column j is output column
j*l + l): a store strided by l into y's (tokens, s, l) view, so y is written
once (until session 17 the kernel wrote a block-major (l, tokens, s) array
and XLA transposed it, two more passes over y). Backward: XLA undoes P2 on dy
(``strides_p2`` says why not the kernels); dx per (token tile, k) program; dA,
dB per (l, k) program looping over token tiles (accumulating across grid
programs would race on Triton). Reference: ``structmat.ops.monarch_matmul``.

Block sizes that are not powers of two (LLaMA-130M's and GPT-2's 768 features
in 4 blocks of 192, q/l = 48) are padded for Triton, which loads and computes
only power-of-two shapes: A and B are zero-padded to (G, P) and (S, G) blocks
(weight-sized, in XLA), activations are read through masked loads that fill
the columns past a block with zeros, and outputs are written through masked
stores. Activations are never padded in memory.

Blocks wider than a Triton tile (p or s above ``MAX_TRITON_BLOCK`` = 256:
LLaMA-60M's MLP blocks of 344, 130M's 512, GPT-2's 768) are walked in
256-wide chunks: stage 1 sums over p's chunks, stage 2 (and dx) produce one
output chunk at a time from the k (or l) stage-1 results held in registers,
and the weight gradients make one pass over the tokens per output chunk,
recomputing the (tokens, q/l) intermediate. Where even 16-token tiles of
256-wide chunks overflow shared memory (float32 from 130M on, LLaMA-7B's
q/l = 256) the chunks narrow to 128, 64, ... (``chunk_width``). So
impl="pallas" runs every Monarch layer of the GaLore LLaMA presets and GPT-2
in 16-bit and 32-bit dtypes; only q/l itself must fit a tile. Never timed on
a GPU: ``impl="auto"`` does not take chunked blocks (``padding_problem``).

The weight gradients' token loops are software-pipelined, so they ask for
more shared memory than the forward's tile (the H200 refused LLaMA-60M's MLP
at 260-276 KiB): they take their own token step (``dw_block_tokens``), and
where even 16 tokens overflow (the factors of wide chunked blocks alone fill
shared memory: LLaMA-350M's and GPT-2's MLPs, float32 MLPs) XLA computes the
weight gradients while the forward and dx stay fused.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from structmat.kernels import triton_backend
from structmat.kernels.portable import (LOOP_SMEM_BUDGET, SMEM_BUDGET,
                                        TRITON_STAGES, compiler_params,
                                        launch_order, pow2, prepare,
                                        split_count)
from structmat.kernels.shared_trace import traced_once
from structmat.kernels.triton_backend import GPU_PLATFORMS, plt
# The regrouping the kernels multiply (also ops.monarch_to_dense's).
from structmat.ops.monarch import gather_weights  # pylint: disable=unused-import


MAX_TRITON_BLOCK = 256
# ``LOOP_SMEM_BUDGET`` (224 KiB) holds the software-pipelined loops (the
# weight gradients', whole blocks' forward and dx), whose estimates
# (``dw_smem_estimate``, ``smem_estimate(looped=True)``) bound what Triton
# asks for from above (never below in 60 weight-gradient shapes compiled
# offline: exact to 50% over, the most in float32 with a thin q/l), unlike
# the unrolled kernels': steps the H200 compiled before there were estimates
# (the 60M attention's dw at 128 tokens, asked 192 KiB; n=4096 in 16
# blocks' at 64, 180 KiB) stay within it.


def scatter_weight_grads(da, db):
  """Inverse of ``gather_weights`` for gradients: (dw1, dw2)."""
  l, k, g, p = da.shape
  s = db.shape[2]
  dw1 = da.transpose(1, 2, 0, 3).reshape(k, g * l, p)
  dw2 = db.transpose(0, 2, 1, 3).reshape(l, s, k * g)
  return dw1, dw2


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def block_dims(w1_shape, w2_shape) -> tuple[int, int, int]:
  """(p, q/l, s): the dims of the blocks the kernels multiply, x_k @ A[l, k]^T
  ((tokens, p) @ (p, q/l)) then @ B[l, k]^T ((q/l, s))."""
  return w1_shape[2], w1_shape[1] // w2_shape[0], w2_shape[1]


def padded_dims(p: int, g: int, s: int, pad: bool = True) -> tuple[int, int, int]:
  """(P, G, S): the block sizes the kernel loads and multiplies, powers of two
  >= 16 (Triton's shapes and smallest dot) with ``pad``, else (p, g, s)."""
  if not pad:
    return p, g, s
  return tuple(max(16, _next_pow2(v)) for v in (p, g, s))


def pads_blocks(platform: str) -> bool:
  """Whether the kernel pads blocks to powers of two on ``platform``: on
  GPUs (Triton) and in interpret mode ("cpu", which tests the GPU code), not
  on TPUs (Mosaic takes any multiple of (8, 128) as it is)."""
  return platform != "tpu"


def strides_p2(platform: str) -> bool:
  """Whether the forward applies P2 through l-strided stores into y's
  (tokens, s, l) view: with Triton (GPUs, and interpret mode, which tests
  that code). Mosaic TPU blocks need (8, 128)-aligned trailing dims, so there
  it writes a block-major (l, tokens, s) array that XLA permutes.

  The backward still reads dy block-major (XLA undoes P2 first): reading dy
  through the strided view, Triton 3.6 could no longer pipeline those loads
  through shared memory (cp.async takes >= 4 contiguous bytes), and the 60M
  MLP's dx spilled 2020 bytes per thread instead of 292
  (``tools/triton_smem.py``); each of dx's l steps would also pull every
  sector of the dy tile for a quarter of it."""
  return platform != "tpu"


def smem_estimate(block_tokens: int, p: int, g: int, s: int, itemsize: int,
                  looped: bool = False) -> int:
  """Bytes of shared memory the Triton forward plans for, per program (dx's
  with p and s swapped).

  Takes the padded block sizes (``padded_dims``), or for blocks wider than
  a chunk the width (``chunk_width``) the kernels walk them in.

  ``looped`` (whole blocks, whose loop over the k blocks Triton
  software-pipelines): ``TRITON_STAGES`` buffers of each step's x tile and
  A and B blocks (one fewer below 64-token tiles, where Triton takes
  mma.sync rather than wgmma), plus the (bt, g) stage-1 operand. Triton 3.6
  compiling for sm_90 (``tools/triton_smem.py``) asked exactly the buffers
  at 64 and 128 tokens and the whole at 32. Unrolled (chunked blocks): both
  dots' operand tiles ((bt x p) @ (p x g), then (bt x g) @ (g x s)) plus
  the float32 (bt x s) accumulator's store conversion, which on an H200
  separated what compiled from what overflowed the 227 KiB (p=s=256, g=16
  in bfloat16 compiled with 64-token tiles, 114 KiB here, and overflowed
  with 128, 212 KiB) and bounds Triton 3.6's asks from above.
  """
  if looped:
    stages = TRITON_STAGES if block_tokens >= 64 else TRITON_STAGES - 1
    return (stages * (block_tokens * p + g * p + s * g)
            + block_tokens * g) * itemsize
  return (((block_tokens + g) * p + (block_tokens + s) * g) * itemsize
          + block_tokens * s * 4)


def tile_smem(block_tokens: int, pp: int, gg: int, ss: int, width: int,
              itemsize: int) -> tuple[int, int]:
  """(estimate, budget) of the forward's and dx's shared memory at a
  ``block_tokens`` tile with blocks walked in ``width``-wide chunks: whole
  blocks loop (an estimate that bounds Triton's ask closely, so the
  pipelined loops' ``LOOP_SMEM_BUDGET``), chunked ones unroll (a looser one
  within ``SMEM_BUDGET``)."""
  if max(pp, ss) <= width:
    return (max(smem_estimate(block_tokens, pp, gg, ss, itemsize, True),
                smem_estimate(block_tokens, ss, gg, pp, itemsize, True)),
            LOOP_SMEM_BUDGET)
  return (smem_estimate(block_tokens, min(pp, width), gg, min(ss, width),
                        itemsize), SMEM_BUDGET)


def dw_smem_estimate(block_tokens: int, p: int, g: int, s: int, tile: int,
                     itemsize: int) -> int:
  """Bytes of shared memory the Triton weight-gradient kernel plans for, per
  program, with ``block_tokens``-token steps over chunks of ``tile`` columns.

  Takes the real block sizes (p, s) and the padded q/l (``padded_dims``).
  Unlike the forward and dx, its token loops are software-pipelined: Triton
  keeps ``TRITON_STAGES`` buffers of each token tile a step loads (x's and
  dy's columns), beside the factor columns a step multiplies by (hoisted out
  of the loop, all of them live) and two (bt, G) stage-1 operands. The
  largest pass counts: whole blocks take one pass; chunked ones a pass per
  chunk of p (loading all of dy's columns and one chunk of x's) and per chunk
  of s (the other way round). Checked against Triton 3.6 compiling the kernel
  for sm_90 (``tools/triton_smem.py``): never below it, exact for whole
  256-wide blocks; and above what the H200 asked for where it refused
  (``tests/test_kernels.py``; the forward's estimate had let those through).
  """
  pp, _, ss = padded_dims(p, g, s)
  widths = lambda real, padded: [size for _, size, _ in
                                 _chunks(real, padded, tile)]
  lp, ls = sum(widths(p, pp)), sum(widths(s, ss))
  if max(pp, ss) <= tile:
    passes = [(pp + ss, pp + ss)]          # (token columns, factor columns)
  else:
    passes = ([(ls + size, ls) for size in widths(p, pp)]
              + [(lp + size, lp) for size in widths(s, ss)])
  return max(TRITON_STAGES * block_tokens * cols + g * factor_cols
             + 2 * block_tokens * g for cols, factor_cols in passes) * itemsize


def dw_block_tokens(block_tokens: int, p: int, g: int, s: int, tile: int,
                    itemsize: int) -> int | None:
  """The weight-gradient kernel's token step: ``block_tokens`` (which it
  divides), halved down to 16 until ``dw_smem_estimate`` fits
  ``LOOP_SMEM_BUDGET``;
  None when even 16 tokens overflow it (wide chunked blocks, whose factors
  alone fill shared memory: LLaMA-350M's MLP, GPT-2 medium's), where XLA
  computes the weight gradients."""
  bt = block_tokens
  while dw_smem_estimate(bt, p, g, s, tile, itemsize) > LOOP_SMEM_BUDGET:
    if bt <= 16:
      return None
    bt //= 2
  return bt


def chunk_width(pp: int, gg: int, ss: int, itemsize: int) -> int:
  """Width of the chunks the Triton kernels walk padded blocks (pp, ss) in.

  The widest of ``MAX_TRITON_BLOCK`` (or the wider block, if narrower),
  halving down to 16, at which 16-token tiles fit their budget (``tile_smem``):
  a whole tile's width for every 16-bit preset up to 1B, narrower where
  float32 or LLaMA-7B's q/l = 256 would overflow it (LLaMA-130M's 4 x 192
  in float32: 128; 7B in bfloat16: 128, in float32: 64). Choosing it from
  the 16-token floor keeps every shape that fits 256-wide chunks at that
  width; ``fit_block_tokens`` then picks the tile."""
  width = min(MAX_TRITON_BLOCK, max(pp, ss))   # blocks that fit are whole
  while width > 16:
    smem, budget = tile_smem(16, pp, gg, ss, width, itemsize)
    if smem <= budget:
      break
    width //= 2
  return width


def chunked(w1_shape, w2_shape, itemsize: int) -> bool:
  """Whether the Triton kernels walk these (padded) blocks in chunks."""
  p, g, s = block_dims(w1_shape, w2_shape)
  pp, gg, ss = padded_dims(p, g, s)
  return max(pp, ss) > chunk_width(pp, gg, ss, itemsize)


def layout_problem(w1_shape, w2_shape) -> str | None:
  """Why the fused kernels' regrouped layout cannot hold these factors, or
  None (both kernels need q divisible by l)."""
  k, q, _ = w1_shape
  l, _, r = w2_shape
  if l * r != k * q:
    return "w2 does not match w1"
  if q % l:
    return f"q={q} not divisible by l={l} (the fused kernels' layout needs it)"
  return None


def supported(tokens: int, w1_shape, w2_shape, block_tokens: int,
              platform: str, itemsize: int = 2) -> str | None:
  """None if the fused kernel runs these shapes on ``platform``, else why not.

  ``itemsize``: bytes per element of x (shared memory depends on it)."""
  _, q, p = w1_shape
  l, s, _ = w2_shape
  if why := layout_problem(w1_shape, w2_shape):
    return why
  if tokens % block_tokens:
    return f"tokens {tokens} not a multiple of block_tokens {block_tokens}"
  g = q // l
  # Padded blocks are read and written through Triton's masked loads/stores.
  masked = padded_dims(p, g, s) != (p, g, s)
  if why := triton_backend.problem(platform, masked):
    return why
  if platform in GPU_PLATFORMS:
    if not pow2(block_tokens) or block_tokens < 16:
      return (f"Triton needs a power-of-two block_tokens >= 16, got "
              f"{block_tokens}")
    pp, gg, ss = padded_dims(p, g, s)
    if gg > MAX_TRITON_BLOCK:
      # p and s wider than a chunk are walked in chunks; q/l is every dot's
      # inner or outer width and stays whole.
      return (f"q/l={g} (padded to {gg}) exceeds a Triton tile of "
              f"{MAX_TRITON_BLOCK}: use more blocks")
    width = chunk_width(pp, gg, ss, itemsize)
    smem, budget = tile_smem(block_tokens, pp, gg, ss, width, itemsize)
    if smem > budget:
      floor, _ = tile_smem(16, pp, gg, ss, width, itemsize)
      fix = ("use fewer tokens per tile" if floor <= budget else
             f"even 16-token tiles need ~{floor // 1024} KiB: use smaller "
             "blocks (more nblocks) or a 16-bit dtype")
      return (f"block_tokens={block_tokens} needs ~{smem // 1024} KiB of shared "
              f"memory in {width}-wide chunks (budget {budget // 1024} "
              f"KiB); {fix}")
  if platform == "tpu":
    if p % 128 or g % 128 or s % 128 or block_tokens % 8:
      return "Mosaic TPU needs block dims multiple of (8, 128)"
  return None


# Measured on H200s (bf16; forward / forward+backward ms, kernel vs XLA).
# n=4096 in 16 blocks of 256 (q/l = 16): 512 tokens 0.060/0.071 vs
# 0.075/0.069; 1024: 0.054/0.130 vs 0.081/0.061; 2048: 0.100/0.197 vs
# 0.080/0.133; 16384: 0.889/1.58 vs 0.381/0.827 (session 8, unrolled), the
# loop over k 0.781/1.551 vs 0.392/0.815 (session 14). Its stage-1 dots are
# (tokens x p) @ (p x q/l): with q/l < 32 they underfill the tensor cores, so
# the kernel only ever wins a forward at <= 1024 tokens and never a training
# step (forward+backward): auto keeps XLA for q/l < 32 at every token count.
THIN_STAGE1 = 32
# Every (token tile, l) program also streams its l's factors, A[l] and B[l],
# from L2. Relative to the activation bytes (x read, y written) that is
# ``factor_rereads``: ~4 in the 16384-token case above (2.4x slower than XLA)
# and ~1 in the 60M preset's attention (n=512 in 4 blocks, 128-token tiles:
# 4096 tokens 0.063/0.052 vs 0.085/0.085, 65536 tokens 0.189/0.256 vs
# 0.169/0.300; the 60M step 8% faster). Beyond 1024 tokens auto keeps XLA
# above this ratio, a bound between the two measured points.
MAX_FACTOR_REREADS = 2.0
REREADS_MIN_TOKENS = 1024


def factor_rereads(w1_shape, w2_shape, block_tokens: int) -> float:
  """Bytes of factors the forward's programs read, over the bytes of x and y:
  k*l*(G*P + S*G) / (block_tokens * (k*p + l*s)) with padded blocks."""
  k, q, p = w1_shape
  l, s, _ = w2_shape
  pp, gg, ss = padded_dims(p, q // l, s)
  return k * l * (gg * pp + ss * gg) / (block_tokens * (k * p + l * s))


def slower_than_xla(tokens: int, w1_shape, w2_shape, platform: str,
                    block_tokens: int | None = None) -> str | None:
  """Why ``impl="auto"`` should keep XLA although the kernel would run, or None.

  Rules from H200 measurements: a thin first stage (any token count), and
  beyond 1024 tokens (given ``block_tokens``) tiles so small that re-reading
  the factors costs more than the activations."""
  if platform not in GPU_PLATFORMS:
    return None
  g = w1_shape[1] // w2_shape[0]
  if g < THIN_STAGE1:
    return (f"q/l={g} < {THIN_STAGE1}: the fused kernel's thin first stage "
            "trained (forward+backward) 2.1x slower than XLA at 1024 tokens "
            "and 1.9x at 16384 on an H200")
  if block_tokens is not None and tokens > REREADS_MIN_TOKENS:
    ratio = factor_rereads(w1_shape, w2_shape, block_tokens)
    if ratio > MAX_FACTOR_REREADS:
      return (f"{block_tokens}-token tiles re-read the factors: {ratio:.1f}x "
              f"the activation bytes (> {MAX_FACTOR_REREADS}; ~4 was 2.4x "
              "slower than XLA on an H200)")
  return None


def padding_problem(w1_shape, w2_shape, platform: str,
                    itemsize: int = 2) -> str | None:
  """Why ``impl="auto"`` should keep XLA for padded blocks, or None.

  Padding multiplies a stage's FLOPs by its block dims' padded-to-real
  ratios while the bytes stay the same. Measured on an H200 at 768 = 4 x 192
  (padded to 256 / 64): forward+backward 0.056 vs 0.047 ms at 512 tokens,
  0.127 vs 0.064 at 4096, 1.57 vs 0.716 at 65536, so auto takes no padding.
  Nor chunks (``chunked``; ``itemsize``: bytes per element of x).
  """
  if not pads_blocks(platform):
    return None
  p, g, s = block_dims(w1_shape, w2_shape)
  for name, v, padded in zip("pgs", (p, g, s), padded_dims(p, g, s)):
    if padded != v:
      return (f"{name}={v} pads to {padded} for Triton, measured up to 2.2x "
              "slower than XLA at 768 = 4 x 192; impl='pallas' runs it anyway")
  if chunked(w1_shape, w2_shape, itemsize):
    width = chunk_width(p, g, s, itemsize)
    return (f"blocks wider than {width} ({p=}, {s=}) run in chunks "
            "that recompute stage 1 in the weight gradients: never timed on "
            "a GPU, and compute-bound blocks are where XLA's matmuls win; "
            "impl='pallas' runs them")
  return None


def fit_block_tokens(tokens: int, w1_shape, w2_shape, itemsize: int,
                     platform: str, block_tokens: int = 128) -> int:
  """The largest tile of at most ``block_tokens`` (halving, >= 16) that
  ``supported`` accepts; ``block_tokens`` itself when none does (then
  ``supported`` says why)."""
  bt = min(block_tokens, tokens)
  while bt >= 16:
    if supported(tokens, w1_shape, w2_shape, bt, platform, itemsize) is None:
      return bt
    if bt % 2:
      break
    bt //= 2
  return min(block_tokens, tokens)


def _dot_t(a, b):
  """a @ b^T with float32 accumulation (2-D)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a^T @ b (contract the token axis)."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _col_mask(ref, valid: int):
  """None when all of a 2-D ref's columns are real, else columns < valid."""
  rows, cols = ref.shape
  if valid >= cols:
    return None
  return jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1) < valid


def _load(ref, valid: int):
  """ref[...] with the columns from ``valid`` on (padding past a block, which
  may be the next block's data or past the array) read as zeros."""
  mask = _col_mask(ref, valid)
  return ref[...] if mask is None else plt.load(ref, mask=mask, other=0)


def _store(ref, value, valid: int):
  """ref[...] = value, the padding columns from ``valid`` on left unwritten."""
  mask = _col_mask(ref, valid)
  if mask is None:
    ref[...] = value
  else:
    plt.store(ref, value, mask=mask)


def _split(x, p: int, pp: int):
  """A (tokens, k*p) activation as the kernels address it: itself when the
  blocks are not padded (pp == p), else its (tokens, k, p) view, whose
  (rows, None, pp) blocks start at every block k although pp > p."""
  return x if pp == p else x.reshape(x.shape[0], -1, p)


def _split_spec(rows: int, p: int, pp: int, index):
  """BlockSpec of one column block of ``_split(x, p, pp)``;
  ``index(*grid_ids) -> (row block, column block)``."""
  if pp == p:
    return pl.BlockSpec((rows, p), index)
  return pl.BlockSpec((rows, None, pp), lambda *ids: (*index(*ids), 0))


def _tile(platform: str, a, b) -> int | None:
  """The widest block dim a kernel takes whole, given the padded factors a
  (.., G, P) and b (.., S, G): the ``chunk_width`` on GPUs and in interpret
  mode (which tests the GPU code); any on TPUs."""
  if not pads_blocks(platform):
    return None
  return chunk_width(a.shape[-1], a.shape[-2], b.shape[-2], a.dtype.itemsize)


def _chunks(real: int, padded: int, tile: int | None):
  """Static (start, size, valid) column chunks of a block dim: the whole
  (padded) block when it fits ``tile``, else tiles of that width, the last
  narrowed to the power of two (>= 16) that holds its real columns (the 60M
  MLP's 344 = 256 + 128 rather than 256 + 256: a quarter fewer padded
  FLOPs, float32 accumulator registers and loaded columns). Chunks wholly
  in the padding are skipped."""
  size = padded if tile is None else min(padded, tile)
  if size == padded:
    return [(0, size, real)]
  return [(c, min(size, max(16, _next_pow2(real - c))), min(size, real - c))
          for c in range(0, real, size)]


def _span(full: int, start: int, size: int):
  """Index of [start, start + size) along an axis of length ``full``: all of
  it (``:``, as in the unchunked kernels measured on the H200) or a slice.
  Callers index a ref once with it: Triton's masked loads take one indexer,
  not a chain of ``.at``s."""
  return slice(None) if start == 0 and size == full else pl.ds(start, size)


def _accumulate(n: int, step, shape, loop: bool):
  """sum(step(i) for i < n) into a float32 ``shape`` accumulator: a
  ``fori_loop`` with ``loop`` (whole blocks: Triton software-pipelines it;
  unrolled, every step's operands stayed live in registers and spilled,
  4.5 KB per thread at n=4096 in 16 blocks, and the H200 ran the forward 2x
  slower: 1.561 vs 0.781 ms, session 14), else unrolled (chunked blocks,
  whose per-chunk operands a loop would multiply by its pipeline stages)."""
  acc = jnp.zeros(shape, jnp.float32)
  if loop:
    return jax.lax.fori_loop(0, n, lambda i, a: a + step(i), acc)
  for i in range(n):
    acc = acc + step(i)
  return acc


def _sum(parts):
  acc = None
  for part in parts:
    acc = part if acc is None else acc + part
  return acc


def _fwd_kernel(x_ref, a_ref, b_ref, o_ref, *, k, p, s, tile):
  pp, ss = a_ref.shape[-1], b_ref.shape[-2]
  in_chunks, out_chunks = _chunks(p, pp, tile), _chunks(s, ss, tile)

  def stage1(ki):   # x_k @ A[l, k]^T, (bt, G), summed over p's chunks
    def part(c, size, valid):
      if x_ref.ndim == 2:   # unpadded: (bt, k*p)
        xk = x_ref[:, pl.ds(ki * p + c, size)]
      else:                 # padded: (bt, k, P); a traced index because jax
        # 0.10.2 interprets masked loads only with those
        xk = _load(x_ref.at[:, jnp.int32(ki), _span(pp, c, size)], valid)
      return _dot_t(xk, a_ref[ki, :, _span(pp, c, size)])
    return _sum(part(*ch) for ch in in_chunks).astype(x_ref.dtype)

  if len(out_chunks) == 1:   # each stage-1 block goes straight into stage 2
    acc = _accumulate(k, lambda ki: _dot_t(stage1(ki), b_ref[ki]),
                      (x_ref.shape[0], ss), len(in_chunks) == 1)
    _store(o_ref, acc.astype(o_ref.dtype), s)
    return
  # Output blocks wider than a tile: stage 1 once, stage 2 per output chunk
  # (a float32 accumulator for all of s would not fit in registers).
  hs = [stage1(ki) for ki in range(k)]
  for c, size, valid in out_chunks:
    acc = _sum(_dot_t(hs[ki], b_ref[ki, pl.ds(c, size), :]) for ki in range(k))
    _store(o_ref.at[:, pl.ds(c, size)], acc.astype(o_ref.dtype), valid)


def _call_fwd(x, a, b, p, s, block_tokens, interpret, platform, strided):
  """x (tokens, k*p), a/b padded to (l, k, G, P) / (l, k, S, G) -> y
  (tokens, s*l), the output permutation P2 (index s_idx*l + l) included:
  in the kernel's stores with ``strided``, else by XLA."""
  # One program per (token tile, output block l): tiles x l programs keep a
  # GPU busy even at a few hundred tokens. A tile's l programs launch
  # together on GPUs (``launch_order``): they re-read its x rows from L2,
  # and their interleaved stores below meet in the same L2 sectors.
  tokens = x.shape[0]
  l, k, g, pp = a.shape
  ss = b.shape[2]
  kernel = functools.partial(_fwd_kernel, k=k, p=p, s=s,
                             tile=_tile(platform, a, b))
  xs = _split(x, p, pp)
  if strided:
    # P2 in the store: block l's column j is output column j*l + l, so each
    # program writes its (bt, S) tile strided by l into y's (tokens, s, l)
    # view. Until session 17 the kernel wrote a block-major (l, tokens, s)
    # array that XLA then transposed: two more passes over y.
    out = (jax.ShapeDtypeStruct((tokens, s, l), x.dtype),
           pl.BlockSpec((block_tokens, ss, None), lambda i, j: (i, 0, j)))
  else:
    out = (jax.ShapeDtypeStruct((l, tokens, s), x.dtype),
           pl.BlockSpec((None, block_tokens, ss), lambda i, j: (j, i, 0)))
  grid, in_specs, out_spec = launch_order(
      platform, (tokens // block_tokens, l),
      # the whole row: (bt, k*p), or (bt, k, P) in the padded view
      [pl.BlockSpec((block_tokens, *xs.shape[1:-1], max(pp, xs.shape[-1])),
                    lambda i, j: (i,) + (0,) * (xs.ndim - 1)),
       pl.BlockSpec((None, k, g, pp), lambda i, j: (j, 0, 0, 0)),
       pl.BlockSpec((None, k, ss, g), lambda i, j: (j, 0, 0, 0))], out[1])
  y = pl.pallas_call(
      kernel,
      out_shape=out[0],
      grid=grid, in_specs=in_specs, out_specs=out_spec,
      interpret=interpret,
      # 8 warps from a 64 KB float32 accumulator on (128 registers per
      # thread at 4 warps): n=4096 in 16 blocks, 64-token tiles spilled 304
      # bytes per thread at 4 warps, none at 8 (tools/triton_smem.py).
      compiler_params=None if interpret else compiler_params(
          platform, 2, 8 if block_tokens * ss >= 16384 else 4),
      name="monarch_fwd",
  )(xs, a, b)
  if not strided:
    y = y.transpose(1, 2, 0)
  return y.reshape(tokens, s * l)


def _dx_kernel(do_ref, a_ref, b_ref, dx_ref, *, l, p, s, tile):
  pp, ss = a_ref.shape[-1], b_ref.shape[-2]
  in_chunks, out_chunks = _chunks(s, ss, tile), _chunks(p, pp, tile)

  def dh(li):       # do_l @ B[l, k], (bt, G), summed over s's chunks
    return _sum(
        _dot(_load(do_ref.at[jnp.int32(li), :, _span(ss, c, size)], valid),
             b_ref[li, _span(ss, c, size), :])
        for c, size, valid in in_chunks).astype(do_ref.dtype)

  if len(out_chunks) == 1:
    acc = _accumulate(l, lambda li: _dot(dh(li), a_ref[li]),     # (bt, P)
                      (do_ref.shape[1], pp), len(in_chunks) == 1)
    _store(dx_ref, acc.astype(dx_ref.dtype), p)
    return
  dhs = [dh(li) for li in range(l)]
  for c, size, valid in out_chunks:
    acc = _sum(_dot(dhs[li], a_ref[li, :, pl.ds(c, size)]) for li in range(l))
    _store(dx_ref.at[:, pl.ds(c, size)], acc.astype(dx_ref.dtype), valid)


def _call_dx(do, a, b, p, block_tokens, interpret, platform):
  """do (l, tokens, s) -> dx (tokens, k*p)."""
  l, tokens, s = do.shape
  _, k, g, pp = a.shape
  ss = b.shape[2]
  # a tile's k programs launch together, re-reading its dy rows from L2
  grid, in_specs, out_spec = launch_order(
      platform, (tokens // block_tokens, k),
      [pl.BlockSpec((l, block_tokens, ss), lambda i, j: (0, i, 0)),
       pl.BlockSpec((l, None, g, pp), lambda i, j: (0, j, 0, 0)),
       pl.BlockSpec((l, None, ss, g), lambda i, j: (0, j, 0, 0))],
      _split_spec(block_tokens, p, pp, lambda i, j: (i, j)))
  dx = pl.pallas_call(
      functools.partial(_dx_kernel, l=l, p=p, s=s,
                        tile=_tile(platform, a, b)),
      out_shape=jax.ShapeDtypeStruct(
          (tokens, k * p) if pp == p else (tokens, k, p), do.dtype),
      grid=grid, in_specs=in_specs, out_specs=out_spec,
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(
          platform, 2, 8 if block_tokens * pp >= 16384 else 4),
      name="monarch_dx",
  )(do, a, b)
  return dx.reshape(tokens, k * p)


def _dw_kernel(x_ref, do_ref, a_ref, b_ref, da_ref, db_ref, *, bt, n_tiles,
               p, s, tile):
  g, pp = a_ref.shape
  ss = b_ref.shape[0]
  p_chunks, s_chunks = _chunks(p, pp, tile), _chunks(s, ss, tile)
  if len(p_chunks) > 1 or len(s_chunks) > 1:
    _dw_chunked(x_ref, do_ref, a_ref, b_ref, da_ref, db_ref, bt, n_tiles,
                p_chunks, s_chunks)
    return

  def body(t, carry):
    da, db = carry
    rows = pl.ds(t * bt, bt)
    x = _load(x_ref.at[rows, :], p)                        # (bt, P)
    do = _load(do_ref.at[rows, :], s)                      # (bt, S)
    h = _dot_t(x, a_ref[...]).astype(x.dtype)              # (bt, G)
    dh = _dot(do, b_ref[...]).astype(x.dtype)              # (bt, G)
    return da + _dot_tn(dh, x), db + _dot_tn(do, h)

  da, db = jax.lax.fori_loop(0, n_tiles, body,
                             (jnp.zeros((g, pp), jnp.float32),
                              jnp.zeros((ss, g), jnp.float32)))
  da_ref[...] = da
  db_ref[...] = db


def _dw_chunked(x_ref, do_ref, a_ref, b_ref, da_ref, db_ref, bt, n_tiles,
                p_chunks, s_chunks):
  """dA and dB for blocks wider than a tile, one output chunk at a time
  (float32 accumulators for a whole (G, P) or (S, G) block would not fit in
  registers): each chunk's pass over the tokens recomputes the (bt, G)
  stage-1 result or its gradient, summed over the other dim's chunks."""
  g, pp = a_ref.shape
  ss = b_ref.shape[0]
  dtype = x_ref.dtype
  x_at = lambda rows, c, size, valid: _load(
      x_ref.at[rows, _span(pp, c, size)], valid)
  do_at = lambda rows, c, size, valid: _load(
      do_ref.at[rows, _span(ss, c, size)], valid)

  def h(rows):      # x @ A^T
    return _sum(_dot_t(x_at(rows, c, size, valid), a_ref[:, _span(pp, c, size)])
                for c, size, valid in p_chunks).astype(dtype)

  def dh(rows):     # do @ B
    return _sum(_dot(do_at(rows, c, size, valid), b_ref[_span(ss, c, size), :])
                for c, size, valid in s_chunks).astype(dtype)

  for c, size, valid in p_chunks:
    def da_body(t, da, c=c, size=size, valid=valid):
      rows = pl.ds(t * bt, bt)
      return da + _dot_tn(dh(rows), x_at(rows, c, size, valid))
    da_ref[:, _span(pp, c, size)] = jax.lax.fori_loop(
        0, n_tiles, da_body, jnp.zeros((g, size), jnp.float32))
  for c, size, valid in s_chunks:
    def db_body(t, db, c=c, size=size, valid=valid):
      rows = pl.ds(t * bt, bt)
      return db + _dot_tn(do_at(rows, c, size, valid), h(rows))
    db_ref[_span(ss, c, size), :] = jax.lax.fori_loop(
        0, n_tiles, db_body, jnp.zeros((size, g), jnp.float32))


def _call_dw(x, do, a, b, p, block_tokens, interpret, platform):
  """(dA, dB), padded like a and b (float32), from x and do (l, tokens,
  s): each program sums one token
  chunk of one (l, k) pair into a float32 partial (programs must not
  accumulate into a shared block on Triton); XLA adds the partials. The chunks
  fill the GPU when l*k is small. ``block_tokens``: the loop's token step
  (``dw_block_tokens`` on GPUs)."""
  tokens, s = do.shape[1:]
  l, k, g, pp = a.shape
  ss = b.shape[2]
  chunks = split_count(tokens // block_tokens, l * k)
  rows = tokens // chunks
  kernel = functools.partial(_dw_kernel, bt=block_tokens,
                             n_tiles=rows // block_tokens, p=p, s=s,
                             tile=_tile(platform, a, b))
  da, db = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((chunks,) + a.shape, jnp.float32),
                 jax.ShapeDtypeStruct((chunks,) + b.shape, jnp.float32)),
      grid=(l, k, chunks),
      in_specs=[_split_spec(rows, p, pp, lambda i, j, c: (c, j)),
                pl.BlockSpec((None, rows, ss), lambda i, j, c: (i, c, 0)),
                pl.BlockSpec((None, None, g, pp), lambda i, j, c: (i, j, 0, 0)),
                pl.BlockSpec((None, None, ss, g), lambda i, j, c: (i, j, 0, 0))],
      out_specs=(pl.BlockSpec((None, None, None, g, pp),
                              lambda i, j, c: (c, i, j, 0, 0)),
                 pl.BlockSpec((None, None, None, ss, g),
                              lambda i, j, c: (c, i, j, 0, 0))),
      interpret=interpret,
      # 8 warps from 64 KB of float32 dA + dB accumulators on: 768 = 4 x 192
      # (padded) spilled 1920 bytes per thread at 4 warps, 216 at 8.
      compiler_params=None if interpret else compiler_params(
          platform, 3, 8 if g * (pp + ss) >= 16384 else 4),
      name="monarch_dw",
  )(_split(x, p, pp), do, a, b)
  return da.sum(0), db.sum(0)


def _padded_weights(w1, w2, pad: bool):
  """gather_weights, zero-padded to (l, k, G, P) and (l, k, S, G)."""
  a, b = gather_weights(w1, w2)
  g, p, s = a.shape[2], a.shape[3], b.shape[2]
  pp, gg, ss = padded_dims(p, g, s, pad)
  if (pp, gg, ss) == (p, g, s):
    return a, b
  return (jnp.pad(a, ((0, 0), (0, 0), (0, gg - g), (0, pp - p))),
          jnp.pad(b, ((0, 0), (0, 0), (0, ss - s), (0, gg - g))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _monarch(x, w1, w2, block_tokens, interpret, platform, strided):
  p = w1.shape[2]
  a, b = _padded_weights(w1, w2, pads_blocks(platform))
  return _call_fwd(x, a, b, p, w2.shape[1], block_tokens, interpret, platform,
                   strided)


def _vjp_fwd(x, w1, w2, block_tokens, interpret, platform, strided):
  return (_monarch(x, w1, w2, block_tokens, interpret, platform, strided),
          (x, w1, w2))


def backward(x, w1, w2, dy, block_tokens, interpret, platform, dx=True):
  """(dx, dw1, dw2) through the kernels; dx=False leaves dx to the caller
  (None), as the Mosaic GPU path does."""
  _, q, p = w1.shape
  l, s, _ = w2.shape
  g = q // l
  a, b = _padded_weights(w1, w2, pads_blocks(platform))
  do = dy.reshape(dy.shape[0], s, l).transpose(2, 0, 1)   # (l, tokens, s)
  dx_out = (_call_dx(do, a, b, p, block_tokens, interpret, platform)
            if dx else None)
  step = (block_tokens if not pads_blocks(platform) else dw_block_tokens(
      block_tokens, p, b.shape[3], s, _tile(platform, a, b), x.dtype.itemsize))
  if step is None:
    # Factors too wide for the kernel's shared memory: XLA's weight gradients
    # (the reference's VJP, its dx unused), as impl="xla" computes them.
    from structmat.ops.monarch import monarch_matmul  # pylint: disable=import-outside-toplevel
    _, vjp = jax.vjp(lambda u, v: monarch_matmul(x, u, v), w1, w2)
    return (dx_out, *vjp(dy))
  da, db = _call_dw(x, do, a, b, p, step, interpret, platform)
  dw1, dw2 = scatter_weight_grads(da[:, :, :g, :p], db[:, :, :s, :g])
  return dx_out, dw1.astype(w1.dtype), dw2.astype(w2.dtype)


def _vjp_bwd(block_tokens, interpret, platform, strided, res, dy):
  del strided   # the backward reads dy block-major either way
  return backward(*res, dy, block_tokens, interpret, platform)


_monarch.defvjp(_vjp_fwd, _vjp_bwd)
_monarch_once = traced_once(_monarch, (3, 4, 5, 6))


def checked_call(x, w1, w2, block_tokens, interpret, platform, fits,
                 what: str):
  """The Monarch wrappers' prologue: the reference's shape checks,
  ``prepare``, and ``fits(tokens, w1_shape, w2_shape, block_tokens, target,
  itemsize)`` (a ``supported``), raising with ``what`` and its reason.
  Returns (x2, block_tokens, interpret, platform, target), ``target`` being
  what the kernel compiles for ("cpu" when interpreted)."""
  from structmat.ops.monarch import _check  # pylint: disable=import-outside-toplevel
  _check(x.shape[-1], w1, w2)
  x2, block_tokens, interpret, platform = prepare(x, block_tokens, interpret,
                                                  platform)
  target = "cpu" if interpret else platform
  why = fits(x2.shape[0], w1.shape, w2.shape, block_tokens, target,
             x2.dtype.itemsize)
  if why:
    raise ValueError(f"{what} cannot run these shapes: {why}")
  return x2, block_tokens, interpret, platform, target


def monarch_matmul_pallas(x, w1, w2, *, block_tokens: int = 128,
                          interpret: bool | None = None,
                          platform: str | None = None,
                          strided_p2: bool | None = None):
  """Fused Monarch product, same contract as ``ops.monarch_matmul`` (no bias).

  Args:
    x: (..., k*p). w1: (k, q, p). w2: (l, s, r) with l*r = k*q and q % l == 0.
    block_tokens: tokens per program.
    interpret: interpret mode (default: on the CPU).
    platform: backend to compile for (default: the default backend).
    strided_p2: whether the forward kernel stores the output permutation
      itself (l-strided stores) rather than leaving it to an XLA transpose;
      default ``strides_p2``: with Triton, not on TPUs (which cannot).

  Returns:
    (..., l*s).
  """
  x2, block_tokens, interpret, platform, target = checked_call(
      x, w1, w2, block_tokens, interpret, platform, supported,
      "the fused Monarch kernel")
  if strided_p2 is None:
    strided_p2 = strides_p2(target)
  elif strided_p2 and not strides_p2(target):
    raise ValueError(f"strided_p2=True: Mosaic TPU ({target}) cannot store "
                     "l-strided blocks; leave it None (XLA permutes)")
  y = _monarch_once(x2, w1.astype(x.dtype), w2.astype(x.dtype), block_tokens,
                    interpret, platform, bool(strided_p2))
  return y.reshape(*x.shape[:-1], y.shape[-1])
