"""Sampling (structmat.models.generate) and the experiments.sample launcher."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structmat.models import build_model
from structmat.models.family import preset_config
from structmat.models.generate import generate
from tests.helpers import randomize

PROMPT = jnp.array([[5, 9, 2], [7, 1, 3]])


def _model(preset, linear="dense", **kw):
  model = build_model(preset_config(preset, linear, vocab_size=37, max_len=32,
                                    **kw))
  v = nn.unbox(model.init(jax.random.key(0), PROMPT))
  v["params"] = randomize(v["params"], scale=1.0)  # peaked, non-trivial logits
  return model, v


@pytest.mark.parametrize("preset,linear", [("llama_tiny", "sltrain"),
                                           ("gpt2_tiny", "monarch")])
def test_greedy_is_the_argmax_of_a_full_forward(preset, linear):
  """Every generated token is the argmax of the model's logits on the
  sequence so far (structures with their own collections included): one
  causal forward over the result gives them all."""
  model, v = _model(preset, linear)
  out = generate(model, v, PROMPT, 6)
  assert out.shape == (2, 9) and (out[:, :3] == PROMPT).all()
  logits = jax.jit(model.apply)(v, out)
  np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:-1], -1))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
  model, v = _model("llama_tiny")
  greedy = generate(model, v, PROMPT, 8)
  np.testing.assert_array_equal(
      generate(model, v, PROMPT, 8, temperature=1.0, top_k=1, seed=3), greedy)
  a = generate(model, v, PROMPT, 8, temperature=2.0, seed=1)
  np.testing.assert_array_equal(a, generate(model, v, PROMPT, 8,
                                            temperature=2.0, seed=1))
  assert not (a == generate(model, v, PROMPT, 8, temperature=2.0,
                            seed=2)).all()


def test_eos_ends_a_row_and_limits_are_checked():
  model, v = _model("llama_tiny")
  greedy = generate(model, v, PROMPT, 6)
  eos = int(greedy[0, 4])      # row 0 stops after its second new token
  out = generate(model, v, PROMPT, 6, eos_id=eos, pad_id=0)
  np.testing.assert_array_equal(out[0, :5], greedy[0, :5])
  assert (out[0, 5:] == 0).all()
  gpt2, gv = _model("gpt2_tiny")   # 1024 positions
  with pytest.raises(ValueError, match="1024 learned positions"):
    generate(gpt2, gv, PROMPT, 1022)
  with pytest.raises(ValueError, match="prompt"):
    generate(model, v, jnp.array([1, 2, 3]), 4)


def test_sample_launcher_on_a_pretraining_run(tmp_path, data_dir):
  from configs import pretrain as pretrain_config  # pylint: disable=import-outside-toplevel
  from experiments.sample import sample_texts  # pylint: disable=import-outside-toplevel
  from structmat.train import loop  # pylint: disable=import-outside-toplevel
  del data_dir
  loop.train_and_evaluate(pretrain_config.get_config("tiny=1,steps=2"),
                          str(tmp_path))
  texts = sample_texts(str(tmp_path), ["def ", "import"], max_new_tokens=12,
                       temperature=0.0, num_samples=2)
  assert len(texts) == 2 and all(len(rows) == 2 for rows in texts)
  assert texts[0][0] == texts[0][1]   # greedy: the same continuation
  assert all(isinstance(t, str) for rows in texts for t in rows)
