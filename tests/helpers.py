"""Test helpers shared by the test modules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def randomize(tree, seed=0, scale=0.5):
  """Replace every float leaf with fresh normals (never zeros), keep int leaves."""
  leaves, treedef = jax.tree.flatten(nn.unbox(tree))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [scale * jax.random.normal(k, l.shape, l.dtype)
         if jnp.issubdtype(l.dtype, jnp.floating) else l
         for k, l in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def assert_close(a, b, rtol=1e-5, atol=1e-5, what=""):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.abs(b).max()))
  np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


def poison_pallas_outputs(monkeypatch, fill=float("nan")):
  """Every ``pl.pallas_call`` made while the patch is on writes into output
  buffers prefilled with ``fill`` (NaN): an element a kernel forgets to write
  stays NaN and fails the comparison with the reference.

  Each output gets an extra input, aliased to it, that the kernel never sees;
  kernels built with ``grid_spec`` (scalar prefetch) are left alone. Returns
  the list of kernel names poisoned, so a test can check it covered them.
  """
  from jax.experimental import pallas as pl
  original = pl.pallas_call
  seen = []

  def patched(kernel, out_shape, *, in_specs=pl.no_block_spec,
              out_specs=pl.no_block_spec, input_output_aliases=None,
              grid_spec=None, name=None, **kw):
    aliases = dict(input_output_aliases or {})
    if grid_spec is not None or aliases:
      return original(kernel, out_shape, in_specs=in_specs, out_specs=out_specs,
                      input_output_aliases=aliases, grid_spec=grid_spec,
                      name=name, **kw)
    outs = (tuple(out_shape) if isinstance(out_shape, (tuple, list))
            else (out_shape,))
    o_specs = (tuple(out_specs) if isinstance(out_specs, (tuple, list))
               else (out_specs,))
    n_in, n_out = len(in_specs), len(outs)
    seen.append(name)

    def body(*refs):  # inputs, poison buffers, outputs (aliased to the poison)
      kernel(*refs[:n_in], *refs[n_in + n_out:])

    call = original(body, out_shape, in_specs=[*in_specs, *o_specs],
                    out_specs=out_specs, name=name,
                    input_output_aliases={n_in + i: i for i in range(n_out)},
                    **kw)

    def run(*args):
      return call(*args, *[jnp.full(o.shape, fill, o.dtype) for o in outs])

    return run

  monkeypatch.setattr(pl, "pallas_call", patched)
  return seen
