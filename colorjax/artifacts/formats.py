"""Artifact formats: the manifest file that marks a finished artifact, the kind each manifest names, and the readers
that refuse a wrong, missing or corrupt one with a message naming the file and the fix.

The lowest layer of `colorjax.artifacts`: it imports nothing of colorjax but `errors`, so object storage and lineage
can both build on it.
"""
import dataclasses
import json
import math
import pathlib

from colorjax import errors

MANIFEST = "manifest.json"
REQUEST = "request.json"  # an unfinished run's request, written before its first step


@dataclasses.dataclass(frozen=True)
class Kind:
  """A kind of artifact: the `format` its manifest names (and `version`, where readers check one), what it is and
  what makes it, so every reader refuses a wrong folder with the same clear message."""
  format: str
  what: str
  made_by: str
  version: int | None = None


STORE = Kind("colorjax.token_store", "a token store", "the prepare stage (or dolma adopt)", version=1)
PARAMS = Kind("colorjax.params", "a params export", "a finished pretrain/finetune run (<workdir>/params)")
SCORES = Kind("colorjax.scores", "a score folder", "the score stage (or dolma import_scores)")
SELECTION = Kind("colorjax.selection", "a selection", "the select or dsir stage (or dolma import_selection)")


def read_manifest(path) -> dict:
  """The manifest of an artifact folder, with errors that say what is wrong and how to fix it."""
  folder = pathlib.Path(path)
  manifest_path = folder / MANIFEST
  if not folder.exists():
    raise errors.DataError(f"{folder} does not exist")
  if not manifest_path.exists():
    raise errors.DataError(f"{manifest_path} is missing: {folder} is not a finished colorjax artifact (an "
                           "interrupted run leaves no manifest); re-run the stage that makes it")
  return read_json(manifest_path)


def open_manifest(path, kind: Kind) -> dict:
  """The manifest of an artifact that must be of `kind` (format, and version where one is read)."""
  manifest = read_manifest(path)
  if manifest.get("format") != kind.format:
    raise errors.DataError(f"{pathlib.Path(path) / MANIFEST} is not {kind.what} (format={manifest.get('format')!r});"
                           f" pass a folder written by {kind.made_by}")
  if kind.version is not None and manifest.get("version") != kind.version:
    raise errors.DataError(f"{path} holds {kind.what} of version {manifest.get('version')}; this colorjax reads "
                           f"version {kind.version}: make it again with {kind.made_by}")
  return manifest


def read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(pathlib.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise errors.DataError(f"{path} is not valid JSON ({e}); it is corrupt: delete its folder and re-run the stage "
                           "that makes it") from e


def finite(value):
  """`value` with every NaN or infinite float replaced by None (JSON has no NaN: an artifact never holds one)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite(v) for v in value]
  return value


def json_text(value, indent: int | None = 1) -> str:
  """Strict JSON of an artifact's record: non-finite floats become null; other objects their str()."""
  return json.dumps(finite(json.loads(json.dumps(value, default=str))), indent=indent, allow_nan=False)
