"""Lineage: content ids, the reuse-or-refuse rule, locks, and paths that survive moving a work directory.

Every artifact (token store, params export, scores, selection) is a folder whose `manifest.json` is written last
and records `request`: what decides the artifact's content, naming its inputs by their content ids, never by path.
Its id is the hash of that request, so it is known before the artifact is built: a stage, or the pipeline's
preflight, decides whether an existing artifact is up to date by recomputing the request from the ids of the
inputs that are there now. Paths recorded in manifests are relative to the artifact's folder, so a work directory
can be moved, copied or synced elsewhere and still reads its own artifacts.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
import time

from colorjax import console
from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import object_storage



def normalized(request: dict) -> dict:
  """The request as JSON stores it (tuples become lists), so a saved request compares equal to a fresh one."""
  return json.loads(json.dumps(request, default=str))


def content_id(request: dict) -> str:
  """The id of an artifact: a hash of what decides its content."""
  text = json.dumps(normalized(request), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two (nested) requests."""
  out = []
  for key in sorted(set(saved) | set(wanted)):
    a, b = saved.get(key), wanted.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}")
  return out


def recorded_request(folder: pathlib.Path) -> dict | None:
  """The request a finished (manifest) or unfinished (request.json) artifact in `folder` was made for."""
  for name in (formats.MANIFEST, formats.REQUEST):
    path = pathlib.Path(folder) / name
    if path.exists():
      return formats.read_json(path).get("request")
  return None


def up_to_date(folder, request: dict, what: str, fix: str) -> bool:
  """True when `folder` holds a finished artifact made for this request (reuse it), False when it holds none; raises
  when it holds one made for another request, naming what differs (nothing is overwritten)."""
  path = pathlib.Path(folder) / formats.MANIFEST
  if not path.exists():
    return False
  saved = formats.read_json(path).get("request")
  if saved == normalized(request):
    return True
  changed = differences(saved or {}, normalized(request)) if isinstance(saved, dict) else ["(no request recorded)"]
  raise errors.DataError(f"{folder} holds {what} made from other inputs or settings (differs in: "
                         f"{', '.join(changed)}); {fix} (nothing was overwritten)")


def check_new(folder, what: str, fix: str) -> None:
  """Before building an artifact that `publish` moves into `folder`: a folder already there that `up_to_date` did
  not accept (no manifest) fails now, not after the work."""
  if pathlib.Path(folder).exists():
    raise errors.DataError(f"{folder} exists but is not {what}; {fix} (nothing was overwritten)")


def write_manifest(folder: pathlib.Path, manifest: dict) -> None:
  """Write the manifest last, atomically: a folder with a manifest is a finished artifact."""
  path = pathlib.Path(folder) / formats.MANIFEST
  tmp = path.with_name(formats.MANIFEST + ".tmp")
  tmp.write_text(formats.json_text(manifest))
  os.replace(tmp, path)


@contextlib.contextmanager
def building(folder, what: str = "an artifact", fix: str = "choose another --config.workdir", lock: bool = True,
             marker: str = formats.MANIFEST):
  """The one way a finished artifact is written: the block writes it into the yielded `<folder>.partial` (made fresh),
  `marker` (the manifest) last; when the block ends it is moved into place in one rename, so readers never see half
  an artifact. A folder already at `folder` that is not the artifact is refused first (nothing is overwritten), and
  the artifact's lock is held throughout (`lock=False` when the caller holds it already). A failed block leaves no
  partial folder behind."""
  folder = pathlib.Path(folder)
  check_new(folder, what, fix)
  with Lock(folder) if lock else contextlib.nullcontext():
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
      shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
      yield partial
    except BaseException:
      shutil.rmtree(partial, ignore_errors=True)
      raise
    if not (partial / marker).exists():
      raise RuntimeError(f"{partial}: an artifact is published with its {marker} written last")
    publish(partial, folder)


def publish_folder(folder, manifest: dict, files: dict, what: str = "an artifact",
                   fix: str = "choose another --config.workdir", lock: bool = True) -> pathlib.Path:
  """`building` for an artifact of small files: `files` (name -> bytes), then its manifest."""
  with building(folder, what, fix, lock) as partial:
    for name, data in files.items():
      (partial / name).write_bytes(data)
    write_manifest(partial, manifest)
  return pathlib.Path(folder)


def publish(partial: pathlib.Path, final: pathlib.Path) -> pathlib.Path:
  """Move a completed `<name>.partial` folder into place (one rename: readers never see half an artifact)."""
  if final.exists():
    raise errors.DataError(f"{final} appeared while {partial} was being built; another process wrote it. Delete one "
                           "of them (nothing was overwritten)")
  shutil.move(str(partial), str(final))
  return final


def relative(path, base) -> str:
  """`path` as recorded in an artifact under `base`: relative when both are local, so moving both keeps it valid."""
  return os.path.relpath(pathlib.Path(path).resolve(), pathlib.Path(base).resolve())


def resolve(recorded: str, base) -> pathlib.Path:
  """A path recorded by `relative` (or an absolute one, from older artifacts), as seen from `base`."""
  return object_storage.reach((pathlib.Path(base) / recorded).resolve())


def fingerprint(path: pathlib.Path, known: dict | None = None) -> dict:
  """sha256, size and mtime of a file; the hash is reused from `known` when size and mtime still match."""
  stat = pathlib.Path(path).stat()
  if known and known.get("sha256") and known.get("bytes") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
    return {"sha256": known["sha256"], "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return {"sha256": digest.hexdigest(), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Lock:
  """An exclusive lock on writing one artifact (`.<name>.lock` beside it), held by process 0 of a job.

  A second process that wants to write the same artifact exits at once with a message naming the holder. The OS
  releases the lock when its holder dies, so a killed job never leaves a stale lock.
  """

  def __init__(self, folder, part: str = ""):
    folder = pathlib.Path(folder).resolve()
    self.folder = folder
    self.path = folder.parent / f".{folder.name}{'.' + part if part else ''}.lock"
    self.file = None

  def __enter__(self):
    if not console.is_main():
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      self.file.seek(0)
      holder = self.file.read().strip() or "another process"
      self.file.close()
      self.file = None
      raise errors.LockedError(f"{self.folder} is being written by {holder}; wait for that job to finish (or stop "
                               "it), or use another --config.workdir") from e
    self.file.seek(0)
    self.file.truncate()
    self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')} "
                    f"({' '.join(sys.argv[:1] + sys.argv[1:4])})")
    self.file.flush()
    return self

  def __exit__(self, *exc):
    if self.file is not None:
      self.file.truncate(0)
      fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
      self.file.close()
      self.file = None
    return False
