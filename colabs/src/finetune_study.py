# %% [markdown]
# # Fine-tuning-methods study: metric against trainable parameters
#
# Reads the workdir of `experiments.finetune_study`
# (configs/studies/finetune_methods.py): every method fine-tuned from the
# pretraining main job on the stdlib prose (LM, validation perplexity) and on
# code-topic classification (accuracy). Set `STRUCTMAT_FT_STUDY_DIR` to a
# finished study; without one (or under the test harness) a tiny LoRA-only
# study is run first.

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
import tempfile
import matplotlib.pyplot as plt

SMALL = os.environ.get("STRUCTMAT_NOTEBOOK_SMALL") == "1"
OUT = os.environ.get("STRUCTMAT_NOTEBOOK_OUT")
STUDY = os.environ.get("STRUCTMAT_FT_STUDY_DIR", "runs/finetune_study")
if SMALL or not os.path.exists(os.path.join(STUDY, "results.json")):
  STUDY = tempfile.mkdtemp(prefix="ft_study_")
  root = os.path.dirname(importlib.util.find_spec("structmat").origin) + "/.."
  subprocess.check_call([sys.executable, "-m", "experiments.finetune_study",
                         "--config=configs/studies/finetune_methods.py:tiny=1,"
                         "methods=lora", f"--workdir={STUDY}"],
                        cwd=os.path.abspath(root))
print("study:", STUDY)
rows = json.load(open(os.path.join(STUDY, "results.json")))
print(open(os.path.join(STUDY, "results.md")).read())

# %% [markdown]
# ## Metric against trainable parameters
# Left: validation perplexity after LM fine-tuning on the prose (lower is
# better); right: topic-classification accuracy. The x axis is logarithmic:
# the adapters train 0.1-3% of the parameters.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, task, label in ((axes[0], "lm", "validation perplexity"),
                        (axes[1], "stdlib_topic", "accuracy")):
  for r in (r for r in rows if r["task"] == task):
    y = r["value"] if task == "lm" else float(r["value"].split(" / ")[0])
    ax.scatter(r["trainable"], y)
    ax.annotate(r["method"], (r["trainable"], y), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters")
  ax.set_ylabel(label)
  ax.set_title(task)
fig.tight_layout()
if OUT:
  fig.savefig(os.path.join(OUT, "metric_vs_trainable.png"), dpi=80)
plt.show()
