"""The `dsir` stage: DSIR (Xie et al. 2023), hashed n-gram importance resampling of the pool toward a target.

Features of a sequence are its token-id n-grams of orders 1..`ngram`, each hashed into one of `buckets` buckets
(the paper hashes words; our stores hold token ids, so we hash those: no detokenization of the pool, and a BPE
token bigram is about a word unigram or bigram). N-grams that contain EOS or PAD are dropped: they mark how the
store packs documents, not what the text says. Two bag-of-n-grams models, p_target from the target store and p_raw
from the pool (or a uniform sample of it), give each sequence the log importance weight

    log w(x) = sum over its features f of count_f(x) * (log(p_target[f] + eps) - log(p_raw[f] + eps)),

eps = dsir.smoothing (1e-8, as the `data-selection` package). k sequences are then drawn without replacement with
probability proportional to w by Gumbel top-k: the k largest keys log w(x) + G(x), G(x) Gumbel noise that is a pure
function of (seed, id), so the draw does not depend on the block size. The top-k is `selection_lib.top_k`'s exact radix
select over the float32 keys (ties to the lower id), streamed from the weights written to `log_weights.npy`:
memory is a block of rows plus the buckets, beside the output (index and weights).

Output: the select stage's format (`index.npy`, `manifest.json` with method "dsir"), so `train` takes the folder
as --config.data.index.
"""
import math
import pathlib
import time

import numpy as np

from colorjax import config as config_lib
from colorjax import console
from colorjax import errors
from colorjax.selection import stage as selection_stage
from colorjax.artifacts import lineage
from colorjax.data import ngrams
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.selection import artifact as selection_lib

FEATURES = ngrams.FEATURES
feature_buckets = ngrams.feature_buckets  # the featurizer DSIR and the distilled scorer share


def ngram_counts(tokens_bt: np.ndarray, buckets: int, order: int = 2, skip=()) -> np.ndarray:
  """[B, buckets] hashed n-gram counts of each row: the paper's feature vectors (O(B * buckets): small blocks)."""
  b = feature_buckets(tokens_bt, buckets, order, skip)
  flat = (np.arange(b.shape[0])[:, None] * (buckets + 1) + b).ravel()
  return np.bincount(flat, minlength=b.shape[0] * (buckets + 1)).reshape(b.shape[0], buckets + 1)[:, :buckets]


def total_counts(blocks, buckets: int, order: int = 2, skip=()) -> np.ndarray:
  """[buckets] n-gram counts summed over an iterable of [B, L] token blocks: one bag-of-n-grams model."""
  total = np.zeros(buckets + 1, np.int64)
  for tokens in blocks:
    total += np.bincount(feature_buckets(tokens, buckets, order, skip).ravel(), minlength=buckets + 1)
  return total[:buckets]


def fit(target_counts: np.ndarray, raw_counts: np.ndarray, smoothing: float = 1e-8) -> np.ndarray:
  """Per-bucket log p_target - log p_raw, each distribution normalized from its counts and smoothed by adding
  `smoothing` to every probability (the reference implementation's 1e-8), so unseen buckets stay finite."""
  target = np.asarray(target_counts, np.float64)
  raw = np.asarray(raw_counts, np.float64)
  return np.log(target / target.sum() + smoothing) - np.log(raw / raw.sum() + smoothing)


def log_weights(tokens_bt: np.ndarray, log_ratio: np.ndarray, order: int = 2, skip=()) -> np.ndarray:
  """[B] float64 log importance weights: the log ratio summed over each row's n-grams, which is count . log_ratio
  without materializing the [B, buckets] counts."""
  table = np.append(np.asarray(log_ratio, np.float64), 0.0)  # the dropped-n-gram slot adds nothing
  return table[feature_buckets(tokens_bt, log_ratio.size, order, skip)].sum(axis=1)


def gumbel_noise(ids: np.ndarray, seed: int) -> np.ndarray:
  """Standard Gumbel noise per id, a pure function of (seed, id): -log(-log(u)), u uniform in (0, 1)."""
  key = np.random.SeedSequence([int(seed), 0xD51]).generate_state(2, dtype=np.uint64)
  bits = ngrams.mix(ngrams.mix(np.asarray(ids, np.uint64), key[0]), key[1])
  u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53
  return -np.log(-np.log(u))


class _Keys:
  """Streams float32 Gumbel keys log w + G of a weight array (a memmap), `block_rows` at a time."""

  def __init__(self, weights, seed: int, block_rows: int, noise: bool = True):
    self.weights, self.seed, self.block_rows, self.noise = weights, seed, int(block_rows), noise

  def __iter__(self):
    n = self.weights.shape[0]
    for start in range(0, n, self.block_rows):
      w = np.asarray(self.weights[start:min(n, start + self.block_rows)], np.float64)
      if self.noise:
        w = w + gumbel_noise(np.arange(start, start + w.size), self.seed)
      yield start, w.astype(np.float32)


def gumbel_top_k(weights, k: int, seed: int, block_rows: int = 1 << 20):
  """(sorted ids of k distinct sequences drawn without replacement with probability proportional to exp(weights);
  the k-th largest key): Gumbel top-k, exact and streaming over `weights` (an array or memmap of log weights)."""
  return selection_lib.top_k(_Keys(weights, seed, block_rows), k)


# ----------------------------------------------------------------------------------------------------------------
# The stage


def _blocks(store: stores.TokenStore, ids: np.ndarray | None, block_rows: int):
  """[B, L] token blocks of a store in id order: all of it, or the given sorted ids."""
  n = store.num_sequences if ids is None else ids.size
  for start in range(0, n, block_rows):
    stop = min(n, start + block_rows)
    yield store.read(np.arange(start, stop) if ids is None else ids[start:stop])


def seed_of(cfg) -> int:
  """dsir.seed, or the top-level seed when it is -1."""
  return int(cfg.seed) if cfg.dsir.seed < 0 else int(cfg.dsir.seed)


def check_settings(cfg) -> None:
  d = cfg.dsir
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the folder the selection goes to")
  for field in ("store", "target"):
    if not d[field]:
      what = "pool to resample" if field == "store" else "target text to match"
      raise errors.ConfigError(f"set --config.dsir.{field} to a token store (the {what})")
  if d.tokens < 0:
    raise errors.ConfigError(f"dsir.tokens={d.tokens}: give a positive token budget (0 = use dsir.tau)")
  if not d.tokens and not (math.isfinite(d.tau) and d.tau >= 1):
    raise errors.ConfigError(f"dsir.tau={d.tau}: keep 1/tau of the pool, so tau is a number >= 1")
  if d.buckets < 1 or d.ngram < 1 or d.block_rows < 1 or d.raw_tokens < 0:
    raise errors.ConfigError(f"dsir.buckets={d.buckets}, dsir.ngram={d.ngram}, dsir.block_rows={d.block_rows} must be "
                             f">= 1 and dsir.raw_tokens={d.raw_tokens} >= 0")
  if seed_of(cfg) < 0:
    raise errors.ConfigError(f"seed={cfg.seed}: dsir.seed = -1 takes the top-level seed, which must be >= 0")
  if not (math.isfinite(d.smoothing) and d.smoothing > 0):
    raise errors.ConfigError(f"dsir.smoothing={d.smoothing}: a positive number keeps unseen buckets finite")


def selection_size(cfg, n: int, seq_len: int) -> int:
  """k, as `select.selection_size`: floor(N / tau), or the token budget's whole sequences."""
  return selection_lib.keep_count(n, seq_len, cfg.dsir.tau, cfg.dsir.tokens, "dsir")


def open_stores(cfg) -> tuple[stores.TokenStore, stores.TokenStore]:
  pool, target = stores.TokenStore(cfg.dsir.store), stores.TokenStore(cfg.dsir.target)
  tokenizer_lib.check_same_tokenizer(pool.manifest["tokenizer"], f"pool store {pool.path}",
                                     target.manifest["tokenizer"], f"target store {target.path}")
  if pool.padded or target.padded:
    raise errors.DataError("dsir resamples pretraining sequences; a padded (SFT) store is neither a pool nor a target")
  if not target.num_sequences:
    raise errors.DataError(f"target store {target.path} holds no sequences")
  return pool, target


def dsir_request(cfg, pool_id: str, target_id: str, within_id: str | None = None) -> dict:
  """What decides the selection: the stores by id (and the candidates, `dsir.within`), the features, the raw
  sample, the size and the seed."""
  d = cfg.dsir
  request = {"method": "dsir", "tau": float(d.tau), "tokens": int(d.tokens), "seed": seed_of(cfg),
             "buckets": int(d.buckets), "ngram": int(d.ngram), "smoothing": float(d.smoothing),
             "raw_tokens": int(d.raw_tokens), "features": FEATURES, "store": pool_id, "target": target_id}
  if within_id:
    request["within"] = within_id
  return request


def raw_ids(cfg, pool: stores.TokenStore, within: np.ndarray | None = None) -> np.ndarray | None:
  """Sorted ids of the candidates' sample the raw model is fit on (None: every candidate)."""
  d = cfg.dsir
  n = pool.num_sequences if within is None else within.size
  rows = max(1, int(d.raw_tokens) // pool.seq_len)
  if not d.raw_tokens or rows >= n:
    return within
  sample = selection_lib.random_sample(n, rows, seed_of(cfg), d.block_rows)
  return sample if within is None else within[sample]


def run(cfg) -> pathlib.Path:
  check_settings(cfg)
  workdir = pathlib.Path(cfg.workdir).resolve()
  pool, target = open_stores(cfg)
  within, within_id = selection_lib.within_ids(cfg.dsir.within, pool, "dsir.within")
  request = dsir_request(cfg, pool.id, target.id, within_id)
  if lineage.up_to_date(workdir, request, "another selection", "choose another --config.workdir"):
    print(f"dsir: {workdir} is up to date; nothing to do")
    return workdir
  lineage.check_new(workdir, "a selection", "choose another --config.workdir")
  k = selection_size(cfg, pool.num_sequences if within is None else within.size, pool.seq_len)
  if not console.is_main():  # a CPU stage: process 0 of a multi-host job does it all
    return workdir
  with lineage.Lock(workdir):
    return _dsir(cfg, workdir, pool, target, request, k, within)


def _dsir(cfg, workdir, pool, target, request, k: int, within: np.ndarray | None) -> pathlib.Path:
  """Weights and Gumbel keys over the candidates (the pool, or `within` by position), mapped to pool ids."""
  d = cfg.dsir
  start, seed = time.time(), seed_of(cfg)
  n = pool.num_sequences if within is None else within.size
  skip = sorted({pool.eos_id, pool.pad_id})
  target_counts = total_counts(_blocks(target, None, d.block_rows), d.buckets, d.ngram, skip)
  if not target_counts.sum():
    raise errors.DataError(f"target store {target.path} has no n-grams outside EOS/PAD; nothing to match")
  sample = raw_ids(cfg, pool, within)
  raw_counts = total_counts(_blocks(pool, sample, d.block_rows), d.buckets, d.ngram, skip)
  log_ratio = fit(target_counts, raw_counts, d.smoothing)
  with lineage.building(workdir, "a selection", "choose another --config.workdir", lock=False) as partial:
    weights = np.lib.format.open_memmap(partial / "log_weights.npy", mode="w+", dtype=np.float32, shape=(n,))
    for first, tokens in zip(range(0, n, d.block_rows), _blocks(pool, within, d.block_rows)):
      weights[first:first + tokens.shape[0]] = log_weights(tokens, log_ratio, d.ngram, skip)
    weights.flush()
    ids, threshold = gumbel_top_k(weights, k, seed, d.block_rows)
    ids = ids if within is None else within[ids]
    manifest = selection_lib.stage_manifest(
        cfg, "dsir", request, "dsir", ids, n, pool, workdir, within, threshold=threshold, seed=seed,
        conditional=None, scores=None,
        target={"id": target.id, "path": lineage.relative(target.path, workdir), "ngrams": int(target_counts.sum())},
        raw={"sequences": n if sample is None else int(sample.size), "ngrams": int(raw_counts.sum())},
        features={"name": FEATURES, "buckets": int(d.buckets), "ngram": int(d.ngram), "skip_ids": skip,
                  "smoothing": float(d.smoothing)},
        score_stats=selection_lib.score_statistics(_Keys(weights, seed, d.block_rows, noise=False)),
        seconds=time.time() - start)
    del weights
    (partial / "index.npy").write_bytes(selection_lib.npy_bytes(ids))
    lineage.write_manifest(partial, manifest)
  print(f"dsir: k={k:,} of {n:,} (tau {manifest['tau']:.2f}) toward {target.path} -> {workdir}")
  selection_lib.print_sources(manifest["sources"])
  return workdir


def describe(cfg) -> None:
  check_settings(cfg)
  pool, target = open_stores(cfg)
  within, _ = selection_lib.within_ids(cfg.dsir.within, pool, "dsir.within")
  n = pool.num_sequences if within is None else within.size
  k = selection_size(cfg, n, pool.seq_len)
  sample = raw_ids(cfg, pool, within)
  print(f"dsir (dry run): keeps {k:,} of {n:,} sequences ({k * pool.seq_len:,} tokens) by hashed "
        f"token 1..{cfg.dsir.ngram}-gram importance ({cfg.dsir.buckets:,} buckets) toward "
        f"{target.num_sequences:,} target sequences; raw model on {n if sample is None else sample.size:,} pool "
        "sequences")


# ----------------------------------------------------------------------------------------------------------------
# The pipeline's view of this stage (colorjax.selection_stage)


def pipeline_config(cfg, inputs: selection_stage.Inputs, selection: selection_stage.Selection):
  """The dsir stage's config for one of a pipeline's selections: the pool resampled toward its target text."""
  dcfg = config_lib.stage_config(cfg, "dsir")
  dcfg.dsir.store = str(inputs.pool)
  dcfg.dsir.target = str(inputs.target_text)
  dcfg.dsir.tau = selection.tau
  selection_stage.place(dcfg, "dsir", selection, inputs.seq_len)
  return dcfg


def expected(dcfg, known: selection_stage.Known) -> list:
  """The selection's request from the ids the preflight knows (dsir_request, as `run` builds it)."""
  within = known.within(dcfg.dsir.within)
  ready = known.pool and known.target_text and (not dcfg.dsir.within or (within and within[0]))
  request = dsir_request(dcfg, known.pool, known.target_text, within[0] if within else None) if ready else None
  return [("selection", pathlib.Path(dcfg.workdir), request)]


STAGE = selection_stage.register(selection_stage.SelectionStage("dsir", pipeline_config, expected,
                                                                 selection_stage.no_cost, run))
