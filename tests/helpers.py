"""Test helpers shared by the test modules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structmat.kernels.lowering import DEVICE_KINDS


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


def check_kernel(ker, ref, args, cotangent, tol, names, fwd_atol=None,
                 jit=False):
  """``ker(*args)`` matches ``ref`` (run in float32) in value and in the
  gradients of <y, cotangent> with respect to every arg (``names``), within
  ``tol`` relative to each result's largest magnitude (``fwd_atol``: an
  absolute bound for the value instead); outputs and gradients keep the
  inputs' dtype. ``jit``: run the kernel and its gradient compiled (XLA
  may then fuse around it) instead of op by op."""
  f32 = lambda f: lambda *a: f(*[v.astype(jnp.float32) for v in a])
  wrap = jax.jit if jit else (lambda f: f)
  y, r = wrap(ker)(*args), f32(ref)(*args)
  assert y.dtype == args[0].dtype
  if fwd_atol is None:
    fwd_atol = tol * 4 * float(jnp.abs(r).max())
  np.testing.assert_allclose(np.asarray(y, np.float32), r, rtol=tol,
                             atol=fwd_atol)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cotangent)
  argnums = tuple(range(len(args)))
  ga = wrap(jax.grad(loss(ker), argnums=argnums))(*args)
  gb = jax.grad(loss(f32(ref)), argnums=argnums)(*args)
  for a, b, x, name in zip(ga, gb, args, names):
    assert a.dtype == x.dtype, name
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b),
                               rtol=tol, atol=tol * 4 * float(jnp.abs(b).max()),
                               err_msg=name)


def sltrain_inputs(tokens, d_in, d_out, rank, density, dtype, seed=0):
  """Random (x, a, b, values, indices, cotangent) for SLTrain kernel tests."""
  from structmat import ops  # pylint: disable=import-outside-toplevel
  k = jax.random.split(jax.random.key(seed + d_in + d_out), 6)
  x = jax.random.normal(k[0], (tokens, d_in)).astype(dtype)
  a = (jax.random.normal(k[1], (d_in, rank)) / np.sqrt(d_in)).astype(dtype)
  b = jax.random.normal(k[2], (rank, d_out)).astype(dtype)
  idx = ops.draw_support(k[3], d_in, d_out, density)
  v = (jax.random.normal(k[4], idx.shape) / np.sqrt(d_in)).astype(dtype)
  g = jax.random.normal(k[5], (tokens, d_out)).astype(dtype)
  return x, a, b, v, idx, g


def check_orders_skip_the_sort(kernel, args, cotangent, orders):
  """``kernel(*args, orders=...)`` gives the same values and gradients with
  the stored tile ``orders`` as when it sorts the support itself, and its
  traced gradient then has no ``sort``."""
  import re  # pylint: disable=import-outside-toplevel

  def run(o):
    f = lambda *a: kernel(*a, orders=o)
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cotangent)
    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    return f(*args), grad(*args), str(jax.make_jaxpr(grad)(*args))

  y0, g0, jaxpr0 = run(None)
  y1, g1, jaxpr1 = run(orders)
  sorts = lambda jaxpr: len(re.findall(r"\bsort\[", jaxpr))  # the primitive
  assert sorts(jaxpr0) >= 1 and sorts(jaxpr1) == 0
  np.testing.assert_array_equal(y0, y1)
  for p, q in zip(g0, g1):
    np.testing.assert_array_equal(p, q)


def preset_step_kernels(preset: str, platform: str, n_layers: int,
                        linear: str = "monarch", impl: str = "pallas"):
  """{"calls", "distinct"} kernels (``lowering.kernel_modules``) of a
  preset's ``impl`` train step (bf16, ``n_layers`` blocks, a 2 x
  128-token batch) cross-lowered for ``platform`` ("cuda": an H100, "tpu":
  a TPU v5e) by ``train.preflight.lower_step``."""
  import optax  # pylint: disable=import-outside-toplevel
  from structmat.models import build_model  # pylint: disable=import-outside-toplevel
  from structmat.models.family import preset_config  # pylint: disable=import-outside-toplevel
  from structmat.train import preflight  # pylint: disable=import-outside-toplevel
  cfg = preset_config(preset, linear, vocab_size=512, max_len=128,
                      dtype=jnp.bfloat16, impl=impl, attention="xla",
                      n_layers=n_layers)
  r = preflight.lower_step(build_model(cfg), optax.adamw(1e-4), (2, 129),
                           platform)
  return {"calls": r["calls"], "distinct": r["distinct"]}


def abstract_mesh(platform: str, n: int, kind: str | None = None):
  """A data n x fsdp 1 x tensor 1 mesh of abstract ``platform`` devices
  ("tpu": a v5e, "cuda": an H100; or that platform's ``kind``, "TPU v4"
  say) for cross-lowering a sharded step."""
  ad = jax.sharding.AbstractDevice(device_kind=kind or DEVICE_KINDS[platform],
                                   num_cores=1, platform=platform)
  return jax.sharding.AbstractMesh((n, 1, 1), ("data", "fsdp", "tensor"),
                                   (jax.sharding.AxisType.Auto,) * 3,
                                   abstract_device=ad)


def on_tpu(kind: str):
  """Inside, kernels are planned for a TPU of ``kind`` ("TPU v4", ...):
  ``target.device_kind`` reads the abstract mesh's device."""
  return jax.sharding.use_abstract_mesh(abstract_mesh("tpu", 1, kind))
