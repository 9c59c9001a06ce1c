"""The `distill` stage: CoLoR-Filter at a fraction of the scoring cost, by a fast scorer distilled from a sample.

CoLoR scores every pool sequence with two LMs. Most of the pool is plainly far from the target, which cheap features
of the text show, so (as FineWeb-Edu's and DCLM's classifiers are distilled from expensive labels):
  1. sample    a uniform random `distill.sample_size` sequences, at most `distill.sample_fraction` of those it is
               drawn from (a selection folder: `<parts>/sample`);
  2. label it  with the prior and the conditional: the score stage restricted to that index (`<parts>/sample_scores`);
  3. fit       a linear model on hashed token n-gram features (data.ngrams) to the CoLoR score with optax, cross-
               fitted over 1/`distill.holdout_fraction` folds with early stopping, so every sampled sequence has an
               out-of-fold prediction that measures it: Spearman ρ and the recall estimate the cascade sizes itself by
               (`<parts>/scorer`; training.ngram_scorer);
  4. predict   every pool sequence, `distill.block_rows` rows at a time (memory independent of the pool), written
               chunk by chunk with done flags and CRC-32s so a killed run resumes to the same bytes and a damaged
               chunk is never used (`<parts>/predictions`; artifacts.chunked);
  5. select    the top 1/τ of the predictions into --config.workdir (the select stage's format: `train` takes it
               as --config.data.index).
Steps 1-4 do not depend on τ: `distill.parts` (default `<workdir>-parts`) is shared by the selections of several τ,
which then cost one prediction pass. The sample is drawn with `distill.seed` from a permutation stream of its own
(never a prefix of a random baseline's or a nested pool's draw), from `distill.sample_within` when set (the largest
fixed-n pool: one sample serves every τ), else from the selection's candidates. Process 0 holds a lock on the parts
folder while it writes them, so a second job waits for nothing half-made.

`distill.method=color_cascade` spends more scoring for more fidelity: the prior and the conditional rescore the top
sequences by prediction among the candidates that were not sampled (`<parts>/candidates-f<factor>`,
`<parts>/rescored-f<factor>`): cascade_factor x the top 1/τ of them, or, with `distill.target_recall`, the fewest
whose estimated recall of CoLoR's top 1/τ reaches it (sampled share + unsampled share x the out-of-fold recall at
that factor). The sampled sequences keep their true scores and compete with the rescored ones: the top 1/τ of the
candidates is taken from both by the true CoLoR score. With cascade_factor = τ every candidate has its true score
and the selection is exactly CoLoR's.
A fitted scorer is an artifact of its own (weights with their sha256, features, the sample scores it was fitted on,
the tokenizer): `distill.scorer` reuses one on another pool, which skips steps 1-3; a scorer whose tokenizer or
features differ from the pool's is refused by name.
"""
import hashlib
import io
import json
import math
import pathlib
import time

import numpy as np

from colorjax import config as config_lib
from colorjax import console
from colorjax import errors
from colorjax import methods
from colorjax import score as score_lib
from colorjax import select as select_lib
from colorjax.selection import stage as selection_stage
from colorjax.artifacts import chunked
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import ngrams
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import ngram_scorer as scorer_lib
from colorjax.training import preemption
from colorjax.selection import artifact as selection_lib

METHOD = "color_distilled"
CASCADE = "color_cascade"
SCORER = formats.Kind("colorjax.scorer", "a fitted scorer", "the distill stage (<workdir>/scorer)")
PREDICTIONS = "predictions.npy"  # float32 [pool sequences], with done.npy and crc32.npy (artifacts.chunked)
SAMPLE_STREAM = 13  # the sample's permutation stream (selection_lib.RANDOM_STREAM is the random baseline's)
MIN_FIT = 8  # sampled sequences each fold needs at least (to train on, held out): fewer cannot be measured
Features = scorer_lib.Features
predict = scorer_lib.predict
spearman = scorer_lib.spearman


# ----------------------------------------------------------------------------------------------------------------
# Settings


def check_settings(cfg) -> None:
  d = cfg.distill
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the folder the distilled selection goes to")
  if not d.store:
    raise errors.ConfigError("set --config.distill.store to the pool's token store")
  if not d.scorer and not (d.prior and d.conditional):
    raise errors.ConfigError("set --config.distill.prior and --config.distill.conditional (params exports) to fit a "
                             "scorer, or --config.distill.scorer to reuse a fitted one")
  if d.method == CASCADE and not (d.prior and d.conditional):
    raise errors.ConfigError("distill.method=color_cascade rescores its candidates with the prior and the "
                             "conditional: set --config.distill.prior and --config.distill.conditional (params "
                             "exports), also when --config.distill.scorer reuses a fitted scorer")
  check_values(cfg)


def check_values(cfg) -> None:
  """The distill section's values alone (no paths): what the pipeline checks before any of its work."""
  d = cfg.distill
  if not 0 < d.sample_fraction <= 1 or not 0 < d.holdout_fraction <= 0.5 or d.sample_size < 0:
    raise errors.ConfigError(f"distill.sample_fraction={d.sample_fraction} must be in (0, 1], distill.sample_size="
                             f"{d.sample_size} >= 0 and distill.holdout_fraction={d.holdout_fraction} in (0, 0.5]")
  if min(d.buckets, d.ngram, d.steps, d.batch, d.block_rows, d.eval_every) < 1 or not d.lr > 0 or d.l2 < 0:
    raise errors.ConfigError("distill.buckets, ngram, steps, eval_every, batch and block_rows must be >= 1, "
                             "distill.lr > 0 and distill.l2 >= 0")
  if d.objective not in scorer_lib.OBJECTIVES:
    raise errors.ConfigError(f"distill.objective={d.objective!r}; choose one of {', '.join(scorer_lib.OBJECTIVES)}")
  if d.tokens < 0 or (not d.tokens and not (math.isfinite(d.tau) and d.tau >= 1)):
    raise errors.ConfigError(f"distill.tau={d.tau}, distill.tokens={d.tokens}: keep the top 1/tau of the pool "
                             "(tau >= 1) or a positive token budget")
  if cfg.seed < 0 or d.seed < 0:
    raise errors.ConfigError(f"seed={cfg.seed}, distill.seed={d.seed}: seeds are integers >= 0")
  if d.method not in (METHOD, CASCADE):
    raise errors.ConfigError(f"distill.method={d.method!r}; choose {METHOD} or {CASCADE}")
  if d.method == CASCADE and not (math.isfinite(d.cascade_factor) and d.cascade_factor >= 1):
    raise errors.ConfigError(f"distill.cascade_factor={d.cascade_factor}: the rescored candidates are "
                             "cascade_factor x the selection, so it is a number >= 1")
  if not 0 <= d.target_recall < 1:
    raise errors.ConfigError(f"distill.target_recall={d.target_recall}: a recall in [0, 1) (0 = use "
                             "distill.cascade_factor)")


def folds(cfg) -> int:
  """Cross-fitting folds: each holds out holdout_fraction of the sample."""
  return max(2, int(round(1 / cfg.distill.holdout_fraction)))


# ----------------------------------------------------------------------------------------------------------------
# 1-2. The sample and its scores


def sample_source(cfg) -> tuple[str, str]:
  """(the selection the sample is drawn from, the setting that named it): distill.sample_within, else the
  candidates (distill.within); ("", "") for the whole store."""
  d = cfg.distill
  return (d.sample_within, "distill.sample_within") if d.sample_within else (d.within, "distill.within")


def sample_size(cfg, n: int) -> int:
  """The sequences the prior and the conditional score to label the scorer, of `n` the sample is drawn from:
  distill.sample_size, at most distill.sample_fraction of them. The one count the stage draws, the dry run plans and
  the report divides by."""
  d = cfg.distill
  count = int(round(d.sample_fraction * n))
  if d.sample_size:
    count = min(count, int(d.sample_size))
  return max(2, min(n, count))


def check_sample(cfg, n: int) -> None:
  """A sample too small to fit and measure a scorer is refused before anything is scored."""
  m = sample_size(cfg, n)
  held = m // folds(cfg)
  if min(held, m - held) < MIN_FIT:
    raise errors.ConfigError(
        f"distill.sample_fraction={cfg.distill.sample_fraction:g} (sample_size {cfg.distill.sample_size:,}) samples "
        f"{m:,} of {n:,} sequences ({held:,} held out per fold): too few to fit and measure a scorer (each part needs "
        f">= {MIN_FIT}); raise distill.sample_fraction or distill.sample_size, or use a larger pool")


def sample_request(cfg, store_id: str, within_id: str | None = None) -> dict:
  """What decides the sample: its size, fraction, seed, draw and source (`within_id`: the selection it is drawn
  from)."""
  d = cfg.distill
  request = {"method": "uniform_sample", "fraction": float(d.sample_fraction), "size": int(d.sample_size),
             "seed": int(d.seed), "stream": SAMPLE_STREAM, "store": store_id}
  return request | {"within": within_id} if within_id else request


def make_sample(cfg, folder: pathlib.Path, store: stores.TokenStore) -> str:
  """The sampled ids as a selection folder (the score stage's index); returns its id."""
  path, setting = sample_source(cfg)
  source, source_id = selection_lib.within_ids(path, store, setting)
  request = sample_request(cfg, store.id, source_id)
  if lineage.up_to_date(folder, request, "another sample", "choose another --config.workdir"):
    return lineage.content_id(request)
  n = store.num_sequences if source is None else source.size
  check_sample(cfg, n)
  m = sample_size(cfg, n)
  ids = selection_lib.random_sample(n, m, cfg.distill.seed, cfg.distill.block_rows, SAMPLE_STREAM)
  ids = ids if source is None else source[ids]
  within = None if source is None else {"path": lineage.relative(path, folder), "id": source_id, "sequences": int(n)}
  selection_lib.publish(folder, ids, selection_lib.manifest(request, "uniform_sample", ids, n, store, folder,
                                                            seed=int(cfg.distill.seed), within=within))
  return lineage.content_id(request)


def score_config(cfg, workdir="", index=""):
  """The score stage's config for the prior and the conditional over `index` (the sample, a cascade's candidates):
  what this stage runs, and what its requests' numerics come from (score.numerics_of)."""
  scfg = config_lib.stage_config(cfg, "score", model=cfg.model)
  scfg.workdir, scfg.score.store, scfg.score.index = str(workdir), cfg.distill.store, str(index)
  scfg.score.prior, scfg.score.conditionals = cfg.distill.prior, (cfg.distill.conditional,)
  return scfg


def _scored(cfg, workdir: pathlib.Path, index: pathlib.Path) -> score_lib.Scores:
  """The prior's and conditional's scores of `index`: the score stage, restricted to it (every host)."""
  score_lib.run(score_config(cfg, workdir, index))
  scores = score_lib.Scores(workdir)
  scores.check_complete()
  return scores


def _folders(cfg, workdir: pathlib.Path) -> dict:
  """Where each step's artifact goes: the τ-independent parts, then the selection (the workdir)."""
  parts = pathlib.Path(cfg.distill.parts).resolve() if cfg.distill.parts else workdir.with_name(workdir.name + "-parts")
  folders = {name: parts / name for name in ("sample", "sample_scores", "scorer", "predictions")}
  return folders | {"selection": workdir}


# ----------------------------------------------------------------------------------------------------------------
# 3. The scorer


def _features(cfg, store: stores.TokenStore) -> Features:
  return Features(int(cfg.distill.buckets), int(cfg.distill.ngram), tuple(sorted({store.eos_id, store.pad_id})))


def scorer_request(cfg, scores_id: str, features: Features, tokenizer_sha: str) -> dict:
  d = cfg.distill
  return {"scores": scores_id, "features": features.describe(), "tokenizer": tokenizer_sha,
          "fit": {"model": "linear-ngram-mean", "objective": d.objective, "folds": folds(cfg), "steps": int(d.steps),
                  "eval_every": int(d.eval_every), "batch": int(d.batch), "lr": float(d.lr), "l2": float(d.l2),
                  "seed": int(d.seed)},
          "recall_estimate": {"resamples": scorer_lib.RESAMPLES, "quantile": scorer_lib.CAUTION}}


def fit_scorer(cfg, folder: pathlib.Path, store: stores.TokenStore, scores: score_lib.Scores) -> pathlib.Path:
  """Cross-fit the scorer on the sample's CoLoR scores (training.ngram_scorer) and publish it with its
  out-of-fold quality: Spearman ρ and the recall estimate."""
  d = cfg.distill
  features = _features(cfg, store)
  request = scorer_request(cfg, scores.id, features, store.manifest["tokenizer"]["sha256"])
  if lineage.up_to_date(folder, request, "another scorer", "choose another --config.workdir"):
    return folder
  start = time.time()
  ids = scores.global_ids(np.arange(scores.num_sequences))
  nll = scores.read(0, scores.num_sequences)
  target = losses.color_score(nll[:, scores.column("prior")], nll[:, scores.column("conditional_0")])
  sample_features = scorer_lib.SampleFeatures(features, store, ids)
  with preemption.Watch(local=True) as watch:
    fit, oof, steps = scorer_lib.cross_fit(
        sample_features, target, features.buckets, folds(cfg), int(d.seed), stop=lambda: watch.check()[0],
        steps=int(d.steps), batch=int(d.batch), lr=float(d.lr), l2=float(d.l2), objective=d.objective,
        eval_every=int(d.eval_every))
  if not (np.isfinite(fit.weights).all() and math.isfinite(fit.bias)):
    raise errors.DataError(f"the scorer's fit diverged (non-finite weights) on {scores.path}; lower distill.lr "
                           f"(now {d.lr:g}) and re-run (nothing was written)")
  quality = {"spearman_heldout": scorer_lib.spearman(oof, target), "heldout": int(target.size),
             "train": int(target.size - target.size // folds(cfg)), "folds": folds(cfg), "best_steps": steps,
             "target_std": float(target.std()), "recall_oof": scorer_lib.recall_curve(target, oof),
             "recall_estimate": scorer_lib.recall_curve(target, oof, resamples=scorer_lib.RESAMPLES,
                                                        quantile=scorer_lib.CAUTION, seed=int(d.seed))}
  buffer = io.BytesIO()
  np.save(buffer, fit.weights.astype(np.float32))
  manifest = {"format": SCORER.format, "id": lineage.content_id(request), "features": features.describe(),
              "bias": fit.bias, "quality": quality, "tokenizer": store.manifest["tokenizer"],
              "scores": {"id": scores.id, "path": lineage.relative(scores.path, folder)},
              "weights_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "seconds": time.time() - start,
              "request": request, "config": json.loads(cfg.to_json()), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  lineage.publish_folder(folder, manifest, {"weights.npy": buffer.getvalue()}, "a fitted scorer")
  rho = quality["spearman_heldout"]
  at8 = (quality["recall_oof"].get("8") or {}).get("2")
  print(f"distill: scorer ({d.objective}) cross-fitted on {target.size:,} sampled sequences ({folds(cfg)} folds, best "
        f"steps {steps}) in {manifest['seconds']:.0f}s; out-of-fold Spearman rho "
        f"{'undefined' if rho is None else f'{rho:.3f}'}"
        f"{'' if at8 is None else f', top 1/8 recall at factor 2: {at8:.1%}'} -> {folder}")
  return folder


def open_scorer(path, store: stores.TokenStore, features_wanted: Features | None = None) -> dict:
  """A fitted scorer, checked against the pool it will rank (same tokenizer by content, same features) and against
  its own manifest (the weights' sha256)."""
  manifest = formats.open_manifest(path, SCORER)
  tokenizer_lib.check_same_tokenizer(manifest["tokenizer"], f"scorer {path}", store.manifest["tokenizer"],
                                     f"pool store {store.path}")
  if manifest["features"]["name"] != ngrams.FEATURES:
    raise errors.DataError(f"scorer {path} uses features {manifest['features']['name']!r}, this colorjax computes "
                           f"{ngrams.FEATURES!r}; fit the scorer again")
  if features_wanted is not None and manifest["features"]["skip_ids"] != list(features_wanted.skip):
    raise errors.DataError(f"scorer {path} drops n-grams of token ids {manifest['features']['skip_ids']}, the pool's "
                           f"EOS/PAD are {list(features_wanted.skip)}; fit a scorer on this pool")
  weights_path = pathlib.Path(path) / "weights.npy"
  refit = f"delete {path} and re-run to fit it again (or point distill.scorer at an intact scorer)"
  if not weights_path.is_file():
    raise errors.DataError(f"scorer {path}: weights.npy is missing; {refit}")
  data = weights_path.read_bytes()
  recorded = manifest.get("weights_sha256")
  if recorded and hashlib.sha256(data).hexdigest() != recorded:
    raise errors.DataError(f"scorer {weights_path} does not match the sha256 in its manifest (damaged or altered "
                           f"since it was fitted); {refit}")
  try:
    weights = np.load(io.BytesIO(data))
  except (ValueError, EOFError, OSError) as e:
    raise errors.DataError(f"scorer {weights_path} is not a readable .npy file ({e}); {refit}") from e
  if weights.shape != (manifest["features"]["buckets"],) or not np.isfinite(weights).all():
    raise errors.DataError(f"scorer {path}: weights.npy holds {weights.dtype}{list(weights.shape)}"
                           f"{'' if np.isfinite(weights).all() else ' with non-finite values'}, its manifest says "
                           f"{manifest['features']['buckets']} finite weights; {refit}")
  return dict(manifest, weights=weights)


# ----------------------------------------------------------------------------------------------------------------
# 4. The pool's predictions


def _predictions_request(cfg, scorer_id: str, store_id: str) -> dict:
  return {"scorer": scorer_id, "store": store_id, "block_rows": int(cfg.distill.block_rows), "checksums": "crc32"}


def predict_pool(cfg, folder: pathlib.Path, store: stores.TokenStore, scorer: dict) -> np.ndarray:
  """Predictions for every pool sequence, `block_rows` at a time, in a chunked array (artifacts.chunked): a killed
  run resumes to the bytes of an uninterrupted one, a damaged chunk is predicted again. Returns them read-only."""
  request = _predictions_request(cfg, scorer["id"], store.id)
  array = chunked.ChunkedArray(folder, PREDICTIONS, store.num_sequences, cfg.distill.block_rows)
  if (folder / formats.MANIFEST).exists():
    saved = formats.read_json(folder / formats.MANIFEST)
    if saved.get("request") != lineage.normalized(request):
      raise errors.DataError(f"{folder} holds predictions of another scorer or pool (differs in "
                             f"{', '.join(lineage.differences(saved.get('request') or {}, request))}); choose "
                             "another --config.workdir (nothing was overwritten)")
  else:
    array.create()
    lineage.write_manifest(folder, {"format": "colorjax.predictions", "id": lineage.content_id(request),
                                    "num_sequences": array.n, "chunk_rows": array.rows, "request": request,
                                    "scorer": scorer["id"], "store_id": store.id})
  features = Features(int(scorer["features"]["buckets"]), int(scorer["features"]["ngram"]),
                      tuple(scorer["features"]["skip_ids"]))
  bar = console.Progress(total=array.n, unit="seq", desc="predict")
  bar.update(0)

  def compute(first, stop):
    block = predict(scorer["weights"], scorer["bias"], features.of(store.read(np.arange(first, stop))))
    bar.update(stop - first)
    return block

  with preemption.Watch(local=True) as watch:
    left = array.write(compute, watch)
  bar.close()
  if left:
    raise errors.Preempted(f"{watch.reason()} during the pool's prediction: {array.chunks - left} of {array.chunks} "
                           f"chunks are written in {folder} (done flags set); re-run the same command to predict the "
                           "rest", array.chunks - left, watch.signum)
  return array.open()


def open_predictions(folder: pathlib.Path, n: int) -> np.ndarray:
  """The pool's predictions (read-only), every chunk done and matching its CRC-32, or a DataError naming the fix."""
  manifest = formats.read_manifest(folder)
  return chunked.ChunkedArray(folder, PREDICTIONS, n, int(manifest["chunk_rows"])).open()


class _Stream:
  """Streams a prediction array's float32 values, `block_rows` at a time (selection_lib.top_k's input); with `ids`, only
  those pool sequences', positions counting within `ids`."""

  def __init__(self, values, block_rows: int, ids: np.ndarray | None = None):
    self.values, self.block_rows, self.ids = values, int(block_rows), ids

  def __iter__(self):
    n = self.values.shape[0] if self.ids is None else self.ids.size
    for start in range(0, n, self.block_rows):
      rows = slice(start, start + self.block_rows) if self.ids is None else self.ids[start:start + self.block_rows]
      yield start, np.asarray(self.values[rows], np.float32)


class _Concat:
  """Several score streams as one, positions counting on from one part to the next."""

  def __init__(self, parts: list):
    self.parts = parts  # (stream, size)

  def __iter__(self):
    offset = 0
    for stream, size in self.parts:
      for start, values in stream:
        yield offset + start, values
      offset += size


# ----------------------------------------------------------------------------------------------------------------
# 5. The cascade and the selection


def cascade_factor(cfg, scorer_manifest: dict | None, sampled_share: float) -> tuple[float | None, float | None]:
  """(the factor the cascade rescores with, its estimated recall of CoLoR's top 1/τ): distill.cascade_factor, or with
  distill.target_recall the smallest factor whose estimate (the scorer's out-of-fold recall curve) reaches it, at most
  τ (every candidate rescored: exactly CoLoR). (None, None) while the scorer is not known."""
  d = cfg.distill
  if not d.target_recall:
    return float(d.cascade_factor), None
  if scorer_manifest is None:
    return None, None
  curve = (scorer_manifest.get("quality") or {}).get("recall_estimate") or {}
  factor, estimate = scorer_lib.factor_for(curve, float(d.tau), float(d.target_recall), sampled_share)
  if factor is None or factor >= d.tau:
    return float(d.tau), 1.0
  return float(factor), estimate


def candidates_request(cfg, factor: float, predictions_id: str, sample_id: str | None, store_id: str,
                       within_id: str | None = None) -> dict:
  d = cfg.distill
  return _within({"method": "cascade_candidates", "factor": float(factor), "tau": float(d.tau),
                  "tokens": int(d.tokens), "predictions": predictions_id, "sample": sample_id, "store": store_id},
                 within_id)


def cascade_request(cfg, factor: float, rescored_id: str, sample_scores_id: str | None, store_id: str,
                    within_id: str | None = None) -> dict:
  d = cfg.distill
  return _within({"method": CASCADE, "tau": float(d.tau), "tokens": int(d.tokens), "factor": float(factor),
                  "target_recall": float(d.target_recall), "rescored": rescored_id, "sample_scores": sample_scores_id,
                  "store": store_id}, within_id)


def _within(request: dict, within_id: str | None) -> dict:
  """A request of a selection among `distill.within`'s candidates names them by id (unset: unchanged)."""
  return request | {"within": within_id} if within_id else request


def selection_request(cfg, predictions_id: str, store_id: str, within_id: str | None = None) -> dict:
  d = cfg.distill
  return _within({"method": METHOD, "tau": float(d.tau), "tokens": int(d.tokens), "predictions": predictions_id,
                  "store": store_id}, within_id)


def _candidates_folder(factor: float, within_id: str | None) -> str:
  """candidates-f<factor>-tau<τ> (and rescored-...) of the whole pool; of `distill.within`, named by its id."""
  return f"f{factor:g}" + (f"-within-{within_id}" if within_id else "")


def rescore_count(factor: float, unsampled: int, tau: float) -> int:
  """The unsampled candidates the cascade rescores: factor x their top 1/τ, at most all of them."""
  return min(unsampled, max(1, int(math.ceil(factor * unsampled / tau - 1e-9))))


def rescore_candidates(cfg, folders: dict, store: stores.TokenStore, values, predictions_id: str, factor: float,
                       sampled: np.ndarray, sample_id: str | None, within: np.ndarray | None = None,
                       within_id: str | None = None) -> score_lib.Scores:
  """The top of the unsampled candidates (the pool, or `distill.within`) by prediction (process 0 writes them),
  scored by the prior and the conditional (every host: the score stage, restricted to them)."""
  d = cfg.distill
  n = store.num_sequences if within is None else within.size
  tau = n / selection_lib.keep_count(n, store.seq_len, d.tau, d.tokens, "distill")
  parts, name = folders["predictions"].parent, _candidates_folder(factor, within_id) + f"-tau{d.tau:g}"
  candidates, rescored = parts / f"candidates-{name}", parts / f"rescored-{name}"
  request = candidates_request(cfg, factor, predictions_id, sample_id, store.id, within_id)

  def write_candidates():
    if lineage.up_to_date(candidates, request, "other candidates", "choose another distill.parts"):
      return
    pool = np.arange(store.num_sequences) if within is None else within
    unsampled = pool[~np.isin(pool, sampled)]
    m = rescore_count(factor, unsampled.size, tau)
    ids, _ = selection_lib.top_k(_Stream(values, d.block_rows, unsampled), m)
    ids = unsampled[ids]
    selection_lib.publish(candidates, ids, selection_lib.manifest(request, "cascade_candidates", ids, unsampled.size,
                                                                   store, candidates))

  console.on_main_then_sync(write_candidates, "cascade candidates")
  return _scored(cfg, rescored, candidates)


def _scoring_flops(scores: score_lib.Scores) -> float:
  """FLOPs the prior and the conditional spent on a score folder (SPEC §5: 2N + 4LdT per token per model)."""
  spec = transformer.ModelSpec(**scores.manifest["model"])
  seq = int(scores.manifest["store"]["seq_len"])
  return float(transformer.flops_per_token(spec, seq, training=False)) * scores.num_sequences * seq * len(
      scores.manifest["models"])


def _select(cfg, folder: pathlib.Path, store: stores.TokenStore, values, request: dict, scorer: dict,
            cascade: dict | None, within: np.ndarray | None) -> pathlib.Path:
  """The top k of the candidates (the pool, or `distill.within`) by prediction, or (cascade) by the true CoLoR score
  among the rescored candidates and the sampled ones."""
  if lineage.up_to_date(folder, request, "another selection", "choose another --config.workdir"):
    print(f"distill: {folder} is up to date; nothing to do")
    return folder
  d = cfg.distill
  n = store.num_sequences if within is None else within.size
  k = selection_lib.keep_count(n, store.seq_len, d.tau, d.tokens, "distill")
  if cascade is None:
    stream = _Stream(values, d.block_rows, within)
    ids, threshold = selection_lib.top_k(stream, k)
    ids = ids if within is None else within[ids]
    summary = None
  else:
    rescored, sample_scores, sampled = cascade["rescored"], cascade["sample_scores"], cascade["sampled"]
    parts = [(select_lib.ScoreStream(rescored, methods.HEADLINE, "conditional_0", d.block_rows),
              rescored.num_sequences)]
    if sampled.size:
      parts.append((select_lib.ScoreStream(sample_scores, methods.HEADLINE, "conditional_0", d.block_rows, sampled),
                    sampled.size))
    stream = _Concat(parts)
    rows, threshold = selection_lib.top_k(stream, k)
    first = rows < rescored.num_sequences
    ids = np.sort(np.concatenate([rescored.global_ids(rows[first]), sampled[rows[~first] - rescored.num_sequences]]))
    summary = {"factor": cascade["factor"], "target_recall": float(d.target_recall) or None,
               "estimated_recall": cascade["estimate"], "rescored": rescored.num_sequences,
               "reused_sample": int(sampled.size), "scoring_flops": _scoring_flops(rescored)}
  rescored = None if cascade is None else cascade["rescored"]
  manifest = selection_lib.stage_manifest(
      cfg, "distill", request, d.method, ids, n, store, folder, within, threshold=threshold, seed=None,
      conditional=None if cascade is None else "conditional_0",
      scores=None if rescored is None else {"path": lineage.relative(rescored.path, folder), "id": rescored.id,
                                            "models": rescored.manifest["models"]},
      cascade=summary, scorer={"id": scorer["id"], "quality": scorer["quality"]},
      score_stats=selection_lib.score_statistics(stream))
  selection_lib.publish(folder, ids, manifest, lock=False)  # run holds the selection's lock
  print(f"distill: {d.method} k={k:,} of {n:,} (tau {manifest['tau']:.2f}), threshold {threshold:.4f} -> {folder}")
  selection_lib.print_sources(manifest["sources"])
  return folder


# ----------------------------------------------------------------------------------------------------------------
# Lineage: every request, known from the inputs' ids


def reused_scorer(cfg) -> dict | None:
  """The manifest of the fitted scorer `distill.scorer` names (None when it is not there yet)."""
  path = pathlib.Path(cfg.distill.scorer) / formats.MANIFEST
  return formats.read_json(path) if path.is_file() else None


def expected_requests(cfg, store: stores.TokenStore, models: list[dict] | None,
                      within: tuple[str, int] | None = None, sample_from: tuple[str, int] | None = None) -> dict:
  """Every artifact's request computed from the inputs' ids alone, as `run` will make them (run checks its output
  with it before any work; the pipeline's preflight lists stale parts with it): sample -> its scores -> the scorer
  -> the predictions -> (a cascade's candidates -> their scores) -> the selection. `within`, `sample_from`: (id,
  size) of the candidates and of what the sample is drawn from, when set; `models`: the prior's and conditional's
  names and ids (None: not known yet). The scores' numerics are the score stage's own (score.numerics_of on the
  config this stage scores with), so score.fp8 is in them. A target-recall cascade's factor is known once its
  scorer is."""
  d = cfg.distill
  within_id, n = within if within else (None, store.num_sequences)
  sample_id, sampled_from = sample_from if sample_from else (None, store.num_sequences)
  numerics = score_lib.numerics_of(score_config(cfg))
  out, scorer_manifest, sample_scores_id, sample = {}, None, None, None
  if d.scorer:
    scorer_manifest = reused_scorer(cfg)
    scorer_id = (scorer_manifest or {}).get("id")
  elif models is None:
    return {}
  else:
    out["sample"] = sample_request(cfg, store.id, sample_id)
    sample = lineage.content_id(out["sample"])
    out["sample_scores"] = score_lib.scores_request(store.id, models, numerics, sample)
    sample_scores_id = lineage.content_id(out["sample_scores"])
    out["scorer"] = scorer_request(cfg, sample_scores_id, _features(cfg, store), store.manifest["tokenizer"]["sha256"])
    scorer_id = lineage.content_id(out["scorer"])
    saved = pathlib.Path(_folders(cfg, pathlib.Path(cfg.workdir).resolve())["scorer"]) / formats.MANIFEST
    scorer_manifest = formats.read_json(saved) if saved.is_file() else None
    scorer_manifest = scorer_manifest if (scorer_manifest or {}).get("id") == scorer_id else None
  if scorer_id is None:
    return out
  out["predictions"] = _predictions_request(cfg, scorer_id, store.id)
  predictions_id = lineage.content_id(out["predictions"])
  if d.method != CASCADE:
    out["selection"] = selection_request(cfg, predictions_id, store.id, within_id)
    return out
  factor, _ = cascade_factor(cfg, scorer_manifest, 0.0 if d.scorer else sample_size(cfg, sampled_from) / sampled_from)
  if models is None or factor is None:
    return out
  name = _candidates_folder(factor, within_id) + f"-tau{d.tau:g}"
  out[f"candidates-{name}"] = candidates_request(cfg, factor, predictions_id, sample, store.id, within_id)
  out[f"rescored-{name}"] = score_lib.scores_request(store.id, models, numerics,
                                                     lineage.content_id(out[f"candidates-{name}"]))
  out["selection"] = cascade_request(cfg, factor, lineage.content_id(out[f"rescored-{name}"]), sample_scores_id,
                                     store.id, within_id)
  return out


def parts(cfg, requests: dict) -> dict:
  """Where `run` puts the artifacts before the selection: the τ-independent ones (no sample, sample scores or scorer
  when `distill.scorer` reuses one) and a cascade's candidates and their scores."""
  folders = _folders(cfg, pathlib.Path(cfg.workdir).resolve())
  root = folders["predictions"].parent
  fitted = () if cfg.distill.scorer else ("sample", "sample_scores", "scorer")
  named = {name: folders[name] for name in fitted + ("predictions",)}
  return named | {name: root / name for name in requests if name.startswith(("candidates-", "rescored-"))}


def _check_models(cfg, store: stores.TokenStore) -> list[dict]:
  """The prior and conditional exist and fit the pool before anything is sampled or scored; their column names and
  content ids (what the score requests name)."""
  entries, spec = score_lib.model_entries(score_config(cfg))
  stores.check_store_fits(store, spec)
  tokenizer_lib.check_same_tokenizer(entries[0][2]["tokenizer"], f"prior {cfg.distill.prior}",
                                     store.manifest["tokenizer"], f"pool store {store.path}")
  return score_lib.describe_models(entries)


# ----------------------------------------------------------------------------------------------------------------
# The stage


def run(cfg) -> pathlib.Path:
  check_settings(cfg)
  d = cfg.distill
  workdir = pathlib.Path(cfg.workdir).resolve()
  store = stores.TokenStore(d.store)
  within, within_id = selection_lib.within_ids(d.within, store, "distill.within")
  candidates = store.num_sequences if within is None else within.size
  selection_lib.keep_count(candidates, store.seq_len, d.tau, d.tokens, "distill")
  path, setting = sample_source(cfg)
  source, source_id = selection_lib.within_ids(path, store, setting)
  sampled_from = store.num_sequences if source is None else source.size
  folders = _folders(cfg, workdir)
  models = _check_models(cfg, store) if (not d.scorer or d.method == CASCADE) else None
  if d.scorer:
    open_scorer(pathlib.Path(d.scorer).resolve(), store, _features(cfg, store))
  else:
    check_sample(cfg, sampled_from)
  expected = expected_requests(cfg, store, models, (within_id, candidates) if within_id else None,
                               (source_id, sampled_from) if source_id else None)
  # the output folder, before any work: up to date (nothing to do), or free to be written
  if "selection" in expected and lineage.up_to_date(workdir, expected["selection"], "another selection",
                                                    "choose another --config.workdir"):
    print(f"distill: {workdir} is up to date; nothing to do")
    return workdir
  lineage.check_new(workdir, "a distilled selection", "choose another --config.workdir")
  with lineage.Lock(folders["predictions"].parent):  # the shared parts: one job writes them
    scorer_path = pathlib.Path(d.scorer).resolve() if d.scorer else folders["scorer"]
    sample_scores, sample_id = None, None
    if not d.scorer:
      sample_id = console.on_main_then_sync(lambda: make_sample(cfg, folders["sample"], store), "distill sample")
      sample_scores = _scored(cfg, folders["sample_scores"], folders["sample"])
      console.on_main_then_sync(lambda: fit_scorer(cfg, scorer_path, store, sample_scores), "distill fit")
      sample_id = sample_id or lineage.content_id(sample_request(cfg, store.id, source_id))
    scorer = open_scorer(scorer_path, store, _features(cfg, store))
    console.on_main_then_sync(lambda: predict_pool(cfg, folders["predictions"], store, scorer), "distill predict")
    predictions_id = formats.read_json(folders["predictions"] / formats.MANIFEST)["id"]
    values = open_predictions(folders["predictions"], store.num_sequences)
    cascade = None
    if d.method == CASCADE:
      cascade = _cascade(cfg, folders, store, values, predictions_id, scorer, sample_scores, sample_id, sampled_from,
                         within, within_id)
      request = cascade_request(cfg, cascade["factor"], cascade["rescored"].id,
                                None if sample_scores is None else sample_scores.id, store.id, within_id)
    else:
      request = selection_request(cfg, predictions_id, store.id, within_id)
  if not console.is_main():  # selection is CPU work of process 0
    return folders["selection"]
  with lineage.Lock(workdir):
    return _select(cfg, folders["selection"], store, values, request, scorer, cascade, within)


def _cascade(cfg, folders, store, values, predictions_id, scorer, sample_scores, sample_id, sampled_from, within,
             within_id) -> dict:
  """Sizes the cascade (its factor, printed with what it costs), rescores its candidates, and returns what the
  selection ranks: the rescored scores and the sampled candidates with their true scores."""
  d = cfg.distill
  sampled = np.zeros(0, np.int64)
  if sample_scores is not None:
    sampled = sample_scores.global_ids(np.arange(sample_scores.num_sequences))
    sampled = sampled if within is None else np.intersect1d(sampled, within)
  n = store.num_sequences if within is None else within.size
  share = 0.0 if sample_scores is None else sample_size(cfg, sampled_from) / sampled_from
  factor, estimate = cascade_factor(cfg, scorer, share)
  rescored = rescore_candidates(cfg, folders, store, values, predictions_id, factor, sampled, sample_id, within,
                                within_id)
  if console.is_main():
    how = (f"distill.target_recall {d.target_recall:g}: estimated recall {estimate:.1%}" if d.target_recall
           else "distill.cascade_factor")
    print(f"distill: cascade factor {factor:g} ({how}); rescored {rescored.num_sequences:,} + {sampled.size:,} "
          f"sampled of {n:,} candidates = {(rescored.num_sequences + sampled.size) / n:.1%} of scoring them")
  return {"factor": factor, "estimate": estimate, "rescored": rescored, "sample_scores": sample_scores,
          "sampled": sampled}


def scoring_plan(cfg, candidates: int, sampled_from: int, seq_len: int) -> dict:
  """What one selection has the prior and the conditional score, in sequences: the sample (of `sampled_from`, drawn
  once for every τ; none with a reused scorer) and a cascade's rescored candidates (of `candidates`; with a target
  recall, planned at distill.cascade_factor: the factor is chosen after the fit), and the share of scoring the
  candidates that comes to, the sample charged in proportion to the candidates it serves (the report's count)."""
  d = cfg.distill
  k = selection_lib.keep_count(candidates, seq_len, d.tau, d.tokens, "distill")
  sample = 0 if d.scorer else sample_size(cfg, sampled_from)
  charged_sample = sample * candidates / max(sampled_from, 1)
  rescored = 0
  if d.method == CASCADE:
    rescored = rescore_count(float(d.cascade_factor), max(candidates - round(charged_sample), 1), candidates / k)
  charged = charged_sample + rescored
  return {"k": k, "sample": sample, "rescored": rescored, "charged": charged, "share": charged / candidates}


def describe(cfg) -> None:
  check_settings(cfg)
  d = cfg.distill
  store = stores.TokenStore(d.store)
  within, _ = selection_lib.within_ids(d.within, store, "distill.within")
  path, setting = sample_source(cfg)
  source, _ = selection_lib.within_ids(path, store, setting)
  n = store.num_sequences if within is None else within.size
  sampled_from = store.num_sequences if source is None else source.size
  if not d.scorer:
    check_sample(cfg, sampled_from)
  plan = scoring_plan(cfg, n, sampled_from, store.seq_len)
  scorer = f"reuses the scorer {d.scorer}" if d.scorer else (
      f"the prior and conditional score a sample of {plan['sample']:,} of {sampled_from:,}, a linear model on hashed "
      f"token 1..{d.ngram}-grams ({d.buckets:,} buckets, {d.objective}, {folds(cfg)} folds) predicts the rest")
  cascade = ""
  if d.method == CASCADE:
    how = (f"the factor reaching an estimated recall of {d.target_recall:g}, chosen after the fit (planned at "
           f"{d.cascade_factor:g})" if d.target_recall else f"{d.cascade_factor:g} x the top 1/tau")
    cascade = f"; the cascade rescores the top {plan['rescored']:,} unsampled by prediction ({how})"
  print(f"distill (dry run): {d.method} keeps {plan['k']:,} of {n:,} sequences; {scorer}{cascade}: "
        f"{plan['share']:.1%} of scoring the {n:,} candidates")
  if plan["sample"] or plan["rescored"]:
    scfg = score_config(cfg)
    _, spec = score_lib.model_entries(scfg)
    for key, value in spec.architecture().items():
      scfg.model[key] = value
    score_lib.describe_nominal(scfg, plan["sample"] + plan["rescored"], store.seq_len, 2)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline's view of this stage (colorjax.selection_stage)


def pipeline_config(cfg, inputs: selection_stage.Inputs, selection: selection_stage.Selection):
  """The distill stage's config for one of a pipeline's selections: the sample, its scores, the scorer and the
  predictions in the pipeline's parts folder serve every τ (under fixed n drawn from the largest pool)."""
  dcfg = config_lib.stage_config(cfg, "distill", model=cfg.prior.model)
  d = dcfg.distill
  d.store, d.prior, d.conditional = str(inputs.pool), str(inputs.prior), str(inputs.conditional)
  d.parts, d.method, d.tau = str(inputs.parts), selection.method, selection.tau
  if selection.shared_within is not None:
    d.sample_within = str(selection.shared_within)
  selection_stage.keep_within(d, selection, inputs.seq_len)
  dcfg.workdir = str(selection.workdir)
  dcfg.seed = selection.seed
  return dcfg


def expected(dcfg, known: selection_stage.Known) -> list:
  """Every part and the selection, with the requests `run` will make (expected_requests) from the known ids."""
  d = dcfg.distill
  store_path = pathlib.Path(d.store)
  within, sample_from = known.within(d.within), known.within(d.sample_within)
  ready = (known.pool and (store_path / formats.MANIFEST).is_file()
           and all(known.within(p) and known.within(p)[0] for p in (d.within, d.sample_within) if p))
  requests = {}
  if ready:
    requests = expected_requests(dcfg, stores.TokenStore(store_path), known.models(), within, sample_from)
  out = [(f"distill {part}", folder, requests.get(part)) for part, folder in parts(dcfg, requests).items()]
  return out + [("selection", pathlib.Path(dcfg.workdir), requests.get("selection"))]


def plan(dcfg, sizes: selection_stage.Sizes, counted: set) -> float:
  """Prints what one selection has the prior and the conditional score (scoring_plan: the report's count), in FLOPs
  and device-hours; returns what it adds to a plan that already counted the parts in `counted` (the sample, shared by
  every τ and both methods, once)."""
  d = dcfg.distill
  per_sequence = 2 * transformer.flops_per_token(transformer.ModelSpec.from_config(dcfg.model), sizes.seq_len,
                                                 training=False) * sizes.seq_len
  p = scoring_plan(dcfg, sizes.candidates, sizes.shared_from, sizes.seq_len)
  flops = per_sequence * (p["sample"] + p["rescored"])
  hours = (p["sample"] + p["rescored"]) * sizes.seq_len / max(sizes.tokens_per_s, 1.0) / 3600
  planned = (f" (planned at cascade_factor {d.cascade_factor:g}: with distill.target_recall {d.target_recall:g} the "
             "factor is chosen after the fit, printed with its cost)" if d.method == CASCADE and d.target_recall else "")
  print(f"  {pathlib.Path(dcfg.workdir).name}: scores {p['sample']:,} sampled (of {sizes.shared_from:,}, shared by "
        f"every tau) + {p['rescored']:,} rescored sequences = {flops:.3e} FLOPs, {hours:,.2f} device-hours at "
        f"{sizes.tokens_per_s:,.0f} pool tok/s per device; charged {p['share']:.1%} of scoring its "
        f"{sizes.candidates:,} candidates{planned}")
  sampled = "distill sample" in counted
  counted.add("distill sample")
  return per_sequence * p["rescored"] if sampled else flops


def fits(dcfg, sizes: selection_stage.Sizes) -> None:
  """A sample too small to fit a scorer is refused before the pipeline scores anything."""
  if not dcfg.distill.scorer:
    check_sample(dcfg, sizes.shared_from if dcfg.distill.sample_within else sizes.candidates)


STAGE = selection_stage.register(selection_stage.SelectionStage("distill", pipeline_config, expected, plan, run,
                                                                 check_values, fits))
