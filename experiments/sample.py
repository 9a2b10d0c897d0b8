r"""Sample continuations from a trained model: a pretraining or fine-tuning
workdir (its latest checkpoint), an init directory, or a Hugging Face
LLaMA/GPT-2 directory.

  python -m experiments.sample --init=runs/pretrain --prompt='def main(' \
      --prompt='class Config:' --max_new_tokens=64 --temperature=0.8 --top_k=40

Greedy with --temperature=0. The run's own tokenizer encodes the prompts;
each prompt is continued --num_samples times (seeds --seed, --seed+1, ...).
"""
from absl import app, flags, logging
import jax
import jax.numpy as jnp

from experiments.sources import embedding_rows, load_source
from structmat.models import build_model
from structmat.models.generate import generate
from structmat.train import loop

_INIT = flags.DEFINE_string("init", None, "Workdir, init directory or Hugging "
                            "Face directory.")
_PROMPTS = flags.DEFINE_multi_string("prompt", ["def "], "Prompt text "
                                     "(repeat the flag for several).")
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sample among the k most likely "
                              "tokens (0: all).")
_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "First sampling seed.")
flags.mark_flag_as_required("init")


def sample_texts(init: str, prompts, max_new_tokens: int = 64,
                 temperature: float = 0.8, top_k: int = 40,
                 num_samples: int = 1, seed: int = 0) -> list[list[str]]:
  """Per prompt, ``num_samples`` continuations (the generated text only)."""
  params, structure, meta, source = load_source(init)
  tok = loop.build_tokenizer(source)
  model = build_model(loop.model_config(source, embedding_rows(params)))
  variables = {"params": params, **jax.tree.map(jnp.asarray, structure)}
  # A prompt starts a document: after eos, as the packed training batches
  # have it, or after bos for a Hugging Face checkpoint that has one.
  bos = getattr(tok, "bos_id", None)
  start = bos if meta.get("hf") and bos is not None else tok.eos_id
  out = []
  for text in prompts:
    ids = [start] + tok.encode(text)
    rows = []
    for i in range(num_samples):
      tokens = generate(model, variables, jnp.asarray([ids]), max_new_tokens,
                        temperature=temperature, top_k=top_k, seed=seed + i,
                        eos_id=tok.eos_id, pad_id=tok.pad_id)
      new = tokens[0, len(ids):].tolist()
      if tok.eos_id in new:  # the document ended
        new = new[:new.index(tok.eos_id)]
      rows.append(tok.decode(new))
    out.append(rows)
  return out


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  texts = sample_texts(_INIT.value, _PROMPTS.value, _NEW.value,
                       _TEMPERATURE.value, _TOP_K.value, _SAMPLES.value,
                       _SEED.value)
  for prompt, rows in zip(_PROMPTS.value, texts):
    for i, row in enumerate(rows):
      print(f"--- prompt {prompt!r}, sample {i}\n{prompt}{row}", flush=True)


if __name__ == "__main__":
  app.run(main)
