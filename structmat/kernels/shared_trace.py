"""One trace, and one lowered copy, of each kernel product per shape.

A ``jax.custom_vjp`` product called at many sites of a jit'd train step is
lowered at every site: each site's forward and backward kernels are lowered
again (Pallas lowering is Python, and a Mosaic GPU module is ~290 KB), and
the backward, traced afresh per site, carries that site's source lines in
its kernels' debug locations, so identical kernels became distinct modules.
Mosaic GPU compiles each distinct module once per process (its cache keys
on the module's hash), and XLA each distinct Triton call (its kernel reuse
cache keys on the backend config), so every extra module is an extra
compile.

Cross-lowered for an H100 on the 2-core CPU (session 16), LLaMA-130M's
12-layer ``impl=pallas`` train step (Mosaic GPU attention, chunked Triton
MLPs): 43.2 s and a 45.8 MB module with 9 distinct Mosaic GPU and 8 distinct
Triton kernel modules (the dx kernel of each attention projection apart, the
gate and up projections' dx and dw apart), against 2.6 s, 3.5 MB, 2 and 6
with the products behind ``jax.jit``: traced once per (static arguments,
shapes), each is lowered as one function that every site calls (XLA
inlines it), and its backward, derived from that one trace, is shared too.
"""
import jax
from jax._src import core as _core

# Every traced_once wrapper's jitted function, for ``clear``.
_JITTED = []


def clear() -> None:
  """Drop the shared traces. A trace bakes in the module constants it read
  (shared-memory budgets, tiles, the SM count), as ``jax.jit`` does; the
  tests that monkeypatch them call this (``tests/conftest.py``)."""
  for jitted in _JITTED:
    jitted.clear_cache()


def _staged(args) -> bool:
  """Whether any argument is abstract: the call is being staged out (under
  ``jit``, also inside ``grad``), not run eagerly (eager ``grad`` passes
  tracers too, with concrete values)."""
  # jax._src: jax.core.is_concrete is deprecated in jax 0.12, no public
  # successor yet; the internal function exists in 0.10.2 through 0.12.
  return not all(_core.is_concrete(leaf) for leaf in jax.tree.leaves(args))


def traced_once(fn, static_argnums: tuple[int, ...]):
  """``fn`` (a custom_vjp product; hashable arguments at ``static_argnums``)
  behind ``jax.jit`` when it is staged out (a jit'd train step), so every
  call with the same static arguments and shapes shares one trace. Eager
  calls, ``jax.grad``'s included, run ``fn`` directly: interpreted kernels
  then execute op by op, as the tests of the interpreter's race detector
  and of two interpreted Mosaic GPU warpgroups (which can hang under
  ``jit`` on few cores) need."""
  jitted = jax.jit(fn, static_argnums=static_argnums)
  _JITTED.append(jitted)

  def call(*args):
    dynamic = [a for i, a in enumerate(args) if i not in static_argnums]
    return (jitted if _staged(dynamic) else fn)(*args)

  return call
