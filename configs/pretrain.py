r"""Pretraining config: LLaMA-style decoder with a chosen linear structure.

The main job (the README's run command), on the embedded stdlib corpus:

  python -m experiments.pretrain --config=configs/pretrain.py --workdir=runs/pretrain

Expected on 2 CPU cores: about 6 minutes including the corpus build and the
sentencepiece training (~30 s); llama_small, 600 steps of 32 x 128 tokens,
validation perplexity about 15 against about 254 for a unigram model on the
same tokens (WORKSPACE.md, "Main job").

Variants by name after the colon (comma-separated key=value):

  --config=configs/pretrain.py:model=llama_60m,linear=monarch,data=c4
  --config=configs/pretrain.py:linear=sltrain,rank=64,density=0.05
  --config=configs/pretrain.py:linear=monarch,nblocks=8,overrides=q=dense;k=dense
  --config=configs/pretrain.py:model=gpt2_small,linear=monarch,data=c4   (GPT-2)

Keys: model (preset), linear (registry name), data (stdlib | c4 | lm1b | any
tfds name), optimizer (adamw | galore), galore_rank, svd (full | randomized),
rank / density / alpha / nblocks / n (structure hyper-parameters;
default per preset to the papers' settings), kernel_block (SLTrain: build W
in blocks of that many columns, keeping none of it for the backward),
overrides (per-site structures, ';'-separated site=name[:k=v] items), steps,
tiny (a seconds-long smoke config).
Everything else: --config.field=value, e.g. --config.total_steps=100.
"""
import ml_collections

from structmat.train import sharding

STRUCTURE_KEYS = ("rank", "density", "alpha", "nblocks", "n", "kernel_block")


def _parse(arg: str) -> dict:
  out = {}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r}: use key=value.")
    out[key] = value
  return out


def _number(v: str):
  try:
    return int(v)
  except ValueError:
    return float(v)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = _parse(arg)
  c = ml_collections.ConfigDict()
  c.model = args.pop("model", "llama_small")
  # JSON of LlamaConfig fields that replace the preset's (d_model, d_ff,
  # n_layers, n_heads, rope_theta, rope_scaling, norm_eps); model="custom"
  # takes its sizes from here. A Hugging Face --init writes it.
  c.model_dims = ""
  # "llama" or "gpt2": set by the preset's name (gpt2_small, ...); a Hugging
  # Face GPT-2 --init sets it with model="custom" and model_dims.
  c.family = "gpt2" if c.model.startswith("gpt2") else "llama"
  c.linear = args.pop("linear", "dense")
  c.linear_kwargs = ml_collections.ConfigDict(
      {k: _number(args.pop(k)) for k in STRUCTURE_KEYS if k in args})
  c.overrides = args.pop("overrides", "").replace(";", ",")
  c.trainable = ""                # regex over "a/b/c" param paths; "" = all
  c.frozen_dtype = ""             # "bfloat16": store frozen params in it ("" = float32)
  # Compacter adapters after sublayers ("" none), e.g.
  # "after=attn+mlp;n=4;rank=1;reduction_factor=32" (fine-tuning sets it).
  c.adapters = ""
  c.n_kv_heads = 0                # grouped KV heads (0: as many as query heads)
  c.tie_embeddings = False

  c.data = ml_collections.ConfigDict()
  c.data.name = args.pop("data", "stdlib")
  c.data.train_split = "train"
  c.data.eval_split = "test" if c.data.name == "lm1b" else "validation"
  c.data.data_dir = ""            # default: $STRUCTMAT_DATA_DIR or ~/.cache/structmat/tfds
  c.data.loader = "data_source"   # or "tfds_load" for tfrecord (TensorFlow extra)
  c.data.text_key = "text"
  c.data.host_shards = 0          # data shards (0: one per process)
  c.data.tokenizer = "sentencepiece"  # or "byte", or "hf" (a tokenizer.json)
  c.data.vocab_size = 2048
  c.data.tokenizer_model = ""     # an existing .model (T5 / LLaMA), or tokenizer.json

  c.seq_len = 128
  c.batch_size = 32
  c.total_steps = 600
  c.warmup_steps = 60
  c.lr = 3e-3
  c.min_lr_ratio = 0.1
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
  c.weight_decay = 0.0
  c.optimizer = args.pop("optimizer", "adamw")   # or "galore"
  c.galore = ml_collections.ConfigDict(dict(
      rank=128, update_proj_gap=200, scale=0.25, proj_type="std",
      svd="full", structured="factors"))
  if "galore_rank" in args:
    c.galore.rank = int(args.pop("galore_rank"))
  if "svd" in args:
    c.galore.svd = args.pop("svd")
  c.grad_clip = 1.0
  c.compute_dtype = "float32"     # "bfloat16" on accelerators
  c.impl = "xla"                  # "auto" | "pallas": Monarch/BTT/blockdiag/SLTrain
                                  # kernels (Triton on GPUs, Mosaic on TPUs);
                                  # "pallas:two_pass": that Monarch kernel
  c.attention = "auto"            # cuDNN (GPUs, 16-bit), the Pallas splash kernel
                                  # (TPUs, seq_len >= 512, % 128 == 0), else XLA; or
                                  # "xla" | "cudnn" | "tpu_flash" | "naive"
  c.remat = "none"                # "full" | "dots" | "linears": recompute
                                  # blocks in the backward (models/remat.py)
                                  # when a step's activations outgrow the device
  c.seed = 0

  # Mesh (-1 fills with the remaining devices) and logical-axis rules.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          num_devices=0))  # 0: all devices
  c.logical_rules = [list(r) for r in sharding.DEFAULT_RULES]

  c.log_every_steps = 25
  c.eval_every_steps = 200
  c.eval_batches = 16
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2
  c.densify_at = 0.0              # Monarch reverse sparsification: fraction of steps
  c.stop_after_steps = 0          # testing aid: exit like a crash after this step

  if c.model not in ("llama_tiny", "llama_small", "llama_20m", "gpt2_tiny"):
    # Paper-scale presets: GaLore/SLTrain's recipe (bf16, 256-token sequences).
    c.data.vocab_size = 32000
    c.seq_len = 256
    c.batch_size = 256
    c.compute_dtype = "bfloat16"
    c.total_steps = 10000
    c.warmup_steps = 1000
    c.eval_batches = 64
  if c.family == "gpt2" and c.model != "gpt2_tiny":
    # GPT-2's context and the Monarch paper's GPT-2 learning rate; the same
    # 65,536 tokens per step as the LLaMA recipe.
    c.seq_len, c.batch_size, c.lr, c.weight_decay = 1024, 64, 6e-4, 0.1
  if "steps" in args:
    c.total_steps = int(args.pop("steps"))
    c.warmup_steps = max(1, c.total_steps // 10)
  if args.pop("tiny", "0") == "1":
    c.model = "gpt2_tiny" if c.family == "gpt2" else "llama_tiny"
    c.data.tokenizer = "byte"
    c.seq_len, c.batch_size = 32, 4
    c.total_steps, c.warmup_steps = 8, 2
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 4
    c.eval_batches = 2
  if args:
    raise ValueError(f"unknown config argument(s) {sorted(args)}; known: model, "
                     f"linear, data, optimizer, galore_rank, svd, overrides, "
                     f"steps, tiny, {STRUCTURE_KEYS}.")
  return c
