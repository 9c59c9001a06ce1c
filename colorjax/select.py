"""The `select` stage: the exact global top ⌊N/τ⌋ sequences by score, in memory independent of N.

The methods this stage runs are the registry's (`colorjax.methods`) with stage "select": a method that ranks score
columns keeps the top k of NLL_prior(x) − NLL_cond(x) in fp32 (CoLoR-Filter) or of −NLL_cond(x); one that ranks none
draws a seeded uniform sample of the same size. Top-k is a two-level radix select on the scores' order-preserving
32-bit keys: one streaming pass histograms the top 16 bits, a second the low 16 bits inside the boundary bucket, which
gives the exact k-th largest score; a third pass collects every id above it plus the lowest ids among the ties at it.
Memory is a block of rows plus 65,536 counters, and the output itself.

Output: `index.npy` (selected global ids, int64, ascending) and `manifest.json` (method, τ, k, threshold, score
statistics and histogram, per-source selection rates, the scores and store it came from).
"""
import math
import pathlib
import time

import numpy as np

from colorjax import config as config_lib
from colorjax import console
from colorjax import errors
from colorjax import methods
from colorjax.selection import stage as selection_stage
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib

def selection_request(cfg, scores_id: str, store_id: str, within_id: str | None = None) -> dict:
  """What decides a selection's content: the method and its settings, the pool (and the candidates within it, by
  id, when `select.within` is set), and (except for a random draw, which a retrained prior or conditional leaves
  unchanged) the scores by id."""
  scfg = cfg.select
  random = not methods.get(scfg.method, "select.method", "select").ranks_scores
  request = {"method": scfg.method, "tau": float(scfg.tau), "tokens": int(scfg.tokens),
             "conditional": None if random else scfg.conditional, "seed": int(cfg.seed) if random else None,
             "scores": None if random else scores_id, "store": store_id}
  if within_id:
    request["within"] = within_id
  return request


def check_settings(cfg) -> None:
  scfg = cfg.select
  methods.get(scfg.method, "select.method", "select")
  if scfg.tokens < 0:
    raise errors.ConfigError(f"select.tokens={scfg.tokens}: give a positive token budget (0 = use select.tau)")
  if not scfg.tokens and not (math.isfinite(scfg.tau) and scfg.tau >= 1):
    raise errors.ConfigError(f"select.tau={scfg.tau}: keep the top 1/tau of the pool, so tau is a number >= 1")


def selection_size(cfg, n: int, seq_len: int) -> int:
  """k: the sequences a selection keeps; refuses settings that keep none."""
  check_settings(cfg)
  return selection_lib.keep_count(n, seq_len, cfg.select.tau, cfg.select.tokens, "select")


def run(cfg) -> pathlib.Path:
  scfg = cfg.select
  check_settings(cfg)
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the folder the selection goes to")
  method = methods.get(scfg.method, "select.method", "select")
  if not method.ranks_scores and scfg.store and not scfg.scores:  # a random draw needs the pool, not its scores
    return _draw(cfg, pathlib.Path(cfg.workdir).resolve(), stores.TokenStore(scfg.store))
  if not scfg.scores:
    raise errors.ConfigError("set --config.select.scores to a score folder (the score stage's workdir)"
                             + ("" if method.ranks_scores else ", or --config.select.store to draw from the pool"))
  workdir = pathlib.Path(cfg.workdir).resolve()
  scores = scores_lib.Scores(scfg.scores)
  store = stores.TokenStore(scores.store_path())
  if store.id != scores.manifest["store"]["id"]:
    raise errors.DataError(f"store {store.path} changed since it was scored (id {store.id}, scores say "
                           f"{scores.manifest['store']['id']}); re-run the score stage")
  within, within_id = selection_lib.within_ids(scfg.within, store, "select.within")
  request = selection_request(cfg, scores.id, store.id, within_id)
  if lineage.up_to_date(workdir, request, "another selection", "choose another --config.workdir"):
    print(f"select: {workdir} is up to date; nothing to do")
    return workdir
  lineage.check_new(workdir, "a selection", "choose another --config.workdir")
  if within is not None and methods.get(scfg.method, "select.method", "select").ranks_scores:
    scores.rows_of(within)  # every candidate was scored, or a DataError names one that was not
  n = scores.num_sequences if within is None else within.size
  k = selection_size(cfg, n, store.seq_len)
  scores.check_complete()
  with lineage.Lock(workdir):
    return _select(cfg, workdir, scores, store, request, n, k, within)


def _draw(cfg, workdir: pathlib.Path, store: stores.TokenStore) -> pathlib.Path:
  """A random selection from the pool store itself (no scores needed: a pipeline of cheap methods scores none)."""
  within, within_id = selection_lib.within_ids(cfg.select.within, store, "select.within")
  request = selection_request(cfg, None, store.id, within_id)
  if lineage.up_to_date(workdir, request, "another selection", "choose another --config.workdir"):
    print(f"select: {workdir} is up to date; nothing to do")
    return workdir
  lineage.check_new(workdir, "a selection", "choose another --config.workdir")
  n = store.num_sequences if within is None else within.size
  with lineage.Lock(workdir):
    return _select(cfg, workdir, None, store, request, n, selection_size(cfg, n, store.seq_len), within)


def _select(cfg, workdir, scores, store, request, n: int, k: int, within: np.ndarray | None) -> pathlib.Path:
  scfg = cfg.select
  method = methods.get(scfg.method, "select.method", "select")
  start = time.time()
  stats, threshold = None, None
  if not method.ranks_scores:
    rows = selection_lib.random_sample(n, k, cfg.seed, scfg.block_rows)
  else:
    stream = selection_lib.ScoreStream(scores, method, scfg.conditional, scfg.block_rows, within)
    rows, threshold = selection_lib.top_k(stream, k)
    stats = selection_lib.score_statistics(stream)
  # the pool's ids: positions in the candidates, or rows of the score folder (a score.index holds a subset)
  ids = within[rows] if within is not None else (rows if scores is None else scores.global_ids(rows))
  manifest = selection_lib.stage_manifest(
      cfg, "select", request, scfg.method, ids, n, store, workdir, within, threshold=threshold,
      seed=None if method.ranks_scores else cfg.seed, conditional=scfg.conditional if method.ranks_scores else None,
      scores=None if scores is None else {"path": lineage.relative(scores.path, workdir), "id": scores.id,
                                          "models": scores.manifest["models"]},
      score_stats=stats, seconds=time.time() - start)
  if console.is_main():
    selection_lib.publish(workdir, ids, manifest, lock=False)  # run holds the selection's lock
    print(f"select: {scfg.method} k={k:,} of {n:,} (tau {manifest['tau']:.2f})"
          + (f", threshold {threshold:.4f}" if threshold is not None else "") + f" -> {workdir}")
    selection_lib.print_sources(manifest["sources"])
  return workdir


def describe(cfg) -> None:
  if cfg.select.store and not cfg.select.scores:
    store = stores.TokenStore(cfg.select.store)
    total = store.num_sequences
  else:
    scores = scores_lib.Scores(cfg.select.scores)
    store, total = stores.TokenStore(scores.store_path()), scores.num_sequences
  within, _ = selection_lib.within_ids(cfg.select.within, store, "select.within")
  n = total if within is None else within.size
  k = selection_size(cfg, n, store.seq_len)
  print(f"select (dry run): {cfg.select.method} keeps {k:,} of {n:,} sequences ({k * store.seq_len:,} tokens)")


# ----------------------------------------------------------------------------------------------------------------
# The pipeline's view of this stage (colorjax.selection_stage)


def pipeline_config(cfg, inputs: selection_stage.Inputs, selection: selection_stage.Selection):
  """The select stage's config for one of a pipeline's selections: ranked from the pool's scores, or (a random draw
  in a pipeline that scores no whole pool) drawn from the pool store itself."""
  scfg = config_lib.stage_config(cfg, "select")
  if inputs.scores is not None:
    scfg.select.scores = str(inputs.scores)
  else:
    scfg.select.store = str(inputs.pool)
  scfg.select.method = selection.method
  scfg.select.tau = selection.tau
  selection_stage.place(scfg, "select", selection, inputs.seq_len)
  return scfg


def expected(scfg, known: selection_stage.Known) -> list:
  """The selection's request from the ids the preflight knows (selection_request, as `run` builds it)."""
  method = methods.get(scfg.select.method, "select.method", "select")
  within = known.within(scfg.select.within)
  ready = known.scores or (not method.ranks_scores and known.pool)
  ready = ready and (not scfg.select.within or (within and within[0]))
  request = selection_request(scfg, known.scores, known.pool, within[0] if within else None) if ready else None
  return [("selection", pathlib.Path(scfg.workdir), request)]


STAGE = selection_stage.register(selection_stage.SelectionStage("select", pipeline_config, expected,
                                                                 selection_stage.no_cost, run))
