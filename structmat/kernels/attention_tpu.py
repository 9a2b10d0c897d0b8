"""Causal attention on TPUs through jax's Pallas splash attention kernel.

XLA on a TPU writes the (batch, heads, t, t) scores and keeps the softmax
probabilities for the backward: at the presets' 256 tokens that is
batch x heads x 256 x 256 x 2 bytes a layer, or more. The splash kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``: flash attention
that skips the masked-out tiles, with its own backward kernels) keeps
heads-major q, k, v, the output and a float32 logsumexp per row, and takes
grouped KV heads as they are. The logsumexp passes through HBM 128 lanes
wide (f32[batch, heads, t, 128] in libtpu's plans), which is why the kernel
only pays from 512 tokens (``AUTO_FROM``). (jax's older
``ops.tpu.flash_attention`` keeps two such statistics: LLaMA-60M's step on
a v5e-4 planned 5.62 -> 6.13 GiB of temporaries with it.)

The kernel is a Mosaic kernel: under a multi-device ``jit`` it must run
inside ``shard_map`` (``shards.per_batch``); on the CPU it is interpreted
(for tests). On a mesh with a "tensor" axis each device takes its batch
shard's sequences and its tensor shard's heads, where the rules put q, k
and v already (before session 25 the batch was split over "tensor" too,
and XLA moved q, k and v between the two layouts around every call).
"""
import jax
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash, splash_attention_mask as masks)

from structmat.kernels import shards, target

BLOCK = 128   # the kernel's default query and key tiles (a lane width)
# attention="auto" takes the kernel from this sequence length on. What XLA
# keeps grows with t, the kernel's does not; libtpu 0.0.42's plans per v5e
# chip, temporaries in GiB, XLA -> kernel, at a fixed token count: LLaMA-60M
# dense on 4 chips 5.62 -> 5.25 at t=256, 6.63 -> 5.26 at 512, 8.63 -> 5.26
# at 1024; LLaMA-1B Monarch (8 of its layers) at fsdp 16 4.55 -> 4.62 at
# 256, 7.58 -> 4.64 at 1024 (the whole 1B: 11.66 -> 12.03 at 256, and 1B
# dense 10.80 -> 10.81); GPT-2 small (64 x 1024 tokens, 4 chips) 13.17 ->
# 8.03. Speed is unmeasured (no TPU): below 512 tokens XLA, as before.
AUTO_FROM = 512


def why_not(batch: int, t: int) -> str | None:
  """None when ``batch`` sequences of ``t`` tokens fit the kernel, else the
  reason."""
  if t % BLOCK:
    return (f"seq_len={t}: the TPU flash attention kernel tiles the sequence "
            f"in {BLOCK} tokens; use a multiple of {BLOCK}")
  if not shards.splits(batch):
    return (f"a batch of {batch} sequences does not divide over the mesh "
            f"({shards.token_shards()} shards), and XLA cannot split a kernel")
  return None


def attention(q, k, v):
  """Causal softmax(q k^T / sqrt(d)) v.

  q (b, t, heads, d); k, v (b, t, kv_heads, d), kv_heads dividing heads
  -> (b, t, heads, d) in q's dtype. Raises for shapes the kernel cannot
  take (``why_not``).
  """
  t, d = q.shape[1], q.shape[-1]
  reason = why_not(q.shape[0], t)
  if reason:
    raise ValueError(f"attention='tpu_flash': {reason}; attention='auto' "
                     "runs XLA there.")
  interpret = target.platform() == "cpu"

  def kernel(q, k, v):   # (b, heads, t, d): built for the heads it sees
    mha = splash.make_splash_mha(   # grouped KV heads as they are
        masks.MultiHeadMask([masks.CausalMask((t, t))] * q.shape[1]),
        head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(mha)(q, k, v)
  heads_major = lambda a: a.transpose(0, 2, 1, 3)
  q = q * (d ** -0.5)   # the kernel takes no scale
  out = shards.per_batch(kernel, *map(heads_major, (q, k, v)), heads=True)
  return heads_major(out)
