r"""Compression config: WeLore, uniform low-rank, or Monarch projection of a dense run.

  python -m experiments.compress --config=configs/compress.py:method=welore,reduction=0.5 \
      --init=runs/pretrain --workdir=runs/welore50
  python -m experiments.pretrain --config=configs/pretrain.py --init=runs/welore50 \
      --workdir=runs/welore50_ft --config.total_steps=200

The first writes an init directory (compressed parameters, model.json with the
per-matrix structures and, for WeLore, the trainable pattern: LRC factors and
norms), a report (per matrix: shape, kept rank, LRC or not; table and JSON) and
validation loss before/after compression. The second continues training from it.

Keys: method (welore | lowrank | monarch), reduction (target parameter
reduction of the selected linears; welore bisects its threshold tau to reach
it, lowrank picks the per-matrix rank that reaches it), pattern (regex over
"layer.site", e.g. "[0-3]\.(up|down)"), min_ratio (WeLore's LRC rule),
nblocks (monarch).
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = dict(item.split("=", 1) for item in (arg or "").split(",") if item)
  c = ml_collections.ConfigDict()
  c.method = args.pop("method", "welore")
  c.reduction = float(args.pop("reduction", 0.5))
  c.pattern = args.pop("pattern", ".*")
  c.min_ratio = float(args.pop("min_ratio", 0.4999))
  c.nblocks = int(args.pop("nblocks", 4))
  if args:
    raise ValueError(f"unknown config argument(s) {sorted(args)}; known: "
                     "method, reduction, pattern, min_ratio, nblocks.")
  return c
