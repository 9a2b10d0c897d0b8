r"""Pretraining throughput per linear family: tokens/s, MFU and step memory.

  python -m experiments.benchmark_pretrain                      # CPU: llama_small
  python -m experiments.benchmark_pretrain --presets=llama_60m,llama_130m \
      --dtype=bfloat16 --batch_size=256 --seq_len=256           # GPU

Synthetic token batches (throughput does not depend on the text). Memory is
XLA's compiled memory analysis of the train step (arguments + outputs +
temporaries - aliased), available on every backend; on GPUs the allocator's
peak is reported too. Lowering, compile and first-step seconds are printed
as each ends and kept in the JSON rows. MFU uses --peak_tflops (989: the
H100/H200 bf16 datasheet). A table is printed last and JSON written to
--output.
"""
import dataclasses
import functools
import json
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import optax

from structmat.kernels.lowering import kernel_modules
from structmat.models import build_model
from structmat.models.family import preset_config
from structmat.models.flops import train_flops_per_token
from structmat.models.llama import ATTENTION_IMPLS
from structmat.models.remat import REMAT
from structmat.train import steps
from structmat.train.params import count_params
from structmat.train.state import create_state
from structmat.utils.timing import format_table, time_fn

_PRESETS = flags.DEFINE_list("presets", ["llama_small"],
                             "Model presets (llama_*, gpt2_*).")
_LINEARS = flags.DEFINE_list(
    "linears", ["dense", "lowrank", "monarch", "btt", "blockdiag", "phm",
                "sltrain"],
    "Linear families.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_VOCAB = flags.DEFINE_integer("vocab_size", 2048, "Vocabulary (32000 for "
                              "paper presets).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Accelerator peak for MFU.")
_OUTPUT = flags.DEFINE_string("output", "runs/benchmark_pretrain.json", "JSON.")
_IMPL = flags.DEFINE_enum(
    "impl", "xla", ["xla", "auto", "pallas", "pallas:two_pass",
                    "pallas:two_pass_dw", "pallas:fused", "pallas:mgpu"],
    "Monarch/BTT implementation (pallas:<kernel>: that Monarch kernel).")
_ATTENTION = flags.DEFINE_enum("attention", "auto", list(ATTENTION_IMPLS),
                               "Attention implementation (LlamaConfig).")
_N_LAYERS = flags.DEFINE_integer(
    "n_layers", 0, "Blocks per model (0: the preset's). One block prices "
    "what each costs to lower and compile.")
_REMAT = flags.DEFINE_enum(
    "remat", "none", list(REMAT), "Blocks recomputed in the backward "
    "(models.remat): what each setting costs in step time and saves in "
    "memory.")
_KERNEL_BLOCK = flags.DEFINE_integer(
    "kernel_block", 0, "SLTrain rows: build W this many columns (rows) at a "
    "time, keeping none for the backward (0: whole W).")


def bench(preset, linear, batch, seq, vocab, dtype, repeats, peak_tflops,
          impl="xla", attention="auto", kernel_block=0, n_layers=0,
          remat="none"):
  kwargs = ({"kernel_block": kernel_block}
            if linear == "sltrain" and kernel_block else None)
  cfg = preset_config(preset, linear, linear_kwargs=kwargs, vocab_size=vocab,
                      max_len=seq, dtype=jnp.dtype(dtype), impl=impl,
                      attention=attention, remat=remat)
  if n_layers:
    cfg = dataclasses.replace(cfg, n_layers=n_layers)
  model = build_model(cfg)
  tx = optax.adamw(1e-4)
  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
  state = create_state(model, tx, 0, tokens[:1, :-1])
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   pad_id=-1), donate_argnums=0)
  # Lowering (tracing; Pallas kernels build their modules here) and XLA's
  # compile (Triton kernels compiled with it) timed apart and printed as
  # they finish: a run stopped by a timeout shows which took the time.
  # The steps run that executable: nothing compiles again inside the timing.
  t0 = time.perf_counter()
  lowered = step.lower(state, tokens)
  lower_s = time.perf_counter() - t0
  text = lowered.as_text()
  kernels = kernel_modules(text)
  print(f"  {preset} {linear}: lowered in {lower_s:.1f} s "
        f"({len(text) / 1e6:.1f} MB; kernel calls {kernels['calls']}, "
        f"distinct {kernels['distinct']})", flush=True)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  print(f"  {preset} {linear}: compiled in {compile_s:.1f} s", flush=True)
  mem = compiled.memory_analysis()
  step_bytes = None
  if mem is not None:
    step_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  holder = {"state": state}
  losses = []

  def run(tokens):
    holder["state"], metrics = compiled(holder["state"], tokens)
    losses.append(metrics["train_loss"])
    return metrics["train_loss"]

  # The first step apart: Mosaic GPU kernels are compiled when the
  # executable first instantiates them (once per distinct kernel).
  t0 = time.perf_counter()
  jax.block_until_ready(run(tokens))
  first_step_s = time.perf_counter() - t0
  print(f"  {preset} {linear}: first step in {first_step_s:.1f} s", flush=True)
  seconds = time_fn(run, tokens, repeats=repeats, warmup=0)
  tps = batch * seq / seconds
  flops = train_flops_per_token(cfg, seq)
  on_accel = jax.default_backend() != "cpu"
  row = {"preset": preset, "linear": linear, "params": count_params(state.params),
         "step_ms": 1e3 * seconds, "tokens_per_sec": tps,
         "gflops_per_token": flops / 1e9,
         "achieved_tflops": tps * flops / 1e12,
         "mfu": tps * flops / (peak_tflops * 1e12) if on_accel else None,
         "step_memory_mb": step_bytes / 2**20 if step_bytes else None,
         "lower_s": lower_s, "compile_s": compile_s,
         "module_mb": len(text) / 1e6, "kernel_calls": kernels["calls"],
         "kernel_modules": kernels["distinct"],
         "first_step_s": first_step_s,
         # Same init and batch for every impl: compare these across --impl.
         "losses": [float(v) for v in losses],
         # As the built model has them (not the flags).
         "kernel_block": dict(cfg.linear_kwargs).get("kernel_block", 0),
         "n_layers": cfg.n_layers, "remat": cfg.remat}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row["peak_memory_mb"] = stats["peak_bytes_in_use"] / 2**20
  return row


def main(argv):
  del argv
  rows = []
  meta = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "dtype": _DTYPE.value, "batch": _BATCH.value,
          "seq_len": _SEQ.value, "vocab": _VOCAB.value, "impl": _IMPL.value,
          "attention": _ATTENTION.value, "kernel_block": _KERNEL_BLOCK.value,
          "n_layers": _N_LAYERS.value, "remat": _REMAT.value}
  os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
  for preset in _PRESETS.value:
    for linear in _LINEARS.value:
      logging.info("%s %s", preset, linear)
      row = bench(preset, linear, _BATCH.value, _SEQ.value, _VOCAB.value,
                  _DTYPE.value, _REPEATS.value, _PEAK.value, _IMPL.value,
                  _ATTENTION.value, _KERNEL_BLOCK.value, _N_LAYERS.value,
                  _REMAT.value)
      dense = next((r for r in rows if r["preset"] == preset
                    and r["linear"] == "dense"), None)
      row["step_vs_dense"] = row["step_ms"] / dense["step_ms"] if dense else 1.0
      print(f"  {preset} {linear}: {row['tokens_per_sec']:,.0f} tokens/s",
            flush=True)
      rows.append(row)
      # After every row: a run stopped by a timeout keeps what it measured.
      with open(_OUTPUT.value, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"\n{meta}\n")
  print(format_table(rows, ["preset", "linear", "params", "step_ms",
                            "tokens_per_sec", "gflops_per_token",
                            "achieved_tflops", "mfu", "step_memory_mb",
                            "step_vs_dense"]))


if __name__ == "__main__":
  app.run(main)
