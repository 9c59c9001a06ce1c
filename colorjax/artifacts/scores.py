"""The scores artifact: what the score stage writes and every selection reads.

A score folder holds `nll.zarr` [rows, models] float32 (per-sequence mean NLL, fp32, keyed by global sequence id, or
with an index by position among `ids.npy`'s ids), `done.zarr` (one flag per row chunk), optionally
`prefix_nll.zarr` [rows, models, prefixes] (the mean NLL of each sequence's first k tokens, diagnostics), and
`manifest.json` (written first, so another machine can resume the folder: it is complete when every done flag is set).
"""
import json
import pathlib

import numpy as np
import tensorstore as ts

from colorjax import console
from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import lineage

def zarr(path: pathlib.Path, create: bool = False, **kw):
  """Open a score array; `create` also opens one of the same shape and dtype already there: a start that died
  before its manifest, or a shard job of the same request starting at the same moment (no chunk is scored before
  the manifest exists, so nothing in it is trusted)."""
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
  try:
    return ts.open(spec, create=create, open=True, **kw).result()
  except ValueError as e:
    if create:
      raise errors.DataError(f"{path} exists with another shape or dtype, and {path.parent} has no manifest (a start "
                             "of another job that died); delete that folder or choose another --config.workdir") from e
    raise errors.DataError(f"{path} is missing or unreadable ({e}); re-run the score stage into a new "
                           "--config.workdir") from e


VERIFY_FLAG = "--config.score.verify=True"
IDS = "ids.npy"  # an index-restricted score folder: the pool ids of its rows, ascending
PREFIXES = "prefix_nll.zarr"  # [rows, models, prefixes]: mean NLL of each sequence's first k tokens (diagnostics)


def first_line(error: Exception) -> str:
  return str(error).splitlines()[0] if str(error) else type(error).__name__


class Scores:
  """Read access to a score folder (manifest + nll.zarr + done.zarr)."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.manifest = formats.open_manifest(self.path, formats.SCORES)
    self.num_sequences = int(self.manifest["num_sequences"])
    self.columns = [m["name"] for m in self.manifest["models"]]
    self.chunk_rows = int(self.manifest["chunk_rows"])
    self._nll = None
    # an index-restricted folder's row r holds sequence ids[r] of the pool; a whole-pool folder's row r is id r
    self.ids = np.load(self.path / IDS) if self.manifest.get("index") else None

  @property
  def prefixes(self) -> tuple:
    """Token counts of the prefix NLLs recorded beside the scores (() for a folder without them)."""
    return tuple(self.manifest.get("prefixes") or ())

  def read_prefixes(self, start: int, stop: int) -> np.ndarray:
    """[rows, models, prefixes] prefix mean NLLs of rows [start, stop)."""
    return np.asarray(zarr(self.path / PREFIXES)[start:stop].read().result(), np.float32)

  def global_ids(self, rows: np.ndarray) -> np.ndarray:
    """The pool ids of rows of this folder."""
    rows = np.asarray(rows, np.int64)
    return rows if self.ids is None else self.ids[rows]

  def rows_of(self, ids: np.ndarray) -> np.ndarray:
    """The rows holding pool sequences `ids`; a DataError names an id this folder did not score."""
    ids = np.asarray(ids, np.int64)
    if self.ids is None:
      return ids
    rows = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
    missing = ids[self.ids[rows] != ids] if ids.size else ids
    if missing.size:
      raise errors.DataError(f"{self.path} scored {self.ids.size:,} sequences of its index, not sequence "
                             f"{int(missing[0])}: the selection was not made from these scores")
    return rows

  @property
  def nll(self):
    if self._nll is None:
      self._nll = zarr(self.path / "nll.zarr")
    return self._nll

  def done(self) -> np.ndarray:
    try:
      return zarr(self.path / "done.zarr").read().result().astype(bool)
    except ValueError as e:
      raise errors.DataError(f"{self.path / 'done.zarr'} is unreadable ({first_line(e)}); delete {self.path} and "
                             "re-run the score stage") from e

  def write_chunk(self, chunk: int, rows: np.ndarray, prefix_rows: np.ndarray | None = None) -> None:
    """Write row chunk `chunk` (its first rows of `rows`, and of `prefix_rows` first: a chunk whose scores are
    written has its prefixes too), then its done flag."""
    first, stop = chunk * self.chunk_rows, min(self.num_sequences, (chunk + 1) * self.chunk_rows)
    if prefix_rows is not None:
      zarr(self.path / PREFIXES)[first:stop].write(prefix_rows[: stop - first]).result()
    self.nll[first:stop].write(rows[: stop - first]).result()
    zarr(self.path / "done.zarr")[chunk].write(np.uint8(1)).result()

  def check_complete(self):
    done = self.done()
    if not done.all():
      raise errors.DataError(f"{self.path} is incomplete: {int((~done).sum())} of {done.size} row chunks are not "
                             "scored yet; finish the score stage (re-run it, or every --config.score.shard job)")

  @property
  def id(self) -> str:
    """Content id: the pool and the models, by their ids (older score folders: derived the same way)."""
    legacy = {"store": self.manifest["store"]["id"],
              "models": [[m["name"], m.get("id")] for m in self.manifest["models"]]}
    return self.manifest.get("id") or lineage.content_id(legacy)  # score.scores_request of a folder without an id

  def store_path(self) -> pathlib.Path:
    """The scored pool store, as recorded relative to this folder (so a moved work directory finds its own)."""
    return lineage.resolve(self.manifest["store"]["path"], self.path)

  def column(self, name: str) -> int:
    if name not in self.columns:
      raise errors.DataError(f"{self.path} has no model column {name!r}; columns: {self.columns}")
    return self.columns.index(name)

  def read(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the [num_sequences, models] NLL array (stop clipped to the end)."""
    stop = min(stop, self.num_sequences)
    return self._checked(lambda: self.nll[start:stop].read().result(), f"rows {start:,}..{stop - 1:,}")

  def read_ids(self, ids: np.ndarray) -> np.ndarray:
    """The NLL rows of pool sequences `ids` (only those rows' chunks are read)."""
    rows = self.rows_of(ids)
    return self._checked(lambda: self.nll.oindex[rows].read().result(), f"{rows.size:,} selected rows")

  def _checked(self, read, what: str) -> np.ndarray:
    """A read whose failure (a chunk damaged on disk) names the folder and the fix."""
    try:
      return read()
    except ValueError as e:
      raise errors.DataError(f"{self.path / 'nll.zarr'}: {what} are unreadable ({first_line(e)}); re-score the "
                             f"damaged chunks: re-run the score stage (or the pipeline) with {VERIFY_FLAG}") from e


def is_complete(workdir: pathlib.Path, request: dict) -> bool:
  """Whether `workdir` already holds finished scores for this request (pool and models)."""
  if not (workdir / formats.MANIFEST).exists():
    return False
  scores = Scores(workdir)
  return scores.manifest.get("request") == lineage.normalized(request) and bool(scores.done().all())


def damaged_chunks(scores: Scores) -> list[int]:
  """Row chunks whose file is damaged (a disk fault, a truncated copy): marked done but unreadable or holding a NaN,
  or not done with a file left that cannot be read (a re-score would read it before writing a short last chunk)."""
  done, bad = scores.done(), []
  for chunk in range(done.size):
    if not done[chunk] and not (scores.path / "nll.zarr" / f"{chunk}.0").exists():
      continue
    first, stop = chunk * scores.chunk_rows, min(scores.num_sequences, (chunk + 1) * scores.chunk_rows)
    try:
      rows = scores.nll[first:stop].read().result()
    except ValueError:
      bad.append(chunk)
      continue
    if done[chunk] and np.isnan(rows).any():
      bad.append(chunk)
  return bad


def reopen_damaged(workdir: pathlib.Path, request: dict) -> None:
  """score.verify: the damaged chunks of this request's scores lose their done flag, so this run re-scores them."""
  if not (workdir / formats.MANIFEST).exists():
    return
  scores = Scores(workdir)
  if scores.manifest.get("request") != lineage.normalized(request):
    return
  bad = damaged_chunks(scores)
  if bad and console.is_main():
    print(f"score: {len(bad)} of {scores.done().size} chunks of {workdir} are damaged (chunks {bad[:10]}"
          f"{' ...' if len(bad) > 10 else ''}); re-scoring them")
    done = zarr(workdir / "done.zarr")
    for chunk in bad:
      done[chunk].write(np.uint8(0)).result()
      # the damaged file goes: a write of a short last chunk would read it first (one chunk spans all columns)
      (workdir / "nll.zarr" / f"{chunk}.0").unlink(missing_ok=True)
  elif console.is_main():
    print(f"score: verified the {int(scores.done().sum())} written chunks of {workdir}: none damaged")


def open_output(workdir: pathlib.Path, manifest: dict, num_chunks: int, ids: np.ndarray | None = None):
  """Create the score folder, or check that an existing one was made by the same job (store, models, layout)."""
  path = workdir / formats.MANIFEST
  keys = ("request", "num_sequences", "chunk_rows", "batch_size", "columns")
  if path.exists():
    existing = json.loads(path.read_text())
    strip = lambda m: {k: m.get(k) for k in keys}
    if strip(existing) != strip(manifest):
      diff = lineage.differences(existing.get("request") or {}, lineage.normalized(manifest["request"]))
      diff += [k for k in keys[1:] if existing.get(k) != manifest.get(k)]
      raise errors.DataError(f"{workdir} holds scores of another job (differs in {', '.join(diff)}); choose another "
                             "--config.workdir (nothing was overwritten)")
    return
  if console.is_main():
    workdir.mkdir(parents=True, exist_ok=True)
    n, k = manifest["num_sequences"], len(manifest["models"])
    zarr(workdir / "nll.zarr", create=True, dtype=ts.float32, shape=[n, k], fill_value=np.nan,
          chunk_layout=ts.ChunkLayout(chunk_shape=[manifest["chunk_rows"], k]))
    zarr(workdir / "done.zarr", create=True, dtype=ts.uint8, shape=[num_chunks], fill_value=0,
          chunk_layout=ts.ChunkLayout(chunk_shape=[1]))
    if manifest.get("prefixes"):
      p = len(manifest["prefixes"])
      zarr(workdir / PREFIXES, create=True, dtype=ts.float32, shape=[n, k, p], fill_value=np.nan,
            chunk_layout=ts.ChunkLayout(chunk_shape=[manifest["chunk_rows"], k, p]))
    if ids is not None:
      np.save(workdir / IDS, ids)
    lineage.write_manifest(workdir, manifest)


def step_schedule(per_host: list, n: int, chunk_rows: int, host_batch: int) -> list[tuple[int, int, bool]]:
  """(slot, batch within the chunk, last batch of the slot) for every global step. Hosts work through their own
  chunk lists in lockstep; a slot takes as many batches as its largest chunk there needs (a short last chunk of
  the pool takes fewer), and a chunk is always cut into the same batches, whichever host or job scores it."""
  schedule = []
  for slot in range(max((len(c) for c in per_host), default=0)):
    rows = [min(chunk_rows, n - int(c[slot]) * chunk_rows) for c in per_host if slot < len(c)]
    steps = -(-max(rows) // host_batch)
    schedule += [(slot, j, j == steps - 1) for j in range(steps)]
  return schedule


def pool_rows_per_step(schedule: list, per_host: list, n: int, chunk_rows: int, host_batch: int) -> np.ndarray:
  """Pool sequences each step scores, all hosts together: a batch's padding rows (a short last chunk, a host with
  no chunk left) are not counted, so progress and throughput count the pool."""
  rows = np.zeros(len(schedule), np.int64)
  for step, (slot, j, _) in enumerate(schedule):
    for chunks in per_host:
      if slot < len(chunks):
        in_chunk = min(chunk_rows, n - int(chunks[slot]) * chunk_rows)
        rows[step] += min(host_batch, max(0, in_chunk - j * host_batch))
  return rows
