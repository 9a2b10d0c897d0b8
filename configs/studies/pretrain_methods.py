r"""Study: pretraining methods at matched tokens on the embedded corpus (CPU).

  python -m experiments.study --config=configs/studies/pretrain_methods.py --workdir=runs/study

Trains llama_small with dense, low-rank, SLTrain, GaLore (full SVD and the
randomized range finder), Monarch and BTT linears on the same tokens; then
compresses the dense result by 50% with WeLore and with uniform low-rank,
evaluates both, and continues training each (WeLore: LRC factors and norms
only; uniform: all factors and norms). Writes WORKDIR/results.md and
results.json. Resumable: finished runs are skipped, unfinished ones resume.
Expected runtime on 2 CPU cores: about 40 minutes (tiny=1: about 2 minutes).
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "tiny=1" (seconds-long runs), "runs=dense+lowrank" (a subset)."""
  args = dict(item.split("=", 1) for item in (arg or "").split(",") if item)
  tiny = args.pop("tiny", "0") == "1"
  only = args.pop("runs", "")
  if args:
    raise ValueError(f"unknown study argument(s) {sorted(args)}; known: tiny, runs.")
  c = ml_collections.ConfigDict()
  base = "tiny=1" if tiny else "model=llama_small"
  c.steps = 8 if tiny else 300
  c.ft_steps = 4 if tiny else 100
  c.reduction = 0.5
  small = {"rank": 16 if tiny else 32}
  # (name, pretrain config argument, --config.* overrides)
  c.runs = [
      ("dense", base, {}),
      ("lowrank", f"{base},linear=lowrank,rank={small['rank']}", {}),
      ("sltrain", f"{base},linear=sltrain,rank={small['rank']},density=0.03,"
                  "alpha=32", {}),
      ("galore", f"{base},optimizer=galore,galore_rank={small['rank']}",
       {"lr": 0.01, "galore.update_proj_gap": 50 if not tiny else 3}),
      ("galore_randomized", f"{base},optimizer=galore,galore_rank="
                            f"{small['rank']},svd=randomized",
       {"lr": 0.01, "galore.update_proj_gap": 50 if not tiny else 3}),
      ("monarch", f"{base},linear=monarch,nblocks=4", {}),
      ("btt", f"{base},linear=btt,nblocks=4,rank=4", {}),
  ]
  if only:
    keep = only.split("+")
    unknown = set(keep) - {r[0] for r in c.runs}
    if unknown or "dense" not in keep:
      raise ValueError(f"runs={only!r}: names must come from "
                       f"{[r[0] for r in c.runs]} and include dense (the "
                       "compressions start from it).")
    c.runs = [r for r in c.runs if r[0] in keep]
  c.compressions = [("welore50", "welore"), ("lowrank50", "lowrank")]
  return c
