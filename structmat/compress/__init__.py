"""Compression of whole checkpoints: WeLore, dense -> Monarch / low-rank."""
from structmat.compress.convert import METHODS, convert, lrc_trainable_pattern
from structmat.compress.welore import find_tau, plan, reduction, report
