"""The distilled CoLoR scorer: a linear function of the mean of a sequence's hashed token n-gram features (an
embedding bag of width 1), fitted with optax to the CoLoR scores of a scored sample.

Fit: `cross_fit` splits the sample into `folds` parts; each fold's model trains on the others and stops early at its
best held-out loss (evaluated every `eval_every` steps), so every sampled sequence gets an out-of-fold prediction,
which measures the scorer honestly: its Spearman ρ and, for every τ and cascade factor, the share of the sample's
true top 1/τ that its predicted top factor/τ holds (`recall_curve`), the estimate the cascade sizes itself by. The
scorer is the mean of the fold models (linear, so one model).

Objectives (`distill.objective`):
  mse      mean squared error against the standardized scores;
  ordinal  all-threshold logistic: one binary "in the top q of the sample" task per q in `TOP_FRACTIONS` (each
           with its own bias, one shared score), which spends the model on ordering the top of the distribution
           (what a selection keeps) instead of the bulk. Its score is mapped back to CoLoR-score units by a least
           squares line (ranks unchanged).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from colorjax import errors
from colorjax.data import ngrams
from colorjax.data import stores

OBJECTIVES = ("mse", "ordinal")
TOP_FRACTIONS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64)  # ordinal: the thresholds, as top shares of the sample
RECALL_TAUS = (2, 4, 7, 8, 16, 32, 64)  # the recall estimate's grid
RECALL_FACTORS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
RESAMPLES, CAUTION = 200, 0.1  # the cascade's recall estimate: the 10th percentile over 200 bootstrap resamples
CACHE_BYTES = 1 << 30  # features of the sample are computed once when they fit in this much memory


@dataclasses.dataclass(frozen=True)
class Features:
  """Hashed token n-grams of orders 1..ngram into `buckets` (data.ngrams), EOS/PAD n-grams dropped."""
  buckets: int
  ngram: int
  skip: tuple

  def of(self, tokens_bt: np.ndarray) -> np.ndarray:
    """[B, F] bucket ids; `buckets` marks a dropped n-gram (its weight is pinned to zero)."""
    return ngrams.feature_buckets(tokens_bt, self.buckets, self.ngram, self.skip).astype(np.int32)

  def describe(self) -> dict:
    return {"name": ngrams.FEATURES, "buckets": self.buckets, "ngram": self.ngram, "skip_ids": list(self.skip)}


class SampleFeatures:
  """Features of the sampled sequences by position in the sample: all computed once when they fit in `max_bytes`,
  else read and hashed per batch (memory then does not grow with the sample)."""

  def __init__(self, features: Features, store: stores.TokenStore, ids: np.ndarray, max_bytes: int = CACHE_BYTES,
               block_rows: int = 4096):
    self.features, self.store, self.ids = features, store, np.asarray(ids)
    width = sum(max(store.seq_len - m + 1, 0) for m in range(1, features.ngram + 1))
    self.table = None
    if self.ids.size * width * 4 <= max_bytes:
      self.table = np.concatenate([features.of(store.read(self.ids[i:i + block_rows]))
                                   for i in range(0, self.ids.size, block_rows)] or [np.zeros((0, width), np.int32)])

  def __call__(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    return self.table[rows] if self.table is not None else self.features.of(self.store.read(self.ids[rows]))


# ----------------------------------------------------------------------------------------------------------------
# The model


def predict(weights: np.ndarray, bias: float, features_bf: np.ndarray) -> np.ndarray:
  """[B] predicted scores: bias + the mean weight of each row's kept n-grams (numpy, for streaming the pool)."""
  table = np.append(np.asarray(weights, np.float32), np.float32(0.0))
  kept = np.maximum((features_bf < weights.size).sum(axis=1), 1)
  return (bias + table[features_bf].sum(axis=1) / kept).astype(np.float32)


def _score_jax(w, features_bf, buckets: int):
  """The shared linear score (no bias) of each row."""
  table = jnp.append(w, 0.0)
  kept = jnp.maximum(jnp.sum(features_bf < buckets, axis=1), 1)
  return jnp.sum(table[features_bf], axis=1) / kept


def _loss_fn(objective: str, buckets: int, l2: float):
  """loss(params, features_bf, y_b) of an objective; y_b: standardized scores (mse) or [B, J] 0/1 labels (ordinal)."""
  def loss(params, features_bf, y_b):
    s = _score_jax(params["w"], features_bf, buckets)
    if objective == "mse":
      value = jnp.mean(jnp.square(s + params["b"][0] - y_b))
    else:
      logits = s[:, None] - params["b"][None, :]
      value = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y_b))
    return value + l2 * jnp.sum(jnp.square(params["w"]))
  return loss


def _labels(objective: str, targets: np.ndarray, thresholds: np.ndarray, mean: float, std: float) -> np.ndarray:
  if objective == "mse":
    return ((targets - mean) / std).astype(np.float32)
  return (targets[:, None] > thresholds[None, :]).astype(np.float32)


@dataclasses.dataclass
class Fit:
  """One fitted model: weights [buckets] and bias in CoLoR-score units, and the step it stopped at."""
  weights: np.ndarray
  bias: float
  best_step: int


def fit_linear(features_of, targets: np.ndarray, buckets: int, steps: int, batch: int, lr: float, l2: float,
               seed: int, objective: str = "mse", held=None, eval_every: int = 100,
               stop=lambda: False) -> Fit:
  """A model fitted by Adam, `batch` rows a step in a seeded order; `features_of(rows)` featurizes rows of the
  training part on demand. `held` = (features_of, targets) of a held-out part: every `eval_every` steps its loss is
  measured and the best parameters are kept (early stopping; no improvement for 5 evaluations ends the fit).
  `stop()` is asked after every step: True ends the fit with errors.Preempted (nothing is written)."""
  if objective not in OBJECTIVES:
    raise errors.ConfigError(f"distill.objective={objective!r}; choose one of {', '.join(OBJECTIVES)}")
  mean, std = float(targets.mean()), float(targets.std()) or 1.0
  fractions = [q for q in TOP_FRACTIONS if q * targets.size >= 2] or [TOP_FRACTIONS[0]]
  thresholds = np.quantile(targets, [1 - q for q in fractions]).astype(np.float32)
  y = _labels(objective, targets, thresholds, mean, std)
  loss = _loss_fn(objective, buckets, l2)
  tx = optax.adam(lr)
  bias0 = jnp.zeros(1, jnp.float32) if objective == "mse" else jnp.asarray((thresholds - mean) / std, jnp.float32)
  params = {"w": jnp.zeros(buckets, jnp.float32), "b": bias0}
  state = tx.init(params)

  @jax.jit
  def step(params, state, features_bf, y_b):
    grads = jax.grad(loss)(params, features_bf, y_b)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  held_loss = None
  if held is not None:
    held_features, held_targets = held
    held_y = _labels(objective, held_targets, thresholds, mean, std)
    held_rows = np.arange(held_targets.size)
    evaluate = jax.jit(loss)
    held_loss = lambda p: float(sum(evaluate(p, jnp.asarray(held_features(held_rows[i:i + 4096])),
                                             jnp.asarray(held_y[i:i + 4096])) * min(4096, held_rows.size - i)
                                    for i in range(0, held_rows.size, 4096)) / held_rows.size)
  best, best_loss, best_step, waited = params, math.inf, 0, 0
  order = stores.Permutation(targets.size, seed, stream=11)
  for i in range(steps):
    rows = order(np.arange(i * batch, (i + 1) * batch) % targets.size)
    params, state = step(params, state, jnp.asarray(features_of(rows)), jnp.asarray(y[rows]))
    if stop():
      raise errors.Preempted(f"stopped during the scorer's fit at step {i + 1} of {steps} (nothing of the fit is kept; "
                             "the sample's scores are): re-run the same command to fit again", i + 1)
    if held_loss is not None and ((i + 1) % eval_every == 0 or i + 1 == steps):
      value = held_loss(params)
      if value < best_loss:
        best, best_loss, best_step, waited = params, value, i + 1, 0
      else:
        waited += 1
        if waited >= 5:
          break
  if held_loss is None:
    best, best_step = params, steps
  w = np.asarray(best["w"], np.float64)
  if objective == "mse":
    return Fit((w * std).astype(np.float32), float(best["b"][0]) * std + mean, best_step)
  return _calibrated(w, features_of, targets, buckets, best_step)


def _calibrated(w: np.ndarray, features_of, targets: np.ndarray, buckets: int, best_step: int) -> Fit:
  """An ordinal model's score mapped to CoLoR-score units by the least-squares line over the training part (a
  positive slope keeps the ranks; a useless score keeps its sign)."""
  rows = np.arange(targets.size)
  s = np.concatenate([predict(w.astype(np.float32), 0.0, features_of(rows[i:i + 4096]))
                      for i in range(0, rows.size, 4096)])
  slope = float(np.cov(s, targets)[0, 1] / max(np.var(s), 1e-12)) if s.size > 1 else 1.0
  slope = slope if slope > 0 else 1.0
  bias = float(targets.mean() - slope * s.mean())
  return Fit((w * slope).astype(np.float32), bias, best_step)


def cross_fit(features_of, targets: np.ndarray, buckets: int, folds: int, seed: int, stop=lambda: False,
              **fit_kw) -> tuple[Fit, np.ndarray, list[int]]:
  """(the mean of the fold models, out-of-fold predictions of every sampled sequence, each fold's best step).
  Fold f trains on the other folds and stops early on fold f; positions are assigned to folds by a seeded
  permutation."""
  n = targets.size
  fold_of = np.empty(n, np.int64)
  fold_of[stores.Permutation(n, seed, stream=12)(np.arange(n))] = np.arange(n) % folds
  oof = np.zeros(n, np.float32)
  weights, biases, steps = [], [], []
  for f in range(folds):
    train_rows, held_rows = np.nonzero(fold_of != f)[0], np.nonzero(fold_of == f)[0]
    fit = fit_linear(lambda r, t=train_rows: features_of(t[r]), targets[train_rows], buckets, seed=seed + f,
                     held=(lambda r, h=held_rows: features_of(h[r]), targets[held_rows]), stop=stop, **fit_kw)
    oof[held_rows] = np.concatenate([predict(fit.weights, fit.bias, features_of(held_rows[i:i + 4096]))
                                     for i in range(0, held_rows.size, 4096)])
    weights.append(fit.weights)
    biases.append(fit.bias)
    steps.append(fit.best_step)
  return Fit(np.mean(weights, axis=0).astype(np.float32), float(np.mean(biases)), int(np.median(steps))), oof, steps


# ----------------------------------------------------------------------------------------------------------------
# Measuring a ranking against the true scores


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
  """Spearman rank correlation (ties broken by position: scores are continuous); None when undefined (fewer than two
  values, or a constant one)."""
  if a.size < 2:
    return None
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  rho = float(np.corrcoef(ra, rb)[0, 1])
  return rho if math.isfinite(rho) else None


def top_recall(true: np.ndarray, predicted: np.ndarray, keep: int, candidates: int) -> float | None:
  """The share of the `keep` truly highest that the `candidates` highest predictions hold (None when keep is 0)."""
  if keep <= 0:
    return None
  top_true = np.argsort(-true, kind="stable")[:keep]
  top_pred = np.argsort(-predicted, kind="stable")[:min(candidates, predicted.size)]
  return float(np.isin(top_true, top_pred).mean())


def recall_curve(true: np.ndarray, predicted: np.ndarray, taus=RECALL_TAUS, factors=RECALL_FACTORS,
                 resamples: int = 0, quantile: float = 0.1, seed: int = 0) -> dict:
  """{τ: {factor: recall}}: for the top 1/τ of `true`, the share within the top factor/τ of `predicted` (the τ whose
  top holds fewer than 4 sequences are left out: too few to measure). With `resamples`, the `quantile` of that share
  over bootstrap resamples of the rows instead: a cautious estimate, which also feels how the 1/τ boundary moves with
  the sample's composition (in a clustered pool a sample can split the clusters more cleanly than the pool does)."""
  n = true.size
  kept = [(tau, int(n // tau)) for tau in taus if int(n // tau) >= 4]
  cut = lambda tau, f: int(math.ceil(f * n / tau - 1e-9))
  if not resamples:
    return {f"{tau:g}": {f"{f:g}": top_recall(true, predicted, keep, cut(tau, f)) for f in factors}
            for tau, keep in kept}
  values = {(tau, f): [] for tau, _ in kept for f in factors}
  rng = np.random.default_rng(seed)
  for _ in range(int(resamples)):
    rows = rng.integers(0, n, n)
    rank_true, rank_pred = np.empty(n, np.int64), np.empty(n, np.int64)
    rank_true[np.argsort(-true[rows], kind="stable")] = np.arange(n)
    rank_pred[np.argsort(-predicted[rows], kind="stable")] = np.arange(n)
    for tau, keep in kept:
      in_top = rank_pred[rank_true < keep]
      for f in factors:
        values[(tau, f)].append(float(np.mean(in_top < cut(tau, f))))
  return {f"{tau:g}": {f"{f:g}": float(np.quantile(values[(tau, f)], quantile)) for f in factors}
          for tau, _ in kept}


def factor_for(curve: dict, tau: float, recall: float, sampled_share: float) -> tuple[float | None, float | None]:
  """The smallest cascade factor whose estimated recall, sampled_share + (1 - sampled_share) x the curve's recall of
  the unsampled part, reaches `recall` at `tau` (the curve's nearest τ at or above it: a larger τ is harder), and that
  estimate; (None, best estimate) when no factor on the curve does."""
  taus = sorted(float(t) for t in curve)
  if not taus:
    return None, None
  at = next((t for t in taus if t >= tau), taus[-1])
  best = None
  for factor, r in sorted(((float(f), r) for f, r in curve[f"{at:g}"].items()), key=lambda x: x[0]):
    estimate = sampled_share + (1 - sampled_share) * (r or 0.0)
    best = estimate if best is None else max(best, estimate)
    if estimate >= recall:
      return factor, estimate
  return None, best
