"""GaLore against an independent NumPy implementation of the official algorithm."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from structmat.optim import galore as G


class OfficialGaLoreAdamW:
  """NumPy transcription of galore_torch.GaLoreAdamW + GaLoreProjector.

  Works on torch-oriented (out, in) weights; singular vectors get the same
  canonical signs as structmat's (largest-|.| entry of each u column > 0).
  """

  def __init__(self, lr, rank, gap, scale, proj_type, b1=0.9, b2=0.999,
               eps=1e-6, wd=0.0):
    self.__dict__.update(lr=lr, rank=rank, gap=gap, scale=scale,
                         proj_type=proj_type, b1=b1, b2=b2, eps=eps, wd=wd)
    self.state = {}

  def _svd(self, g):
    u, s, vh = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    r = min(self.rank, *g.shape)
    u, vh = u[:, :r], vh[:r]
    sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(r)])
    return u * sign, vh * sign[:, None]

  def step(self, name, p, grad, projected):
    st = self.state.setdefault(name, {"step": 0})
    if projected:
      m, n = grad.shape
      t = self.proj_type
      side = {"std": "right" if m >= n else "left",
              "reverse_std": "left" if m >= n else "right"}.get(t, t)
      if "ortho" not in st or st["step"] % self.gap == 0:
        st["ortho"] = self._svd(grad)
      u, vh = st["ortho"]
      grad = {"right": lambda: grad @ vh.T, "left": lambda: u.T @ grad,
              "full": lambda: u.T @ grad @ vh.T}[side]()
    if "m" not in st:
      st["m"], st["v"] = np.zeros_like(grad), np.zeros_like(grad)
    st["step"] += 1
    st["m"] = self.b1 * st["m"] + (1 - self.b1) * grad
    st["v"] = self.b2 * st["v"] + (1 - self.b2) * grad * grad
    step_size = self.lr * np.sqrt(1 - self.b2 ** st["step"]) / (1 - self.b1 ** st["step"])
    norm = st["m"] / (np.sqrt(st["v"]) + self.eps)
    if projected:
      norm = {"right": lambda: norm @ vh, "left": lambda: u @ norm,
              "full": lambda: u @ norm @ vh}[side]() * self.scale
    p = p - step_size * norm
    if self.wd > 0:
      p = p - self.lr * self.wd * p
    return p


SHAPES = {"layer_0": {"mlp": {"up": {"kernel": (6, 10)},
                              "down": {"kernel": (10, 6)}},
                      "attn": {"q": {"kernel": (8, 8)}}},
          "embed": {"embedding": (5, 4)}}


def _params(seed):
  return jax.tree.map(lambda s: jax.random.normal(jax.random.key(seed), s),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_matches_official_algorithm_over_several_gaps(proj_type):
  lr, rank, gap, scale, wd = 0.05, 3, 3, 0.25, 0.1
  tx = G.galore_adamw(lr, rank=rank, update_proj_gap=gap, scale=scale,
                      proj_type=proj_type, weight_decay=wd)
  params = _params(0)
  state = tx.init(params)
  ref = OfficialGaLoreAdamW(lr, rank, gap, scale, proj_type, wd=wd)
  ref_params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  update = jax.jit(tx.update)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  for step in range(10):  # refreshes at 0, 3, 6, 9
    grads = jax.tree.map(
        lambda x, i=step: jax.random.normal(jax.random.key(100 + i), x.shape),
        params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    flat_ref, tree = jax.tree.flatten(ref_params)
    new = []
    for path, p, g in zip(paths, flat_ref, jax.tree.leaves(grads)):
      projected = "kernel" in path
      # structmat works in flax (in, out) layout; the official code in (out, in).
      new.append(ref.step(path, p.T, np.asarray(g, np.float64).T, projected).T
                 if projected else ref.step(path, p, np.asarray(g, np.float64), False))
    ref_params = jax.tree.unflatten(tree, new)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      # float32 vs float64: Adam's m / sqrt(v) amplifies roundoff where m ~ 0;
      # a wrong side, scale or bias correction moves entries by O(lr) = 5e-2.
      np.testing.assert_allclose(np.asarray(a), b, rtol=2e-3, atol=5e-4,
                                 err_msg=f"{proj_type} step {step}")
  assert int(state[0].count) == 10


def test_std_keeps_larger_dimension_in_moments():
  tx = G.scale_by_galore(rank=2)
  state = tx.init(_params(0))
  mu = state.mu["layer_0"]["mlp"]
  # up: flax (6, 10) -> torch (out=10, in=6): right projection, moments (10, 2).
  assert mu["up"]["kernel"].shape == (10, 2)
  assert mu["down"]["kernel"].shape == (2, 10)
  assert state.mu["embed"]["embedding"].shape == (5, 4)  # not projected


def test_state_is_plain_pytree_and_resumes_mid_gap():
  tx = G.galore_adamw(0.01, rank=2, update_proj_gap=4)
  params = _params(1)
  grads = [jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape),
                        params) for i in range(7)]
  state = tx.init(params)
  p = params
  for g in grads[:5]:
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  # Round-trip the state through host numpy (what a checkpoint does) mid-gap.
  leaves, tree = jax.tree.flatten(state)
  state2 = jax.tree.unflatten(tree, [jnp.asarray(np.asarray(l)) for l in leaves])
  p2 = p
  for g in grads[5:]:
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    u2, state2 = tx.update(g, state2, p2)
    p2 = optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_converges_on_least_squares(svd):
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (64, 32))
  w_true = jax.random.normal(k2, (32, 16))
  y = a @ w_true
  params = {"mlp": {"up": {"kernel": jnp.zeros((32, 16))}}}
  tx = G.galore_adamw(0.05, rank=4, update_proj_gap=20, scale=1.0, svd=svd)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(
        lambda p: jnp.mean((a @ p["mlp"]["up"]["kernel"] - y) ** 2))(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, loss

  first = None
  for _ in range(600):
    params, state, loss = step(params, state)
    first = first if first is not None else float(loss)
  assert float(loss) < 0.01 * first, (first, float(loss))


def test_randomized_svd_recovers_top_subspace():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (200, 200)))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (120, 120)))
  s = 0.9 ** jnp.arange(120)
  g = (u[:, :120] * s) @ v.T
  ur, sr, vhr = G.randomized_svd(g, 10, k3)
  np.testing.assert_allclose(sr, s[:10], rtol=1e-3)
  overlap = jnp.linalg.svd(ur.T @ u[:, :10], compute_uv=False)
  assert float(overlap.min()) > 0.999


def test_predicate_and_errors():
  pred = G.default_predicate()
  leaf = jnp.zeros((4, 4))
  assert pred(("layer_0", "attn", "q", "kernel"), leaf)
  assert pred(("layer_0", "mlp", "up", "u"), leaf)
  assert not G.default_predicate("none")(("layer_0", "mlp", "up", "u"), leaf)
  assert not pred(("embed", "embedding"), leaf)
  assert not pred(("layer_0", "mlp", "up", "w1"), jnp.zeros((4, 4, 4)))
  with pytest.raises(ValueError, match="proj_type"):
    G.scale_by_galore(proj_type="diagonal")
  with pytest.raises(ValueError, match="structured"):
    G.default_predicate("all")


def test_benchmark_refresh_rows():
  """experiments.benchmark_galore's refresh part at a small size: both
  refreshes timed beside a whole AdamW step (updates and state), and the
  randomized projector captures the optimal rank-r energy on a decaying
  spectrum."""
  from experiments import benchmark_galore  # pylint: disable=import-outside-toplevel
  rows = benchmark_galore.refresh_rows(64, [8], gap=10)
  assert [r["refresh"] for r in rows] == ["full SVD", "randomized"]
  for r in rows:
    assert r["refresh_ms"] > 0 and r["adam_step_ms"] > 0
    assert r["per_step_overhead_ms"] == pytest.approx(r["refresh_ms"] / 10)
  assert 0.95 < rows[1]["energy_vs_optimal"] <= 1 + 1e-4
