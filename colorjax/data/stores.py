"""Token stores (reading), the deterministic data order, and the background batch loader.

A token store is a folder of `.npy` arrays of fixed-length token sequences plus `manifest.json` (written by
`prepare.py`), or a manifest over headerless dolma/OLMo token files left where they are (`dolma.py`). A
sequence's global id is its row over the store's arrays in manifest order. Training order is a pure function of
(seed, step): a keyed Feistel permutation of the ids (or of positions in an index of ids), so resuming needs no
iterator state and any host can compute any step's ids.
"""
import hashlib
import os
import pathlib
import queue
import threading

import numpy as np

from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.artifacts import object_storage
from colorjax.data import tokenizer as tokenizer_lib





def shared_dir(sub: str) -> str | None:
  """A folder of the shared data used when none is configured: $COLORJAX_DATA/<sub>, else ../shared/data/<sub>
  (relative to the current directory), whichever exists first."""
  for root in (os.environ.get("COLORJAX_DATA"), "../shared/data"):
    if root and (pathlib.Path(root) / sub).is_dir():
      return str((pathlib.Path(root) / sub).resolve())
  return None


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------------------------
# Reading stores


class TokenStore:
  """Read access to a token store by global sequence id."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.manifest = formats.open_manifest(self.path, formats.STORE)
    m = self.manifest
    self.seq_len = int(m["seq_len"])
    self.dtype = np.dtype(m["dtype"])
    self.vocab_size = int(m["tokenizer"]["vocab_size"])
    self.eos_id = int(m["tokenizer"]["eos_id"])
    self.pad_id = int(m["tokenizer"]["pad_id"])
    self.padded = bool(m.get("padded", False))
    self.files = m["files"]
    self.num_sequences = int(m["num_sequences"])
    counts = np.array([f["sequences"] for f in self.files], dtype=np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(counts)])
    if int(self.offsets[-1]) != self.num_sequences:
      raise errors.DataError(f"{self.path / formats.MANIFEST}: file sequence counts sum to "
                             f"{int(self.offsets[-1])}, not num_sequences={self.num_sequences}; the manifest is "
                             "corrupt, re-run prepare")
    self._arrays: list = [None] * len(self.files)
    self._labels: list = [None] * len(self.files)

  @property
  def id(self) -> str:
    """Content id of the store (tokenizer, seq_len, sources, counts), recorded by downstream artifacts."""
    return self.manifest["id"]

  def _array(self, i: int) -> np.ndarray:
    if self._arrays[i] is None and self.files[i].get("format") == "raw":
      self._arrays[i] = self._raw_array(self.files[i])
    if self._arrays[i] is None:
      entry = self.files[i]
      path = self.path / entry["array"]
      try:
        array = object_storage.open_array(path)
      except FileNotFoundError as e:
        raise errors.DataError(f"{path} is missing from token store {self.path}; re-run prepare") from e
      except ValueError as e:
        raise errors.DataError(f"{path} is not a readable .npy file ({e}); the store is corrupt, re-run prepare") from e
      expected = (entry["sequences"], self.seq_len)
      if array.shape != expected or array.dtype != self.dtype:
        raise errors.DataError(f"{path} holds {array.dtype}{list(array.shape)}, the manifest says "
                               f"{self.dtype}{list(expected)}; the store is corrupt, re-run prepare")
      self._arrays[i] = array
    return self._arrays[i]

  def _raw_array(self, entry: dict) -> np.ndarray:
    """A headerless token file adopted in place (dolma/OLMo format, `dolma` stage): its first `sequences` rows, the
    tail ignored. Its size must still be the one recorded, as its content decided the store's id."""
    path = lineage.resolve(entry["path"], self.path)
    try:
      size = path.stat().st_size
    except FileNotFoundError as e:
      raise errors.DataError(f"{path}, a file of token store {self.path}, is missing; restore it, or adopt the files "
                             "again (dolma stage, a new store id)") from e
    if size != entry["bytes"]:
      raise errors.DataError(f"{path} has {size:,} bytes, {entry['bytes']:,} when token store {self.path} adopted it: "
                             "the file changed; restore it, or adopt the files again (dolma stage, a new store id)")
    rows = int(entry["sequences"])
    if not rows:
      return np.zeros((0, self.seq_len), self.dtype)
    return np.memmap(path, dtype=self.dtype, mode="r", shape=(rows * self.seq_len,)).reshape(rows, self.seq_len)

  def file_of(self, ids: np.ndarray) -> np.ndarray:
    """Index (into manifest files) of the file holding each global id."""
    return np.searchsorted(self.offsets, ids, side="right") - 1

  def read(self, ids) -> np.ndarray:
    """Sequences [len(ids), seq_len] for global ids, in the given order."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_sequences):
      raise errors.DataError(f"sequence ids out of range for {self.path} ({self.num_sequences} sequences): "
                             f"min {ids.min()}, max {ids.max()}; is the index from another store?")
    out = np.empty((ids.size, self.seq_len), self.dtype)
    files = self.file_of(ids)
    for i in np.unique(files):
      rows = np.nonzero(files == i)[0]
      local = ids[rows] - self.offsets[i]
      order = np.argsort(local, kind="stable")  # sorted reads are kinder to disks and page cache
      out[rows[order]] = self._array(int(i))[local[order]]
    if out.size and int(out.max()) >= self.vocab_size:  # a model would embed a clamped id and score NaN or garbage
      bad = int(ids[np.argmax(out.max(axis=1))])
      raise errors.DataError(f"token store {self.path}: sequence {bad} holds token id {int(out.max())}, outside its "
                             f"tokenizer's {self.vocab_size:,} ids; the store's token files are corrupt or not its "
                             "own: prepare (or adopt) the store again")
    return out

  def tokenizer_path(self) -> pathlib.Path:
    return tokenizer_lib.checked_tokenizer_path(self.path, self.manifest["tokenizer"])

  def labels(self) -> list[str]:
    return list(self.manifest.get("labels", []))

  def label_ids(self, ids) -> np.ndarray:
    """Per-sequence source label (index into `labels()`): the source of the sequence's first token's document."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty(ids.size, np.int32)
    files = self.file_of(ids)
    for i in np.unique(files):
      rows = np.nonzero(files == i)[0]
      entry = self.files[int(i)]
      if "label_array" in entry:
        if self._labels[i] is None:
          self._labels[i] = object_storage.open_array(self.path / entry["label_array"])
        out[rows] = self._labels[i][ids[rows] - self.offsets[i]]
      else:
        out[rows] = entry.get("label", 0)
    return out


def check_store_fits(store: TokenStore, spec) -> None:
  """A store a model reads (train, held-out eval) must fit its vocabulary and its context: RoPE would run past
  the trained positions without an error, so a longer store gives silently wrong losses."""
  if store.vocab_size > spec.vocab_size:
    raise errors.DataError(f"token store {store.path} has vocab {store.vocab_size} but model.vocab_size="
                           f"{spec.vocab_size}; set --config.model.vocab_size to at least {store.vocab_size} "
                           f"(rounded up to a multiple of 64: {-(-store.vocab_size // 64) * 64})")
  if store.seq_len > spec.max_seq_len:
    raise errors.DataError(f"token store {store.path} has seq_len {store.seq_len} > model.max_seq_len="
                           f"{spec.max_seq_len}; raise model.max_seq_len (training) or prepare the store with "
                           f"--config.prepare.seq_len={spec.max_seq_len}")


def eval_stores(entries, tok_info: dict, against: str, spec) -> dict:
  """data.eval_stores ("name=path", or a bare path named by its folder) as name -> TokenStore, each checked to use
  the tokenizer `tok_info` describes (that of `against`: the training store or the params evaluated) and to fit
  the model `spec`."""
  stores = {}
  for entry in entries:
    name, path = entry.split("=", 1) if "=" in entry else (pathlib.Path(entry).name, entry)
    store = TokenStore(path)
    tokenizer_lib.check_same_tokenizer(store.manifest["tokenizer"], f"eval store {path}", tok_info, against)
    check_store_fits(store, spec)
    if name in stores:
      raise errors.ConfigError(f"data.eval_stores names {name!r} twice; give each store its own name=path")
    stores[name] = store
  return stores


def _index_file(path) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(the .npy of ids, the manifest that describes it or None): a selection folder's manifest describes its own
  index.npy only; a bare .npy (any other file, even one in a selection folder) has no manifest."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "index.npy"
  manifest = path.parent / formats.MANIFEST
  return path, (manifest if path.name == "index.npy" and manifest.exists() else None)


def _fix(setting: str) -> str:
  """How an error tells the user to fix an index: its config field, or the artifact it came from."""
  return f"--config.{setting}" if " " not in setting else setting


def index_id(path, setting: str = "data.index") -> str:
  """Content id of a selection: its manifest's id (known before the selection is made, from what it is selected
  from), else, for a bare .npy of ids, the hash of its bytes."""
  path, manifest_path = _index_file(path)
  if manifest_path is not None:
    manifest = formats.read_json(manifest_path)
    if manifest.get("id"):
      return manifest["id"]
  if not path.exists():
    raise errors.DataError(f"index file {path} does not exist; run the select stage or fix {_fix(setting)}")
  return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_index(path, store: TokenStore | None = None, setting: str = "data.index") -> np.ndarray:
  """A selection index: a 1-D .npy of global ids (checked against its manifest and the store when both exist);
  errors name `setting`, the config field (or the artifact) the index came from."""
  path, manifest_path = _index_file(path)
  if not path.exists():
    raise errors.DataError(f"index file {path} does not exist; run the select stage or fix {_fix(setting)}")
  try:
    index = np.load(path)
  except (ValueError, EOFError, OSError) as e:
    raise errors.DataError(f"{path} ({setting}) is not a readable .npy file ({e}); re-run the stage that wrote it "
                           f"or fix {_fix(setting)}") from e
  if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
    raise errors.DataError(f"{path} ({setting}) holds {index.dtype}{list(index.shape)}; an index is a 1-D integer "
                           "array of ids")
  manifest = formats.read_json(manifest_path) if manifest_path is not None else {}
  if manifest.get("index_sha256") and hashlib.sha256(path.read_bytes()).hexdigest() != manifest["index_sha256"]:
    raise errors.DataError(f"{path} ({setting}) does not match the hash in {manifest_path}: the selection was "
                           "modified; re-run the stage that wrote it")
  if store is not None and manifest:
    recorded = manifest.get("store_id")
    if recorded and recorded != store.id:
      fix = ("point --config.data.train_store at the store the selection came from" if setting == "data.index"
             else f"point {setting} at a selection of that store")
      raise errors.DataError(f"index {path} ({setting}) was selected from store {recorded}, but it is used with "
                             f"store {store.id} ({store.path}); {fix}")
  if store is not None and index.size and (index.min() < 0 or index.max() >= store.num_sequences):
    raise errors.DataError(f"index {path} ({setting}) has ids outside [0, {store.num_sequences}) of store "
                           f"{store.path}; fix {_fix(setting)}")
  return index.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Deterministic order


def _mix64(x: np.ndarray, key: np.uint64) -> np.ndarray:
  """splitmix64 finalizer of (x xor key): a cheap, well-mixed round function."""
  with np.errstate(over="ignore"):
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Permutation:
  """A keyed pseudo-random bijection of [0, n), O(1) memory: a balanced Feistel network with cycle walking."""

  ROUNDS = 6

  def __init__(self, n: int, seed: int, stream: int = 0):
    if n <= 0:
      raise ValueError(f"cannot permute {n} items")
    self.n = int(n)
    self.half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    self.mask = np.uint64((1 << self.half_bits) - 1)
    words = np.random.SeedSequence([int(seed), int(stream), self.n]).generate_state(self.ROUNDS, dtype=np.uint64)
    self.keys = [np.uint64(w) for w in words]

  def _feistel(self, x: np.ndarray) -> np.ndarray:
    shift = np.uint64(self.half_bits)
    left, right = x >> shift, x & self.mask
    for key in self.keys:
      left, right = right, left ^ (_mix64(right, key) & self.mask)
    return (left << shift) | right

  def __call__(self, positions) -> np.ndarray:
    x = np.asarray(positions, dtype=np.uint64)
    out = self._feistel(x)
    pending = out >= self.n
    while pending.any():  # cycle walking: re-encrypt until inside [0, n); keeps it a bijection of [0, n)
      out[pending] = self._feistel(out[pending])
      pending = out >= self.n
    return out.astype(np.int64)


def step_ids(step: int, batch_size: int, num_items: int, seed: int, index: np.ndarray | None = None) -> np.ndarray:
  """Global sequence ids of one step's batch: a fresh permutation per epoch over the store or the index."""
  positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, within = positions // num_items, positions % num_items
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    rows = epochs == epoch
    out[rows] = Permutation(num_items, seed, stream=int(epoch))(within[rows])
  return out if index is None else index[out]


# ----------------------------------------------------------------------------------------------------------------
# Background loading


class Prefetcher:
  """Runs `produce(step)` for consecutive steps in a background thread, `depth` steps ahead."""

  def __init__(self, produce, steps, depth: int = 4):
    self._produce = produce
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(list(steps),), daemon=True)
    self._thread.start()

  def _run(self, steps):
    try:
      for step in steps:
        item = (step, self._produce(step), None)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
    except BaseException as e:  # surfaced in the consumer, with its traceback
      self._queue.put((None, None, e))
      return
    self._queue.put((None, None, StopIteration()))

  def __iter__(self):
    return self

  def __next__(self):
    step, item, error = self._queue.get()
    if isinstance(error, StopIteration):
      raise StopIteration
    if error is not None:
      raise error
    return step, item

  def close(self):
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.05)
      except queue.Empty:
        pass
