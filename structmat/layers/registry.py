"""make_linear: the one place that maps a structure name to a layer."""
from structmat.layers.adapters import LoRALinear, NOLALinear
from structmat.layers.blockdiag import Blockdiag
from structmat.layers.dense import Dense
from structmat.layers.lowrank import LowRank
from structmat.layers.monarch import BTT, Monarch
from structmat.layers.phm import PHMLinear
from structmat.layers.sltrain import SparsePlusLowRank

LINEARS = {
    "dense": Dense,
    "lowrank": LowRank,
    "monarch": Monarch,
    "btt": BTT,
    "blockdiag": Blockdiag,  # one block-diagonal factor (Monarch Mixer)
    "phm": PHMLinear,
    "sltrain": SparsePlusLowRank,
    "nola": NOLALinear,  # dense base + NOLA delta (fine-tuning)
    "lora": LoRALinear,  # dense base + LoRA delta (fine-tuning)
}


def make_linear(name: str, /, **kwargs):
  """Build the linear layer registered as ``name`` with constructor kwargs.

  ``name`` is positional-only, so ``name=`` in kwargs is the module's name.
  Example: ``make_linear("monarch", features=1024, nblocks=4, name="up")``.
  """
  if name not in LINEARS:
    raise ValueError(f"linear={name!r} is not a known structure; use one of "
                     f"{sorted(LINEARS)}.")
  cls = LINEARS[name]
  fields = set(cls.__dataclass_fields__)
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"linear={name!r} takes no argument(s) {unknown}; its "
                     f"fields are {sorted(fields - {'parent'})}.")
  return cls(**kwargs)
