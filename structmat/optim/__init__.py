"""Optimizers (optax): the AdamW factory and GaLore."""
from structmat.optim.adamw import make_optimizer, make_schedule
from structmat.optim.galore import (GaLoreState, default_predicate,
                                    galore_adamw, randomized_svd,
                                    scale_by_galore, scale_by_lr_and_decay)
