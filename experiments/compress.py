r"""Compress a dense pretraining run: WeLore, uniform low-rank or Monarch.

  python -m experiments.compress --config=configs/compress.py:method=welore,reduction=0.5 \
      --init=runs/pretrain --workdir=runs/welore50

See configs/compress.py. Writes WORKDIR/init (orbax), WORKDIR/model.json,
WORKDIR/report.txt and report.json, and WORKDIR/compress_summary.json.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.compress_lib import run_compress

_CONFIG = config_flags.DEFINE_config_file("config", "configs/compress.py",
                                          "Compression config.", lock_config=True)
_INIT = flags.DEFINE_string("init", None, "The dense run's workdir, an init "
                            "dir, or a Hugging Face LLaMA or GPT-2 directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the result goes.")
flags.mark_flags_as_required(["init", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  s = run_compress(_CONFIG.value, _INIT.value, _WORKDIR.value)
  # A preset source is named in the config argument (its recipe defaults
  # follow); a Hugging Face one needs its sizes and tokenizer as flags.
  preset = "" if s["model_flags"] else f":model={s['model']}"
  print(f"\ncontinue training: python -m experiments.pretrain "
        f"--config=configs/pretrain.py{preset} --init={_WORKDIR.value} "
        f"--workdir={_WORKDIR.value}_ft {s['model_flags']} "
        "(same data flags as the source run)".replace("  ", " "))


if __name__ == "__main__":
  app.run(main)
