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
import hashlib
import io
import json
import math
import pathlib
import shutil
import time

import numpy as np

from colorjax import console
from colorjax import errors
from colorjax import methods
from colorjax import score as score_lib
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.model import losses

HIST_BINS = 100


def sortable_keys(values: np.ndarray) -> np.ndarray:
  """uint32 keys whose unsigned order is the float32 order of `values` (−0.0 and +0.0 aside)."""
  bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
  negative = (bits >> np.uint32(31)).astype(bool)
  return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def key_to_float(key: int) -> float:
  key = np.uint32(key)
  bits = key & np.uint32(0x7FFFFFFF) if key >> np.uint32(31) else ~key
  return float(np.array([bits], np.uint32).view(np.float32)[0])


def _kth_bucket(counts: np.ndarray, k: int) -> tuple[int, int]:
  """Bucket holding the k-th largest element, and how many elements lie in buckets above it."""
  above = np.cumsum(counts[::-1])  # above[i] = elements in the top i+1 buckets
  i = int(np.searchsorted(above, k))  # first i with above[i] >= k
  bucket = counts.size - 1 - i
  return bucket, int(above[i - 1]) if i else 0


class ScoreStream:
  """Streams fp32 scores of one selection method over the score array, `block_rows` rows at a time; with `ids`
  (sorted pool ids, e.g. a fixed-n pool) over those sequences only, positions counting within `ids`."""

  def __init__(self, scores: score_lib.Scores, method: methods.Method, conditional: str, block_rows: int,
               ids: np.ndarray | None = None):
    self.scores, self.block_rows, self.ids = scores, int(block_rows), ids
    self.cond = scores.column(conditional)
    self.prior = scores.column("prior") if "prior" in method.score_columns else None

  def __iter__(self):
    n = self.scores.num_sequences if self.ids is None else self.ids.size
    for start in range(0, n, self.block_rows):
      stop = min(n, start + self.block_rows)
      rows = self.scores.read(start, stop) if self.ids is None else self.scores.read_ids(self.ids[start:stop])
      values = losses.color_score(None if self.prior is None else rows[:, self.prior], rows[:, self.cond])
      if np.isnan(values).any():
        at = start + int(np.argmax(np.isnan(values)))
        bad = int(self.scores.global_ids([at])[0] if self.ids is None else self.ids[at])
        raise errors.DataError(f"{self.scores.path}: score of sequence {bad} is NaN (unscored or corrupt); re-run the "
                               f"score stage with {score_lib.VERIFY_FLAG} (it re-scores damaged chunks)")
      yield start, values.astype(np.float32)


def top_k(stream, k: int):
  """(sorted ids of the k largest scores, ties broken by lower id; the k-th largest score)."""
  if k <= 0:
    return np.zeros(0, np.int64), float("nan")
  high = np.zeros(1 << 16, np.int64)
  for _, values in stream:
    high += np.bincount(sortable_keys(values) >> np.uint32(16), minlength=1 << 16)
  bucket_high, above_high = _kth_bucket(high, k)
  low = np.zeros(1 << 16, np.int64)
  for _, values in stream:
    keys = sortable_keys(values)
    inside = keys[(keys >> np.uint32(16)) == bucket_high]
    low += np.bincount(inside & np.uint32(0xFFFF), minlength=1 << 16)
  bucket_low, above_low = _kth_bucket(low, k - above_high)
  threshold = (bucket_high << 16) | bucket_low
  ties_needed = k - above_high - above_low
  chosen = []
  for start, values in stream:
    keys = sortable_keys(values)
    chosen.append(start + np.nonzero(keys > threshold)[0])
    if ties_needed:
      ties = start + np.nonzero(keys == threshold)[0][:ties_needed]
      chosen.append(ties)
      ties_needed -= ties.size
  ids = np.sort(np.concatenate(chosen)).astype(np.int64)
  assert ids.size == k, (ids.size, k)
  return ids, key_to_float(threshold)


RANDOM_STREAM = 7  # the random baseline's (and the nested pools') permutation stream; other draws use their own


def random_sample(n: int, k: int, seed: int, block_rows: int, stream: int = RANDOM_STREAM) -> np.ndarray:
  """k distinct ids of [0, n), uniform, sorted: the first k positions of a seeded permutation (of `stream`: two
  draws of one seed and stream are prefixes of each other), built blockwise so the temporaries stay O(block_rows)
  beside the output."""
  perm = stores.Permutation(n, seed, stream=stream) if n else None
  ids = np.empty(k, np.int64)
  for start in range(0, k, block_rows):
    stop = min(k, start + block_rows)
    ids[start:stop] = perm(np.arange(start, stop))
  ids.sort()
  return ids


def score_statistics(stream) -> dict:
  """Mean, std, extremes and a fixed-bin histogram of the scores (two streaming passes)."""
  count, total, total_sq, lo, hi = 0, 0.0, 0.0, np.inf, -np.inf
  for _, values in stream:
    v = values.astype(np.float64)
    count += v.size
    total += v.sum()
    total_sq += np.square(v).sum()
    lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
  edges = np.linspace(lo, hi if hi > lo else lo + 1.0, HIST_BINS + 1)
  hist = np.zeros(HIST_BINS, np.int64)
  for _, values in stream:
    hist += np.histogram(values, bins=edges)[0]
  mean = total / max(count, 1)
  return {"count": count, "mean": mean, "std": float(np.sqrt(max(total_sq / max(count, 1) - mean ** 2, 0.0))),
          "min": lo, "max": hi, "hist_edges": edges.tolist(), "hist_counts": hist.tolist()}


def label_rates(store: stores.TokenStore, ids: np.ndarray, block_rows: int,
                within: np.ndarray | None = None) -> dict:
  """Per-source pool counts (of the candidates `within`, else the store), selected counts and selection rates (by
  each sequence's first document's source)."""
  labels = store.labels() or ["all"]
  pool = np.zeros(len(labels), np.int64)
  n = store.num_sequences if within is None else within.size
  for start in range(0, n, block_rows):
    stop = min(n, start + block_rows)
    candidates = np.arange(start, stop) if within is None else within[start:stop]
    pool += np.bincount(store.label_ids(candidates), minlength=len(labels))
  chosen = np.bincount(store.label_ids(ids), minlength=len(labels)) if ids.size else np.zeros(len(labels), np.int64)
  return {name: {"pool": int(p), "selected": int(c), "rate": float(c / p) if p else 0.0}
          for name, p, c in zip(labels, pool, chosen)}


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


def within_ids(path: str, store: stores.TokenStore, setting: str) -> tuple[np.ndarray | None, str | None]:
  """The candidates a selection draws from when `setting` names a selection folder or .npy of ids (a fixed-n pool):
  their sorted unique pool ids and content id; (None, None) when it is unset: the whole pool."""
  if not path:
    return None, None
  ids = np.unique(stores.load_index(path, store, setting))
  if not ids.size:
    raise errors.DataError(f"{setting}={path} holds no sequences; point it at a non-empty selection of the pool")
  return ids, stores.index_id(path, setting)


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
  return keep_count(n, seq_len, cfg.select.tau, cfg.select.tokens, "select")


def keep_count(n: int, seq_len: int, tau: float, tokens: int, section: str) -> int:
  """floor(N / tau), or the token budget's whole sequences; refuses a count of 0 naming `section`'s field."""
  k = min(n, int(tokens) // seq_len) if tokens else int(n // tau)
  if tokens and int(tokens) // seq_len > n and console.is_main():
    print(f"{section}: warning: {section}.tokens={int(tokens):,} is more than the pool's {n:,} sequences "
          f"({n * seq_len:,} tokens); the selection is the whole pool")
  if k <= 0:
    how = f"{section}.tokens={tokens}" if tokens else f"{section}.tau={tau:g}"
    raise errors.ConfigError(f"{how} keeps 0 of the pool's {n:,} sequences of {seq_len} tokens; lower tau (at most "
                             f"{n:,}) or raise the token budget")
  return k


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
  scores = score_lib.Scores(scfg.scores)
  store = stores.TokenStore(scores.store_path())
  if store.id != scores.manifest["store"]["id"]:
    raise errors.DataError(f"store {store.path} changed since it was scored (id {store.id}, scores say "
                           f"{scores.manifest['store']['id']}); re-run the score stage")
  within, within_id = within_ids(scfg.within, store, "select.within")
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
  within, within_id = within_ids(cfg.select.within, store, "select.within")
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
    rows = random_sample(n, k, cfg.seed, scfg.block_rows)
  else:
    stream = ScoreStream(scores, method, scfg.conditional, scfg.block_rows, within)
    rows, threshold = top_k(stream, k)
    stats = score_statistics(stream)
  # the pool's ids: positions in the candidates, or rows of the score folder (a score.index holds a subset)
  ids = within[rows] if within is not None else (rows if scores is None else scores.global_ids(rows))
  manifest = {
      "format": formats.SELECTION.format, "id": lineage.content_id(request), "method": scfg.method,
      "tau": float(n / k), "tau_requested": float(scfg.tau), "tokens_requested": int(scfg.tokens), "k": int(k),
      "num_sequences": n, "tokens": int(k) * store.seq_len, "threshold": threshold,
      "seed": None if method.ranks_scores else cfg.seed,
      "conditional": scfg.conditional if method.ranks_scores else None,
      "scores": None if scores is None else {"path": lineage.relative(scores.path, workdir), "id": scores.id,
                                             "models": scores.manifest["models"]},
      "store_id": store.id, "store_path": lineage.relative(store.path, workdir),
      "index_sha256": hashlib.sha256(npy_bytes(ids)).hexdigest(), "score_stats": stats,
      "within": None if within is None else {"path": lineage.relative(scfg.within, workdir),
                                             "id": request["within"], "sequences": int(within.size)},
      "sources": label_rates(store, ids, scfg.block_rows, within), "seconds": time.time() - start,
      "request": request, "config": json.loads(cfg.to_json()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  if console.is_main():
    partial = workdir.with_name(workdir.name + ".partial")
    if partial.exists():
      shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / "index.npy").write_bytes(npy_bytes(ids))
    lineage.write_manifest(partial, manifest)
    lineage.publish(partial, workdir)
    print(f"select: {scfg.method} k={k:,} of {n:,} (tau {manifest['tau']:.2f})"
          + (f", threshold {threshold:.4f}" if threshold is not None else "") + f" -> {workdir}")
    print_sources(manifest["sources"])
  return workdir


def print_sources(sources: dict) -> None:
  """Per-source selected / pool counts, highest selection rate first."""
  for name, r in sorted(sources.items(), key=lambda x: -x[1]["rate"]):
    print(f"  {name:<16} {r['selected']:,}/{r['pool']:,} ({r['rate']:.1%})")


def npy_bytes(ids: np.ndarray) -> bytes:
  """A selection's index.npy, as bytes: what the manifest's index_sha256 hashes and the folder stores."""
  buffer = io.BytesIO()
  np.save(buffer, ids)
  return buffer.getvalue()


def store_of(selection: pathlib.Path, manifest: dict) -> pathlib.Path:
  """The pool store a selection indexes, as recorded relative to the selection folder."""
  return lineage.resolve(manifest["store_path"], selection)


def describe(cfg) -> None:
  if cfg.select.store and not cfg.select.scores:
    store = stores.TokenStore(cfg.select.store)
    total = store.num_sequences
  else:
    scores = score_lib.Scores(cfg.select.scores)
    store, total = stores.TokenStore(scores.store_path()), scores.num_sequences
  within, _ = within_ids(cfg.select.within, store, "select.within")
  n = total if within is None else within.size
  k = selection_size(cfg, n, store.seq_len)
  print(f"select (dry run): {cfg.select.method} keeps {k:,} of {n:,} sequences ({k * store.seq_len:,} tokens)")
