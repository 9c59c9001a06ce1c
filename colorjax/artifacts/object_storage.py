"""Object storage (gs://, s3://) for every stage, through local mirrors of the remote folders a config names.

A stage's code reads and writes local paths only. Before a stage runs, `mirror_config` replaces each gs:// or
s3:// path of the config by its mirror under `$COLORJAX_CACHE` (default ~/.cache/colorjax/objects), after pulling
what is there: every file except the token arrays of token stores, which `RemoteArray` reads row range by row
range (ranged GETs of just the rows a host needs, never a whole-file download). `sync` uploads what changed in the
mirrors (new or changed files, deletions of files it had seen) with every manifest.json last, so a remote folder
with a manifest is a finished artifact there as it is on disk. Stages call it where a local run would be durable:
after a checkpoint, a flushed score chunk, the end of a stage.

On gs:// training checkpoints and params are written by orbax straight to the bucket (`orbax_path`), so they work on
many hosts; orbax has no s3 driver, so on s3:// they go through the mirror and need one host or a shared disk.
Credentials and endpoints come from the usual environment (AWS_*, incl. AWS_ENDPOINT_URL for S3-compatible servers;
GOOGLE_APPLICATION_CREDENTIALS, STORAGE_EMULATOR_HOST).
"""
import logging
import os
import pathlib
import shutil
import time

import numpy as np

from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import hub_paths

SCHEMES = ("gs://", "s3://")
_SKIPPED_SUFFIXES = (".lock", ".tmp")  # locks are per machine; .tmp files are renamed when complete

_mirrors: dict[pathlib.Path, "Mirror"] = {}
_last_flush = 0.0


def is_remote(path) -> bool:
  return str(path).startswith(SCHEMES)


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("COLORJAX_CACHE") or pathlib.Path.home() / ".cache/colorjax/objects")


def _fs(url: str):
  """The fsspec filesystem of a URL and the path in it (gcsfs / s3fs: installed with colorjax)."""
  import fsspec  # pylint: disable=import-outside-toplevel
  logging.getLogger("gcsfs").setLevel(logging.ERROR)  # warns on every call without default credentials
  options = {}
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if url.startswith("s3://") and region:  # botocore reads only AWS_DEFAULT_REGION; requests are signed for it
    options["client_kwargs"] = {"region_name": region}
  try:
    return fsspec.core.url_to_fs(url, **options)
  except ImportError as e:
    raise errors.ConfigError(f"{url}: reading {url.split(':')[0]}:// needs {e.name}; pip install -r "
                             "requirements.txt") from e


def mirror_path(url: str) -> pathlib.Path:
  """Where the mirror of `url` lives on this machine."""
  scheme, rest = url.split("://", 1)
  return cache_root() / scheme / rest.strip("/")


def remote_of(path) -> str | None:
  """The URL a local mirror path stands for, or None for ordinary local paths."""
  path, root = pathlib.Path(path).absolute(), cache_root().absolute()
  if root not in path.parents:
    return None
  scheme, *rest = path.relative_to(root).parts
  return f"{scheme}://{'/'.join(rest)}" if rest and scheme + "://" in SCHEMES else None


def reach(path: pathlib.Path) -> pathlib.Path:
  """`path` itself, pulled first when it is a mirror path not here yet: an artifact in object storage names its
  inputs by relative paths (a selection its scores, the scores their store), which this makes readable."""
  url = remote_of(path)
  if url and not path.exists():
    mirror(url)
  return path


def as_urls(message: str) -> str:
  """A message with mirror paths written as the URLs they stand for (errors should name what the user passed)."""
  root = str(cache_root().absolute())
  for scheme in SCHEMES:
    message = message.replace(f"{root}/{scheme[:-3]}/", scheme)
  return message


def _orbax_direct() -> bool:
  """COLORJAX_ORBAX_DIRECT=0 sends gs:// checkpoints through the mirror too (one host): for GCS emulators whose
  object generations tensorstore's OCDBT cannot parse."""
  return os.environ.get("COLORJAX_ORBAX_DIRECT", "1") != "0"


def orbax_path(path):
  """Where orbax should write a checkpoint folder: on gs:// the bucket itself (orbax's native, multi-host driver),
  otherwise the local path (an s3:// mirror is uploaded by `sync`)."""
  url = remote_of(path)
  if url and url.startswith("gs://") and _orbax_direct():
    from etils import epath  # pylint: disable=import-outside-toplevel
    return epath.Path(url)
  return pathlib.Path(path)


def _store_arrays(manifest_path: pathlib.Path) -> set[str]:
  """Token-array files of a store (read lazily by RemoteArray, never pulled)."""
  manifest = formats.read_json(manifest_path)
  if manifest.get("format") != formats.STORE.format:
    return set()
  return {f[key] for f in manifest.get("files", []) for key in ("array", "label_array") if key in f}


class Mirror:
  """One remote folder (or file) and its local mirror; `seen` maps a relative name to the (size, mtime_ns) it had
  locally when last pulled or pushed, which is how `push` knows what changed or was deleted."""

  def __init__(self, url: str):
    self.url = url.rstrip("/")
    self.local = mirror_path(self.url)
    self.fs, self.root = _fs(self.url)
    self.seen: dict[str, tuple[int, int]] = {}
    self.lazy: set[str] = set()

  def _remember(self, name: str) -> None:
    stat = (self.local / name).stat()
    self.seen[name] = (stat.st_size, stat.st_mtime_ns)

  def pull(self, skip_checkpoints: bool) -> None:
    """Download the remote folder (or file), except store token arrays and, on gs://, training checkpoints."""
    if self.fs.isfile(self.root):
      self.local.parent.mkdir(parents=True, exist_ok=True)
      self.fs.get_file(self.root, str(self.local))
      self._remember("")
      beside = self.root.rsplit("/", 1)[0] + "/" + formats.MANIFEST  # a file of an artifact travels with its manifest
      if self.local.name != formats.MANIFEST and self.fs.isfile(beside):
        self.fs.get_file(beside, str(self.local.parent / formats.MANIFEST))
      return
    names = sorted(p[len(self.root):].lstrip("/") for p in self.fs.find(self.root))
    for name in (n for n in names if n.rsplit("/", 1)[-1] == formats.MANIFEST):
      self._get(name)
      folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
      self.lazy |= {folder + array for array in _store_arrays(self.local / name)}
    for name in names:
      if name in self.lazy or name in self.seen or (skip_checkpoints and "checkpoints" in name.split("/")[:-1]):
        continue
      self._get(name)

  def _get(self, name: str) -> None:
    target = self.local / name
    target.parent.mkdir(parents=True, exist_ok=True)
    self.fs.get_file(f"{self.root}/{name}", str(target))
    self._remember(name)

  def push(self, manifests: bool) -> int:
    """Upload new and changed files: data files, or (second phase) manifests and the deletions of files removed
    here. Returns the number of uploads."""
    if not self.local.exists():
      return 0
    files = [self.local] if self.local.is_file() else [p for p in self.local.rglob("*") if p.is_file()]
    names = [p.relative_to(self.local).as_posix() if p != self.local else "" for p in files]
    names = [n for n in names if not n.endswith(_SKIPPED_SUFFIXES) and ".partial" not in n]
    changed = [n for n in names if (n.rsplit("/", 1)[-1] == formats.MANIFEST) == manifests
               and self.seen.get(n) != ((st := (self.local / n).stat()).st_size, st.st_mtime_ns)]
    changed.sort(key=lambda n: ((self.local / n).stat().st_mtime_ns, n))  # in the order written: flags after data
    for name in changed:
      self.fs.put_file(str(self.local / name), f"{self.root}/{name}" if name else self.root)
      self._remember(name)
    if manifests:
      present = set(names)
      for name in [n for n in self.seen if n and n not in present and n not in self.lazy]:
        self.fs.rm_file(f"{self.root}/{name}")
        del self.seen[name]
    return len(changed)


def mirror(url: str) -> pathlib.Path:
  """Pull `url` into its mirror (once per process, not again inside a mirrored folder) and return the local path
  stages should use. On gs:// training checkpoints stay in the bucket (orbax reads them there)."""
  local = mirror_path(url).absolute()
  if any(c in url for c in "*?["):  # a pattern (prepare.inputs): mirror each match; the pattern globs the mirror
    fs, pattern = _fs(url)
    for match in fs.glob(pattern):
      mirror(url.split("://", 1)[0] + "://" + match)
    return local
  if not any(local == root or root in local.parents for root in _mirrors):
    m = Mirror(url)
    try:
      m.pull(skip_checkpoints=url.startswith("gs://") and _orbax_direct())
    except Exception as e:  # pylint: disable=broad-except  # botocore, aiohttp, google-auth: each its own errors
      raise errors.DataError(f"cannot read {url}: {type(e).__name__}: {e}; check the path, the credentials "
                             "(AWS_* / GOOGLE_APPLICATION_CREDENTIALS) and the endpoint (AWS_ENDPOINT_URL, "
                             "STORAGE_EMULATOR_HOST)") from e
    _mirrors[local] = m
  return local


def _remote_values(value):
  if isinstance(value, str):
    return [value] if is_remote(value) else []
  if isinstance(value, (tuple, list)):
    return [v for v in value if isinstance(v, str) and is_remote(v)]
  return []


def _map(value, fn):
  if isinstance(value, str):
    return fn(value) if is_remote(value) else value
  return type(value)(fn(v) if isinstance(v, str) and is_remote(v) else v for v in value)


def mirror_config(cfg) -> list[str]:
  """Replace every gs:// / s3:// path in the config by its pulled local mirror; returns the URLs mirrored. Outer
  folders are pulled first, so a store inside a mirrored work directory is not pulled twice. hf:// paths (read
  only) are downloaded into the hub's own cache instead (artifacts/hub_paths.py)."""
  hub_paths.localize_config(cfg)
  fields = []

  def visit(node):
    for key in list(node.keys()):
      if hasattr(node[key], "keys"):
        visit(node[key])
      elif _remote_values(node[key]):
        fields.append((node, key))

  visit(cfg)
  urls = sorted({url for node, key in fields for url in _remote_values(node[key])}, key=len)
  local = {url: str(mirror(url)) for url in urls}
  for node, key in fields:
    node[key] = _map(node[key], local.get)
  return urls


def active() -> bool:
  """Whether this process works on mirrors of object storage (stages then sync at their durable points)."""
  return bool(_mirrors)


def sync() -> int:
  """Push every mirror of this process: data files first, then (after every host has pushed its data) manifests,
  so a manifest never names a file that is not there yet. A no-op without remote paths; returns the uploads."""
  if not _mirrors:
    return 0
  uploads = sum(m.push(manifests=False) for m in _mirrors.values())
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("colorjax storage sync")
  return uploads + sum(m.push(manifests=True) for m in _mirrors.values())


def flush(min_interval_s: float = 60.0) -> int:
  """Push this process's new data files (no manifests, no barrier: hosts may call it at different times), at most
  once per `min_interval_s`; for long stages whose progress should survive the machine, e.g. finished score chunks."""
  global _last_flush  # pylint: disable=global-statement
  if not _mirrors or time.monotonic() - _last_flush < min_interval_s:
    return 0
  _last_flush = time.monotonic()
  return sum(m.push(manifests=False) for m in _mirrors.values())


def forget() -> None:
  """Drop the mirrors of this process (tests run several stages in one process)."""
  _mirrors.clear()


def clean() -> int:
  """After a stage's final sync: delete this process's mirrors from the cache (everything in them is in the bucket),
  unless COLORJAX_KEEP_CACHE=1. Returns the bytes freed. A failed or stopped stage keeps its mirrors (a re-run on this
  machine resumes from them); `rm -rf $COLORJAX_CACHE` clears the cache by hand."""
  if os.environ.get("COLORJAX_KEEP_CACHE", "0") == "1":
    return 0
  freed = 0
  for local in list(_mirrors):
    if local.is_dir():
      freed += sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
      shutil.rmtree(local, ignore_errors=True)
    elif local.is_file():
      freed += local.stat().st_size
      local.unlink()
    del _mirrors[local]
  return freed


class UrlStream:
  """A text stream that writes mirror paths as the URLs they stand for: every message of a stage that works on
  object storage names the user's gs:// or s3:// path, never the local cache (which a preempted machine loses)."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> int:
    return self.stream.write(as_urls(text))

  def __getattr__(self, name):
    return getattr(self.stream, name)


class RemoteArray:
  """Rows of a remote .npy file, read with ranged GETs: `array[sorted_row_ids]` fetches each run of consecutive
  rows in one request (all requests concurrently), so a host downloads only the rows it trains on or scores."""

  def __init__(self, url: str):
    self.url = url
    self.fs, self.path = _fs(url)
    header = self.fs.cat_file(self.path, start=0, end=4096)
    import io  # pylint: disable=import-outside-toplevel
    stream = io.BytesIO(header)
    try:
      version = np.lib.format.read_magic(stream)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, fortran, dtype = read_header(stream)
    except ValueError as e:
      raise errors.DataError(f"{url} is not a readable .npy file ({e}); the store is corrupt, re-run prepare") from e
    if fortran or len(shape) not in (1, 2):
      raise errors.DataError(f"{url}: expected a C-ordered 1-D or 2-D .npy array; re-run prepare")
    self.shape, self.dtype, self.offset = tuple(shape), np.dtype(dtype), stream.tell()
    self.row_bytes = self.dtype.itemsize * (self.shape[1] if len(self.shape) == 2 else 1)

  def __getitem__(self, rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if not rows.size:
      return np.zeros((0,) + self.shape[1:], self.dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    breaks = np.nonzero(np.diff(unique) != 1)[0] + 1
    starts, ends = unique[np.r_[0, breaks]], unique[np.r_[breaks - 1, unique.size - 1]] + 1
    blobs = self.fs.cat_ranges([self.path] * starts.size, (self.offset + starts * self.row_bytes).tolist(),
                               (self.offset + ends * self.row_bytes).tolist())
    for blob in blobs:
      if isinstance(blob, Exception):
        raise errors.DataError(f"reading rows of {self.url} failed: {blob}")
    return np.frombuffer(b"".join(blobs), self.dtype).reshape((-1,) + self.shape[1:])[inverse]


def open_array(path: pathlib.Path):
  """A store's array: memory-mapped when on this disk, ranged reads when it lives in object storage."""
  if not path.exists() and (url := remote_of(path)):
    return RemoteArray(url)
  return np.load(path, mmap_mode="r")
