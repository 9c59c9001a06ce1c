"""The selection artifact and the arithmetic every selection stage shares.

A selection is a folder with `index.npy` (global ids of a pool store, int64, ascending) and `manifest.json` (method,
τ, k, the store and what it was selected from, its request). `top_k` is the exact global top-k in memory independent
of N: a two-level radix select on the scores' order-preserving 32-bit keys (one streaming pass histograms the top 16
bits, a second the low 16 bits inside the boundary bucket, which gives the exact k-th largest score; a third collects
every id above it plus the lowest ids among the ties), so memory is a block of rows plus 65,536 counters and the
output. `random_sample` draws a seeded uniform subset (the first k of a keyed permutation of one stream: two draws of
one seed and stream are prefixes of each other, so each use has its own stream).
"""
import hashlib
import io
import json
import pathlib
import time

import numpy as np

from colorjax import console
from colorjax import errors
from colorjax import methods
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.artifacts import scores as scores_lib
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

  def __init__(self, scores: scores_lib.Scores, method: methods.Method, conditional: str, block_rows: int,
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
                               f"score stage with {scores_lib.VERIFY_FLAG} (it re-scores damaged chunks)")
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


def within_ids(path: str, store: stores.TokenStore, setting: str) -> tuple[np.ndarray | None, str | None]:
  """The candidates a selection draws from when `setting` names a selection folder or .npy of ids (a fixed-n pool):
  their sorted unique pool ids and content id; (None, None) when it is unset: the whole pool."""
  if not path:
    return None, None
  ids = np.unique(stores.load_index(path, store, setting))
  if not ids.size:
    raise errors.DataError(f"{setting}={path} holds no sequences; point it at a non-empty selection of the pool")
  return ids, stores.index_id(path, setting)


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


def manifest(request: dict, method: str, ids: np.ndarray, n: int, store: stores.TokenStore, folder: pathlib.Path,
             **extra) -> dict:
  """The manifest of a selection of `ids` among `n` candidates of `store`, written to `folder` (the one builder every
  stage uses; `extra` adds the stage's own fields)."""
  return {"format": formats.SELECTION.format, "id": lineage.content_id(request), "method": method,
          "k": int(ids.size), "num_sequences": int(n), "tau": n / max(ids.size, 1),
          "tokens": int(ids.size) * store.seq_len, "store_id": store.id,
          "store_path": lineage.relative(store.path, folder), **extra,
          "index_sha256": hashlib.sha256(npy_bytes(ids)).hexdigest(), "request": request}


def stage_manifest(cfg, section: str, request: dict, method: str, ids: np.ndarray, n: int, store: stores.TokenStore,
                   folder: pathlib.Path, within: np.ndarray | None, **extra) -> dict:
  """The manifest of a selection a stage made (`section`: its config section): `manifest` plus what every stage
  records — the τ and token budget asked for, the candidates it selected among, per-source selection rates, the
  config and the time."""
  s = cfg[section]
  candidates = None if within is None else {"path": lineage.relative(s.within, folder), "id": request["within"],
                                            "sequences": int(within.size)}
  return manifest(request, method, ids, n, store, folder, tau_requested=float(s.tau), tokens_requested=int(s.tokens),
                  within=candidates, sources=label_rates(store, ids, int(s.block_rows), within), **extra,
                  config=json.loads(cfg.to_json()), time=time.strftime("%Y-%m-%dT%H:%M:%S"))


def publish(folder: pathlib.Path, ids: np.ndarray, manifest_: dict, fix: str = "choose another --config.workdir",
            files: dict | None = None, lock: bool = True) -> pathlib.Path:
  """Writes a selection (its index, any other `files`, the manifest last) through lineage.publish_folder."""
  return lineage.publish_folder(folder, manifest_, {"index.npy": npy_bytes(ids), **(files or {})}, what="a selection",
                                fix=fix, lock=lock)
