# %% [markdown]
# # A tour of structmat's structured layers
#
# Parameters and FLOPs per structure, the dense kernel each structure
# materializes, and how well Monarch matrices approximate dense ones.
# Opens in Colab; the first cell installs structmat from the repository.

# %%
# Install structmat (Colab): clone the repository (the launchers and configs
# live beside the package) and install it; skipped where it is importable.
import importlib.util, os, subprocess, sys
STRUCTMAT_REPO = "https://github.com/structmat/structmat"  # or your fork
if importlib.util.find_spec("structmat") is None:
  subprocess.check_call(["git", "clone", "-q", STRUCTMAT_REPO, "structmat"])
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e",
                         "structmat[notebooks]"])
  os.chdir("structmat")
  sys.path.insert(0, os.getcwd())

# %%
import os
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from structmat import ops
from structmat.layers import make_linear
from structmat.utils.timing import format_table

SMALL = os.environ.get("STRUCTMAT_NOTEBOOK_SMALL") == "1"  # set by the test harness
OUT = os.environ.get("STRUCTMAT_NOTEBOOK_OUT")  # where figures are saved, if set
WIDTHS = [256, 1024] if SMALL else [256, 1024, 4096]


def show(fig, name):
  if OUT:
    fig.savefig(os.path.join(OUT, name + ".png"), dpi=80)
  plt.show()

# %% [markdown]
# ## Parameters and FLOPs per token (square layers, width -> width)

# %%
def structures(width):
  return [("dense", {}), ("lowrank", dict(rank=width // 8)),
          ("monarch", dict(nblocks=4)),
          ("monarch", dict(nblocks=int(width ** 0.5))),
          ("btt", dict(nblocks=int(width ** 0.5), rank=4)),
          ("phm", dict(n=4, rank=None)), ("phm", dict(n=4, rank=8)),
          ("sltrain", dict(rank=width // 8, density=0.03))]

rows = []
for width in WIDTHS:
  dense = make_linear("dense", features=width)
  for name, kw in structures(width):
    layer = make_linear(name, features=width, **kw)
    rows.append({"width": width, "layer": name, "args": kw,
                 "params": layer.param_count(width),
                 "params/dense": layer.param_count(width) / dense.param_count(width),
                 "MFLOP/token": layer.flops_per_token(width) / 1e6})
print(format_table(rows, ["width", "layer", "args", "params", "params/dense",
                          "MFLOP/token"]))

# %% [markdown]
# ## What each structure materializes
# The (in, out) kernel of each layer at width 64, random parameters.

# %%
def random_variables(layer, d):
  v = nn.unbox(layer.init(jax.random.key(0), jnp.ones((1, d))))
  leaves, tree = jax.tree.flatten(v["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  v["params"] = jax.tree.unflatten(tree, [jax.random.normal(k, l.shape)
                                          for k, l in zip(keys, leaves)])
  return v

d = 64
pictures = [("dense", {}), ("lowrank", dict(rank=4)),
            ("monarch", dict(nblocks=4)), ("monarch", dict(nblocks=8)),
            ("btt", dict(nblocks=8, rank=2)), ("phm", dict(n=4, rank=None)),
            ("phm", dict(n=4, rank=1)), ("sltrain", dict(rank=2, density=0.05))]
fig, axes = plt.subplots(2, 4, figsize=(14, 7))
for ax, (name, kw) in zip(axes.flat, pictures):
  layer = make_linear(name, features=d, **kw)
  kernel = layer.apply(random_variables(layer, d), d, method="to_dense")
  lim = float(np.abs(kernel).max())  # centre the colour map on zero
  ax.imshow(np.asarray(kernel), cmap="RdBu", vmin=-lim, vmax=lim)
  ax.set_title(f"{name} {kw}", fontsize=8)
  ax.axis("off")
show(fig, "kernels")

# %% [markdown]
# A Monarch kernel with few blocks is dense-looking but structured: permuting
# rows by stride nblocks turns it into a grid of low-rank blocks.

# %%
layer = make_linear("monarch", features=d, nblocks=4, use_bias=False)
kernel = np.asarray(layer.apply(random_variables(layer, d), d, method="to_dense"))
order = np.concatenate([np.arange(l, d, 4) for l in range(4)])
fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
a.imshow(kernel.T, cmap="RdBu"); a.set_title("M (out, in)")
b.imshow(kernel.T[order], cmap="RdBu"); b.set_title("rows grouped by stride 4")
for ax in (a, b):
  for t in range(1, 4):
    ax.axhline(t * d / 4 - .5, color="k", lw=.5); ax.axvline(t * d / 4 - .5, color="k", lw=.5)
show(fig, "monarch_blocks")
print("ranks of the 4x4 block grid:")
print(np.array([[np.linalg.matrix_rank(kernel.T[order][i*16:(i+1)*16, j*16:(j+1)*16])
                 for j in range(4)] for i in range(4)]))

# %% [markdown]
# ## Monarch projection error against nblocks
# Relative Frobenius error of the optimal Monarch approximation
# (`ops.monarch_project`) of a random Gaussian matrix and of one with a
# decaying spectrum (s_i = i^-1.5), against the fraction of dense parameters.

# %%
n = 64 if SMALL else 256
rng = np.random.default_rng(0)
gaussian = rng.normal(size=(n, n))
u, _ = np.linalg.qr(rng.normal(size=(n, n)))
v, _ = np.linalg.qr(rng.normal(size=(n, n)))
decaying = (u * np.arange(1, n + 1) ** -1.5) @ v.T
results = []
for nb in [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= n]:
  for label, m in (("gaussian", gaussian), ("decaying", decaying)):
    w1, w2 = ops.monarch_project(m, nb)
    rec = np.asarray(ops.monarch_to_dense(w1, w2))[:n, :n]
    results.append({"nblocks": nb, "matrix": label,
                    "params/dense": (w1.size + w2.size) / n ** 2,
                    "rel_error": float(np.linalg.norm(rec - m) / np.linalg.norm(m))})
print(format_table(results, ["nblocks", "matrix", "params/dense", "rel_error"]))
fig, ax = plt.subplots(figsize=(6, 4))
for label in ("gaussian", "decaying"):
  r = [x for x in results if x["matrix"] == label]
  ax.plot([x["nblocks"] for x in r], [x["rel_error"] for x in r], "o-", label=label)
ax.set_xscale("log", base=2); ax.set_xlabel("nblocks"); ax.set_ylabel("relative error")
ax.set_title(f"Monarch projection of a {n}x{n} matrix"); ax.legend()
show(fig, "projection_error")
assert all(x["rel_error"] < 1e-5 for x in results if x["nblocks"] == 1)
