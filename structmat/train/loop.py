"""The standard train loop: data -> model -> AdamW -> eval -> checkpoints.

Resume order: the workdir's latest checkpoint, else scratch. The data position
and RNG live in the checkpoint, so a run killed at any moment and restarted
reproduces the uninterrupted run's losses.
"""
import functools
import json
import math
import os
import resource

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from structmat import data as sm_data
from structmat.data import hosts
from structmat.data.tokenizers import cached_path
from structmat.data.pipeline import unigram_log_perplexity
from structmat.kernels import shards
from structmat.models import build_model, llama_config
from structmat.models.family import FAMILIES, gpt2_config
from structmat.models.llama import parse_adapters, parse_value
from structmat.models.presets import DIM_FIELDS, GPT2_SIZES, gpt2_dims
from structmat.optim import make_optimizer
from structmat.train import densify, init_ckpt, sharding, steps
from structmat.train.partition import partition
from structmat.train.checkpoint import Checkpointer
from structmat.train.metrics import MetricWriter, Progress
from structmat.train.params import count_params, param_rows, param_table
from structmat.train.state import create_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATASETS = {"c4": "c4/en", "lm1b": "lm1b", "stdlib": "stdlib"}


class NonFiniteLoss(RuntimeError):
  pass


def validate_config(config) -> None:
  """Raise ValueError naming the config field and the fix."""
  def need(cond, msg):
    if not cond:
      raise ValueError(f"config.{msg}")
  need(config.total_steps > 0, f"total_steps={config.total_steps} must be > 0.")
  need(config.batch_size > 0, f"batch_size={config.batch_size} must be > 0.")
  need(config.seq_len > 1, f"seq_len={config.seq_len} must be > 1.")
  need(config.lr > 0, f"lr={config.lr} must be > 0.")
  need(0 <= config.warmup_steps <= config.total_steps,
       f"warmup_steps={config.warmup_steps} must be in [0, total_steps].")
  need(config.compute_dtype in DTYPES,
       f"compute_dtype={config.compute_dtype!r}; use one of {list(DTYPES)}.")
  need(0.0 <= config.densify_at < 1.0,
       f"densify_at={config.densify_at} must be in [0, 1) (0 disables).")
  need(config.eval_every_steps >= 0 and config.checkpoint_every_steps >= 0,
       "eval_every_steps / checkpoint_every_steps must be >= 0.")


def frozen_dtype(config):
  """config.frozen_dtype as a dtype; None ("") keeps the parameters' own."""
  name = config.get("frozen_dtype", "")
  if not name:
    return None
  if name not in DTYPES:
    raise ValueError(f"config.frozen_dtype={name!r}; use one of "
                     f"{sorted(DTYPES)} or '' (the parameters' own).")
  return DTYPES[name]


def model_config(config, vocab_size: int):
  """The model config (LlamaConfig or GPT2Config, by config.family)."""
  overrides = tuple((site, name, tuple(sorted(dict(kw).items())))
                    for site, name, kw in _parse_overrides(config.overrides))
  family = config.get("family", "llama")
  if family not in FAMILIES:
    raise ValueError(f"config.family={family!r}; use one of {FAMILIES}.")
  if family == "gpt2":
    return _gpt2_model_config(config, vocab_size, overrides)
  return llama_config(config.model, config.linear, vocab_size=vocab_size,
                      max_len=config.seq_len, **model_dims(config),
                      dtype=DTYPES[config.compute_dtype],
                      n_kv_heads=config.n_kv_heads or None,
                      tie_embeddings=config.tie_embeddings,
                      impl=config.get("impl", "xla"),
                      attention=config.get("attention", "auto"),
                      remat=config.get("remat", "none"),
                      adapters=parse_adapters(config.get("adapters", "")),
                      overrides=overrides, **dict(config.linear_kwargs))


def _gpt2_model_config(config, vocab_size: int, overrides):
  """GPT2Config: a GPT2_SIZES preset (1024 positions, or seq_len if longer)
  updated by config.model_dims, or model="custom" with every size there."""
  if config.model != "custom" and config.model not in GPT2_SIZES:
    raise ValueError(f"config.model={config.model!r} with family='gpt2'; use "
                     f"one of {sorted(GPT2_SIZES)} or 'custom' (sizes in "
                     "config.model_dims).")
  if config.get("adapters", ""):
    raise ValueError("config.adapters (Compacter) exist for LLaMA models "
                     "only; GPT-2 takes structures and LoRA/NOLA linears.")
  dims = gpt2_dims(config.model, config.seq_len) if (
      config.model in GPT2_SIZES) else {}
  dims.update(json.loads(config.model_dims or "{}"))
  if config.seq_len > dims.get("max_len", config.seq_len):
    raise ValueError(f"config.seq_len={config.seq_len} exceeds the GPT-2 "
                     f"position table ({dims['max_len']}); lower seq_len.")
  return gpt2_config(vocab_size, config.linear, dims, config.model,
                     dict(config.linear_kwargs),
                     dtype=DTYPES[config.compute_dtype],
                     impl=config.get("impl", "xla"),
                     attention=config.get("attention", "auto"),
                     remat=config.get("remat", "none"), overrides=overrides)


MODEL_DIMS = DIM_FIELDS + ("rope_theta", "rope_scaling", "norm_eps")


def model_dims(config) -> dict:
  """config.model_dims (JSON) as LlamaConfig fields; {} when empty."""
  spec = config.get("model_dims", "")
  if not spec:
    return {}
  try:
    dims = json.loads(spec)
  except json.JSONDecodeError as e:
    raise ValueError(f"config.model_dims={spec!r} is not JSON ({e}); write "
                     'e.g. \'{"d_model": 512, "n_layers": 8}\'.') from None
  if not isinstance(dims, dict):
    raise ValueError(f"config.model_dims={spec!r}: write a JSON object.")
  unknown = sorted(set(dims) - set(MODEL_DIMS))
  if unknown:
    raise ValueError(f"config.model_dims: unknown field(s) {unknown}; use "
                     f"{MODEL_DIMS}.")
  if "rope_scaling" in dims:  # JSON lists -> the config's hashable pairs
    dims["rope_scaling"] = tuple(sorted((k, v) for k, v in (
        dims["rope_scaling"].items() if isinstance(dims["rope_scaling"], dict)
        else dims["rope_scaling"])))
  return dims


def _parse_overrides(spec: str):
  """"q=dense,k=dense,up=lowrank:rank=64" -> [(site, name, kwargs)]."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    site, _, rest = item.partition("=")
    name, *kv = rest.split(":")
    kwargs = {}
    for pair in kv:
      k, _, v = pair.partition("=")
      kwargs[k] = parse_value(v)
    if not name:
      raise ValueError(f"config.overrides item {item!r}: use site=structure.")
    out.append((site, name, kwargs))
  return out


def _tokenizer_cache(config):
  """(cache directory, cache key) of the sentencepiece model a config trains."""
  dc = config.data
  cache = os.path.join(dc.data_dir or sm_data.sources.default_data_dir(),
                       "tokenizers")
  return cache, f"{DATASETS.get(dc.name, dc.name)}/{dc.train_split}"


def build_tokenizer(config):
  """The config's tokenizer, opening no data when it is a file (byte,
  tokenizer.model, tokenizer.json) or already trained and cached; otherwise
  ``build_data``'s (which trains it on the training split)."""
  dc = config.data
  cache, key = _tokenizer_cache(config)
  if (dc.tokenizer != "sentencepiece" or dc.tokenizer_model
      or os.path.exists(cached_path(dc.vocab_size, cache, key))):
    return sm_data.make_tokenizer(dc.tokenizer, dc.vocab_size,
                                  dc.tokenizer_model, None, cache, key)
  return build_data(config)[0]


def build_data(config):
  """(tokenizer, train sources, eval sources): this process's data shards."""
  dc = config.data
  name = DATASETS.get(dc.name, dc.name)
  data_dir = dc.data_dir or None
  index, count = jax.process_index(), jax.process_count()
  shards = hosts.my_shards(dc.get("host_shards", 0))
  n_shards = (dc.get("host_shards", 0) or count)
  if count > 1 and index != 0:  # process 0 builds the embedded corpus first
    multihost_utils.sync_global_devices("structmat_corpus")
  open_ = lambda split, i, n: sm_data.open_split(
      name, split, data_dir, i, n, dc.loader, dc.text_key)
  full_train = open_(dc.train_split, 0, 1)
  if count > 1 and index == 0:
    multihost_utils.sync_global_devices("structmat_corpus")
  train_src = [open_(dc.train_split, i, n_shards) for i in shards]
  eval_src = [open_(dc.eval_split, i, n_shards) for i in shards]
  cache, key = _tokenizer_cache(config)
  make = lambda: sm_data.make_tokenizer(
      dc.tokenizer, dc.vocab_size, dc.tokenizer_model, full_train, cache, key)
  if count > 1:
    # One tokenizer for every host: process 0 trains it (once, cached on the
    # shared data_dir); the others load the file after the barrier.
    if index == 0:
      make()
    multihost_utils.sync_global_devices("structmat_tokenizer")
  tok = make()
  return tok, train_src, eval_src


def peak_memory_bytes() -> int:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host RSS


def _densify_step(config) -> int:
  if config.linear != "monarch" and "monarch" not in config.overrides:
    return 0
  return int(config.densify_at * config.total_steps) if config.densify_at else 0


def state_factory(config, tx):
  """(example tokens (1, seq_len), ``create_state`` bound to ``config`` and
  ``tx``: model -> TrainState), what ``Placement`` builds states with."""
  example = jnp.ones((1, config.seq_len), jnp.int32)
  return example, functools.partial(create_state, tx=tx, seed=config.seed,
                                    example_tokens=example,
                                    trainable=config.trainable,
                                    frozen_dtype=frozen_dtype(config))


class Placement:
  """Mesh, logical rules and the shardings of states and batches, over
  ``devices`` (default: all of this job's)."""

  def __init__(self, config, new_state, example, devices=None):
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                       for k, v in config.logical_rules)
    self.batch = sharding.batch_sharding(self.mesh, self.rules)
    self.replicated = NamedSharding(self.mesh, P())
    self.new_state, self.example, self.trainable = (new_state, example,
                                                    config.trainable)
    rows = config.batch_size // jax.process_count()
    shards = self.batch.mesh.shape["data"] * self.batch.mesh.shape["fsdp"]
    if config.batch_size % jax.process_count() or config.batch_size % shards:
      raise ValueError(f"config.batch_size={config.batch_size} must be "
                       f"divisible by the process count "
                       f"({jax.process_count()}) and by data x fsdp ({shards}).")
    self.local_batch = rows
    self.batch_shape = (config.batch_size, config.seq_len + 1)

  def state_shardings(self, model):
    """TrainState of NamedShardings, derived abstractly (nothing allocated)."""
    # The key made inside: nothing runs (the default device may be a
    # topology's, described without hardware: preflight.compile_step).
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                              self.example))
    full = sharding.logical_shardings(dict(boxed), self.mesh, self.rules)
    abstract = jax.eval_shape(lambda: self.new_state(model))
    train_sh, frozen_sh = partition(full["params"], self.trainable)
    return abstract.replace(
        step=self.replicated, params=train_sh, frozen=frozen_sh,
        opt_state=sharding.follow_params(abstract.opt_state, train_sh,
                                         abstract.params, self.mesh),
        structure={k: v for k, v in full.items() if k != "params"},
        rng=self.replicated)

  def init(self, model, params=None):
    """Initialize directly into the shardings (no host holds the full model)."""
    sh = self.state_shardings(model)
    if params is None:
      return jax.jit(lambda: self.new_state(model), out_shardings=sh)()
    return jax.jit(lambda p: self.new_state(model, params=p),
                   out_shardings=sh)(params)

  def abstract(self, model):
    """ShapeDtypeStructs with shardings: a restore target."""
    sh = self.state_shardings(model)
    shapes = jax.eval_shape(lambda: self.new_state(model))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                          sharding=s),
                        shapes, sh)

  def _jit_steps(self, model, tx, pad_id):
    sh = self.state_shardings(model)
    train = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                      pad_id=pad_id), donate_argnums=0,
                    in_shardings=(sh, self.batch),
                    out_shardings=(sh, self.replicated))
    evaluate = jax.jit(functools.partial(steps.eval_step, model=model,
                                         pad_id=pad_id),
                       in_shardings=(sh, self.batch),
                       out_shardings=self.replicated)
    return train, evaluate

  def compile(self, model, tx, pad_id):
    """(train step, eval step), jitted for the mesh."""
    return tuple(map(self.on_mesh, self._jit_steps(model, tx, pad_id)))

  def lower_train(self, model, tx, pad_id: int = -1):
    """The train step ``compile`` gives, lowered for the mesh on an abstract
    state and global batch (nothing allocated): what a run would compile."""
    train, _ = self._jit_steps(model, tx, pad_id)
    # The state outside ``over``: its init traces the model on one example
    # row, which is no token shard.
    state = self.abstract(model)
    batch = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32,
                                 sharding=self.batch)
    with shards.over(self.mesh, self.batch.spec[0]):
      return train.lower(state, batch)

  def on_mesh(self, jitted):
    """``jitted``, traced with Pallas kernels run per token shard
    (``kernels.shards``: XLA would gather every kernel's operands onto
    each device)."""
    axes = self.batch.spec[0]

    @functools.wraps(jitted)
    def call(*args):
      with shards.over(self.mesh, axes):
        return jitted(*args)
    return call

  def put_batch(self, local):
    return sharding.global_batch(local, self.batch)


def evaluate_loss(eval_fn, state, batches) -> float:
  total, count = 0.0, 0.0
  for b in batches:
    t, c = eval_fn(state, b)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def config_vocab(config) -> int:
  """The vocabulary size a run of ``config`` will have, without building its
  tokenizer (the byte tokenizer's is fixed)."""
  return config.data.vocab_size if config.data.tokenizer != "byte" else 259


def dry_run(config) -> int:
  """Build the model abstractly, print the parameter table, return the total."""
  validate_config(config)
  cfg = model_config(config, config_vocab(config))
  shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                          jnp.ones((1, config.seq_len), jnp.int32))
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  params = nn.unbox(shapes["params"])
  print(param_table(params))
  return count_params(params)


def apply_init_meta(config, meta: dict):
  """A copy of config with an init checkpoint's overrides and trainable set."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    items = [f"{site}={name}" + "".join(f":{k}={v}" for k, v in kwargs)
             for site, name, kwargs in meta.get("overrides", [])]
    config.overrides = ",".join(filter(None, [config.overrides] + items))
    if meta.get("trainable") and not config.trainable:
      config.trainable = meta["trainable"]
    if meta.get("adapters"):
      config.adapters = meta["adapters"]
  return config


def train_and_evaluate(config, workdir: str, init: str = "") -> dict:
  """Train per ``config``; returns the final summary (also summary.json).

  Resume order: the workdir's latest checkpoint, else ``init`` (an init
  directory from experiments.compress or another run's workdir: parameters
  only, fresh optimizer, step 0), else scratch.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  init_params = init_structure = None
  if init:
    init_params, init_structure, meta = init_ckpt.load_init(init)
    config = apply_init_meta(config, meta)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  tok, train_src, eval_src = build_data(config)
  cfg = model_config(config, tok.vocab_size)
  tx = make_optimizer(config)
  ckpt = Checkpointer(workdir, config.checkpoint_every_steps,
                      config.keep_checkpoints)
  densify_step = _densify_step(config)
  model = build_model(cfg)
  example, new_state = state_factory(config, tx)
  place = Placement(config, new_state, example)
  data_state = None
  start = ckpt.latest_step()
  if start is not None:
    # A checkpoint at densify_step itself was saved before the switch.
    if densify_step and start > densify_step:
      cfg = densify.densified_config(cfg)
      model = build_model(cfg)
    state, data_states = ckpt.restore(start, place.abstract(model))
    data_state = data_states["processes"][jax.process_index()]
    logging.info("Resumed from step %d in %s", start, workdir)
    print(f"resumed from step {start}", flush=True)
  elif init_params is not None:
    abstract = jax.eval_shape(lambda: new_state(model).all_params())
    init_ckpt.check_compatible(abstract, init_params)
    state = place.init(model, init_params)
    if init_structure:
      state = state.replace(structure=jax.device_put(
          init_structure, place.state_shardings(model).structure))
    print(f"initialized from {init}", flush=True)
  else:
    state = place.init(model)
  batches = hosts.HostBatches(train_src, tok, place.local_batch,
                              config.seq_len, config.seed, data_state)
  rows = place.local_batch // len(eval_src)
  eval_parts = [sm_data.eval_batches(src, tok, rows, config.seq_len,
                                     config.eval_batches, exact=True)
                for src in eval_src]
  eval_local = [np.concatenate(parts) for parts in zip(*eval_parts)]
  eval_list = [place.put_batch(b) for b in eval_local]
  train_fn, eval_fn = place.compile(model, tx, tok.pad_id)
  writer = MetricWriter(workdir)
  step = int(state.step)
  print(param_table(state.all_params()), flush=True)
  n_train, n_all = count_params(state.params), count_params(state.all_params())
  print(f"trainable parameters: {n_train} ({100 * n_train / n_all:.2f}%)",
        flush=True)
  progress = Progress(config.total_steps, step,
                      config.batch_size * config.seq_len)
  prev = None  # (step, metrics) of the previous step: checked one step late
  eval_loss = float("nan")
  first = step < config.total_steps
  if first:
    print("compiling the train step (the first step includes it)",
          flush=True)
  try:
    while step < config.total_steps:
      if densify_step and step == densify_step:
        cfg, model, state = _densify(cfg, tx, state, config.trainable)
        state = jax.device_put(state, place.state_shardings(model))
        train_fn, eval_fn = place.compile(model, tx, tok.pad_id)
        print(f"step {step}: Monarch layers switched to dense", flush=True)
      state, metrics = train_fn(state, place.put_batch(next(batches)))
      step += 1
      if first:  # tokens/s and the ETA leave the compile out from here
        jax.block_until_ready(metrics)
        print(f"step {step}: first step {progress.first_step_done(step):.1f} s "
              "(train step compiled)", flush=True)
        first = False
      if prev is not None:
        _check_finite(*prev)
      prev = (step, metrics)
      if step % config.log_every_steps == 0 or step == config.total_steps:
        _check_finite(*prev)
        m = jax.device_get(metrics)
        m["lr"] = float(make_lr(config)(step - 1))
        m["tokens_per_sec"] = progress.tokens_per_sec(step)
        writer.write(step, m)
        print(progress.line(step, float(m["train_loss"])), flush=True)
      if (config.eval_every_steps and step % config.eval_every_steps == 0
          ) or step == config.total_steps:
        eval_loss = evaluate_loss(eval_fn, state, eval_list)
        writer.write(step, {"eval_loss": eval_loss,
                            "eval_perplexity": math.exp(min(eval_loss, 50))})
        print(f"step {step}: eval loss {eval_loss:.4f} perplexity "
              f"{math.exp(min(eval_loss, 50)):.2f}", flush=True)
      if ckpt.due(step) or step == config.total_steps:
        _check_finite(*prev)  # never checkpoint a non-finite state
        ckpt.save(step, state,
                  {"processes": hosts.gather_states(batches.state())})
      if config.stop_after_steps and step >= config.stop_after_steps:
        logging.warning("stop_after_steps=%d: stopping as if killed.", step)
        ckpt.manager.wait_until_finished()
        os._exit(3)  # pylint: disable=protected-access
  except NonFiniteLoss as e:
    print(str(e), flush=True)
    ckpt.close()
    writer.close()
    raise
  ckpt.close()
  if math.isnan(eval_loss):  # resumed at total_steps: evaluate the final state
    eval_loss = evaluate_loss(eval_fn, state, eval_list)
  summary = _summary(config, workdir, state, step, progress, eval_loss,
                     train_src, tok, eval_local)
  writer.close()
  return summary


def make_lr(config):
  from structmat.optim import make_schedule  # pylint: disable=import-outside-toplevel
  return make_schedule(config.lr, config.total_steps, config.warmup_steps,
                       config.min_lr_ratio)


def _check_finite(step, metrics):
  """Raise unless the step's loss and its updated parameters are finite."""
  loss = float(metrics["train_loss"])
  if not (np.isfinite(loss) and np.isfinite(float(metrics["param_norm"]))):
    raise NonFiniteLoss(
        f"non-finite train loss ({loss}) or parameters at step {step}; "
        "stopping. The last good checkpoint is kept (checkpoints are written "
        "only after their step passed this check). Lower config.lr or enable "
        "config.grad_clip.")


def _densify(cfg, tx, state, trainable: str = ""):
  new_cfg = densify.densified_config(cfg)
  params, frozen = partition(densify.densify_params(cfg, state.all_params()),
                             trainable)
  opt_state = densify.carry_opt_state(tx.init(params), state.opt_state)
  return new_cfg, build_model(new_cfg), state.replace(
      params=params, frozen=frozen, opt_state=opt_state)


def _summary(config, workdir, state, step, progress, eval_loss, train_src,
             tok, eval_list):
  sample = sm_data.PackedBatches(train_src[0], tok, config.batch_size,
                                 config.seq_len, seed=config.seed + 1)
  unigram = unigram_log_perplexity((next(sample) for _ in range(100)),
                                   eval_list, tok.vocab_size, tok.pad_id)
  summary = {
      "step": step,
      "parameters": count_params(state.all_params()),
      "trainable_parameters": count_params(state.params),
      "optimizer_state_bytes": sum(
          l.nbytes for l in jax.tree.leaves(state.opt_state)),
      "parameters_by_kind": param_rows(state.all_params()),
      "tokens_seen": step * config.batch_size * config.seq_len,
      "eval_loss": eval_loss,
      "eval_perplexity": math.exp(min(eval_loss, 50)),
      "unigram_perplexity": math.exp(unigram),
      # Over the steps after the first, which compiled the train step and
      # is timed alone in first_step_s.
      "tokens_per_sec_this_run": progress.tokens_per_sec(step),
      "first_step_s": progress.first_s,
      "peak_memory_bytes": peak_memory_bytes(),
      "backend": jax.default_backend(),
  }
  print("\n== summary ==")
  for k, v in summary.items():
    if k != "parameters_by_kind":
      print(f"{k}: {v:,.4g}" if isinstance(v, float) else f"{k}: {v}")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary
