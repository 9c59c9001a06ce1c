"""The `distill` stage: CoLoR-Filter at a fraction of the scoring cost, by a fast scorer distilled from a sample.

CoLoR scores every pool sequence with two LMs. Most of the pool is plainly far from the target, which cheap features
of the text show, so (as FineWeb-Edu's and DCLM's classifiers are distilled from expensive labels):
  1. sample    a uniform random `distill.sample_fraction` of the pool (a selection folder: `<parts>/sample`);
  2. label it  with the prior and the conditional: the score stage restricted to that index
               (`<parts>/sample_scores`);
  3. fit       a linear model on hashed token n-gram features (dsir's featurizer) to the CoLoR score, with optax,
               `distill.holdout_fraction` of the sample held out to measure it (Spearman ρ) (`<parts>/scorer`);
  4. predict   every pool sequence, streaming `distill.block_rows` rows at a time (memory independent of the
               pool), written chunk by chunk with done flags so a killed run resumes to the same bytes
               (`<parts>/predictions`);
  5. select    the top 1/τ of the predictions into --config.workdir (the select stage's format: `train` takes it
               as --config.data.index).
Steps 1-4 do not depend on τ: `distill.parts` (default `<workdir>-parts`) can be shared by the selections of
several τ, which then cost one prediction pass. The sample is drawn with `distill.seed` from a permutation stream of
its own (never a prefix of a random baseline's or a nested pool's draw), from `distill.sample_within` when set (the
largest fixed-n pool: one sample serves every τ), else from the selection's candidates. Process 0 holds a lock on
the parts folder while it writes them, so a second job waits for nothing half-made.

Damage is caught, never used: the scorer records its weights' sha256 and each predicted chunk its CRC-32; a
truncated or altered file is named with the fix (a damaged prediction chunk is predicted again on the next run).

`distill.method=color_cascade` spends more scoring for more fidelity: the prior and the conditional rescore the
top `distill.cascade_factor`/τ of the pool by prediction (`<parts>/candidates-m<m>`, `<parts>/rescored-m<m>`), and
the top 1/τ of the pool is taken from those by the true CoLoR score. With cascade_factor = τ the candidates are the
whole pool and the selection is exactly CoLoR's.
A fitted scorer is an artifact of its own (weights, features, the sample scores it was fitted on, the tokenizer):
`distill.scorer` reuses one on another pool, which skips steps 1-3; a scorer whose tokenizer or features differ
from the pool's is refused by name.
"""
import dataclasses
import hashlib
import io
import json
import math
import pathlib
import shutil
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from colorjax import config as config_lib
from colorjax import console
from colorjax import dsir
from colorjax import errors
from colorjax import methods
from colorjax import score as score_lib
from colorjax import select as select_lib
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import preemption

METHOD = "color_distilled"
CASCADE = "color_cascade"
SCORER = formats.Kind("colorjax.scorer", "a fitted scorer", "the distill stage (<workdir>/scorer)")
PREDICTIONS = "predictions.npy"  # float32 [pool sequences], in a folder with done.npy (uint8 per chunk)
CHECKSUMS = "crc32.npy"  # uint32 per chunk: the CRC-32 of that chunk's predictions, written before its done flag
SAMPLE_STREAM = 13  # the sample's permutation stream (select.RANDOM_STREAM is the random baseline's)
MIN_FIT = 8  # sampled sequences each part of the fit needs at least (train, held out): fewer cannot be measured


@dataclasses.dataclass(frozen=True)
class Features:
  """Hashed token n-grams of orders 1..ngram into `buckets` (dsir's featurizer), EOS/PAD n-grams dropped."""
  buckets: int
  ngram: int
  skip: tuple

  def of(self, tokens_bt: np.ndarray) -> np.ndarray:
    """[B, F] bucket ids; `buckets` marks a dropped n-gram (its weight is pinned to zero)."""
    return dsir.feature_buckets(tokens_bt, self.buckets, self.ngram, self.skip).astype(np.int32)

  def describe(self) -> dict:
    return {"name": dsir.FEATURES, "buckets": self.buckets, "ngram": self.ngram, "skip_ids": list(self.skip)}


# ----------------------------------------------------------------------------------------------------------------
# The model: a linear function of the mean of a sequence's n-gram features (an embedding bag of width 1)


def predict(weights: np.ndarray, bias: float, features_bf: np.ndarray) -> np.ndarray:
  """[B] predicted scores: bias + the mean weight of each row's kept n-grams (numpy, for streaming the pool)."""
  table = np.append(np.asarray(weights, np.float32), np.float32(0.0))
  kept = np.maximum((features_bf < weights.size).sum(axis=1), 1)
  return (bias + table[features_bf].sum(axis=1) / kept).astype(np.float32)


def _predict_jax(params, features_bf, buckets: int):
  table = jnp.append(params["w"], 0.0)
  kept = jnp.maximum(jnp.sum(features_bf < buckets, axis=1), 1)
  return params["b"] + jnp.sum(table[features_bf], axis=1) / kept


def fit_linear(features_of, targets: np.ndarray, buckets: int, steps: int, batch: int, lr: float, l2: float,
               seed: int, stop=lambda: False) -> tuple[np.ndarray, float]:
  """Weights [buckets] and bias fitted by Adam to the mean squared error against standardized targets (plus `l2`
  times the squared weights), `batch` rows a step in a seeded order; `features_of(rows)` featurizes rows of the
  sample on demand, so memory does not grow with the sample. Returns them in the targets' units. `stop()` is asked
  after every step: True ends the fit with errors.Preempted (nothing is written; a re-run fits again)."""
  mean, std = float(targets.mean()), float(targets.std()) or 1.0
  y = (targets - mean) / std
  tx = optax.adam(lr)
  params = {"w": jnp.zeros(buckets, jnp.float32), "b": jnp.zeros((), jnp.float32)}
  state = tx.init(params)

  @jax.jit
  def step(params, state, features_bf, y_b):
    def loss(p):
      return jnp.mean(jnp.square(_predict_jax(p, features_bf, buckets) - y_b)) + l2 * jnp.sum(jnp.square(p["w"]))
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  order = stores.Permutation(y.size, seed, stream=11)
  for i in range(steps):
    rows = order(np.arange(i * batch, (i + 1) * batch) % y.size)
    params, state = step(params, state, jnp.asarray(features_of(rows)), jnp.asarray(y[rows], jnp.float32))
    if stop():
      raise errors.Preempted(f"stopped during the scorer's fit at step {i + 1} of {steps} (nothing of the fit is kept; "
                             "the sample's scores are): re-run the same command to fit again", i + 1)
  return np.asarray(params["w"]) * std, float(params["b"]) * std + mean


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
  """Spearman rank correlation (ties broken by position: scores are continuous); None when undefined (fewer than two
  values, or a constant one)."""
  if a.size < 2:
    return None
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  rho = float(np.corrcoef(ra, rb)[0, 1])
  return rho if math.isfinite(rho) else None


# ----------------------------------------------------------------------------------------------------------------
# The stage


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
  if not 0 < d.sample_fraction <= 1 or not 0 < d.holdout_fraction < 1:
    raise errors.ConfigError(f"distill.sample_fraction={d.sample_fraction} must be in (0, 1] and "
                             f"distill.holdout_fraction={d.holdout_fraction} in (0, 1)")
  if min(d.buckets, d.ngram, d.steps, d.batch, d.block_rows) < 1 or not d.lr > 0 or d.l2 < 0:
    raise errors.ConfigError("distill.buckets, ngram, steps, batch and block_rows must be >= 1, distill.lr > 0 and "
                             "distill.l2 >= 0")
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


def _folders(cfg, workdir: pathlib.Path) -> dict:
  """Where each step's artifact goes: the τ-independent parts, then the selection (the workdir)."""
  parts = pathlib.Path(cfg.distill.parts).resolve() if cfg.distill.parts else workdir.with_name(workdir.name + "-parts")
  folders = {name: parts / name for name in ("sample", "sample_scores", "scorer", "predictions")}
  return folders | {"selection": workdir}


def _features(cfg, store: stores.TokenStore) -> Features:
  return Features(int(cfg.distill.buckets), int(cfg.distill.ngram), tuple(sorted({store.eos_id, store.pad_id})))


def sample_source(cfg) -> tuple[str, str]:
  """(the selection the sample is drawn from, the setting that named it): distill.sample_within, else the
  candidates (distill.within); ("", "") for the whole store."""
  d = cfg.distill
  return (d.sample_within, "distill.sample_within") if d.sample_within else (d.within, "distill.within")


def sample_size(cfg, n: int) -> int:
  """The sequences the prior and the conditional score to label the scorer, of `n` the sample is drawn from: the one
  count the stage draws, the dry run plans and the report divides by."""
  return max(2, min(n, int(round(cfg.distill.sample_fraction * n))))


def holdout_count(cfg, m: int) -> int:
  """Sampled sequences held out of the fit to measure it."""
  return max(1, int(round(cfg.distill.holdout_fraction * m)))


def check_sample(cfg, n: int) -> None:
  """A sample too small to fit and measure a scorer is refused before anything is scored (its Spearman ρ would be
  undefined)."""
  m = sample_size(cfg, n)
  held = holdout_count(cfg, m)
  if min(held, m - held) < MIN_FIT:
    raise errors.ConfigError(
        f"distill.sample_fraction={cfg.distill.sample_fraction:g} samples {m:,} of {n:,} sequences ({held:,} held "
        f"out): too few to fit and measure a scorer (each part needs >= {MIN_FIT}); raise distill.sample_fraction "
        "or use a larger pool")


def sample_request(cfg, store_id: str, within_id: str | None = None) -> dict:
  """What decides the sample: its fraction, seed, draw and source (`within_id`: the selection it is drawn from)."""
  request = {"method": "uniform_sample", "fraction": float(cfg.distill.sample_fraction),
             "seed": int(cfg.distill.seed), "stream": SAMPLE_STREAM, "store": store_id}
  return request | {"within": within_id} if within_id else request


def make_sample(cfg, folder: pathlib.Path, store: stores.TokenStore) -> str:
  """The sampled ids as a selection folder (the score stage's index); returns its id."""
  path, setting = sample_source(cfg)
  source, source_id = select_lib.within_ids(path, store, setting)
  request = sample_request(cfg, store.id, source_id)
  if lineage.up_to_date(folder, request, "another sample", "choose another --config.workdir"):
    return lineage.content_id(request)
  n = store.num_sequences if source is None else source.size
  check_sample(cfg, n)
  m = sample_size(cfg, n)
  ids = select_lib.random_sample(n, m, cfg.distill.seed, cfg.distill.block_rows, SAMPLE_STREAM)
  ids = ids if source is None else source[ids]
  manifest = {"format": formats.SELECTION.format, "id": lineage.content_id(request), "method": "uniform_sample",
              "k": int(m), "num_sequences": n, "tau": n / m, "tokens": int(m) * store.seq_len,
              "store_id": store.id, "store_path": lineage.relative(store.path, folder), "seed": int(cfg.distill.seed),
              "within": None if source is None else {"path": lineage.relative(path, folder), "id": source_id,
                                                     "sequences": int(n)},
              "index_sha256": hashlib.sha256(select_lib.npy_bytes(ids)).hexdigest(), "request": request}
  _publish(folder, {"index.npy": select_lib.npy_bytes(ids)}, manifest)
  return manifest["id"]


def _publish(folder: pathlib.Path, files: dict, manifest: dict) -> None:
  """Write a small artifact through `<folder>.partial` (manifest last, one rename)."""
  lineage.check_new(folder, f"a {folder.name} artifact", "choose another --config.workdir")
  partial = folder.with_name(folder.name + ".partial")
  if partial.exists():
    shutil.rmtree(partial)
  partial.mkdir(parents=True)
  for name, data in files.items():
    (partial / name).write_bytes(data)
  lineage.write_manifest(partial, manifest)
  lineage.publish(partial, folder)


def score_config(cfg, workdir="", index=""):
  """The score stage's config for the prior and the conditional over `index` (the sample, a cascade's candidates):
  what this stage runs, and what its requests' numerics come from (score.numerics_of)."""
  scfg = config_lib.stage_config(cfg, "score", model=cfg.model)
  scfg.workdir, scfg.score.store, scfg.score.index = str(workdir), cfg.distill.store, str(index)
  scfg.score.prior, scfg.score.conditionals = cfg.distill.prior, (cfg.distill.conditional,)
  return scfg


def score_sample(cfg, folders: dict) -> score_lib.Scores:
  """The sample's CoLoR labels: the score stage, restricted to the sample's ids."""
  score_lib.run(score_config(cfg, folders["sample_scores"], folders["sample"]))
  scores = score_lib.Scores(folders["sample_scores"])
  scores.check_complete()
  return scores


def scorer_request(cfg, scores_id: str, features: Features, tokenizer_sha: str) -> dict:
  d = cfg.distill
  return {"scores": scores_id, "features": features.describe(), "tokenizer": tokenizer_sha,
          "fit": {"model": "linear-ngram-mean", "holdout_fraction": float(d.holdout_fraction), "steps": int(d.steps),
                  "batch": int(d.batch), "lr": float(d.lr), "l2": float(d.l2), "seed": int(d.seed)}}


def fit_scorer(cfg, folder: pathlib.Path, store: stores.TokenStore, scores: score_lib.Scores) -> pathlib.Path:
  """Fit the scorer on the sample's CoLoR scores (a held-out part measures it) and publish it."""
  d = cfg.distill
  features = _features(cfg, store)
  request = scorer_request(cfg, scores.id, features, store.manifest["tokenizer"]["sha256"])
  if lineage.up_to_date(folder, request, "another scorer", "choose another --config.workdir"):
    return folder
  start = time.time()
  ids = scores.global_ids(np.arange(scores.num_sequences))
  nll = scores.read(0, scores.num_sequences)
  target = losses.color_score(nll[:, scores.column("prior")], nll[:, scores.column("conditional_0")])
  held = np.zeros(ids.size, bool)
  held[select_lib.random_sample(ids.size, holdout_count(cfg, ids.size), d.seed + 1, d.block_rows)] = True
  train_ids, train_y = ids[~held], target[~held]
  with preemption.Watch(local=True) as watch:
    weights, bias = fit_linear(lambda rows: features.of(store.read(train_ids[rows])), train_y, features.buckets,
                               int(d.steps), int(d.batch), float(d.lr), float(d.l2), int(d.seed),
                               stop=lambda: watch.check()[0])
  if not (np.isfinite(weights).all() and math.isfinite(bias)):
    raise errors.DataError(f"the scorer's fit diverged (non-finite weights) on {scores.path}; lower distill.lr "
                           f"(now {d.lr:g}) and re-run (nothing was written)")
  predicted = predict(weights, bias, features.of(store.read(ids[held])))
  quality = {"spearman_heldout": spearman(predicted, target[held]), "heldout": int(held.sum()),
             "train": int((~held).sum()), "target_std": float(target.std())}
  manifest = {"format": SCORER.format, "id": lineage.content_id(request), "features": features.describe(),
              "bias": bias, "quality": quality, "tokenizer": store.manifest["tokenizer"],
              "scores": {"id": scores.id, "path": lineage.relative(scores.path, folder)},
              "seconds": time.time() - start, "request": request, "config": json.loads(cfg.to_json()),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  buffer = io.BytesIO()
  np.save(buffer, weights.astype(np.float32))
  manifest["weights_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
  _publish(folder, {"weights.npy": buffer.getvalue()}, manifest)
  rho = quality["spearman_heldout"]
  print(f"distill: scorer fitted on {quality['train']:,} sampled sequences in {manifest['seconds']:.0f}s; Spearman "
        f"rho on {quality['heldout']:,} held out: {'undefined' if rho is None else f'{rho:.3f}'} -> {folder}")
  return folder


def open_scorer(path, store: stores.TokenStore, features_wanted: Features | None = None) -> dict:
  """A fitted scorer, checked against the pool it will rank: same tokenizer (by content), same features."""
  manifest = formats.open_manifest(path, SCORER)
  tokenizer_lib.check_same_tokenizer(manifest["tokenizer"], f"scorer {path}", store.manifest["tokenizer"],
                                     f"pool store {store.path}")
  if manifest["features"]["name"] != dsir.FEATURES:
    raise errors.DataError(f"scorer {path} uses features {manifest['features']['name']!r}, this colorjax computes "
                           f"{dsir.FEATURES!r}; fit the scorer again")
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


def _open_npy(path: pathlib.Path, dtype, shape: tuple, fix: str, mode: str = "r"):
  """A memmap of an .npy file that must hold `dtype[shape]`, checked before it is opened: numpy's r+ mode would
  silently extend a truncated file with zeros."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      header = read(f)
      offset = f.tell()
  except FileNotFoundError as e:
    raise errors.DataError(f"{path} is missing; {fix}") from e
  except (ValueError, EOFError, OSError) as e:
    raise errors.DataError(f"{path} is not a readable .npy file ({e}); {fix}") from e
  want = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
  if tuple(header[0]) != tuple(shape) or np.dtype(header[2]) != np.dtype(dtype) or path.stat().st_size != want:
    raise errors.DataError(f"{path} holds {np.dtype(header[2])}{list(header[0])} in {path.stat().st_size:,} bytes, "
                           f"not {np.dtype(dtype)}{list(shape)} in {want:,} (truncated or replaced); {fix}")
  return np.lib.format.open_memmap(path, mode=mode)


def _chunk_crc(values, first: int, stop: int) -> int:
  return zlib.crc32(np.ascontiguousarray(values[first:stop], np.float32).tobytes())


def _prediction_arrays(folder: pathlib.Path, n: int, chunks: int, mode: str = "r"):
  """(predictions, done flags, CRC-32 per chunk) of a predictions folder, each checked for its size."""
  fix = f"delete {folder} and re-run (the pool is predicted again; nothing else is lost)"
  return (_open_npy(folder / PREDICTIONS, np.float32, (n,), fix, mode),
          _open_npy(folder / "done.npy", np.uint8, (chunks,), fix, mode),
          _open_npy(folder / CHECKSUMS, np.uint32, (chunks,), fix, mode))


def predict_pool(cfg, folder: pathlib.Path, store: stores.TokenStore, scorer: dict) -> np.ndarray:
  """Predictions for every pool sequence, `block_rows` at a time; each chunk is written, its CRC-32 recorded, then
  flagged done, so a killed run resumes where it stopped and ends with the bytes of an uninterrupted one; a done
  chunk whose bytes no longer match its CRC (a disk fault) is predicted again. Returns a read-only memmap."""
  request = _predictions_request(cfg, scorer["id"], store.id)
  n, rows = store.num_sequences, int(cfg.distill.block_rows)
  chunks = -(-n // rows)
  if (folder / formats.MANIFEST).exists():
    saved = formats.read_json(folder / formats.MANIFEST)
    if saved.get("request") != lineage.normalized(request):
      raise errors.DataError(f"{folder} holds predictions of another scorer or pool (differs in "
                             f"{', '.join(lineage.differences(saved.get('request') or {}, request))}); choose "
                             "another --config.workdir (nothing was overwritten)")
  else:
    folder.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(folder / PREDICTIONS, mode="w+", dtype=np.float32, shape=(n,)).flush()
    np.save(folder / "done.npy", np.zeros(chunks, np.uint8))
    np.save(folder / CHECKSUMS, np.zeros(chunks, np.uint32))
    lineage.write_manifest(folder, {"format": "colorjax.predictions", "id": lineage.content_id(request),
                                    "num_sequences": n, "chunk_rows": rows, "request": request,
                                    "scorer": scorer["id"], "store_id": store.id})
  values, done, crc = _prediction_arrays(folder, n, chunks, "r+")
  damaged = [int(c) for c in np.nonzero(done)[0] if _chunk_crc(values, c * rows, min(n, (c + 1) * rows)) != crc[c]]
  if damaged:
    print(f"distill: {len(damaged)} predicted chunk(s) of {folder / PREDICTIONS} no longer match their CRC-32 "
          f"(chunks {damaged[:8]}{' ...' if len(damaged) > 8 else ''}); predicting them again")
    done[damaged] = 0
    done.flush()
  features = Features(int(scorer["features"]["buckets"]), int(scorer["features"]["ngram"]),
                      tuple(scorer["features"]["skip_ids"]))
  todo = np.nonzero(done == 0)[0]
  bar = console.Progress(total=int(sum(min(rows, n - c * rows) for c in todo)), unit="seq", desc="predict")
  with preemption.Watch(local=True) as watch:
    for i, chunk in enumerate(todo):
      first, stop = int(chunk) * rows, min(n, (int(chunk) + 1) * rows)
      block = predict(scorer["weights"], scorer["bias"], features.of(store.read(np.arange(first, stop))))
      values[first:stop] = block
      values.flush()
      crc[chunk] = _chunk_crc(block, 0, block.size)
      crc.flush()
      done[chunk] = 1
      done.flush()
      bar.update(stop - first)
      if watch.check()[0] and i + 1 < todo.size:
        bar.close()
        raise errors.Preempted(f"{watch.reason()} during the pool's prediction: {int(done.sum())} of {chunks} chunks "
                               f"are written in {folder} (done flags set); re-run the same command to predict the "
                               "rest", int(done.sum()), watch.signum)
  bar.close()
  del values, done, crc
  return open_predictions(folder, n)


def open_predictions(folder: pathlib.Path, n: int) -> np.ndarray:
  """The pool's predictions (read-only), every chunk done and matching its CRC-32, or a DataError naming the fix."""
  manifest = formats.read_manifest(folder)
  rows = int(manifest["chunk_rows"])
  chunks = -(-n // rows)
  values, done, crc = _prediction_arrays(folder, n, chunks)
  if not done.all():
    raise errors.DataError(f"{folder}: {int((done == 0).sum())} of {chunks} chunks are not predicted yet; re-run the "
                           "same command to finish them")
  for c in range(chunks):
    if _chunk_crc(values, c * rows, min(n, (c + 1) * rows)) != crc[c]:
      raise errors.DataError(f"{folder / PREDICTIONS}: chunk {c} (rows {c * rows:,}..) does not match its CRC-32 "
                             "(damaged since it was written); re-run the same command: it predicts damaged chunks "
                             "again")
  return values


def _within(request: dict, within_id: str | None) -> dict:
  """A request of a selection among `distill.within`'s candidates names them by id (unset: unchanged)."""
  return request | {"within": within_id} if within_id else request


def selection_request(cfg, predictions_id: str, store_id: str, within_id: str | None = None) -> dict:
  d = cfg.distill
  return _within({"method": METHOD, "tau": float(d.tau), "tokens": int(d.tokens), "predictions": predictions_id,
                  "store": store_id}, within_id)


class _Stream:
  """Streams a prediction array's float32 values, `block_rows` at a time (select.top_k's input); with `ids`, only
  those pool sequences', positions counting within `ids`."""

  def __init__(self, values, block_rows: int, ids: np.ndarray | None = None):
    self.values, self.block_rows, self.ids = values, int(block_rows), ids

  def __iter__(self):
    n = self.values.shape[0] if self.ids is None else self.ids.size
    for start in range(0, n, self.block_rows):
      rows = slice(start, start + self.block_rows) if self.ids is None else self.ids[start:start + self.block_rows]
      yield start, np.asarray(self.values[rows], np.float32)


def run(cfg) -> pathlib.Path:
  check_settings(cfg)
  d = cfg.distill
  workdir = pathlib.Path(cfg.workdir).resolve()
  store = stores.TokenStore(d.store)
  within, within_id = select_lib.within_ids(d.within, store, "distill.within")
  candidates = store.num_sequences if within is None else within.size
  select_lib.keep_count(candidates, store.seq_len, d.tau, d.tokens, "distill")
  sample_path, setting = sample_source(cfg)
  source, source_id = select_lib.within_ids(sample_path, store, setting)
  folders = _folders(cfg, workdir)
  models = _check_models(cfg, store) if (not d.scorer or d.method == CASCADE) else None
  if d.scorer:
    open_scorer(pathlib.Path(d.scorer).resolve(), store, _features(cfg, store))
  else:
    check_sample(cfg, store.num_sequences if source is None else source.size)
  expected = expected_requests(cfg, store, models, (within_id, candidates) if within_id else None, source_id)
  # the output folder, before any work: up to date (nothing to do), or free to be written
  if lineage.up_to_date(workdir, expected["selection"], "another selection", "choose another --config.workdir"):
    print(f"distill: {workdir} is up to date; nothing to do")
    return workdir
  lineage.check_new(workdir, "a distilled selection", "choose another --config.workdir")
  with lineage.Lock(folders["predictions"].parent):  # the shared parts: one job writes them
    scorer_path = pathlib.Path(d.scorer).resolve() if d.scorer else folders["scorer"]
    if not d.scorer:
      console.on_main_then_sync(lambda: make_sample(cfg, folders["sample"], store), "distill sample")
      scores = score_sample(cfg, folders)  # every host scores its rows of the sample ("complete" when it is)
      console.on_main_then_sync(lambda: fit_scorer(cfg, scorer_path, store, scores), "distill fit")
    scorer = open_scorer(scorer_path, store, _features(cfg, store))
    console.on_main_then_sync(lambda: predict_pool(cfg, folders["predictions"], store, scorer), "distill predict")
    predictions_id = formats.read_json(folders["predictions"] / formats.MANIFEST)["id"]
    values = open_predictions(folders["predictions"], store.num_sequences)
    if d.method == CASCADE:
      rescored = rescore_candidates(cfg, folders, store, values, predictions_id, within, within_id)
      request = cascade_request(cfg, rescored.id, store.id, within_id)
    else:
      rescored, request = None, selection_request(cfg, predictions_id, store.id, within_id)
  if not console.is_main():  # selection is CPU work of process 0
    return folders["selection"]
  with lineage.Lock(workdir):
    return _select(cfg, folders["selection"], store, values, request, scorer, rescored, within)


def candidate_count(cfg, n: int, k: int) -> int:
  """The cascade's rescored candidates: cascade_factor / τ of the pool (τ = n / k for a token budget), at most all."""
  d = cfg.distill
  tau = float(d.tau) if not d.tokens else n / k
  return min(n, max(k, int(math.ceil(d.cascade_factor * n / tau - 1e-9))))


def candidates_request(m: int, predictions_id: str, store_id: str, within_id: str | None = None) -> dict:
  return _within({"method": "cascade_candidates", "m": int(m), "predictions": predictions_id, "store": store_id},
                 within_id)


def cascade_request(cfg, rescored_id: str, store_id: str, within_id: str | None = None) -> dict:
  d = cfg.distill
  return _within({"method": CASCADE, "tau": float(d.tau), "tokens": int(d.tokens), "factor": float(d.cascade_factor),
                  "rescored": rescored_id, "store": store_id}, within_id)


def _candidates_folder(m: int, within_id: str | None) -> str:
  """candidates-m<m> (and rescored-m<m>) of the whole pool; of `distill.within`'s candidates, named by their id."""
  return f"m{m}" + (f"-within-{within_id}" if within_id else "")


def rescore_candidates(cfg, folders: dict, store: stores.TokenStore, values, predictions_id: str,
                       within: np.ndarray | None = None, within_id: str | None = None) -> score_lib.Scores:
  """The top m of the candidates (the pool, or `distill.within`) by prediction (process 0 writes them), scored by
  the prior and the conditional (every host: the score stage, restricted to them)."""
  d = cfg.distill
  n = store.num_sequences if within is None else within.size
  m = candidate_count(cfg, n, select_lib.keep_count(n, store.seq_len, d.tau, d.tokens, "distill"))
  parts, name = folders["predictions"].parent, _candidates_folder(m, within_id)
  candidates, rescored = parts / f"candidates-{name}", parts / f"rescored-{name}"
  request = candidates_request(m, predictions_id, store.id, within_id)

  def write_candidates():
    if lineage.up_to_date(candidates, request, "other candidates", "choose another distill.parts"):
      return
    ids, _ = select_lib.top_k(_Stream(values, d.block_rows, within), m)
    ids = ids if within is None else within[ids]
    manifest = {"format": formats.SELECTION.format, "id": lineage.content_id(request), "method": "cascade_candidates",
                "k": int(m), "num_sequences": n, "tau": n / m, "tokens": int(m) * store.seq_len, "store_id": store.id,
                "store_path": lineage.relative(store.path, candidates), "request": request,
                "index_sha256": hashlib.sha256(select_lib.npy_bytes(ids)).hexdigest()}
    _publish(candidates, {"index.npy": select_lib.npy_bytes(ids)}, manifest)

  console.on_main_then_sync(write_candidates, "cascade candidates")
  score_lib.run(score_config(cfg, rescored, candidates))
  scores = score_lib.Scores(rescored)
  scores.check_complete()
  return scores


def _scoring_flops(scores: score_lib.Scores) -> float:
  """FLOPs the prior and the conditional spent on a score folder (SPEC §5: 2N + 4LdT per token per model)."""
  spec = transformer.ModelSpec(**scores.manifest["model"])
  seq = int(scores.manifest["store"]["seq_len"])
  return float(transformer.flops_per_token(spec, seq, training=False)) * scores.num_sequences * seq * len(
      scores.manifest["models"])


def reused_scorer_id(cfg) -> str | None:
  """The id of the fitted scorer `distill.scorer` names (None when it is not there yet)."""
  path = pathlib.Path(cfg.distill.scorer) / formats.MANIFEST
  return formats.read_json(path).get("id") if path.is_file() else None


def expected_requests(cfg, store: stores.TokenStore, models: list[dict] | None,
                      within: tuple[str, int] | None = None, sample_from: str | None = None) -> dict:
  """Every artifact's request computed from the inputs' ids alone, as `run` will make them (run checks its output
  with it before any work; the pipeline's preflight lists stale parts with it): sample -> its scores -> the scorer
  -> the predictions -> (a cascade's candidates -> their scores) -> the selection. `within`: (id, size) of the
  candidates when `distill.within` is set; `sample_from`: the id of the selection the sample is drawn from;
  `models`: the prior's and conditional's names and ids (None: not known yet). The scores' numerics are the score
  stage's own (score.numerics_of on the config this stage scores with), so score.fp8 is in them."""
  d = cfg.distill
  within_id, n = within if within else (None, store.num_sequences)
  numerics = score_lib.numerics_of(score_config(cfg))
  out = {}
  if d.scorer:
    scorer_id = reused_scorer_id(cfg)
  elif models is None:
    return {}
  else:
    out["sample"] = sample_request(cfg, store.id, sample_from)
    out["sample_scores"] = score_lib.scores_request(store.id, models, numerics, lineage.content_id(out["sample"]))
    out["scorer"] = scorer_request(cfg, lineage.content_id(out["sample_scores"]), _features(cfg, store),
                                   store.manifest["tokenizer"]["sha256"])
    scorer_id = lineage.content_id(out["scorer"])
  if scorer_id is None:
    return out
  out["predictions"] = _predictions_request(cfg, scorer_id, store.id)
  predictions_id = lineage.content_id(out["predictions"])
  if d.method == CASCADE:
    if models is None:
      return out
    m = candidate_count(cfg, n, select_lib.keep_count(n, store.seq_len, d.tau, d.tokens, "distill"))
    name = _candidates_folder(m, within_id)
    out[f"candidates-{name}"] = candidates_request(m, predictions_id, store.id, within_id)
    out[f"rescored-{name}"] = score_lib.scores_request(store.id, models, numerics,
                                                       lineage.content_id(out[f"candidates-{name}"]))
    out["selection"] = cascade_request(cfg, lineage.content_id(out[f"rescored-{name}"]), store.id, within_id)
  else:
    out["selection"] = selection_request(cfg, predictions_id, store.id, within_id)
  return out


def parts(cfg, requests: dict) -> dict:
  """Where `run` puts the artifacts before the selection: the τ-independent ones (no sample, sample scores or scorer
  when `distill.scorer` reuses one) and a cascade's candidates and their scores."""
  folders = _folders(cfg, pathlib.Path(cfg.workdir).resolve())
  root = folders["predictions"].parent
  fitted = () if cfg.distill.scorer else ("sample", "sample_scores", "scorer")
  named = {name: folders[name] for name in fitted + ("predictions",)}
  return named | {name: root / name for name in requests if name.startswith(("candidates-", "rescored-"))}


def _predictions_request(cfg, scorer_id: str, store_id: str) -> dict:
  return {"scorer": scorer_id, "store": store_id, "block_rows": int(cfg.distill.block_rows), "checksums": "crc32"}


def _check_models(cfg, store: stores.TokenStore) -> list[dict]:
  """The prior and conditional exist and fit the pool before anything is sampled or scored; their column names and
  content ids (what the score requests name)."""
  entries, spec = score_lib.model_entries(score_config(cfg))
  stores.check_store_fits(store, spec)
  tokenizer_lib.check_same_tokenizer(entries[0][2]["tokenizer"], f"prior {cfg.distill.prior}",
                                     store.manifest["tokenizer"], f"pool store {store.path}")
  return score_lib.describe_models(entries)


def _select(cfg, folder: pathlib.Path, store: stores.TokenStore, values, request: dict, scorer: dict,
            rescored: score_lib.Scores | None, within: np.ndarray | None) -> pathlib.Path:
  """The top k of the candidates (the pool, or `distill.within`) by prediction, or (cascade) by the true CoLoR
  score among the rescored ones."""
  if lineage.up_to_date(folder, request, "another selection", "choose another --config.workdir"):
    print(f"distill: {folder} is up to date; nothing to do")
    return folder
  d = cfg.distill
  n = store.num_sequences if within is None else within.size
  k = select_lib.keep_count(n, store.seq_len, d.tau, d.tokens, "distill")
  if rescored is None:
    stream = _Stream(values, d.block_rows, within)
    ids, threshold = select_lib.top_k(stream, k)
    ids = ids if within is None else within[ids]
  else:
    stream = select_lib.ScoreStream(rescored, methods.HEADLINE, "conditional_0", d.block_rows)
    rows, threshold = select_lib.top_k(stream, k)
    ids = rescored.global_ids(rows)
  manifest = {
      "format": formats.SELECTION.format, "id": lineage.content_id(request), "method": d.method,
      "tau": float(n / k), "tau_requested": float(d.tau), "tokens_requested": int(d.tokens), "k": int(k),
      "num_sequences": n, "tokens": int(k) * store.seq_len, "threshold": threshold, "seed": None,
      "conditional": None if rescored is None else "conditional_0",
      "scores": None if rescored is None else {"path": lineage.relative(rescored.path, folder), "id": rescored.id,
                                               "models": rescored.manifest["models"]},
      "cascade": None if rescored is None else {"factor": float(d.cascade_factor), "rescored": rescored.num_sequences,
                                                "scoring_flops": _scoring_flops(rescored)},
      "scorer": {"id": scorer["id"], "quality": scorer["quality"]},
      "store_id": store.id, "store_path": lineage.relative(store.path, folder),
      "index_sha256": hashlib.sha256(select_lib.npy_bytes(ids)).hexdigest(),
      "score_stats": select_lib.score_statistics(stream),
      "within": None if within is None else {"path": lineage.relative(d.within, folder), "id": request["within"],
                                             "sequences": int(within.size)},
      "sources": select_lib.label_rates(store, ids, d.block_rows, within), "request": request,
      "config": json.loads(cfg.to_json()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  _publish(folder, {"index.npy": select_lib.npy_bytes(ids)}, manifest)
  print(f"distill: {d.method} k={k:,} of {n:,} (tau {manifest['tau']:.2f}), threshold {threshold:.4f} -> {folder}")
  select_lib.print_sources(manifest["sources"])
  return folder


def scoring_plan(cfg, candidates: int, sampled_from: int, seq_len: int) -> dict:
  """What one selection has the prior and the conditional score, in sequences: the sample (of `sampled_from`, drawn
  once for every τ; none with a reused scorer) and a cascade's rescored candidates (of `candidates`), and the share
  of scoring the candidates that comes to, the sample charged in proportion to the candidates it serves (the same
  count as the report's)."""
  d = cfg.distill
  k = select_lib.keep_count(candidates, seq_len, d.tau, d.tokens, "distill")
  sample = 0 if d.scorer else sample_size(cfg, sampled_from)
  rescored = candidate_count(cfg, candidates, k) if d.method == CASCADE else 0
  charged = sample * candidates / max(sampled_from, 1) + rescored
  return {"k": k, "sample": sample, "rescored": rescored, "charged": charged, "share": charged / candidates}


def describe(cfg) -> None:
  check_settings(cfg)
  d = cfg.distill
  store = stores.TokenStore(d.store)
  within, _ = select_lib.within_ids(d.within, store, "distill.within")
  path, setting = sample_source(cfg)
  source, _ = select_lib.within_ids(path, store, setting)
  n = store.num_sequences if within is None else within.size
  sampled_from = store.num_sequences if source is None else source.size
  if not d.scorer:
    check_sample(cfg, sampled_from)
  plan = scoring_plan(cfg, n, sampled_from, store.seq_len)
  scorer = f"reuses the scorer {d.scorer}" if d.scorer else (
      f"the prior and conditional score a sample of {plan['sample']:,} of {sampled_from:,}, a linear model on hashed "
      f"token 1..{d.ngram}-grams ({d.buckets:,} buckets) predicts the rest")
  cascade = (f"; the cascade rescores the top {plan['rescored']:,} by prediction ({d.cascade_factor:g}/tau)"
             if d.method == CASCADE else "")
  print(f"distill (dry run): {d.method} keeps {plan['k']:,} of {n:,} sequences; {scorer}{cascade}: "
        f"{plan['share']:.1%} of scoring the {n:,} candidates")
  if plan["sample"] or plan["rescored"]:
    _, spec = score_lib.model_entries(score_config(cfg))
    scfg = score_config(cfg)
    for key, value in spec.architecture().items():
      scfg.model[key] = value
    score_lib.describe_nominal(scfg, plan["sample"] + plan["rescored"], store.seq_len, 2)
