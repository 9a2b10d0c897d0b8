"""AdamW with linear warmup, cosine decay and global-norm clipping."""
import jax
import optax


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
  """AdamW from a config with lr, total_steps, warmup_steps, min_lr_ratio,
  b1, b2, eps, weight_decay, grad_clip (0 disables clipping)."""
  schedule = make_schedule(config.lr, config.total_steps, config.warmup_steps,
                           config.min_lr_ratio)
  parts = []
  if config.grad_clip:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
