"""Linen modules: one file per structure, a registry, adapters and inits."""
from structmat.layers.adapters import (NOLA, AdaptedLinear, CompacterAdapter,
                                       LoRA, NOLALinear)
from structmat.layers.base import Elementwise, StructuredLinear, apply_to
from structmat.layers.blockdiag import Blockdiag
from structmat.layers.dense import Dense
from structmat.layers.lowrank import LowRank
from structmat.layers.monarch import BTT, Monarch
from structmat.layers.phm import PHMLinear, PHMRule
from structmat.layers.registry import LINEARS, make_linear
from structmat.layers.sltrain import SparsePlusLowRank
