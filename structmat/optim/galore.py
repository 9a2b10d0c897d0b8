"""GaLore (Zhao et al. 2024): Adam in a low-rank gradient subspace, as optax transforms.

Default semantics are the official algorithm's (jiaweizzhao/GaLore, galore-torch
1.0), applied to the weight in torch's (out, in) orientation: a flax kernel
(in, out) is transposed before projecting, so "std", "left" and "right" mean
what they mean in the official code (std: right projection when out >= in, so
the Adam moments keep the larger dimension).

- The projector comes from the SVD of the float32 gradient at the first step
  and whenever ``count % update_proj_gap == 0`` (count read before increment).
- Adam runs on the projected gradient R; the Adam moments are kept (neither
  reset nor re-projected) when the projector changes, and the count continues.
- The update is ``scale * project_back(m / (sqrt(v) + eps)) * sqrt(1 - b2^t) /
  (1 - b1^t)`` (the official bias correction: eps outside it); parameters the
  predicate does not select get the same Adam on their full gradient.
- Decoupled weight decay on the full matrix after the step, as the official
  ``p += -lr * wd * p`` on the updated parameter (``scale_by_lr_and_decay``).

Differences from ``optax.contrib.galore``: that one projects on the opposite
side (for m >= n it keeps U, so its moments keep the smaller dimension), uses
scale 1.0 and optax's eps placement. structmat's follows the official code,
adds "reverse_std" / "left" / "right" / "full", a path predicate, canonical
singular-vector signs (so refreshes are reproducible across backends), and a
randomized range finder (``svd="randomized"``) for cheap refreshes.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SITES = ("q", "k", "v", "o", "gate", "up", "down",  # LLaMA
         "fc", "proj")                                # GPT-2's MLP
FACTOR_NAMES = ("u", "v", "lora_a", "lora_b")


def _empty():
  # Placeholder for "no projector": one element because orbax cannot save
  # zero-size arrays, and a fresh buffer per leaf because one shared array
  # would be donated twice.
  return jnp.zeros((1,), jnp.float32)


def default_predicate(structured: str = "factors") -> Callable:
  """Select the 2-D kernels of attention and MLP linears.

  structured="factors" also selects the 2-D factors of structured layers
  (LowRank u/v, SLTrain lora_a/lora_b); "none" selects dense kernels only.
  Monarch/BTT factors are 3-D and never projected.
  """
  if structured not in ("factors", "none"):
    raise ValueError(f"structured={structured!r}; use 'factors' or 'none'.")
  names = ("kernel",) + (FACTOR_NAMES if structured == "factors" else ())

  def pred(path: tuple[str, ...], leaf) -> bool:
    return (leaf.ndim == 2 and path[-1] in names
            and any(p in SITES for p in path[:-1]))
  return pred


def _side(proj_type: str, m: int, n: int) -> str:
  """Which projection the official code uses for an (m, n) = (out, in) weight."""
  if proj_type == "std":
    return "right" if m >= n else "left"
  if proj_type == "reverse_std":
    return "left" if m >= n else "right"
  return proj_type


def canonical_signs(u, vh):
  """Flip each singular pair so the largest-|.| entry of u's column is positive."""
  idx = jnp.argmax(jnp.abs(u), axis=0)
  sign = jnp.sign(u[idx, jnp.arange(u.shape[1])])
  sign = jnp.where(sign == 0, 1.0, sign)
  return u * sign, vh * sign[:, None]


def randomized_svd(g, rank: int, key, oversample: int = 8, power_iters: int = 2):
  """Top-``rank`` (u, s, vh) by subspace iteration (Halko et al.)."""
  m, n = g.shape
  k = min(rank + oversample, m, n)
  q = jnp.linalg.qr(g @ jax.random.normal(key, (n, k), g.dtype))[0]
  for _ in range(power_iters):
    q = jnp.linalg.qr(g.T @ q)[0]
    q = jnp.linalg.qr(g @ q)[0]
  ub, s, vh = jnp.linalg.svd(q.T @ g, full_matrices=False)
  return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def _top_singular(g, rank, svd, key):
  if svd == "full":
    u, s, vh = jnp.linalg.svd(g, full_matrices=False)
    u, vh = u[:, :rank], vh[:rank]
  elif svd == "randomized":
    u, _, vh = randomized_svd(g, rank, key)
  else:
    raise ValueError(f"svd={svd!r}; use 'full' or 'randomized'.")
  return canonical_signs(u, vh)


class GaLoreState(NamedTuple):
  count: jax.Array   # steps taken (int32)
  left: Any          # per leaf: U[:, :r] (m, r), or a (1,) placeholder
  right: Any         # per leaf: Vh[:r] (r, n), or a (1,) placeholder
  mu: Any            # Adam moments, projected shape for projected leaves
  nu: Any


def _paths(tree):
  return [tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def scale_by_galore(rank: int = 128, update_proj_gap: int = 200,
                    scale: float = 0.25, proj_type: str = "std",
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                    predicate: Callable | None = None, svd: str = "full",
                    seed: int = 0) -> optax.GradientTransformation:
  """GaLore's Adam direction (the update before -lr), see the module docstring.

  Args:
    rank: projection rank (min(rank, dims) for small matrices).
    update_proj_gap: steps between projector refreshes.
    scale: multiplies the projected-back update (0.25 in the official scripts).
    proj_type: "std", "reverse_std", "left", "right" or "full".
    b1, b2, eps: Adam constants (official defaults 0.9, 0.999, 1e-6).
    predicate: (path tuple, leaf) -> bool, which leaves are projected
      (default: ``default_predicate()``).
    svd: "full" (official) or "randomized" (subspace iteration).
    seed: key for the randomized range finder.
  """
  if proj_type not in PROJ_TYPES:
    raise ValueError(f"proj_type={proj_type!r}; use one of {PROJ_TYPES}.")
  if rank < 1 or update_proj_gap < 1:
    raise ValueError(f"rank={rank} and update_proj_gap={update_proj_gap} must "
                     "be >= 1.")
  predicate = predicate or default_predicate()

  def selected(params):
    leaves = jax.tree.leaves(params)
    return [predicate(p, l) for p, l in zip(_paths(params), leaves)]

  def shapes(leaf, on):
    """(left shape, right shape, moment shape) for a leaf, torch orientation."""
    if not on:
      return None, None, leaf.shape
    n, m = leaf.shape  # flax (in, out) -> torch (out=m, in=n)
    r = min(rank, m, n)
    side = _side(proj_type, m, n)
    return {"right": (None, (r, n), (m, r)),
            "left": ((m, r), None, (r, n)),
            "full": ((m, r), (r, n), (r, r))}[side]

  def init_fn(params):
    leaves, tree = jax.tree.flatten(params)
    left, right, mu = [], [], []
    for leaf, on in zip(leaves, selected(params)):
        ls, rs, ms = shapes(leaf, on)
        left.append(jnp.zeros(ls, jnp.float32) if ls else _empty())
        right.append(jnp.zeros(rs, jnp.float32) if rs else _empty())
        mu.append(jnp.zeros(ms, jnp.float32))
    un = lambda xs: jax.tree.unflatten(tree, xs)
    return GaLoreState(jnp.zeros((), jnp.int32), un(left), un(right), un(mu),
                       un([jnp.zeros_like(x) for x in mu]))

  def update_fn(updates, state, params=None):
    del params
    leaves, tree = jax.tree.flatten(updates)
    flags = selected(updates)
    refresh = state.count % update_proj_gap == 0
    key = jax.random.fold_in(jax.random.key(seed), state.count)
    t = (state.count + 1).astype(jnp.float32)
    step_size = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    outs, lefts, rights, mus, nus = [], [], [], [], []
    for i, (g, on, left, right, mu, nu) in enumerate(zip(
        leaves, flags, jax.tree.leaves(state.left), jax.tree.leaves(state.right),
        jax.tree.leaves(state.mu), jax.tree.leaves(state.nu))):
      g32 = g.astype(jnp.float32)
      if on:
        gt = g32.T  # torch orientation (out, in)
        m, n = gt.shape
        side = _side(proj_type, m, n)
        r = min(rank, m, n)

        def new_proj(gt=gt, r=r, i=i):
          u, vh = _top_singular(gt, r, svd, jax.random.fold_in(key, i))
          return u, vh

        def old_proj(left=left, right=right, gt=gt, r=r):
          u = left if left.ndim == 2 else jnp.zeros((gt.shape[0], r), jnp.float32)
          vh = right if right.ndim == 2 else jnp.zeros((r, gt.shape[1]), jnp.float32)
          return u, vh

        u, vh = jax.lax.cond(refresh, new_proj, old_proj)
        if side == "right":
          low, left, right = gt @ vh.T, _empty(), vh
        elif side == "left":
          low, left, right = u.T @ gt, u, _empty()
        else:
          low, left, right = u.T @ gt @ vh.T, u, vh
        g32 = low
      mu = b1 * mu + (1 - b1) * g32
      nu = b2 * nu + (1 - b2) * g32 * g32
      direction = step_size * mu / (jnp.sqrt(nu) + eps)
      if on:
        if side == "right":
          back = direction @ right
        elif side == "left":
          back = left @ direction
        else:
          back = left @ direction @ right
        direction = scale * back.T
      outs.append(direction.astype(g.dtype))
      lefts.append(left), rights.append(right), mus.append(mu), nus.append(nu)
    un = lambda xs: jax.tree.unflatten(tree, xs)
    return un(outs), GaLoreState(state.count + 1, un(lefts), un(rights),
                                 un(mus), un(nus))

  return optax.GradientTransformation(init_fn, update_fn)


class LrDecayState(NamedTuple):
  count: jax.Array


def scale_by_lr_and_decay(learning_rate, weight_decay: float = 0.0,
                          mask: Callable | None = None
                          ) -> optax.GradientTransformation:
  """u = -lr * d - lr * wd * (p - lr * d): the official order (decay after the step).

  ``learning_rate`` is a float or an optax schedule of the step count.
  """
  def init_fn(params):
    del params
    return LrDecayState(jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)
    if weight_decay and params is None:
      raise ValueError("weight decay needs params: pass them to update().")
    decay = (mask(params) if mask else jax.tree.map(lambda _: True, updates))

    def one(d, p, on):
      step = -lr * d
      if weight_decay and on:
        step = step - lr * weight_decay * (p + step)
      return step.astype(d.dtype)
    if params is None:
      params = updates
    return (jax.tree.map(one, updates, params, decay),
            LrDecayState(state.count + 1))

  return optax.GradientTransformation(init_fn, update_fn)


def galore_adamw(learning_rate, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
                 predicate: Callable | None = None, svd: str = "full",
                 decay_mask: Callable | None = None, seed: int = 0
                 ) -> optax.GradientTransformation:
  """GaLore-AdamW: ``scale_by_galore`` then ``scale_by_lr_and_decay``."""
  return optax.chain(
      scale_by_galore(rank, update_proj_gap, scale, proj_type, b1, b2, eps,
                      predicate, svd, seed),
      scale_by_lr_and_decay(learning_rate, weight_decay, decay_mask))
