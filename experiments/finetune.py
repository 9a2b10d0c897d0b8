r"""Fine-tune a pretrained structmat run with one PEFT method.

  python -m experiments.finetune --config=configs/finetune.py:method=compacter \
      --init=runs/pretrain --workdir=runs/ft_compacter

--init may also be a Hugging Face LLaMA-family or GPT-2 directory
(config.json, model.safetensors or shards, and tokenizer.model or
tokenizer.json).
See configs/finetune.py for the methods and keys. Prints the trainable
parameter count (absolute and %), then trains with the standard loop
(checkpoints, resume, metrics.jsonl); WORKDIR/finetune_summary.json at the end.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.finetune_lib import run_finetune

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py",
                                          "Fine-tuning config.", lock_config=True)
_INIT = flags.DEFINE_string(
    "init", None, "The pretrained run's workdir, an init directory, or a "
    "Hugging Face LLaMA or GPT-2 directory (config.json, safetensors, "
    "tokenizer).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["init", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  s = run_finetune(_CONFIG.value, _INIT.value, _WORKDIR.value)
  keys = ("eval_loss", "eval_perplexity", "accuracy", "f1", "mcc")
  print("done: " + ", ".join(f"{k} {s[k]:.4f}" for k in keys if k in s))


if __name__ == "__main__":
  app.run(main)
