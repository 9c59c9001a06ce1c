"""Benchmark: training and scoring throughput (tokens/s, MFU) of a model size on the current devices.

  python tests/benchmarks/bench_throughput.py --size 150m --batch 256 --micro 64 --seq 512
  python tests/benchmarks/bench_throughput.py --size tiny --batch 16 --seq 128 --steps 3     # CPU smoke run

Times the real jitted train step (AdamW, clip, z-loss, accumulation; state donated) and the real vmapped
prior+conditional scoring step on random tokens, after a warm-up step, and reports MFU with SPEC §5's
conventions: 6N+12·L·d·T FLOPs/token for training, 2N+4·L·d·T per model for scoring, N = non-embedding + head.
"""
import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from colorjax import metrics, model, score, sharding, train  # noqa: E402
from configs import base  # noqa: E402


def timed(fn, steps: int) -> float:
  fn()  # compile + warm up
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="150m")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--micro", type=int, default=0)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--score-batch", type=int, default=256)
  parser.add_argument("--loss-chunk", type=int, default=0)
  parser.add_argument("--score-chunk", type=int, default=64)
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--remat", action="store_true")
  args = parser.parse_args()

  cfg = base.get_config()
  cfg.model = base.model_config(args.size)
  cfg.model.attention = args.attention
  cfg.model.remat = args.remat
  cfg.train.global_batch_size = args.batch
  cfg.train.micro_batch_size = args.micro
  cfg.train.max_steps = 1000
  spec = model.ModelSpec.from_config(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh)
  dp = sharding.data_parallel_size(mesh)
  plan = train.step_plan(cfg, None, args.seq, dp)
  tx, schedule = train.make_optimizer(cfg.train, plan.schedule_steps)
  param_sh = sharding.tree_shardings(model.abstract_params(spec), model.param_axes(spec), mesh)

  def init_state(key):
    params = model.init_params(spec, key)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init_state, jax.random.key(0))
  state_sh = {"params": param_sh, "step": sharding.replicated(mesh),
              "opt_state": sharding.mirror_params(abstract["opt_state"], param_sh, sharding.replicated(mesh))}
  batch_sh = NamedSharding(mesh, P(None, sharding.RULES["batch"], None))
  peak = metrics.peak_flops()
  counts = model.param_counts(spec)
  print(f"{args.size}: params total={counts['total']:,} non_embedding={counts['non_embedding']:,}; "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}; attention={model.attention_impl(spec)}")

  with sharding.use_mesh(mesh):
    state = jax.jit(init_state, out_shardings=state_sh)(jax.random.key(0))
    tokens = jax.device_put(np.random.default_rng(0).integers(0, 50000, (plan.n_micro, plan.micro_batch, args.seq),
                                                               dtype=np.int32) % spec.vocab_size, batch_sh)
    step = train.build_train_step(spec, tx, schedule, plan, state_sh, batch_sh, param_sh, 1e-4, None,
                                  args.loss_chunk)
    holder = {"state": state}

    def train_once():
      holder["state"], stats = step(holder["state"], tokens)
      return stats["loss"]

    seconds = timed(train_once, args.steps)
    tok_s = args.batch * args.seq / seconds
    flops = model.flops_per_token(spec, args.seq, training=True)
    mfu = f"{tok_s * flops / (peak * jax.device_count()):.1%}" if peak else "n/a (unknown peak)"
    print(f"train: {seconds * 1e3:.1f} ms/step, {tok_s:,.0f} tokens/s, MFU {mfu} "
          f"(batch {args.batch} x {args.seq}, {plan.n_micro} micro-batches)")

    stacked_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((2,) + a.shape, a.dtype),
                                    model.abstract_params(spec))
    stacked_axes = jax.tree.map(lambda a: ("models",) + a, model.param_axes(spec), is_leaf=sharding.is_axes)
    stacked_sh = sharding.tree_shardings(stacked_abstract, stacked_axes, mesh)
    params = holder["state"]["params"]
    stacked = jax.jit(lambda p: jax.tree.map(lambda x: jnp.stack([x, x * 1.01]), p), out_shardings=stacked_sh)(params)
    row_sh = NamedSharding(mesh, P(sharding.RULES["batch"], None))
    pool = jax.device_put(np.asarray(tokens).reshape(-1, args.seq)[: args.score_batch], row_sh)
    score_step = score.build_score_step(spec, stacked_sh, row_sh, row_sh, None, args.score_chunk)
    seconds = timed(lambda: score_step(stacked, pool), args.steps)
    tok_s = pool.shape[0] * args.seq / seconds
    flops = model.flops_per_token(spec, args.seq, training=False)
    mfu = f"{2 * tok_s * flops / (peak * jax.device_count()):.1%}" if peak else "n/a (unknown peak)"
    print(f"score (prior + conditional, one vmapped pass): {seconds * 1e3:.1f} ms/step, {tok_s:,.0f} tokens/s per "
          f"model, MFU {mfu} (batch {pool.shape[0]} x {args.seq})")


if __name__ == "__main__":
  main()
