"""load_hf against the transformers implementation on tiny random models.

torch and transformers are test-only extras (``pip install -e '.[test]'``).
Models are created offline here with random weights; logits must agree to a
relative error below 1e-4 in float32.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from structmat.models import load_hf  # noqa: E402

TOKENS = np.array([[1, 5, 9, 3, 7, 2, 8, 4, 6, 11, 13, 0],
                   [4, 4, 2, 19, 1, 0, 3, 17, 5, 5, 9, 12]])

LLAMA = dict(vocab_size=37, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA_CASES = {
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True,
                     rope_theta=500.0),
    "rope_linear": dict(num_key_value_heads=1,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3": dict(num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}


def _save(model, path, shard=False):
  torch.manual_seed(0)
  with torch.no_grad():  # random everything, norms included (never ones)
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
  model.save_pretrained(path, safe_serialization=True,
                        max_shard_size="20KB" if shard else "10GB")
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_matches_transformers(case, tmp_path):
  cfg = transformers.LlamaConfig(**LLAMA, **LLAMA_CASES[case])
  ref = _save(transformers.LlamaForCausalLM(cfg).eval(), tmp_path,
              shard=case == "gqa_tied")
  model, params = load_hf(str(tmp_path), attention="naive")
  logits = model.apply({"params": params}, jnp.asarray(TOKENS))
  assert logits.shape == ref.shape
  assert _rel(logits, ref) < 1e-4


def test_sharded_checkpoint_is_read(tmp_path):
  cfg = transformers.LlamaConfig(**LLAMA, num_key_value_heads=2)
  _save(transformers.LlamaForCausalLM(cfg), tmp_path, shard=True)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  load_hf(str(tmp_path))


def test_gpt2_matches_transformers(tmp_path):
  cfg = transformers.GPT2Config(vocab_size=37, n_embd=32, n_layer=2, n_head=4,
                                n_positions=32, bos_token_id=0, eos_token_id=0)
  ref = _save(transformers.GPT2LMHeadModel(cfg).eval(), tmp_path)
  model, params = load_hf(str(tmp_path))
  logits = model.apply({"params": params}, jnp.asarray(TOKENS))
  assert logits.shape == ref.shape
  assert _rel(logits, ref) < 1e-4


def test_conversion_errors_name_the_tensor(tmp_path):
  cfg = transformers.LlamaConfig(**LLAMA, num_key_value_heads=2)
  _save(transformers.LlamaForCausalLM(cfg), tmp_path)
  c = json.load(open(tmp_path / "config.json"))
  c["intermediate_size"] = 40  # config no longer matches the weights
  json.dump(c, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*expects"):
    load_hf(str(tmp_path))
  c["model_type"] = "bert"
  json.dump(c, open(tmp_path / "config.json", "w"))
  with pytest.raises(ValueError, match="model_type"):
    load_hf(str(tmp_path))


def _tokenizer_files(kind, directory):
  """(size, files) of a small tokenizer trained offline on stdlib sources:
  a sentencepiece tokenizer.model, or a byte-level BPE tokenizer.json with
  its tokenizer_config.json."""
  import shutil  # pylint: disable=import-outside-toplevel
  texts = [open(m.__file__).read() for m in (json, os, shutil)]
  os.makedirs(directory)
  if kind == "sentencepiece":
    from structmat.data.tokenizers import SentencePieceTokenizer, train_sentencepiece  # pylint: disable=import-outside-toplevel
    sp = train_sentencepiece(texts, 400, os.path.join(directory, "tokenizer.model"))
    return SentencePieceTokenizer(sp).vocab_size, [sp]
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  files = [os.path.join(directory, n) for n in ("tokenizer.json",
                                                "tokenizer_config.json")]
  tk.save(files[0])
  json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
            open(files[1], "w"))
  return tk.get_vocab_size(), files


def _lora_launcher_roundtrip(hf_dir, workdir, vocab, hf_class, hf_cfg, ref):
  """LoRA through run_finetune (2 steps, merged export) on ``hf_dir``: every
  checkpoint tensor arrives (plus the trainable factors), LoRA at init
  computes transformers' logits ``ref``, training moves them, and the merged
  directory loaded by ``hf_class`` computes the fine-tuned model's logits.
  Returns the summary."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from configs import finetune as finetune_config  # pylint: disable=import-outside-toplevel
  from experiments import sources  # pylint: disable=import-outside-toplevel
  from experiments.finetune_lib import run_finetune  # pylint: disable=import-outside-toplevel
  from structmat.models import build_model  # pylint: disable=import-outside-toplevel
  from structmat.train import init_ckpt, loop  # pylint: disable=import-outside-toplevel
  fc = finetune_config.get_config("method=lora,rank=2,steps=2,seq_len=32,"
                                  "batch_size=4")
  with fc.unlocked():
    fc.eval_every_steps, fc.export_merged = 0, True
  s = run_finetune(fc, str(hf_dir), str(workdir))
  assert s["step"] == 2 and np.isfinite(s["eval_loss"])
  assert s["total_params"] - s["trainable_params"] == sum(
      p.numel() for p in hf_class(hf_cfg).parameters())
  params, _, meta = init_ckpt.load_init(str(workdir / "init"))
  config = loop.apply_init_meta(sources.source_config(meta["config"]), meta)
  model = build_model(dataclasses.replace(loop.model_config(config, vocab),
                                          attention="naive"))
  apply = lambda p: model.apply({"params": jax.tree.map(jnp.asarray, p)},
                                jnp.asarray(TOKENS))
  assert _rel(apply(params), ref) < 1e-4     # LoRA at init: the base
  ours = apply(init_ckpt.load_init(str(workdir))[0])
  assert _rel(ours, ref) > 1e-3              # training moved it
  merged = hf_class.from_pretrained(str(workdir / "merged_hf")).eval()
  with torch.no_grad():
    theirs = merged(torch.tensor(TOKENS)).logits.float().numpy()
  assert _rel(ours, theirs) < 1e-4
  return s


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_finetune_launcher_takes_a_hf_llama(kind, tmp_path, data_dir):
  """--init=HF_DIR: the checkpoint's sizes and tokenizer drive the run, the
  prepared model (LoRA at init) computes the transformers logits, and the
  merged result loads back into transformers."""
  import shutil  # pylint: disable=import-outside-toplevel
  from configs import finetune as finetune_config  # pylint: disable=import-outside-toplevel
  from experiments import sources  # pylint: disable=import-outside-toplevel
  from experiments.finetune_lib import run_finetune  # pylint: disable=import-outside-toplevel
  from structmat.train import loop  # pylint: disable=import-outside-toplevel
  size, files = _tokenizer_files(kind, str(tmp_path / "tok"))
  # A tokenizer.json checkpoint may pad its embedding beyond the tokenizer.
  vocab = size if kind == "sentencepiece" else size + 3
  hf_dir = tmp_path / "hf"
  cfg = transformers.LlamaConfig(**dict(LLAMA, vocab_size=vocab),
                                 num_key_value_heads=2, rope_theta=500.0)
  ref = _save(transformers.LlamaForCausalLM(cfg).eval(), hf_dir)
  with pytest.raises(ValueError, match="tokenizer"):
    sources.load_source(str(hf_dir))
  for f in files:
    shutil.copy(f, hf_dir)
  source = sources.load_source(str(hf_dir))[3]
  tok = loop.build_data(source)[0]
  assert tok.vocab_size == vocab and tok.decode(tok.encode("def f(x):\n")) == "def f(x):\n"

  del data_dir  # the fixture points STRUCTMAT_DATA_DIR at the shared corpus
  s = _lora_launcher_roundtrip(hf_dir, tmp_path / "ft", vocab,
                               transformers.LlamaForCausalLM, cfg, ref)
  out = tmp_path / "ft" / "merged_hf"
  assert all((out / os.path.basename(f)).exists() for f in files)
  if kind == "sentencepiece":
    # Continued pretraining from the same directory: its sizes and tokenizer
    # replace the config's, its weights are written once as WORKDIR/hf_init.
    from configs import pretrain as pretrain_config  # pylint: disable=import-outside-toplevel
    pc = pretrain_config.get_config("steps=2")
    with pc.unlocked():
      pc.seq_len, pc.batch_size, pc.eval_batches = 32, 4, 2
    pc, init = sources.hf_init(pc, str(hf_dir), str(tmp_path / "pt"))
    assert init == str(tmp_path / "pt" / "hf_init") and pc.model == "custom"
    assert pc.data.tokenizer_model == str(hf_dir / "tokenizer.model")
    summary = loop.train_and_evaluate(pc, str(tmp_path / "pt"), init)
    assert summary["parameters"] == s["total_params"] - s["trainable_params"]
  # Mistral-style sliding windows: full attention is the same function only
  # up to the window, so longer sequences are refused before any work.
  conf = json.load(open(hf_dir / "config.json"))
  json.dump(dict(conf, sliding_window=16), open(hf_dir / "config.json", "w"))
  with pytest.raises(ValueError, match="sliding_window=16"):
    run_finetune(finetune_config.get_config("method=lora,seq_len=32"),
                 str(hf_dir), str(tmp_path / "ft_window"))
  if kind == "sentencepiece":  # continued pretraining refuses it as well
    with pytest.raises(ValueError, match="sliding_window=16"):
      sources.hf_init(pc, str(hf_dir), str(tmp_path / "pt_window"))


def test_finetune_launcher_takes_a_hf_gpt2(tmp_path, data_dir):
  """--init=HF_GPT2_DIR: LoRA on q and v (NOLA's and LoRA's GPT-2 setting)
  starts from the transformers function, trains, and the merged model goes
  back to transformers (q, k, v fused into c_attn again)."""
  import shutil  # pylint: disable=import-outside-toplevel
  from configs import finetune as finetune_config  # pylint: disable=import-outside-toplevel
  from experiments import sources  # pylint: disable=import-outside-toplevel
  from experiments.finetune_lib import run_finetune  # pylint: disable=import-outside-toplevel
  from structmat.finetune import prepare  # pylint: disable=import-outside-toplevel
  from structmat.models import GPT2  # pylint: disable=import-outside-toplevel
  from structmat.train import loop  # pylint: disable=import-outside-toplevel
  size, files = _tokenizer_files("tokenizer.json", str(tmp_path / "tok"))
  hf_dir = tmp_path / "hf"
  cfg = transformers.GPT2Config(vocab_size=size, n_embd=32, n_layer=2,
                                n_head=4, n_positions=48, bos_token_id=0,
                                eos_token_id=0)
  ref = _save(transformers.GPT2LMHeadModel(cfg).eval(), hf_dir)
  for f in files:
    shutil.copy(f, hf_dir)
  base, _, _, source = sources.load_source(str(hf_dir))
  assert source.family == "gpt2" and source.seq_len == 48  # capped: positions
  del data_dir  # the fixture points STRUCTMAT_DATA_DIR at the shared corpus
  s = _lora_launcher_roundtrip(hf_dir, tmp_path / "ft", size,
                               transformers.GPT2LMHeadModel, cfg, ref)
  assert os.path.exists(os.path.join(s["peft"], "adapter_config.json"))
  # Structures replace GPT-2 linears with their biases kept (merging back
  # to dense gives the same function); the Compacter family and
  # classification heads are LLaMA-only and say so up front.
  from structmat.finetune.export import merge_to_dense  # pylint: disable=import-outside-toplevel
  cfg_ours = loop.model_config(source, size)
  for method in ("monarch", "welore"):
    hp = finetune_config.get_config(f"method={method}")
    prep = prepare(method, cfg_ours, base, {}, hp)
    np.testing.assert_array_equal(prep.params["layer_1"]["mlp"]["fc"]["bias"],
                                  base["layer_1"]["mlp"]["fc"]["bias"])
    new_cfg = loop.model_config(loop.apply_init_meta(source, {
        "overrides": prep.overrides}), size)
    assert new_cfg.linear_for("fc", 1)[0] != "dense"
    out = GPT2(new_cfg).apply({"params": prep.params}, jnp.asarray(TOKENS))
    dense_cfg, dense = merge_to_dense(new_cfg, prep.params)
    back = GPT2(dense_cfg).apply({"params": dense}, jnp.asarray(TOKENS))
    assert _rel(out, back) < 1e-5
  with pytest.raises(ValueError, match="LLaMA"):
    prepare("compacter", cfg_ours, base, {}, finetune_config.get_config(""))
  with pytest.raises(ValueError, match="classification"):
    run_finetune(finetune_config.get_config("method=lora,task=stdlib_topic"),
                 str(hf_dir), str(tmp_path / "cls"))
  with pytest.raises(ValueError, match="model_type"):
    json.dump({"model_type": "bert"}, open(tmp_path / "tok" / "config.json", "w"))
    sources.load_source(str(tmp_path / "tok"))


def test_save_hf_roundtrips_through_transformers(tmp_path):
  """A structmat LLaMA (no HF source: save_hf writes its own config.json)
  loads into transformers with the same logits."""
  import jax  # pylint: disable=import-outside-toplevel
  from structmat.models import Llama, llama_config, save_hf  # pylint: disable=import-outside-toplevel
  cfg = llama_config("custom", vocab_size=37, max_len=64, d_model=32, d_ff=48,
                     n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500.0,
                     rope_scaling=(("factor", 2.0), ("rope_type", "linear")),
                     norm_eps=1e-5, tie_embeddings=True, attention="naive")
  model = Llama(cfg)
  params = model.init(jax.random.key(0), jnp.asarray(TOKENS))["params"]
  params = jax.tree.map(  # norms away from ones, every tensor random
      lambda p: p + 0.2 * jax.random.normal(jax.random.key(p.size), p.shape),
      params)
  save_hf(str(tmp_path), cfg, params)
  theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    ref = theirs(torch.tensor(TOKENS)).logits.float().numpy()
  assert _rel(model.apply({"params": params}, jnp.asarray(TOKENS)), ref) < 1e-4
  with pytest.raises(ValueError, match="merge"):
    save_hf(str(tmp_path / "x"), llama_config("llama_tiny", "monarch"), params)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_matches_transformers(family, tmp_path):
  """structmat.models.generate (greedy) continues prompts exactly as
  transformers' generate(do_sample=False) does."""
  from structmat.models.generate import generate  # pylint: disable=import-outside-toplevel
  if family == "llama":
    cfg = transformers.LlamaConfig(**LLAMA, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(cfg)
  else:
    cfg = transformers.GPT2Config(vocab_size=37, n_embd=32, n_layer=2,
                                  n_head=4, n_positions=32)
    hf = transformers.GPT2LMHeadModel(cfg)
  _save(hf.eval(), tmp_path)
  model, params = load_hf(str(tmp_path), attention="naive")
  prompt = TOKENS[:, :5]
  ours = generate(model, {"params": params}, jnp.asarray(prompt), 8)
  hf.generation_config.eos_token_id = None   # ours runs to the end too
  with torch.no_grad():
    theirs = hf.generate(torch.tensor(prompt), max_new_tokens=8,
                         do_sample=False, pad_token_id=0).numpy()
  np.testing.assert_array_equal(np.asarray(ours), theirs)
