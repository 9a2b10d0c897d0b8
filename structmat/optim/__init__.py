"""Optimizers (optax): the AdamW factory; GaLore arrives here too."""
from structmat.optim.adamw import make_optimizer, make_schedule
