"""The distill stage's parts, shared by every τ: the sample, its scores, the fitted scorer (an artifact of its
own) and the pool's predictions (a chunked, CRC-checked array)."""
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
from colorjax import score as score_lib
from colorjax.artifacts import chunked
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import ngrams
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import losses
from colorjax.selection import artifact as selection_lib
from colorjax.training import ngram_scorer as scorer_lib
from colorjax.training import preemption
from colorjax.artifacts import scores as scores_lib

SCORER = formats.Kind("colorjax.scorer", "a fitted scorer", "the distill stage (<workdir>/scorer)")
PREDICTIONS = "predictions.npy"  # float32 [pool sequences], with done.npy and crc32.npy (artifacts.chunked)
SAMPLE_STREAM = 13  # the sample's permutation stream (selection_lib.RANDOM_STREAM is the random baseline's)
MIN_FIT = 8  # sampled sequences each fold needs at least (to train on, held out): fewer cannot be measured
Features = scorer_lib.Features
predict = scorer_lib.predict
spearman = scorer_lib.spearman


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


def scored(cfg, workdir: pathlib.Path, index: pathlib.Path) -> scores_lib.Scores:
  """The prior's and conditional's scores of `index`: the score stage, restricted to it (every host)."""
  score_lib.run(score_config(cfg, workdir, index))
  scores = scores_lib.Scores(workdir)
  scores.check_complete()
  return scores


def folders_of(cfg, workdir: pathlib.Path) -> dict:
  """Where each step's artifact goes: the τ-independent parts, then the selection (the workdir)."""
  parts = pathlib.Path(cfg.distill.parts).resolve() if cfg.distill.parts else workdir.with_name(workdir.name + "-parts")
  folders = {name: parts / name for name in ("sample", "sample_scores", "scorer", "predictions")}
  return folders | {"selection": workdir}


# ----------------------------------------------------------------------------------------------------------------
# 3. The scorer


def features_of(cfg, store: stores.TokenStore) -> Features:
  return Features(int(cfg.distill.buckets), int(cfg.distill.ngram), tuple(sorted({store.eos_id, store.pad_id})))


def scorer_request(cfg, scores_id: str, features: Features, tokenizer_sha: str) -> dict:
  d = cfg.distill
  return {"scores": scores_id, "features": features.describe(), "tokenizer": tokenizer_sha,
          "fit": {"model": "linear-ngram-mean", "objective": d.objective, "folds": folds(cfg), "steps": int(d.steps),
                  "eval_every": int(d.eval_every), "batch": int(d.batch), "lr": float(d.lr), "l2": float(d.l2),
                  "seed": int(d.seed)},
          "recall_estimate": {"resamples": scorer_lib.RESAMPLES, "quantile": scorer_lib.CAUTION}}


def fit_scorer(cfg, folder: pathlib.Path, store: stores.TokenStore, scores: scores_lib.Scores) -> pathlib.Path:
  """Cross-fit the scorer on the sample's CoLoR scores (training.ngram_scorer) and publish it with its
  out-of-fold quality: Spearman ρ and the recall estimate."""
  d = cfg.distill
  features = features_of(cfg, store)
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


def predictions_request(cfg, scorer_id: str, store_id: str) -> dict:
  return {"scorer": scorer_id, "store": store_id, "block_rows": int(cfg.distill.block_rows), "checksums": "crc32"}


def predict_pool(cfg, folder: pathlib.Path, store: stores.TokenStore, scorer: dict) -> np.ndarray:
  """Predictions for every pool sequence, `block_rows` at a time, in a chunked array (artifacts.chunked): a killed
  run resumes to the bytes of an uninterrupted one, a damaged chunk is predicted again. Returns them read-only."""
  request = predictions_request(cfg, scorer["id"], store.id)
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


class Stream:
  """Streams a prediction array's float32 values, `block_rows` at a time (selection_lib.top_k's input); with `ids`, only
  those pool sequences', positions counting within `ids`."""

  def __init__(self, values, block_rows: int, ids: np.ndarray | None = None):
    self.values, self.block_rows, self.ids = values, int(block_rows), ids

  def __iter__(self):
    n = self.values.shape[0] if self.ids is None else self.ids.size
    for start in range(0, n, self.block_rows):
      rows = slice(start, start + self.block_rows) if self.ids is None else self.ids[start:start + self.block_rows]
      yield start, np.asarray(self.values[rows], np.float32)


class Concat:
  """Several score streams as one, positions counting on from one part to the next."""

  def __init__(self, parts: list):
    self.parts = parts  # (stream, size)

  def __iter__(self):
    offset = 0
    for stream, size in self.parts:
      for start, values in stream:
        yield offset + start, values
      offset += size


def check_models(cfg, store: stores.TokenStore) -> list[dict]:
  """The prior and conditional exist and fit the pool before anything is sampled or scored; their column names and
  content ids (what the score requests name)."""
  entries, spec = score_lib.model_entries(score_config(cfg))
  stores.check_store_fits(store, spec)
  tokenizer_lib.check_same_tokenizer(entries[0][2]["tokenizer"], f"prior {cfg.distill.prior}",
                                     store.manifest["tokenizer"], f"pool store {store.path}")
  return score_lib.describe_models(entries)
