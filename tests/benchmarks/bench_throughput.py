"""Benchmark: training and scoring throughput of a model size on the current devices, one JSON line per measurement.

  python tests/benchmarks/bench_throughput.py --size 150m --batch 256 --micro 128 --seq 512
  python tests/benchmarks/bench_throughput.py --size 1.2b --micro 32 --what train
  python tests/benchmarks/bench_throughput.py --size tiny --batch 16 --seq 128 --steps 3    # CPU smoke run

Times the real jitted train step (AdamW, clip, z-loss, accumulation, fused head loss; state donated) and the real
vmapped prior+conditional scoring step on random tokens, after a warm-up step. With `--store` it also times the
train step fed by the real loader (BatchSource + Prefetcher) from that token store, so loader stalls show. With
`--profile DIR` it traces a few steps with jax.profiler and prints the kernels that took the time.
MFU uses SPEC §5's conventions: 6N+12·L·d·T FLOPs/token for training, 2N+4·L·d·T per model for scoring,
N = non-embedding + head; "pool_tokens_per_s" counts each pool token once however many models score it, and
"per_flop_vs_train" is scoring's model FLOP/s over training's in the same run (1.0 = as fast per FLOP).
  python tests/benchmarks/bench_throughput.py --size demo --vocab 4096 --batch 16 --seq 256 --steps 6 \
      --score-batch 64 --loss-chunk 8 --score-chunk 32 --score-vocab-tile 2048    # the CPU books presets' pair
"""
import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from colorjax import config  # noqa: E402
from colorjax import score, sharding, train
from colorjax.data import stores
from colorjax.model import transformer  # noqa: E402
from colorjax.training import metrics
from colorjax.training import step_plan
import trace_summary  # noqa: E402  (beside this file)
import variants  # noqa: E402  (beside this file)


def peak_memory_gib():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 2)


def compiled(jitted, *args):
  start = time.perf_counter()
  fn = jitted.lower(*args).compile()
  return fn, time.perf_counter() - start


def timed(fn, steps: int) -> float:
  jax.block_until_ready(fn())  # warm-up (after compilation)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def save_hlo(args, compiled_fn, name: str):
  """The optimized HLO, for counting fusions and fp32 elementwise ops offline."""
  if args.hlo:
    folder = pathlib.Path(args.hlo)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.hlo.txt").write_text(compiled_fn.as_text())


TRAIN_FLOPS_PER_S = {}  # variant -> training's model FLOP/s, so a score line can say its rate per FLOP against it


def emit(record: dict):
  print(json.dumps(record), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="150m")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--micro", type=int, default=0, help="train micro-batch (0 = whole batch in one pass)")
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=0, help="embedding rows (0 = the size's 50,304)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--score-batch", type=int, default=256)
  parser.add_argument("--loss-chunk", type=int, default=128, help="train head chunk (positions)")
  parser.add_argument("--score-chunk", type=int, default=64, help="score head chunk (positions)")
  parser.add_argument("--score-vocab-tile", type=int, default=0, help="score head vocabulary tile (0 = whole vocab)")
  parser.add_argument("--score-models", type=int, default=2, help="models scored in one vmapped pass")
  parser.add_argument("--precision", default="original", choices=transformer.PRECISIONS)
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--what", default="both", choices=("train", "score", "both"))
  parser.add_argument("--store", default="", help="token store: also time training fed by the real loader")
  parser.add_argument("--profile", default="", help="folder for a jax.profiler trace of a few steps")
  parser.add_argument("--tag", default="", help="free text copied into every JSON line")
  parser.add_argument("--variants", default="base", help="comma-separated tests/benchmarks/variants.py patches")
  parser.add_argument("--xla-flags", default=None, help="XLA flags colorjax adds (default: colorjax/config.py's)")
  parser.add_argument("--hlo", default="", help="folder for the optimized HLO text of the measured steps")
  args = parser.parse_args()

  cfg = config.get_config()
  sharding.add_xla_flags(cfg.mesh.xla_flags if args.xla_flags is None else args.xla_flags)
  cfg.model = config.model_config(args.size)
  cfg.model.attention = args.attention
  cfg.model.remat = args.remat
  cfg.model.vocab_size = args.vocab or cfg.model.vocab_size
  cfg.model.precision = args.precision
  cfg.train.global_batch_size = args.batch
  cfg.train.micro_batch_size = args.micro
  cfg.train.max_steps = 1000
  spec = transformer.ModelSpec.from_config(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh)
  peak = metrics.peak_flops()
  common = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax": jax.__version__,
            "size": args.size, "precision": args.precision, "seq": args.seq,
            "attention": transformer.attention_impl(spec),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "tag": args.tag}
  mfu = lambda tok_s, flops: round(tok_s * flops / (peak * jax.device_count()), 4) if peak else None
  rows = max(args.batch, args.score_batch)  # the train step takes the first --batch rows, scoring --score-batch
  tokens = np.random.default_rng(0).integers(0, 50000, (rows, args.seq), dtype=np.int32) % spec.vocab_size
  if args.store:  # the dtype the real loader delivers, so one compiled step serves both measurements
    tokens = tokens.astype(stores.TokenStore(args.store).dtype)

  with sharding.use_mesh(mesh):
    params = jax.jit(lambda k: transformer.init_params(spec, k))(jax.random.key(0))
    for variant in args.variants.split(","):
      with variants.applied(variant):
        tagged = {**common, "variant": variant}
        if args.what in ("train", "both"):
          params = bench_train(args, cfg, spec, mesh, params, tokens, tagged, mfu)
        if args.what in ("score", "both"):
          bench_score(args, spec, mesh, params, tokens, tagged, mfu)


def bench_train(args, cfg, spec, mesh, params, tokens, common, mfu):
  dp = sharding.data_parallel_size(mesh)
  plan = step_plan.step_plan(cfg, None, args.seq, dp)
  tx, schedule = train.make_optimizer(cfg.train, plan.schedule_steps)
  param_sh = sharding.tree_shardings(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  init_state = lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}
  abstract = jax.eval_shape(init_state, params)
  state_sh = {"params": param_sh, "step": sharding.replicated(mesh),
              "opt_state": sharding.opt_state_shardings(tx, abstract["opt_state"], param_sh, mesh)}
  batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
  holder = {"state": jax.jit(init_state, out_shardings=state_sh)(params)}
  batch = jax.device_put(tokens[:args.batch].reshape(plan.n_micro, plan.micro_batch, args.seq), batch_sh)
  step = train.build_train_step(spec, tx, schedule, plan, state_sh, batch_sh, param_sh, 1e-4, None, args.loss_chunk)
  step, compile_s = compiled(step, holder["state"], batch)
  save_hlo(args, step, f"train-{common['variant']}")

  def train_once(tokens_mbt=batch):
    holder["state"], stats = step(holder["state"], tokens_mbt)
    return stats["loss"]

  seconds = timed(train_once, args.steps)
  tok_s = args.batch * args.seq / seconds
  flops = transformer.flops_per_token(spec, args.seq, training=True)
  TRAIN_FLOPS_PER_S[common["variant"]] = tok_s * flops
  emit({"measure": "train", **common, "batch": args.batch, "micro": plan.micro_batch, "loss_chunk": args.loss_chunk,
        "remat": args.remat, "ms_per_step": round(seconds * 1e3, 2), "tokens_per_s": round(tok_s),
        "mfu": mfu(tok_s, flops), "peak_memory_gib": peak_memory_gib(), "compile_s": round(compile_s, 1)})
  if args.store:
    store = stores.TokenStore(args.store)
    real_plan = step_plan.step_plan(cfg, store.num_sequences, store.seq_len, dp)
    source = train.BatchSource(store, real_plan, 0, None, batch_sh)
    prefetch = stores.Prefetcher(source, range(args.steps + 1), cfg.data.prefetch)
    try:
      it = iter(prefetch)
      jax.block_until_ready(train_once(next(it)[1]))
      start = time.perf_counter()
      for _, real in it:
        loss = train_once(real)
      jax.block_until_ready(loss)
    finally:
      prefetch.close()
    seconds = (time.perf_counter() - start) / args.steps
    tok_s = args.batch * args.seq / seconds
    emit({"measure": "train_real_loader", **common, "store": str(store.path), "batch": args.batch,
          "micro": plan.micro_batch, "ms_per_step": round(seconds * 1e3, 2), "tokens_per_s": round(tok_s),
          "mfu": mfu(tok_s, flops)})
  if args.profile:
    trace_summary.profile(lambda: train_once(), pathlib.Path(args.profile) / f"train-{common['variant']}", steps=3)
  return holder["state"]["params"]


def bench_score(args, spec, mesh, params, tokens, common, mfu):
  k = args.score_models
  stacked_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((k,) + a.shape, a.dtype),
                                  transformer.abstract_params(spec))
  stacked_axes = jax.tree.map(lambda a: ("models",) + a, transformer.param_axes(spec), is_leaf=sharding.is_axes)
  stacked_sh = sharding.tree_shardings(stacked_abstract, stacked_axes, mesh)
  stacked = jax.jit(lambda p: jax.tree.map(lambda x: jnp.stack([x * (1 + 0.01 * i) for i in range(k)]), p),
                    out_shardings=stacked_sh)(params)
  row_sh = NamedSharding(mesh, P(sharding.RULES["batch"], None))
  pool = jax.device_put(tokens[: args.score_batch], row_sh)
  # the product's score.fp8 is the spec's flag (its step scores one model at a time: score.over_models)
  step_spec = dataclasses.replace(spec, fp8=True) if common["variant"] == "fp8" else spec
  score_step = score.build_score_step(step_spec, stacked_sh, row_sh, row_sh, None, args.score_chunk,
                                      args.score_vocab_tile)
  score_step, compile_s = compiled(score_step, stacked, pool)
  save_hlo(args, score_step, f"score-{common['variant']}")
  seconds = timed(lambda: score_step(stacked, pool), args.steps)
  pool_tok_s = pool.shape[0] * args.seq / seconds
  flops = transformer.flops_per_token(spec, args.seq, training=False)
  emit({"measure": "score_pair" if k == 2 else f"score_{k}_models", **common, "batch": pool.shape[0],
        "score_chunk": args.score_chunk, "score_vocab_tile": args.score_vocab_tile,
        "ms_per_step": round(seconds * 1e3, 2), "pool_tokens_per_s": round(pool_tok_s),
        "model_tokens_per_s": round(k * pool_tok_s), "mfu": mfu(k * pool_tok_s, flops),
        "per_flop_vs_train": (round(k * pool_tok_s * flops / TRAIN_FLOPS_PER_S[common["variant"]], 3)
                              if common["variant"] in TRAIN_FLOPS_PER_S else None),
        "peak_memory_gib": peak_memory_gib(), "compile_s": round(compile_s, 1)})
  if args.profile:
    trace_summary.profile(lambda: score_step(stacked, pool), pathlib.Path(args.profile) / f"score-{common['variant']}",
                          steps=3)


if __name__ == "__main__":
  main()
