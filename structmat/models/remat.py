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
  kernels are recomputed;
- "linears": also keep every linear layer's output, whatever its structure
  (q, k, v, o, gate, up, down: the outputs ``StructuredLinear`` names
  ``LINEAR_OUT``): what "dots" keeps for dense layers, and for Monarch,
  SLTrain or the Pallas kernels too. The backward then recomputes norms,
  rotary embeddings, attention and activations but no layer's forward
  product (XLA's Monarch still rebuilds its stage-1 intermediate, which
  its backward needs; the kernels' backward passes do that anyway).

Parameters keep their paths (``nn.remat`` lifts the module under the same
name), so checkpoints move between settings.
"""
import flax.linen as nn
import jax

from structmat.layers.base import LINEAR_OUT

REMAT = ("none", "full", "dots", "linears")


def check(remat: str) -> None:
  if remat not in REMAT:
    raise ValueError(f"remat={remat!r}; use one of {REMAT} ('full', 'dots' "
                     "or 'linears' when a step's activations outgrow the "
                     "device).")


def block_class(cls, remat: str):
  """``cls`` (a linen block module class) rematerialized per ``remat``."""
  check(remat)
  if remat == "none":
    return cls
  policies = jax.checkpoint_policies
  policy = {"full": None,
            "dots": policies.dots_with_no_batch_dims_saveable,
            "linears": policies.save_only_these_names(LINEAR_OUT)}[remat]
  return nn.remat(cls, policy=policy)
