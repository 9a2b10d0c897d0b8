r"""Per-device memory estimate of a pretraining config: parameters, gradients,
optimizer state, activations; optionally next to XLA's measurement on CPU.

  python -m experiments.memory_estimate --config=configs/pretrain.py:model=llama_1b \
      --config.mesh.data=1 --config.mesh.fsdp=8 --devices=8
  python -m experiments.memory_estimate --config=configs/pretrain.py --measure

Shards are computed from the config's mesh and logical rules by arithmetic (no
devices needed): a dimension is split when the rules map it to mesh axes whose
size divides it. Activations follow Korthikanti et al. (2022): a layer
without recomputation keeps 34*s*b*h + 5*a*s^2*b bytes at 2 bytes per value
(scaled to the compute dtype; call it A). Where config.attention resolves to
a fused kernel on --platform (cuDNN on GPUs, the splash kernel on TPUs from
512 tokens: ``models.llama.attention_impl``) no s^2 scores are kept: the
term becomes the kernel's float32 row statistics, a*s*b*4 bytes (cuDNN) or
128 lanes wide, a*s*b*512 (the TPU kernel, as libtpu's buffer reports show).
Structured layers add what they keep beyond dense ones, from the traced
model's residuals (``structure_bytes``: XLA's Monarch keeps its stage-1
intermediate; the kernels keep nothing more).
config.remat sets what each of the L layers keeps (``models.remat``): A
("none"), its input s*b*h ("full"), or its input and the outputs the
policy keeps, counted in the abstractly traced model: matmuls without
batch dimensions ("dots"), linear layers of any structure ("linears").
The backward then holds one layer's activation gradients (about A again)
and, under remat, the layer it recomputes (A). The logits and their
gradient add 2*b*s*vocab values in the compute dtype (the loss keeps no
float32 copy: ``structmat.train.cross_entropy``). So activations = L*kept
+ A (2A under remat) + logits. Against libtpu's plans for v5e chips
(WORKSPACE) that is 0.95-1.06x without remat, with it under data
parallelism, and with "linears" under fsdp, but only 0.5-0.85x for fsdp
with "full" or "dots": XLA then keeps gathered weights (1B dense, fsdp 16,
"full": 5.85 GiB planned, 3.0 estimated), which this leaves out; read it
as a lower bound there.
--measure compiles one train step on this machine (all of it on one device)
and prints XLA's memory analysis for comparison.
"""
import dataclasses
import functools
import math

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from structmat.layers.base import LINEAR_OUT
from structmat.models import build_model
from structmat.models.llama import attention_impl
from structmat.optim import make_optimizer
from structmat.train import sharding, steps
from structmat.train.loop import config_vocab, model_config
from structmat.train.partition import partition
from structmat.train.state import create_state
from structmat.utils.timing import format_table

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py",
                                          "Pretraining config.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices the mesh spans.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary (0: the config's).")
_PLATFORM = flags.DEFINE_enum(
    "platform", "", ["", "cpu", "gpu", "tpu"], "The platform the step runs "
    "on, for what config.attention='auto' takes there (fused kernels keep no "
    "seq_len^2 scores); default: this host's.")
_MEASURE = flags.DEFINE_bool("measure", False, "Also compile a step here and "
                             "print XLA's memory analysis.")

GB = 2**30


def _shard_bytes(shape, dtype, names, mesh, rules) -> float:
  """Bytes of one device's shard, split as the train loop places it
  (``sharding.fit_spec``: fsdp splits that do not divide move)."""
  size = math.prod(shape) * jnp.dtype(dtype).itemsize
  if names is None:
    return size
  spec = sharding.fit_spec(nn.logical_to_mesh_axes(names, rules), shape, mesh)
  for axes in spec:
    if axes is not None:
      axes = (axes,) if isinstance(axes, str) else axes
      size /= math.prod(mesh.shape[a] for a in axes)
  return size


def attention_bytes(cfg, b: float, s: int, platform: str) -> tuple:
  """(impl, bytes a layer) of attention's scores-sized activations: the
  paper's 5*a*s^2*b (at 2 bytes a value) for XLA, the row statistics for a
  fused kernel."""
  a = cfg.n_heads
  impl = attention_impl(cfg.attention, cfg.dtype, cfg.head_dim,
                        max(1, int(b)), s, platform=platform)
  itemsize = jnp.dtype(cfg.dtype).itemsize
  per_row = {"cudnn": 4, "tpu_flash": 128 * 4}
  if impl in per_row:
    return impl, a * s * b * per_row[impl]
  return impl, 5 * a * s * s * b * itemsize / 2


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for j in (v if isinstance(v, (tuple, list)) else (v,)):
      j = getattr(j, "jaxpr", j)
      if hasattr(j, "eqns"):
        yield j


def _kept(eqn, remat: str) -> bool:
  """Whether ``remat``'s policy keeps the output of ``eqn``: for "dots" a
  matmul without batch dimensions (``dots_with_no_batch_dims_saveable``),
  for "linears" a layer output named ``LINEAR_OUT``."""
  if remat == "dots":
    return (eqn.primitive.name == "dot_general"
            and not eqn.params["dimension_numbers"][1][0])
  return eqn.primitive.name == "name" and eqn.params["name"] == LINEAR_OUT


def _kept_bytes(jaxpr, remat: str) -> int:
  """Bytes of the outputs in ``jaxpr`` that ``remat`` keeps. Custom-VJP
  calls (the Pallas kernels) run whole, so they are not entered."""
  total = 0
  for eqn in jaxpr.eqns:
    if _kept(eqn, remat):
      aval = eqn.outvars[0].aval
      total += math.prod(aval.shape) * aval.dtype.itemsize
    elif not eqn.primitive.name.startswith("custom_vjp"):
      total += sum(_kept_bytes(j, remat) for j in _sub_jaxprs(eqn))
  return total


def _abstract(cfg, batch: int, seq_len: int):
  """(model, abstract variables, abstract tokens) of ``cfg``."""
  model = build_model(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  return model, jax.eval_shape(model.init, jax.random.key(0), tokens), tokens


def saved_bytes(cfg, batch: int, seq_len: int) -> float:
  """Bytes a block keeps under ``cfg.remat`` "dots" or "linears" beyond
  its input, from the traced model (abstractly), averaged over the blocks:
  the outputs of its matmuls without batch dimensions (dense projections;
  Monarch's block products are batched and recomputed), or of its linear
  layers, whatever their structure."""
  model, params, tokens = _abstract(cfg, batch, seq_len)
  jaxpr = jax.make_jaxpr(model.apply)(params, tokens).jaxpr
  # The rematerialized blocks: the eqns that carry a checkpoint policy.
  blocks = [e for e in jaxpr.eqns if "policy" in e.params]
  if not blocks:
    raise ValueError(f"remat={cfg.remat!r} but the traced model has no "
                     "rematerialized blocks; check models.remat.")
  return sum(_kept_bytes(j, cfg.remat) for e in blocks
             for j in _sub_jaxprs(e)) / len(blocks)


def _residual_bytes(cfg, batch: int, seq_len: int) -> int:
  """Bytes of what the model's VJP keeps for its backward, as traced
  (abstractly; before XLA fuses anything)."""
  model, params, tokens = _abstract(cfg, batch, seq_len)

  def residuals(p, t):
    return jax.tree.leaves(jax.vjp(lambda p: model.apply(p, t), p)[1])
  return sum(math.prod(r.shape) * r.dtype.itemsize
             for r in jax.eval_shape(residuals, params, tokens))


def structure_bytes(cfg, batch: float, seq_len: int) -> float:
  """Bytes a layer's linear structures keep for the backward beyond dense
  layers of the same shapes (which Korthikanti's A counts): XLA's Monarch
  product keeps its stage-1 intermediate, which the kernels recompute,
  say. The traced residuals' growth from one sequence to two (what the
  weights' casts add does not grow), structure minus dense, times
  ``batch``, averaged over the layers; without remat."""
  plain = dataclasses.replace(cfg, remat="none")
  return _extra_per_sequence(plain, seq_len) * batch / cfg.n_layers


@functools.lru_cache(maxsize=64)
def _extra_per_sequence(cfg, seq_len: int) -> int:
  dense = dataclasses.replace(cfg, linear="dense", linear_kwargs=(),
                              overrides=())
  if dense == cfg:
    return 0
  grow = lambda c: (_residual_bytes(c, 2, seq_len)
                    - _residual_bytes(c, 1, seq_len))
  return grow(cfg) - grow(dense)


def estimate(config, devices: int, vocab: int, platform: str = "") -> dict:
  mesh_sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(
      {k: config.mesh[k] for k in sharding.MESH_AXES}, devices)))
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                for k, v in config.logical_rules)
  cfg = model_config(config, vocab)
  example = jnp.ones((1, config.seq_len), jnp.int32)
  boxed = jax.eval_shape(build_model(cfg).init, jax.random.key(0), example)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes.values()),
                                   tuple(mesh_sizes))
  param_bytes = sum(_shard_bytes(l.value.shape, l.value.dtype, l.names,
                                 mesh, rules) for l in leaves)
  n_params = sum(math.prod(l.value.shape) for l in leaves)
  tx = make_optimizer(config)
  abstract = jax.eval_shape(lambda: create_state(build_model(cfg), tx, 0, example,
                                                 config.trainable))
  trainable = sum(math.prod(l.shape) for l in jax.tree.leaves(abstract.params))
  opt_elems = sum(math.prod(l.shape) for l in jax.tree.leaves(abstract.opt_state))
  # Optimizer state and gradients shard like the parameters they belong to.
  shard_ratio = param_bytes / (n_params * 4)
  opt_bytes = opt_elems * 4 * shard_ratio
  grad_bytes = trainable * 4 * shard_ratio
  data_par = mesh_sizes["data"] * mesh_sizes["fsdp"]
  b = config.batch_size / data_par
  s, h, L = config.seq_len, cfg.d_model, cfg.n_layers
  itemsize = jnp.dtype(cfg.dtype).itemsize
  impl, scores = attention_bytes(cfg, b, s, platform or jax.default_backend())
  tensor = mesh_sizes["tensor"]
  act_layer = (34 * s * b * h * itemsize / 2 + scores
               + structure_bytes(cfg, b, s)) / tensor
  remat = config.get("remat", "none")
  kept = act_layer    # a layer's, and under remat its input and what the
  if remat != "none":  # policy keeps ("dots", "linears")
    kept = s * b * h * itemsize + (
        0 if remat == "full" else saved_bytes(cfg, max(1, round(b)), s) / tensor)
  # The backward of a block holds the gradients of its activations (about
  # as large again) and, under remat, the activations it recomputes.
  working = act_layer * (1 if remat == "none" else 2)
  # The logits and their gradient, in the compute dtype (the loss keeps no
  # float32 copy: ``structmat.train.cross_entropy``).
  logits = 2 * b * s * cfg.vocab_size * itemsize / tensor
  act = L * kept + working + logits
  return {"model": config.model, "linear": config.linear,
          "optimizer": config.get("optimizer", "adamw"), "attention": impl,
          "remat": remat,
          "mesh": "x".join(str(mesh_sizes[k]) for k in sharding.MESH_AXES),
          "params": n_params, "params_GB": param_bytes / GB,
          "grads_GB": grad_bytes / GB, "opt_state_GB": opt_bytes / GB,
          "activations_GB": act / GB,
          "total_GB": (param_bytes + grad_bytes + opt_bytes + act) / GB}


def measure(config, vocab: int) -> dict:
  cfg = model_config(config, vocab)
  model, tx = build_model(cfg), make_optimizer(config)
  example = jnp.ones((1, config.seq_len), jnp.int32)
  state = jax.eval_shape(lambda: create_state(model, tx, 0, example,
                                              config.trainable))
  batch = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   pad_id=0), donate_argnums=0)
  m = step.lower(state, batch).compile().memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes
           + m.temp_size_in_bytes - m.alias_size_in_bytes)
  return {"xla_arguments_GB": m.argument_size_in_bytes / GB,
          "xla_temporaries_GB": m.temp_size_in_bytes / GB,
          "xla_total_GB": total / GB}


def main(argv):
  del argv
  config = _CONFIG.value
  vocab = _VOCAB.value or config_vocab(config)
  row = estimate(config, _DEVICES.value, vocab, _PLATFORM.value)
  if _MEASURE.value:
    row.update(measure(config, vocab))
  print(format_table([row], list(row)))


if __name__ == "__main__":
  app.run(main)
