"""The text files a token store is made from: which files a list of paths and globs names, each file's default
source name, and its documents (jsonl(.gz) lines, a whole .txt(.gz) file, or parquet rows), with errors that name
the file and line at fault.
"""
import glob
import gzip
import json
import os
import pathlib

from colorjax import errors


def expand_inputs(patterns) -> list[pathlib.Path]:
  """Files named by paths or globs, in the given order (each glob's matches sorted), duplicates removed."""
  if isinstance(patterns, str):
    patterns = [patterns]
  if not patterns:
    raise errors.DataError("no inputs: set --config.prepare.inputs to text files or globs")
  files, seen = [], set()
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise errors.DataError(f"input {pattern!r} matches no file; fix --config.prepare.inputs")
    for match in matches:
      path = pathlib.Path(os.path.abspath(match))  # a link's own name (hub cache files link to hash-named blobs)
      if path.resolve() not in seen:
        seen.add(path.resolve())
        files.append(path)
  return files


def source_label(path: pathlib.Path) -> str:
  """A file's default source name: its file name without data extensions (kjv.jsonl.gz -> kjv)."""
  name = path.name
  for ext in (".gz", ".jsonl", ".json", ".txt", ".parquet"):
    if name.endswith(ext):
      name = name[: -len(ext)]
  return name


def iter_documents(path: pathlib.Path, text_field: str, source_field: str):
  """(text, source) per document: jsonl(.gz) lines, a whole .txt(.gz) file, or parquet rows."""
  name, default_source = path.name, source_label(path)
  if name.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise errors.DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    table = pq.read_table(path)
    if text_field not in table.column_names:
      raise errors.DataError(f"{path} has no column {text_field!r} (columns: {table.column_names}); set "
                             "--config.prepare.text_field")
    sources = table.column(source_field).to_pylist() if source_field in table.column_names else None
    for i, text in enumerate(table.column(text_field).to_pylist()):
      if not isinstance(text, str):
        raise errors.DataError(f"{path}: row {i}: {text_field!r} is {type(text).__name__}, not text; fix or drop "
                               "that row")
      source = sources[i] if sources else None
      yield text, (default_source if source is None else str(source))
    return
  opener = gzip.open if name.endswith(".gz") else open
  stem = name[:-3] if name.endswith(".gz") else name
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      if stem.endswith(".txt"):
        yield f.read(), default_source
        return
      if not stem.endswith((".jsonl", ".json")):
        raise errors.DataError(f"{path}: unsupported file type; use .jsonl, .jsonl.gz, .txt, .txt.gz or .parquet")
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          doc = json.loads(line)
        except json.JSONDecodeError as e:
          raise errors.DataError(f"{path}:{line_no}: invalid JSON ({e}); fix or remove the file") from e
        if not isinstance(doc, dict) or text_field not in doc:
          raise errors.DataError(f"{path}:{line_no}: no {text_field!r} field; set --config.prepare.text_field")
        text = doc[text_field]
        if not isinstance(text, str):
          raise errors.DataError(f"{path}:{line_no}: {text_field!r} is {type(text).__name__}, not text; fix or drop "
                                 "that line")
        yield text, str(doc.get(source_field, default_source))
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path}: cannot be read ({e}); the file is corrupt or not UTF-8 text") from e
