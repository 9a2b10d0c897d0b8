"""Fine-tuning methods: preparation, frozen parameters, counts, the launcher."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_config
from structmat.finetune import METHODS, prepare
from structmat.models import GPT2, GPT2Config, Llama, llama_config
from structmat.models.llama import parse_adapters
from structmat.train import loop
from structmat.train.params import count_params
from structmat.train.partition import partition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = jnp.array([[3, 9, 1, 7, 2, 8, 5, 4], [6, 6, 0, 1, 3, 2, 9, 7]])


def _base(seed=0):
  cfg = llama_config("llama_tiny", "dense", vocab_size=16, max_len=8)
  v = nn.unbox(Llama(cfg).init(jax.random.key(seed), TOKENS))
  # Norm scales away from one, so "left unchanged" is a real check.
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(
      jax.random.key(7), a.shape), v)
  return cfg, v["params"]


def _apply(cfg, prep):
  cfg = loop.model_config(_loop_config(cfg, prep), cfg.vocab_size)
  variables = {"params": prep.params, **prep.structure}
  return Llama(cfg).apply(variables, TOKENS), cfg


def _loop_config(cfg, prep):
  from configs import pretrain as pretrain_config  # pylint: disable=import-outside-toplevel
  c = pretrain_config.get_config("tiny=1")
  meta = {"overrides": prep.overrides, "trainable": prep.trainable,
          "adapters": prep.adapters}
  return loop.apply_init_meta(c, meta)


@pytest.mark.parametrize("method", METHODS)
def test_prepare_every_method(method):
  cfg, params = _base()
  fc = finetune_config.get_config(f"method={method},rank=4,num_basis=16,"
                                  "reduction_factor=8,n_phm=4")
  prep = prepare(method, cfg, params, {}, fc)
  logits, new_cfg = _apply(cfg, prep)
  base = Llama(cfg).apply({"params": params}, TOKENS)
  train, frozen = partition(prep.params, prep.trainable)
  n_train, n_all = count_params(train), count_params(prep.params)
  assert 0 < n_train <= n_all
  if method in ("full", "galore"):
    assert n_train == n_all
  else:
    # Monarch trains every projected linear, WeLore every LRC (random weights
    # have flat spectra, so every matrix is one): nearly all parameters here.
    limit = 1.0 if method in ("monarch", "welore") else 0.6
    assert n_train < limit * n_all, (method, n_train, n_all)
    # The pretrained weights are frozen and carried over unchanged.
    np.testing.assert_array_equal(frozen["embed"]["embedding"],
                                  params["embed"]["embedding"])
  if method in ("full", "galore", "lora", "nola"):
    # B = 0 (LoRA) / zero coefficients (NOLA offset): the base function.
    np.testing.assert_allclose(logits, base, rtol=1e-5, atol=1e-5)
  elif method in ("compacter", "compacter++", "phm_adapter"):
    # Adapters start near the identity (rule std 1e-4) but are not zero.
    assert 0 < float(jnp.abs(logits - base).max()) < 1e-2
  else:  # monarch projection / WeLore truncation change the function
    assert float(jnp.abs(logits - base).max()) > 1e-4
  if method == "lora":
    assert set(train["layer_0"]["attn"]) == {"q", "v"}
    assert set(train["layer_0"]["attn"]["q"]["lora"]) == {"lora_a", "lora_b"}


def test_bad_target_names_the_field():
  cfg, params = _base()
  fc = finetune_config.get_config(r"method=lora,target=\d+\.qkv")
  with pytest.raises(ValueError, match="target"):
    prepare("lora", cfg, params, {}, fc)
  with pytest.raises(ValueError, match="method"):
    finetune_config.get_config("method=prefix")


def _adapter_count(after, n=4, rank=1, reduction_factor=32):
  # A T5-base-shaped adapter set: d=768, 12 encoder + 12 decoder blocks.
  cfg = llama_config("llama_tiny", "dense", vocab_size=8, max_len=4)
  import dataclasses  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(cfg, d_model=768, n_heads=12, d_ff=64, n_layers=24,
                            adapters=parse_adapters(
                                f"after={after};n={n};rank={rank};"
                                f"reduction_factor={reduction_factor}"))
  p = nn.unbox(jax.eval_shape(Llama(cfg).init, jax.random.key(0),
                              jnp.ones((1, 4), jnp.int32)))["params"]
  train, _ = partition(p, r".*_adapter/.*|phm_rule/.*")
  return count_params(train)


def test_compacter_counts_match_the_paper():
  # METHODS.md: Compacter 114,112 and Compacter++ 57,088 adapter parameters
  # (2,376 per adapter at d=768, plus one shared 64-entry rule).
  assert _adapter_count("attn+mlp") == 114_112
  assert _adapter_count("mlp") == 57_088


def test_nola_gpt2_medium_q_v_count():
  over = tuple((s, "nola", (("num_basis", 512), ("rank", 8)))
               for s in ("q", "v"))
  cfg = GPT2Config(d_model=1024, n_layers=24, n_heads=16, d_ff=4096,
                   overrides=over)
  v = jax.eval_shape(GPT2(cfg).init, jax.random.key(0),
                     jnp.ones((1, 4), jnp.int32))
  train, _ = partition(nn.unbox(v["params"]), r".*nola/coef_.*")
  assert count_params(train) == 49_152


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, data_dir):
  """A few steps of the tiny pretraining config: the base to fine-tune."""
  base = tmp_path_factory.mktemp("base")
  p = subprocess.run([sys.executable, "-m", "experiments.pretrain",
                      "--config=configs/pretrain.py:tiny=1,steps=4",
                      f"--workdir={base}"], cwd=ROOT,
                     env=dict(os.environ, STRUCTMAT_DATA_DIR=data_dir),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return str(base)


def test_finetune_launcher_trains_only_adapters(tmp_path, data_dir, tiny_base):
  ft = tmp_path / "ft"
  p = subprocess.run([sys.executable, "-m", "experiments.finetune",
                      "--config=configs/finetune.py:method=compacter,steps=3,"
                      "reduction_factor=8,data=stdlib_docs",
                      f"--init={tiny_base}", f"--workdir={ft}"], cwd=ROOT,
                     env=dict(os.environ, STRUCTMAT_DATA_DIR=data_dir),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "trainable parameters" in p.stdout and "%)" in p.stdout
  s = json.load(open(ft / "finetune_summary.json"))
  assert s["method"] == "compacter" and s["step"] == 3
  assert s["trainable_parameters"] == s["trainable_params"] < s["parameters"]
  # AdamW keeps two moments per trainable parameter and nothing for frozen.
  assert s["optimizer_state_bytes"] < 3 * 4 * s["trainable_params"] + 1024
  assert s["adapter_bytes"] > 0 and (ft / "adapter" / "adapter.json").exists()


def test_galore_fine_tuning_keeps_low_rank_moments(tmp_path, tiny_base):
  """method=galore trains every parameter with GaLore's optimizer: its AdamW
  moments are projected (rank 2 here), far below full AdamW's."""
  from experiments.finetune_lib import run_finetune  # pylint: disable=import-outside-toplevel
  from structmat.models import load_hf  # pylint: disable=import-outside-toplevel
  from structmat.train import init_ckpt  # pylint: disable=import-outside-toplevel
  fc = finetune_config.get_config("method=galore,rank=2,steps=2")
  with fc.unlocked():
    fc.eval_every_steps, fc.export_merged = 0, True
  s = run_finetune(fc, tiny_base, str(tmp_path / "ft"))
  assert s["step"] == 2 and np.isfinite(s["eval_loss"])
  assert s["trainable_params"] == s["total_params"]
  full_adamw = 2 * 4 * s["total_params"]
  assert s["optimizer_state_bytes"] < 0.5 * full_adamw, s
  # The report (written before training, from the optimizer's state shapes)
  # is the real state plus float32 gradients, not full AdamW's bound.
  assert s["grad_and_opt_state_mb"] * 2**20 == pytest.approx(
      4 * s["total_params"] + s["optimizer_state_bytes"])
  assert s["grad_and_opt_state_mb"] < 0.75 * s["full_ft_grad_and_opt_state_mb"]
  # Nothing frozen: no adapter file, but the export still goes out, and the
  # Hugging Face directory holds exactly the final checkpoint's weights.
  assert "adapter_bytes" not in s and s["merged_hf"]
  final, _, _ = init_ckpt.load_init(str(tmp_path / "ft"))
  _, exported = load_hf(s["merged_hf"])
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)


def test_frozen_base_in_bfloat16(tmp_path, tiny_base):
  """frozen_dtype=bfloat16: the checkpointed base is bf16 (half the bytes),
  the LoRA factors stay float32, and the loss matches the float32 base's to
  bf16 rounding."""
  from experiments.finetune_lib import run_finetune  # pylint: disable=import-outside-toplevel
  from structmat.train import init_ckpt  # pylint: disable=import-outside-toplevel
  losses = {}
  for dt in ("", "bfloat16"):
    fc = finetune_config.get_config(f"method=lora,rank=2,steps=2,frozen_dtype={dt}")
    with fc.unlocked():
      fc.eval_every_steps = 0
    losses[dt] = run_finetune(fc, tiny_base, str(tmp_path / f"ft{dt}"))["eval_loss"]
  params, _, _ = init_ckpt.load_init(str(tmp_path / "ftbfloat16"))
  assert params["layer_0"]["attn"]["k"]["kernel"].dtype == jnp.bfloat16
  assert params["embed"]["embedding"].dtype == jnp.bfloat16
  assert params["layer_0"]["attn"]["q"]["lora"]["lora_a"].dtype == jnp.float32
  assert losses["bfloat16"] != losses[""]
  np.testing.assert_allclose(losses["bfloat16"], losses[""], rtol=1e-2)


def test_glue_metrics():
  from structmat.finetune.classify import glue_metrics  # pylint: disable=import-outside-toplevel
  preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
  m = glue_metrics(preds, labels, 2)
  tp, tn, fp, fn = 2, 2, 1, 1
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / np.sqrt(
      (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  assert glue_metrics([0, 1, 2], [0, 1, 2], 3)["mcc"] == pytest.approx(1.0)
  assert glue_metrics([0, 0, 0], [0, 1, 1], 2)["mcc"] == 0.0  # constant


def test_glue_classification_with_mock_data(tmp_path, tiny_base):
  task = "glue/mrpc"  # two sentences per example; sst2 etc. take one
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from experiments.finetune_lib import run_finetune  # pylint: disable=import-outside-toplevel
  fc = finetune_config.get_config(f"method=lora,rank=2,steps=2,task={task}")
  with fc.unlocked():
    fc.eval_every_steps = 0
  with tfds.testing.mock_data(num_examples=12):
    s = run_finetune(fc, tiny_base, str(tmp_path / "ft"))
  assert s["step"] == 2 and s["task"] == task
  for k in ("accuracy", "f1", "mcc"):
    assert np.isfinite(s[k])
  assert 0 <= s["accuracy"] <= 1
  # The adapter carries the trained head: put back onto the base, it gives
  # the final checkpoint's logits.
  from experiments.sources import load_source  # pylint: disable=import-outside-toplevel
  from structmat.finetune import export  # pylint: disable=import-outside-toplevel
  from structmat.models import LlamaClassifier  # pylint: disable=import-outside-toplevel
  from structmat.train import init_ckpt, loop  # pylint: disable=import-outside-toplevel
  base, _, _, source = load_source(tiny_base)
  cfg = loop.model_config(source, base["embed"]["embedding"].shape[0])
  adapter = str(tmp_path / "ft" / "adapter")
  new_cfg, params, structure = export.load_adapter(adapter, cfg, base)
  model = export.adapter_module(new_cfg, export.read_meta(adapter))
  assert isinstance(model, LlamaClassifier) and model.num_classes == 2
  final, final_structure, _ = init_ckpt.load_init(str(tmp_path / "ft"))
  tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, cfg.vocab_size)
  np.testing.assert_allclose(
      model.apply({"params": params, **structure}, tokens),
      model.apply({"params": final, **final_structure}, tokens),
      rtol=1e-5, atol=1e-6)


def test_embedded_downstream_tasks(data_dir):
  from structmat.data import downstream, sources  # pylint: disable=import-outside-toplevel
  src = 'def f():\n  """Docs here."""\n  x = 1  # a comment\n  return x\n'
  assert downstream.prose_of(src) == "Docs here.\na comment"
  train = sources.open_records("stdlib_topic", "train", data_dir)
  val = sources.open_records("stdlib_topic", "validation", data_dir)
  labels = [int(train[i]["label"]) for i in range(len(train))]
  assert labels.count(0) == labels.count(1) > 50   # balanced
  assert len(val) > 20
  docs = sources.open_split("stdlib_docs", "train", data_dir)
  assert len(docs) > 100 and "import " not in docs[0].split("\n")[0]


def _randomize(tree, regex, seed=3):
  """Trainable leaves random (never zeros): LoRA's B = 0 would hide bugs."""
  import re  # pylint: disable=import-outside-toplevel
  from structmat.train.partition import path_str  # pylint: disable=import-outside-toplevel
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  return jax.tree_util.tree_map_with_path(
      lambda p, l: l + 0.1 * jax.random.normal(next(keys), l.shape)
      if re.fullmatch(regex, path_str(p)) else l, tree)


@pytest.mark.parametrize("method", ["lora", "nola", "monarch", "compacter"])
def test_adapter_files_load_and_merge(method, tmp_path):
  from structmat.finetune import export  # pylint: disable=import-outside-toplevel
  cfg, params = _base()
  # Layer 0's q and v only: NOLA's eager basis generation is slow here.
  fc = finetune_config.get_config(f"method={method},rank=4,num_basis=16,"
                                  r"reduction_factor=8,target=0\.(q|v)")
  prep = prepare(method, cfg, params, {}, fc)
  tuned = _randomize(prep.params, prep.trainable)
  meta = {"trainable": prep.trainable, "overrides": prep.overrides,
          "adapters": prep.adapters, "method": method}
  size = export.save_adapter(str(tmp_path), tuned, prep.structure, meta)
  full = sum(l.nbytes for l in jax.tree.leaves(tuned))
  new_cfg, loaded, structure = export.load_adapter(str(tmp_path), cfg, params)
  want = Llama(new_cfg).apply({"params": tuned, **prep.structure}, TOKENS)
  got = Llama(new_cfg).apply({"params": loaded, **structure}, TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  if method in ("lora", "nola", "compacter"):
    assert size < 0.2 * full, (size, full)   # the adapter is small
  if method == "compacter":
    with pytest.raises(ValueError, match="cannot be merged"):
      export.merge_to_dense(new_cfg, loaded, structure)
    return
  dense_cfg, dense = export.merge_to_dense(new_cfg, loaded, structure)
  assert set(dense["layer_0"]["attn"]["q"]) == {"kernel"}
  merged = Llama(dense_cfg).apply({"params": dense}, TOKENS)
  np.testing.assert_allclose(merged, want, rtol=1e-4, atol=1e-4)


def _peft_roundtrip(hf, cfg, params, fc, directory):
  """LoRA (``fc``) with random factors on ``params``, exported to PEFT and
  loaded onto the transformers model ``hf``: PEFT's logits must be ours.
  Returns (our logits, the PEFT model)."""
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from structmat.finetune import export  # pylint: disable=import-outside-toplevel
  from structmat.models import build_model  # pylint: disable=import-outside-toplevel
  prep = prepare("lora", cfg, params, {}, fc)
  tuned = _randomize(prep.params, prep.trainable)
  new_cfg = export.method_config(cfg, {"overrides": prep.overrides})
  ours = build_model(new_cfg).apply({"params": tuned}, TOKENS)
  export.export_peft_lora(directory, new_cfg, tuned)
  peft_model = peft.PeftModel.from_pretrained(hf, directory).eval()
  with torch.no_grad():
    ref = peft_model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
  assert np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref) < 1e-4
  return ours, peft_model


def test_peft_lora_format_matches_peft(tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  from structmat.finetune import export  # pylint: disable=import-outside-toplevel
  from structmat.models import load_hf  # pylint: disable=import-outside-toplevel
  hf_cfg = transformers.LlamaConfig(
      vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  hf.save_pretrained(tmp_path / "base", safe_serialization=True)
  model, params = load_hf(str(tmp_path / "base"), attention="naive")
  cfg = model.cfg
  fc = finetune_config.get_config("method=lora,rank=4,alpha=8")
  ours, _ = _peft_roundtrip(hf, cfg, params, fc, str(tmp_path / "peft"))
  back_cfg, back = export.import_peft_lora(str(tmp_path / "peft"), cfg, params)
  again = Llama(back_cfg).apply({"params": back}, TOKENS)
  np.testing.assert_allclose(again, ours, rtol=1e-5, atol=1e-5)


def test_gpt2_peft_lora_matches_peft(tmp_path):
  """GPT-2: LoRA on q and v exports as one rank-2r LoRA on the fused c_attn
  (alpha scaled alike), o and fc as themselves; PEFT on the transformers
  GPT-2 then computes our logits, and PEFT GPT-2 adapters import."""
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  from structmat.finetune import export  # pylint: disable=import-outside-toplevel
  from structmat.models import GPT2, load_hf  # pylint: disable=import-outside-toplevel
  hf_cfg = transformers.GPT2Config(vocab_size=16, n_embd=32, n_layer=2,
                                   n_head=4, n_positions=32)
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
  hf.save_pretrained(tmp_path / "base", safe_serialization=True)
  model, params = load_hf(str(tmp_path / "base"), attention="naive")
  fc = finetune_config.get_config(r"method=lora,rank=4,alpha=8,"
                                  r"target=\d\.(q|v|o)|1\.fc")
  ours, peft_model = _peft_roundtrip(hf, model.cfg, params, fc,
                                     str(tmp_path / "peft"))
  c_attn = peft_model.base_model.model.transformer.h[0].attn.c_attn
  assert c_attn.lora_A["default"].weight.shape == (8, 32)   # rank 2 x 4
  # Imported back: q and v (k's third of B is zero, so k gets none).
  back_cfg, back = export.import_peft_lora(str(tmp_path / "peft"), model.cfg,
                                           params)
  assert back_cfg.linear_for("k", 0)[0] == "dense"
  np.testing.assert_allclose(GPT2(back_cfg).apply({"params": back}, TOKENS),
                             ours, rtol=1e-5, atol=1e-5)
  # An adapter PEFT itself made on the fused c_attn and on c_fc (random B,
  # per-module rank and alpha) imports as q/k/v LoRAs sharing A: PEFT's
  # logits.
  conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                         fan_in_fan_out=True, rank_pattern={"c_fc": 2},
                         alpha_pattern={"c_fc": 3.0})
  fresh = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
  made = peft.get_peft_model(fresh.eval(), conf)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in made.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn_like(p) * 0.3)
  made.save_pretrained(tmp_path / "made")
  with torch.no_grad():
    ref = made.eval()(torch.tensor(np.asarray(TOKENS))).logits.numpy()
  got_cfg, got = export.import_peft_lora(str(tmp_path / "made"), model.cfg,
                                         params)
  assert got_cfg.linear_for("fc", 1) == ("lora", {"alpha": 3.0, "rank": 2})
  mine = GPT2(got_cfg).apply({"params": got}, TOKENS)
  assert np.linalg.norm(np.asarray(mine) - ref) / np.linalg.norm(ref) < 1e-4
