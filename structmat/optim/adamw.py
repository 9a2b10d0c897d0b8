"""The optimizer factory: AdamW or GaLore-AdamW, warmup + cosine, clipping."""
import jax
import optax

from structmat.optim import galore

OPTIMIZERS = ("adamw", "galore")


def make_schedule(lr: float, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.1):
  """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
  warmup_steps = max(1, min(warmup_steps, total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=lr * min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices and structured factors (ndim >= 2) only."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """The optimizer a config names (``config.optimizer``, default "adamw").

  Fields: lr, total_steps, warmup_steps, min_lr_ratio, b1, b2, eps,
  weight_decay, grad_clip (0 disables clipping); for "galore" also
  config.galore.{rank, update_proj_gap, scale, proj_type, svd, structured}.
  """
  schedule = make_schedule(config.lr, config.total_steps, config.warmup_steps,
                           config.min_lr_ratio)
  name = config.get("optimizer", "adamw")
  parts = []
  if config.grad_clip:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  if name == "adamw":
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                             eps=config.eps, weight_decay=config.weight_decay,
                             mask=decay_mask))
  elif name == "galore":
    g = config.galore
    parts.append(galore.galore_adamw(
        schedule, rank=g.rank, update_proj_gap=g.update_proj_gap,
        scale=g.scale, proj_type=g.proj_type, b1=config.b1, b2=config.b2,
        eps=config.eps, weight_decay=config.weight_decay,
        predicate=galore.default_predicate(g.structured), svd=g.svd,
        decay_mask=decay_mask, seed=config.seed))
  else:
    raise ValueError(f"config.optimizer={name!r}; use one of {OPTIMIZERS}.")
  return optax.chain(*parts)
