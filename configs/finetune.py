r"""Fine-tuning config: ``--config=configs/finetune.py:method=lora,rank=8``.

  python -m experiments.finetune --config=configs/finetune.py:method=compacter \
      --init=runs/pretrain --workdir=runs/ft_compacter

Keys: method (full | galore | lora | nola | monarch | welore | compacter |
compacter++ | phm_adapter; galore is full fine-tuning with GaLore's low-rank
optimizer state, projection rank ``rank``), target (regex over "layer.site" names such as "0.q"; default q
and v for lora/nola, every linear otherwise), rank, alpha, num_basis, variant,
nblocks, reduction, n, n_phm, reduction_factor, steps, lr, data, task
(lm | stdlib_topic | glue/sst2 | glue/mrpc | ...), seq_len, batch_size,
compute_dtype, frozen_dtype.
Everything else: --config.field=value. The model, tokenizer and data settings
come from the --init run's config.json (or, for a Hugging Face LLaMA
directory, from its config.json and tokenizer); ``data`` replaces the
dataset, seq_len / batch_size / compute_dtype the shapes and precision.
"""
import ml_collections

from structmat.finetune import METHODS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = dict(kv.split("=", 1) for kv in filter(None, arg.split(",")))
  c = ml_collections.ConfigDict()
  c.method = args.pop("method", "lora")
  if c.method not in METHODS:
    raise ValueError(f"method={c.method!r}; use one of {METHODS}.")
  adapter_like = c.method in ("lora", "nola")
  c.target = args.pop("target", r"\d+\.(q|v)" if adapter_like else r".*")
  c.rank = int(args.pop("rank", 8))
  c.alpha = float(args.pop("alpha", 16.0))
  c.num_basis = int(args.pop("num_basis", 64))
  c.variant = args.pop("variant", "offset")
  c.nblocks = int(args.pop("nblocks", 4))
  c.reduction = float(args.pop("reduction", 0.5))
  c.n = int(args.pop("n", 4))                 # Compacter's PHM n
  c.n_phm = int(args.pop("n_phm", 12))        # phm_adapter's n (paper: 12)
  c.reduction_factor = int(args.pop("reduction_factor", 32))
  c.seed = 0
  # Training (the rest of the loop's fields come from the source run).
  c.total_steps = int(args.pop("steps", 200))
  c.warmup_steps = max(1, c.total_steps // 10)
  # Adapters start at (or near) the base: a higher rate than full tuning.
  # galore: full tuning's rate over GaLore's update scale (0.25).
  c.lr = float(args.pop("lr", {"full": 3e-4, "galore": 1e-3}.get(c.method, 3e-3)))
  c.data = args.pop("data", "")             # "" = the source run's dataset
  # 0 / "": the source run's (a Hugging Face --init starts from the
  # pretraining defaults: 128 tokens, batch 32, float32).
  c.seq_len = int(args.pop("seq_len", 0))
  c.batch_size = int(args.pop("batch_size", 0))
  c.compute_dtype = args.pop("compute_dtype", "")
  # "bfloat16" stores the frozen base in bf16 (half its memory; adapters and
  # their optimizer state stay float32). "" keeps float32.
  c.frozen_dtype = args.pop("frozen_dtype", "")
  # "lm" (causal LM on data) or a classification task: glue/sst2, glue/mrpc,
  # ..., or the embedded stdlib_topic (see structmat.finetune.classify).
  c.task = args.pop("task", "lm")
  c.max_train_examples = 0                  # 0: the whole split
  # Also write WORKDIR/merged: the fine-tuned model as a plain dense init
  # directory (PEFT's merge_and_unload; not for Compacter adapters), and for
  # task=lm WORKDIR/merged_hf, a Hugging Face LLaMA directory.
  c.export_merged = False
  c.max_eval_examples = 0
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.log_every_steps = 20
  if args:
    raise ValueError(f"unknown config keys {sorted(args)}; use method, target, "
                     "rank, alpha, num_basis, variant, nblocks, reduction, n, "
                     "n_phm, reduction_factor, steps, lr, data, task, seq_len, "
                     "batch_size, compute_dtype, frozen_dtype.")
  return c
