"""The stages' step loops: training (metrics one step late, evals, checkpoints, preemption) and scoring (each host's
row chunks in lockstep, one step ahead of writing). Both stop at a step boundary on SIGTERM and say how to resume."""
import dataclasses
import time

import jax
import numpy as np

from colorjax import console
from colorjax import errors
from colorjax import sharding
from colorjax.artifacts import object_storage
from colorjax.artifacts import scores as scores_lib
from colorjax.data import stores
from colorjax.training import metrics
from colorjax.training import preemption
from colorjax.training import step_plan


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a score job cuts the pool: global batch, this host's rows of it, rows per output chunk, hosts."""
  batch: int
  row_start: int
  host_batch: int
  chunk_rows: int
  hosts: int


def train_loop(cfg, state, train_step, source, start_step: int, steps: step_plan.StepPlan, ckpt, log, evaluators,
               workdir, started: list, meta: dict):
  """Steps start_step..total: metrics fetched one step late, evals, checkpoints every checkpoint_every steps and
  every checkpoint_minutes, a final save. A preemption notice (SIGTERM) saves at the step all hosts agree on and
  ends the run with errors.Preempted."""

  def log_eval(step: int):
    if evaluators:
      results = {}
      for evaluator in evaluators:
        results.update(evaluator(state["params"]))
      log.eval(step, results)

  eval_due = lambda step: step == 0 or bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
  if start_step < steps.total_steps and eval_due(start_step):  # a resume: again, see metrics.MetricsWriter
    log_eval(start_step)
  prefetch = stores.Prefetcher(source, range(start_step, steps.total_steps), cfg.data.prefetch)
  profiler = metrics.StepProfiler(cfg.profile_steps, workdir / "profile")
  pending, stopped = None, None
  with preemption.Watch(cfg.train.checkpoint_minutes) as watch:  # until the stop's save is on disk
    try:
      for step, batch in prefetch:
        profiler.before(step)
        state, stats = train_step(state, batch)
        started.append(step)
        profiler.after(step, stats)
        if pending is not None:
          log.train(*pending)
        pending = (step + 1, stats)
        done = step + 1
        stop, timer = watch.check()  # every step on every host, the last one too
        if done == steps.total_steps:
          break  # the final save below
        if stop or timer or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
          ckpt.save(done, state, meta)
          watch.saved()
        if stop:
          stopped = done
          break
        if cfg.train.eval_every and done % cfg.train.eval_every == 0:
          log.train(*pending)
          pending = None
          log_eval(done)
      if pending is not None:
        log.train(*pending, flush=True)
    finally:
      prefetch.close()
      profiler.close(state)
    log.done_stepping()
    if stopped is not None:
      ckpt.close()
      raise errors.Preempted(f"{watch.reason()} at step {stopped} of {steps.total_steps}: checkpoint saved in "
                             f"{ckpt.directory / str(stopped)}; resume with --config.train.resume=True (a pipeline "
                             "resumes its stages itself: re-run it)", stopped, watch.signum)
  if start_step < steps.total_steps:
    ckpt.save(steps.total_steps, state, meta)
  ckpt.close()
  log_eval(steps.total_steps)
  return state


def score_chunks(cfg, mesh, step_fn, stacked, store, index, lay, out, per_host, n_models, prefixes, flops_per_seq,
                  peak_flops, profiler):
  """Score every host's chunks in lockstep, one step ahead of writing (a chunk, then its done flag, when its last
  batch is back); a SIGTERM stops after the current step. Returns (seconds, pool sequences scored, None or
  (step, reason, signal) when stopped, steps)."""
  n, host_batch, chunk_rows = out.num_sequences, lay.host_batch, lay.chunk_rows
  my_chunks = per_host[jax.process_index()]
  schedule = scores_lib.step_schedule(per_host, n, chunk_rows, host_batch)
  real_rows = scores_lib.pool_rows_per_step(schedule, per_host, n, chunk_rows, host_batch)
  batch_sh = sharding.batch_sharding(mesh)
  buffer = np.empty((chunk_rows, n_models), np.float32)
  prefix_buffer = np.empty((chunk_rows, n_models, len(prefixes)), np.float32) if prefixes else None
  peak = metrics.peak_flops(peak_flops)

  def produce(step: int):
    slot, j, _ = schedule[step]
    rows = np.zeros((host_batch, store.seq_len), store.dtype)
    if slot < len(my_chunks):
      first = int(my_chunks[slot]) * chunk_rows + j * host_batch
      ids = np.arange(first, min(first + host_batch, n))
      if ids.size:
        rows[: ids.size] = store.read(ids if index is None else index[ids])
    return sharding.put_host_rows(rows, batch_sh, (lay.batch, store.seq_len), lay.row_start)

  def local_rows(array):
    shards = {s.index[0].start or 0: s for s in array.addressable_shards}  # replicas (tensor axis) once
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])[:host_batch]

  bar = console.Progress(total=int(real_rows.sum()), unit="seq", desc="score")
  start = time.time()

  def finish(step, result):
    slot, j, last = schedule[step]
    full, prefix = result if prefixes else (result, None)
    buffer[j * host_batch:(j + 1) * host_batch] = local_rows(full)
    if prefixes:
      prefix_buffer[j * host_batch:(j + 1) * host_batch] = local_rows(prefix)
    if last and slot < len(my_chunks):
      out.write_chunk(int(my_chunks[slot]), buffer, prefix_buffer)
      object_storage.flush()
    seq_per_s = bar.count / max(time.time() - start, 1e-9)
    mfu = f" mfu {seq_per_s * flops_per_seq / (peak * jax.device_count()):.1%}" if peak else ""
    bar.update(int(real_rows[step]), extra=f"{console.human(seq_per_s * store.seq_len)} tok/s{mfu}")

  stopped, pending = None, None
  prefetch = stores.Prefetcher(produce, range(len(schedule)), cfg.data.prefetch)
  try:
    with sharding.use_mesh(mesh), preemption.Watch() as watch:
      for step, tokens in prefetch:
        profiler.before(step)
        result = step_fn(stacked, tokens)
        profiler.after(step, result)
        if pending is not None:
          finish(*pending)  # one step late: the device is already busy with the next batch
        pending = (step, result)
        if watch.check()[0] and step + 1 < len(schedule):
          stopped = (step + 1, watch.reason(), watch.signum)  # write what is finished, leave the rest to a re-run
          break
      if pending is not None:
        finish(*pending)
  finally:
    prefetch.close()
    profiler.close()
  bar.close()
  scored = int(real_rows[:stopped[0]].sum()) if stopped is not None else int(real_rows.sum())
  return time.time() - start, scored, stopped, len(schedule)
