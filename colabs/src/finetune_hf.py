# %% [markdown]
# # Fine-tune a Hugging Face LLaMA with structmat, and take it back
#
# `experiments.finetune --init=HF_DIR` reads a LLaMA-family checkpoint
# directory (config.json, safetensors, and tokenizer.model or
# tokenizer.json), applies a PEFT method (LoRA here), trains on the embedded
# stdlib prose, and with `export_merged` writes the merged model back as a
# Hugging Face directory that `transformers` loads.
#
# Set `STRUCTMAT_HF_DIR` to a local checkpoint (on Colab, e.g.
# `huggingface_hub.snapshot_download("TinyLlama/TinyLlama-1.1B-Chat-v1.0")`,
# with a GPU and `compute_dtype=bfloat16,frozen_dtype=bfloat16`). Without
# one (and under the test harness) a tiny random LLaMA with a sentencepiece
# tokenizer is built offline first.

# %%
# Install structmat (Colab): clone the repository (the launchers and configs
# live beside the package) and install it; skipped where it is importable.
import importlib.util, os, subprocess, sys
STRUCTMAT_REPO = "https://github.com/structmat/structmat"  # or your fork
if importlib.util.find_spec("structmat") is None:
  subprocess.check_call(["git", "clone", "-q", STRUCTMAT_REPO, "structmat"])
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e",
                         "structmat[notebooks,hf]"])
  os.chdir("structmat")
  sys.path.insert(0, os.getcwd())

# %%
import json
import shutil
import tempfile
import matplotlib.pyplot as plt
import numpy as np

SMALL = os.environ.get("STRUCTMAT_NOTEBOOK_SMALL") == "1"
OUT = os.environ.get("STRUCTMAT_NOTEBOOK_OUT")
ROOT = os.path.abspath(
    os.path.dirname(importlib.util.find_spec("structmat").origin) + "/..")
WORK = tempfile.mkdtemp(prefix="ft_hf_")
HF_DIR = "" if SMALL else os.environ.get("STRUCTMAT_HF_DIR", "")
if not HF_DIR:
  # A stand-in checkpoint: random weights, a tokenizer trained on a few
  # stdlib modules. transformers builds and saves it (test extra; Colab has it).
  import torch
  import transformers
  from structmat.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
  HF_DIR = os.path.join(WORK, "tiny_llama")
  texts = [open(m.__file__).read() for m in (json, os, shutil, tempfile)]
  sp = train_sentencepiece(texts, 512, os.path.join(WORK, "sp.model"))
  cfg = transformers.LlamaConfig(
      vocab_size=SentencePieceTokenizer(sp).vocab_size, hidden_size=64,
      intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=256)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).save_pretrained(HF_DIR)
  shutil.copy(sp, os.path.join(HF_DIR, "tokenizer.model"))
print("checkpoint:", HF_DIR, sorted(os.listdir(HF_DIR)))

# %% [markdown]
# ## Fine-tune: LoRA on q and v, then merge
# The launcher prints the trainable share, trains with the standard loop
# (checkpoints, resume, metrics.jsonl) and writes the adapter, the PEFT
# files and, with `export_merged`, `merged_hf/`.

# %%
STEPS = 20 if SMALL else 200
FT = os.path.join(WORK, "ft")
subprocess.check_call(
    [sys.executable, "-m", "experiments.finetune",
     f"--config=configs/finetune.py:method=lora,rank=8,steps={STEPS},"
     "seq_len=64,batch_size=8", f"--init={HF_DIR}", f"--workdir={FT}",
     "--config.export_merged=True", "--config.eval_every_steps=10",
     "--config.log_every_steps=5"], cwd=ROOT)
summary = json.load(open(os.path.join(FT, "finetune_summary.json")))
print({k: summary[k] for k in ("trainable_params", "total_params",
                               "trainable_pct", "eval_perplexity")})

# %%
rows = [json.loads(l) for l in open(os.path.join(FT, "metrics.jsonl"))]
train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(*zip(*train), label="train")
ax.plot(*zip(*ev), "o-", label="validation")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.legend()
ax.set_title("LoRA fine-tuning of the checkpoint on the stdlib prose")
fig.tight_layout()
if OUT:
  fig.savefig(os.path.join(OUT, "finetune_hf_loss.png"), dpi=80)
plt.show()

# %% [markdown]
# ## Back in transformers
# The merged directory is a plain LLaMA checkpoint. Its logits equal the
# fine-tuned structmat model's (LoRA deltas folded into the kernels).

# %%
import jax
import jax.numpy as jnp
import torch
import transformers
from structmat.models import load_hf

merged = os.path.join(FT, "merged_hf")
tokens = np.array([[5, 17, 3, 42, 8, 9, 11, 2]])
theirs = transformers.LlamaForCausalLM.from_pretrained(merged).eval()
with torch.no_grad():
  ref = theirs(torch.tensor(tokens)).logits.float().numpy()
model, params = load_hf(merged, attention="naive")
ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
print(f"relative difference structmat vs transformers: {rel:.1e}")
assert rel < 1e-4

# %% [markdown]
# ## Samples
# Greedy continuations from the base checkpoint and from the fine-tuned run
# (`experiments.sample` takes either; the run's tokenizer encodes the
# prompt). With the tiny random checkpoint both are noise; with a real one
# the fine-tuned model drifts toward the new text.

# %%
for name, init in (("base", HF_DIR), ("fine-tuned", FT)):
  print(f"== {name}")
  print(subprocess.run(
      [sys.executable, "-m", "experiments.sample", f"--init={init}",
       "--prompt=The function returns", "--prompt=Example usage:",
       "--max_new_tokens=24", "--temperature=0"],
      cwd=ROOT, check=True, capture_output=True, text=True).stdout)
