"""Sharded vs single-device training on fake CPU devices (run in a subprocess).

  python tests/sharded_check.py WORKDIR

Sets 8 host devices before importing jax. For each structure and optimizer, a
data x fsdp x tensor = 2 x 2 x 2 run must give the single-device losses within
float32 tolerance, and parameters must be sharded as the rules say.
"""
import os
import sys

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]))

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pretrain as pretrain_config  # noqa: E402
from structmat.models import build_model  # noqa: E402
from structmat.train import loop  # noqa: E402
from structmat.train.state import create_state  # noqa: E402

# Every structure once, both optimizers, both model families, in two runs
# (each run costs two compilations and trainings): one LLaMA mixes dense
# attention with Monarch, SLTrain and PHM MLP sites under GaLore; NOLA (a
# frozen base) runs on GPT-2 (biases, LayerNorms, learned positions).
MIXED = "up=monarch;gate=sltrain:rank=8;down=phm"
CASES = [("dense", "galore", MIXED, "llama_tiny"),
         ("nola", "adamw", "", "gpt2_tiny")]
EXPECTED_SPECS = {  # (linear, path) -> spec under the default rules
    ("dense", ("layer_0", "attn", "q", "kernel")): P("fsdp", "tensor"),
    ("dense", ("embed", "embedding")): P(None, "fsdp"),  # vocab 259: odd
    ("dense", ("layer_0", "attn", "o", "kernel")): P("tensor", "fsdp"),
    ("dense", ("layer_0", "mlp", "up", "w1")): P(None, "fsdp", None),
    ("dense", ("layer_0", "mlp", "gate", "lora_a")): P("fsdp", None),
    # PHM (rank-1 factors): d_ff/n = 43 is odd, so 'mlp' falls back to
    # replication; 'embed' (16) shards.
    ("dense", ("layer_0", "mlp", "down", "s")): P(None, None, None),
    ("dense", ("layer_0", "mlp", "down", "t")): P(None, None, "fsdp"),
    ("nola", ("layer_0", "mlp", "fc", "nola", "coef_a")): P(None),
    ("nola", ("layer_0", "attn", "q", "kernel")): P("fsdp", "tensor"),
    ("nola", ("layer_0", "attn", "q", "bias")): P("tensor"),
    ("nola", ("layer_0", "mlp", "proj", "bias")): P("fsdp"),
    ("nola", ("wpe", "embedding")): P(None, "fsdp"),
    ("nola", ("layer_0", "ln_1", "scale")): P(None),
}


def config(linear, optimizer, overrides, model, mesh):
  c = pretrain_config.get_config(f"model={model},tiny=1,linear={linear},"
                                 f"optimizer={optimizer},overrides={overrides}")
  c.total_steps, c.log_every_steps = 3, 1
  c.eval_every_steps = c.checkpoint_every_steps = 0
  c.galore.rank, c.galore.update_proj_gap = 4, 2
  if linear == "nola":  # fine-tuning style: only NOLA coefficients and norms
    c.trainable = ".*coef_.*|.*norm.*"
  c.mesh.update(mesh)
  return c


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["train_loss"] for r in rows if "train_loss" in r]


def main(root):
  assert jax.device_count() == 8
  for linear, opt, over, model_name in CASES:
    single = config(linear, opt, over, model_name,
                    dict(data=1, fsdp=1, tensor=1, num_devices=1))
    sharded = config(linear, opt, over, model_name,
                     dict(data=2, fsdp=2, tensor=2))
    a = os.path.join(root, f"{linear}_{opt}_1")
    b = os.path.join(root, f"{linear}_{opt}_8")
    loop.train_and_evaluate(single, a)
    loop.train_and_evaluate(sharded, b)
    np.testing.assert_allclose(losses(b), losses(a), rtol=2e-5,
                               err_msg=f"{linear} {opt}")
    print(f"OK losses {linear} {opt}: {losses(b)}", flush=True)
    # Parameters really are sharded as the rules say.
    cfg = loop.model_config(sharded, 259)
    model = build_model(cfg)
    tx = loop.make_optimizer(sharded)
    example = jax.numpy.ones((1, sharded.seq_len), jax.numpy.int32)
    new_state = lambda m, **kw: create_state(m, tx, 0, example,
                                             sharded.trainable, **kw)
    place = loop.Placement(sharded, new_state, example)
    state = place.init(model)
    checked = 0
    for (lin, path), spec in EXPECTED_SPECS.items():
      if lin != linear:
        continue
      leaf = state.all_params()  # frozen ones too
      for k in path:
        leaf = leaf[k]
      assert leaf.sharding.spec == spec, (path, leaf.sharding.spec, spec)
      checked += 1
      assert len(leaf.addressable_shards) == 8
    assert checked == sum(lin == linear for lin, _ in EXPECTED_SPECS)
    print(f"OK shardings {linear} {opt}", flush=True)
  print("ALL OK")


if __name__ == "__main__":
  main(sys.argv[1])
