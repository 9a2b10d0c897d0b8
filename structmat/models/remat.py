"""Rematerialization of transformer blocks (activation checkpointing).

Without it a train step keeps every block's activations for the backward
pass: a data-parallel LLaMA-1B Monarch step at 16 x 256 tokens per chip
needs 17.6 GB of temporaries, more than a TPU v5e's 16 GiB; sharded over
16 chips by fsdp, 12.3 GiB, and 1.9 GiB with "full" (libtpu's compiles
for a v5e-16, ``--dry_run --tpu_topology``; WORKSPACE). ``remat`` trades
that memory for recomputing the block's forward during the backward:

- "none": keep everything (fastest where it fits);
- "full": keep only each block's input; the whole block runs twice;
- "dots": also keep the outputs of matmuls without batch dimensions (the
  dense projections; ``jax.checkpoint_policies.
  dots_with_no_batch_dims_saveable``): attention scores, norms,
  activations, batched einsums (Monarch's block products) and Pallas
  kernels are recomputed.

Parameters keep their paths (``nn.remat`` lifts the module under the same
name), so checkpoints move between settings.
"""
import flax.linen as nn
import jax

REMAT = ("none", "full", "dots")


def check(remat: str) -> None:
  if remat not in REMAT:
    raise ValueError(f"remat={remat!r}; use one of {REMAT} ('full' or "
                     "'dots' when a step's activations outgrow the device).")


def block_class(cls, remat: str):
  """``cls`` (a linen block module class) rematerialized per ``remat``."""
  check(remat)
  if remat == "none":
    return cls
  policy = (None if remat == "full"
            else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return nn.remat(cls, policy=policy)
