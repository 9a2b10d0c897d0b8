# %% [markdown]
# # Pretraining-methods study: loss curves and WeLore spectra
#
# Reads the workdirs of `experiments.study` (configs/studies/pretrain_methods.py):
# loss curves of every method at matched tokens, the results table, and the
# normalized singular-value spectra that WeLore thresholds. Set
# `STRUCTMAT_STUDY_DIR` to a finished study; without one (or under the test
# harness) a tiny study is run first.

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
import json
import os
import tempfile
import matplotlib.pyplot as plt
import numpy as np
from structmat.compress import welore
from structmat.compress.convert import linear_paths, spectra_of
from structmat.train.init_ckpt import load_init

SMALL = os.environ.get("STRUCTMAT_NOTEBOOK_SMALL") == "1"
OUT = os.environ.get("STRUCTMAT_NOTEBOOK_OUT")
STUDY = os.environ.get("STRUCTMAT_STUDY_DIR", "runs/study")
if SMALL or not os.path.exists(os.path.join(STUDY, "results.json")):
  STUDY = tempfile.mkdtemp(prefix="study_")
  root = os.path.dirname(importlib.util.find_spec("structmat").origin) + "/.."
  subprocess.check_call([sys.executable, "-m", "experiments.study",
                         "--config=configs/studies/pretrain_methods.py:tiny=1,"
                         "runs=dense+lowrank+galore", f"--workdir={STUDY}"],
                        cwd=os.path.abspath(root))
print("study:", STUDY)


def show(fig, name):
  if OUT:
    fig.savefig(os.path.join(OUT, name + ".png"), dpi=80)
  plt.show()

# %% [markdown]
# ## Results table

# %%
print(open(os.path.join(STUDY, "results.md")).read())

# %% [markdown]
# ## Loss curves at matched tokens

# %%
def read_metrics(run):
  rows = [json.loads(l) for l in open(os.path.join(STUDY, run, "metrics.jsonl"))]
  last = {}
  for r in rows:  # a resumed run rewrites steps: keep the last value
    last.setdefault(r["step"], {}).update(r)
  return [last[s] for s in sorted(last)]

runs = sorted(d for d in os.listdir(STUDY)
              if os.path.exists(os.path.join(STUDY, d, "metrics.jsonl")))
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
for run in runs:
  rows = read_metrics(run)
  train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
  ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  style = "--" if run.endswith("_ft") else "-"
  a.plot(*zip(*train), style, label=run)
  if ev:
    b.plot(*zip(*ev), style + "o", label=run)
a.set_title("train loss"); b.set_title("validation loss")
for ax in (a, b):
  ax.set_xlabel("step"); ax.legend(fontsize=7)
show(fig, "loss_curves")

# %% [markdown]
# ## WeLore: normalized singular-value spectra of the dense model
# Each curve is one attention/MLP matrix; WeLore drops the singular values
# below the global threshold tau (dashed) found by bisection for a 50%
# reduction. Matrices whose spectra fall fast become low-rank components.

# %%
from structmat.models import llama_config
params, _, meta = load_init(os.path.join(STUDY, "dense"))
saved = meta["config"]
vocab = np.shape(params["embed"]["embedding"])[0]
cfg = llama_config(saved["model"], "dense", vocab_size=vocab)
spectra = spectra_of(linear_paths(cfg, params))
tau = json.load(open(os.path.join(STUDY, "welore50", "compress_summary.json")))["tau"]
plans = {p.path: p for p in welore.plan(spectra, tau)}
fig, ax = plt.subplots(figsize=(7, 4))
for path, (shape, s) in spectra.items():
  ns = welore.normalized_spectrum(s)
  ax.plot(np.arange(len(ns)) / len(ns), ns, lw=0.8,
          color="C0" if plans[path].lrc else "C3")
ax.axhline(tau, ls="--", color="k")
ax.set_xlabel("singular value index / min(m, n)"); ax.set_ylabel("normalized s'")
ax.set_title(f"blue: LRC, red: kept dense; tau = {tau:.3f}")
show(fig, "welore_spectra")
print(f"{sum(p.lrc for p in plans.values())}/{len(plans)} matrices are LRCs; "
      f"reduction {welore.reduction(list(plans.values())):.3f}")
