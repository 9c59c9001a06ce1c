"""The `dolma` stage: the original CoLoR-Filter's files (dolma/OLMo formats) as colorjax artifacts, and back.

The original (PyTorch/OLMo) keeps tokens, scores and selections as headerless memmaps. `--config.dolma.action`
picks one of four conversions; each writes its artifact to `--config.workdir`:

* adopt: token files (uint16/uint32 ids, documents joined by EOS) -> a token store whose manifest points at the
  files where they are (no copy). As OLMo's `MemMapDataset(*paths, chunk_size=seq_len)`, file i gives
  floor(tokens_i / seq_len) sequences (its tail ignored) and global ids run over the files in the given order: the
  original's ids exactly when the files come in its order, i.e. its config.yaml `data.paths` (a folder it globbed
  unsorted, in filesystem order, which no other listing reproduces).
* import_scores: the score shards `Scorer.score_model` writes (DictMemmapWriter: files.txt, mmap_index.npy, 1.npy,
  2.npy, ...) of the prior and of each conditional -> a colorjax score folder, aligned by sequence id (the
  original's select_index_np.py asserted equal row orders instead).
* import_selection: select_index_np.py's selected_indices.npy -> a colorjax selection (train --config.data.index).
* export_selection: a colorjax selection -> token files in the same dolma/OLMo format plus a JSON sidecar, and
  sharded Parquet {id, input_ids, score, source}, for the original trainer, OLMo-core, MaxText or HF datasets.

Rows of a score shard. The writer pre-sizes mmap_index.npy (1e8 int64) and every N.npy (1,048,576 float32 rows)
with zeros and records no row count; the original's reader strips the index's trailing zeros, so it drops a real
id 0 written last. Ids within a shard are distinct, so a shard wrote either `nz` rows (the index up to its last
nonzero entry) or nz + 1, the extra row being id 0. This reader keeps (first rule that applies):
  1. nz when the index or the float files have no room for another row;
  2. the float files' row count when they were cut to the written rows (the last file below the pre-size), which
     must then be nz or nz + 1;
  3. `--config.dolma.rows` when given and the shard is full (nz >= rows - 1; the pool's last shard may be short);
  4. nz + 1 when the float at row nz is nonzero (a written mean NLL is > 0, unwritten pre-sized rows are 0.0).
Each model's shards must then cover every pool id exactly once, which catches a wrong decision.
"""
# score._zarr, select._npy_bytes and export._scores_of are the writers' own pieces, reused here
# pylint: disable=protected-access
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import time

import jax
import numpy as np
import tensorstore as ts

from colorjax import artifacts
from colorjax import checkpoint
from colorjax import data
from colorjax import errors
from colorjax import export as export_lib
from colorjax import metrics
from colorjax import score as score_lib
from colorjax import select as select_lib

ACTIONS = ("adopt", "import_scores", "import_selection", "export_selection")
DTYPES = ("uint16", "uint32")
FORMATS = ("tokens", "parquet")
PRESIZED_ROWS = 1 << 20  # DictMemmapWriter's file_seqs: the rows every score file N.npy is created with
SAMPLE_TOKENS = 1 << 20  # leading tokens of each adopted file checked against the vocabulary (catches a wrong dtype)
SCORE_CHUNK_ROWS = 1 << 16  # nll.zarr row chunk of imported scores
BLOCK_ROWS = 4096  # sequences read from a store at a time when exporting
EXPORT_FORMAT = "colorjax.dolma_export"


def _print(message: str) -> None:
  if metrics.is_main():
    print(message, flush=True)


def _workdir(cfg) -> pathlib.Path:
  if not cfg.workdir:
    raise errors.ConfigError(f"set --config.workdir to the folder the dolma {cfg.dolma.action} output goes to")
  return pathlib.Path(cfg.workdir).resolve()


def _as_list(value) -> list[str]:
  """A config tuple (or one string given for it) as a list of strings."""
  return [value] if isinstance(value, str) else [str(v) for v in value]


def _byte_rows(path: pathlib.Path, itemsize: int, what: str, fix: str) -> int:
  """Rows of `itemsize` bytes in a headerless file, refusing a size that is not a multiple of it."""
  size = path.stat().st_size
  if size % itemsize:
    raise data.DataError(f"{path} has {size:,} bytes, not a multiple of {itemsize}: not a headerless {what} file "
                         f"(or cut mid-value); {fix}")
  return size // itemsize


def _publish(partial: pathlib.Path, output: pathlib.Path, write) -> pathlib.Path:
  """Build an artifact in `<output>.partial` with `write(folder)` (manifest last), then move it into place."""
  if partial.exists():
    shutil.rmtree(partial)
  partial.mkdir(parents=True)
  write(partial)
  return artifacts.publish(partial, output)


# ----------------------------------------------------------------------------------------------------------------
# adopt: token files -> a token store, in place


def read_yaml(path) -> dict:
  """An original run's config.yaml (OmegaConf writes plain YAML; PyYAML comes with ml_collections)."""
  import yaml  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.ConfigError(f"{path} is not a file; pass the config.yaml of an original run (its save_folder or "
                             "checkpoint folder holds one)")
  try:
    loaded = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise data.DataError(f"{path} is not readable YAML ({e}); pass the config.yaml of an original run") from e
  if not isinstance(loaded, dict):
    raise data.DataError(f"{path} is not a TrainConfig (a YAML mapping); pass the config.yaml of an original run")
  return loaded


def _is_pattern(entry: str) -> bool:
  return any(c in entry for c in "*?[")


def _matches(path: pathlib.Path) -> tuple[list[pathlib.Path], bool]:
  """Files a path names (a glob's matches and a folder's *.npy, each sorted; a file itself), and whether it was
  expanded (a glob or a folder)."""
  if _is_pattern(str(path)):
    return [pathlib.Path(m) for m in sorted(glob.glob(str(path))) if os.path.isfile(m)], True
  if path.is_dir():
    return sorted(p for p in path.glob("*.npy") if p.is_file()), True
  return ([path] if path.is_file() else []), False


def expand_paths(entries, root: str = "") -> tuple[list[pathlib.Path], list[str]]:
  """Token files in the given order (duplicates kept, as the original keeps them), each entry found as given or
  else under `root`; and the entries that were globs or folders, whose sorted order is not the original's."""
  files, expanded = [], []
  for entry in entries:
    entry = os.path.expanduser(str(entry))
    bases = [pathlib.Path()] + ([pathlib.Path(root)] if root and not os.path.isabs(entry) else [])
    found, was_expanded = next((m for m in (_matches(base / entry) for base in bases) if m[0]), ([], False))
    if not found:
      where = f" nor under dolma.root={root}" if root else "; set --config.dolma.root to the folder the original ran in"
      raise data.DataError(f"token file {entry!r} does not exist (as given{where}); fix --config.dolma.paths or "
                           "--config.dolma.paths_from")
    if was_expanded:
      expanded.append(entry)
    files += [f.resolve() for f in found]
  return files, expanded


def _special(given: int, original) -> int:
  """A special token id: given (>= 0), else the original run's model.<name>, else -1 (the tokenizer's)."""
  if given >= 0:
    return int(given)
  return int(original) if original is not None else -1


def adopt_settings(cfg) -> dict:
  """Files, dtype, seq_len, special ids and labels: as given, else from the original run's config.yaml."""
  d = cfg.dolma
  given = _as_list(d.paths)
  if given and d.paths_from:
    raise errors.ConfigError("give --config.dolma.paths or --config.dolma.paths_from, not both")
  original = read_yaml(d.paths_from) if d.paths_from else {}
  data_cfg, model_cfg = original.get("data") or {}, original.get("model") or {}
  entries = given or _as_list(data_cfg.get("paths") or [])
  if d.paths_from and not entries:
    raise data.DataError(f"{d.paths_from} lists no data.paths (its data came from data.datasets or a registry name); "
                         "pass its token files as --config.dolma.paths, in the original's order")
  if not entries:
    raise errors.ConfigError("set --config.dolma.paths (token files, globs or folders, in id order) or "
                             "--config.dolma.paths_from=<original run>/config.yaml")
  dtype = d.dtype or str(data_cfg.get("memmap_dtype") or "")
  if dtype not in DTYPES:
    raise errors.ConfigError(f"dolma.dtype={dtype!r}: set the token files' dtype, uint16 or uint32 (the original's "
                             "data.memmap_dtype)")
  seq_len = int(d.seq_len or model_cfg.get("max_sequence_length") or 0)
  if seq_len < 2:
    raise errors.ConfigError(f"dolma.seq_len={seq_len}: set the original's chunk_size, its "
                             "model.max_sequence_length (at least 2)")
  files, expanded = expand_paths(entries, d.root)
  labels = _as_list(d.labels) or [f.stem for f in files]
  if len(labels) != len(files):
    raise errors.ConfigError(f"dolma.labels names {len(labels)} sources for {len(files)} files; give one per file "
                             "(names may repeat) or none (each file's stem)")
  return {"files": files, "entries": entries, "expanded": expanded, "dtype": dtype, "seq_len": seq_len,
          "eos_id": _special(d.eos_id, model_cfg.get("eos_token_id")),
          "pad_id": _special(d.pad_id, model_cfg.get("pad_token_id")), "labels": labels}


def token_file(path: pathlib.Path, dtype: str, seq_len: int, known: dict | None = None) -> dict:
  """A store entry for a headerless token file read in place: fingerprint, tokens, sequences, ignored tail."""
  tokens = _byte_rows(path, np.dtype(dtype).itemsize, f"{dtype} token",
                      "check --config.dolma.dtype (the original's data.memmap_dtype) and the file")
  sequences = tokens // seq_len
  return {"name": path.name, "path": str(path), "format": "raw", **artifacts.fingerprint(path, known),
          "tokens": tokens, "sequences": sequences, "dropped_tokens": tokens - sequences * seq_len}


def check_vocab(path: pathlib.Path, dtype: str, vocab_size: int) -> None:
  """The file's leading tokens are ids of the tokenizer: a wrong dtype or tokenizer shows here, not mid-training."""
  sample = np.fromfile(path, dtype=dtype, count=SAMPLE_TOKENS)
  if sample.size and int(sample.max()) >= vocab_size:
    raise data.DataError(f"{path} holds token id {int(sample.max()):,} in its first {sample.size:,} tokens, outside "
                         f"the tokenizer's {vocab_size:,} ids; check --config.dolma.dtype ({dtype}) and "
                         "--config.dolma.tokenizer")


def adopt_request(entries: list[dict], dtype: str, seq_len: int, tok_info: dict) -> dict:
  """What decides an adopted store's content: the files (by hash, in order), dtype, seq_len and tokenizer."""
  return {"kind": "dolma", "version": data.STORE_VERSION, "files": [[e["name"], e["sha256"]] for e in entries],
          "dtype": dtype, "seq_len": int(seq_len), "tokenizer_sha256": tok_info["sha256"],
          "eos_id": tok_info["eos_id"], "pad_id": tok_info["pad_id"]}


def label_table(labels: list[str]) -> tuple[list[str], list[int]]:
  """Distinct label names in first-seen order, and each file's index into them."""
  names = list(dict.fromkeys(labels))
  return names, [names.index(label) for label in labels]


def _adopt_inputs(cfg):
  """Everything adopt decides before writing (also the dry run): settings, tokenizer, entries, request."""
  s = adopt_settings(cfg)
  if not cfg.dolma.tokenizer:
    raise errors.ConfigError("set --config.dolma.tokenizer to the tokenizer.json the tokens were made with (the "
                             "original's: gpt-neox-20b-pii-special.json)")
  tokenizer = data.load_tokenizer(cfg.dolma.tokenizer)
  tok_info = data.tokenizer_info(tokenizer, cfg.dolma.tokenizer, s["eos_id"], s["pad_id"])
  output = _workdir(cfg)
  previous = artifacts.read_json(output / data.MANIFEST).get("files", []) if (output / data.MANIFEST).exists() else []
  known = {e.get("path"): e for e in previous}
  entries = [token_file(f, s["dtype"], s["seq_len"], known.get(str(f))) for f in s["files"]]
  for entry in entries:
    check_vocab(pathlib.Path(entry["path"]), s["dtype"], tok_info["vocab_size"])
  return s, tokenizer, tok_info, entries, adopt_request(entries, s["dtype"], s["seq_len"], tok_info)


def _report_order(s: dict, entries: list[dict]) -> None:
  """The order ids come in; a warning when it came from sorting a glob or folder."""
  first = 0
  for i, entry in enumerate(entries):
    if i < 8 or i == len(entries) - 1:
      _print(f"  ids [{first:,}, {first + entry['sequences']:,}) {entry['path']} ({entry['dropped_tokens']} tail "
             "tokens ignored)")
    elif i == 8:
      _print(f"  ... {len(entries) - 9} more files")
    first += entry["sequences"]
  if s["expanded"]:
    _print(f"dolma adopt: warning: {', '.join(s['expanded'])} expanded in sorted order; the original globbed a folder "
           "unsorted (filesystem order), so its ids are only reproduced from its own file list: pass "
           "--config.dolma.paths_from=<its run>/config.yaml (data.paths)")


def adopt(cfg) -> pathlib.Path:
  output = _workdir(cfg)
  s, tokenizer, tok_info, entries, request = _adopt_inputs(cfg)
  names, label_ids = label_table(s["labels"])
  _print(f"dolma adopt: {len(entries)} {s['dtype']} files, seq_len {s['seq_len']}, in this order:")
  _report_order(s, entries)
  if artifacts.up_to_date(output, request, "another token store", "delete it or choose another --config.workdir"):
    saved = data.read_manifest(output)
    if saved.get("labels") != names or [e.get("label") for e in saved["files"]] != label_ids:
      raise data.DataError(f"{output} holds these files with other labels ({saved.get('labels')}); delete it to "
                           "relabel (nothing was overwritten)")
    _print(f"dolma adopt: {output} is up to date; nothing to do")
    return output
  if output.exists():
    raise data.DataError(f"{output} exists but is not a token store; choose another --config.workdir")
  first = 0
  for entry, label in zip(entries, label_ids):
    entry.update(first_id=first, label=label)
    first += entry["sequences"]
  if not first:
    raise data.DataError(f"no file holds one sequence of {s['seq_len']} tokens; check --config.dolma.seq_len "
                         "(nothing was written)")
  manifest = {
      "format": data.STORE_FORMAT, "version": data.STORE_VERSION, "id": artifacts.content_id(request),
      "seq_len": s["seq_len"], "dtype": s["dtype"], "tokenizer": tok_info, "num_sequences": first,
      "num_tokens": first * s["seq_len"], "labels": names, "files": entries,
      "adopted": {"from": "dolma/OLMo token files, read in place", "entries": s["entries"],
                  "paths_from": cfg.dolma.paths_from or None, "sorted": s["expanded"]},
      "request": request,
      "created_by": {"stage": "dolma adopt", "config": cfg.to_dict(), "host": socket.gethostname(),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
  }

  def write(folder):
    (folder / data.TOKENIZER).write_text(tokenizer.to_str())  # the bytes tok_info's sha256 is of
    artifacts.write_manifest(folder, manifest)

  with artifacts.Lock(output):
    _publish(output.with_name(output.name + ".partial"), output, write)
  _print(f"dolma adopt: wrote {output}: {first:,} sequences of {s['seq_len']} tokens (id {manifest['id']}); the "
         "token files stay where they are and must not change")
  return output


# ----------------------------------------------------------------------------------------------------------------
# import_scores: the original's score shards -> a colorjax score folder


def shard_folders(spec: str, field: str) -> list[pathlib.Path]:
  """The score folders a "+"-joined list names (each the `score` folder itself, or the run folder above it)."""
  parts = [p.strip() for p in str(spec).split("+") if p.strip()]
  if not parts:
    raise errors.ConfigError(f"set --config.dolma.{field} to score folders joined by + (the original's "
                             "data.extra_data_paths)")
  folders = []
  for part in parts:
    found = next((c for c in (pathlib.Path(part), pathlib.Path(part) / "score") if (c / "files.txt").is_file()), None)
    if found is None:
      raise data.DataError(f"{part} holds no files.txt (nor score/files.txt): not a score folder of the original; "
                           f"fix --config.dolma.{field}")
    folders.append(found.resolve())
  return folders


def score_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """A shard's float files in files.txt order, found by file name in its folder: the lines are the writer's paths
  (e.g. $CHECKPOINTS_PATH/<job>/score/1.npy), valid only where it ran."""
  listing = folder / "files.txt"
  lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
  if not lines:
    raise data.DataError(f"{listing} lists no score file; the scoring run wrote nothing, score it again")
  files = []
  for number, line in enumerate(lines, 1):
    path = folder / pathlib.PurePosixPath(line).name
    if not path.is_file():
      raise data.DataError(f"{listing}:{number} names {line}, and {folder} holds no {path.name} (lines are found by "
                           "file name in the score folder); copy that file there from the scoring run")
    files.append(path)
  return files


def written_rows(nz: int, room: int, cut_rows: int | None, rows: int, next_value: float) -> tuple[int, str]:
  """How many rows a shard wrote, and the rule that decided (module docstring, "Rows of a score shard")."""
  if nz >= room:
    return nz, "no room after the last nonzero id"
  if cut_rows is not None:
    return cut_rows, "float files cut to the written rows"
  if rows and nz >= rows - 1:
    return rows, "dolma.rows"
  if next_value != 0:
    return nz + 1, "a written score after the last nonzero id (id 0 written last)"
  return nz, "index up to its last nonzero id"


def _read_floats(files: list[pathlib.Path], file_rows: int, stop: int) -> np.ndarray:
  """Rows [0, stop) over a shard's float files (row r is row r % file_rows of file r // file_rows)."""
  parts = []
  for i, path in enumerate(files):
    count = min(file_rows, stop - i * file_rows)
    if count <= 0:
      break
    parts.append(np.fromfile(path, dtype=np.float32, count=count))
  return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def read_shard(folder: pathlib.Path, rows: int = 0) -> dict:
  """One score shard as {path, ids, values, rows, rule}: its written rows, in the order it wrote them."""
  fix = "copy it again from the scoring run"
  files = score_files(folder)
  sizes = [_byte_rows(f, 4, "float32 score", fix) for f in files]
  file_rows = sizes[0] if len(files) > 1 else max(sizes[0], PRESIZED_ROWS)
  if any(n != sizes[0] for n in sizes[:-1]) or sizes[-1] > file_rows:
    raise data.DataError(f"{folder}: score files {[f.name for f in files]} hold {sizes} rows; every file but the last "
                         "is full (the writer's file_seqs) and none holds more; copy them again from the scoring run")
  capacity = sum(sizes)
  index_path = folder / "mmap_index.npy"
  if not index_path.is_file():
    raise data.DataError(f"{index_path} is missing: a score folder holds files.txt, mmap_index.npy and 1.npy, ...; "
                         f"{fix}")
  room = min(_byte_rows(index_path, 8, "int64 index", fix), capacity)
  index = np.fromfile(index_path, dtype=np.int64, count=room)
  nonzero = np.flatnonzero(index)
  nz = int(nonzero[-1]) + 1 if nonzero.size else 0
  cut = capacity if sizes[-1] < file_rows else None
  floats = _read_floats(files, file_rows, min(room, nz + 1))
  n, rule = written_rows(nz, room, cut, int(rows), float(floats[nz]) if nz < room else 0.0)
  if (cut is not None and n != cut) or not nz <= n <= min(nz + 1, room):
    raise data.DataError(f"{folder}: the index names {nz:,} rows (+ at most one trailing id 0), the float files hold "
                         f"{capacity:,} and {n:,} were asked for ({rule}); the files do not belong together or "
                         f"--config.dolma.rows is wrong; {fix}")
  return {"path": folder, "ids": index[:n], "values": floats[:n], "rows": n, "rule": rule,
          "files": [f.name for f in files]}


def _examples(values, limit: int = 10) -> str:
  shown = ", ".join(str(int(v)) for v in values[:limit])
  return shown + (f", ... ({len(values):,} in all)" if len(values) > limit else "")


def align(shards: list[dict], n: int, what: str) -> np.ndarray:
  """One model's scores by sequence id over its shards: every id of [0, n) exactly once, each a finite float."""
  ids = np.concatenate([s["ids"] for s in shards])
  values = np.concatenate([s["values"] for s in shards])
  names = "+".join(str(s["path"]) for s in shards)
  outside = np.unique(ids[(ids < 0) | (ids >= n)])
  if outside.size:
    raise data.DataError(f"{what} ({names}) scores ids {_examples(outside)} outside the store's {n:,} sequences: the "
                         "scores index another pool; adopt the files they scored, in their order (the scoring run's "
                         "config.yaml data.paths)")
  counts = np.bincount(ids, minlength=n)
  missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
  if missing.size or repeated.size:
    where = {int(i): [s["path"].parent.name for s in shards if (s["ids"] == i).any()] for i in repeated[:5]}
    raise data.DataError(
        f"{what} ({names}) must score every pool id once: missing ids: {_examples(missing) or 'none'}; ids scored "
        f"more than once: {_examples(repeated) or 'none'}{f' (in {where})' if where else ''}. List every shard of "
        "this model joined by + (each once), score the missing ids (another data_start_step); a shard whose last "
        "written id is 0 may need --config.dolma.rows")
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise data.DataError(f"{what} ({names}) has non-finite scores at ids {_examples(ids[bad])}; score them again")
  column = np.empty(n, np.float32)
  column[ids] = values
  return column


def check_scored_pool(folder: pathlib.Path, store: data.TokenStore) -> None:
  """The pool a shard's scoring run read (its config.yaml beside `score/`, when there) is the adopted store."""
  path = folder.parent / "config.yaml"
  if not path.is_file():
    return
  original = read_yaml(path)
  data_cfg, model_cfg = original.get("data") or {}, original.get("model") or {}
  scored = [pathlib.PurePosixPath(str(p)).name for p in data_cfg.get("paths") or []]
  adopted = [pathlib.Path(e.get("path", "")).name for e in store.files]
  fix = f"adopt the files it scored, in its order (--config.dolma.paths_from={path})"
  if scored and all(name.endswith(".npy") for name in scored) and scored != adopted:
    raise data.DataError(f"{path} scored data.paths {scored}, but store {store.path} holds {adopted}: the scores "
                         f"index another pool; {fix}")
  length, dtype = model_cfg.get("max_sequence_length"), data_cfg.get("memmap_dtype")
  if (length and int(length) != store.seq_len) or (dtype and str(dtype) != store.dtype.name):
    raise data.DataError(f"{path} scored {dtype} sequences of {length} tokens, store {store.path} holds "
                         f"{store.dtype.name} sequences of {store.seq_len}; {fix}")


def model_ids(given, columns: list[str], values: list[np.ndarray]) -> list[str]:
  """Each column's model id: the id of the params export named (or the id given), else a content id of the
  scores themselves (the imported column, so a cut and a pre-sized copy of the same shards agree)."""
  given = _as_list(given)
  if not given:
    return [artifacts.content_id({"kind": "olmo_scores", "nll_sha256": hashlib.sha256(v.tobytes()).hexdigest()})
            for v in values]
  if len(given) != len(columns):
    raise errors.ConfigError(f"dolma.models names {len(given)} models for the {len(columns)} columns {columns}; give "
                             "one per column (prior first) or none")
  ids = []
  for entry in given:
    if (pathlib.Path(entry) / data.MANIFEST).is_file():
      ids.append(checkpoint.read_params_manifest(entry)["id"])
    elif re.fullmatch(r"[0-9a-f]{16}", entry):
      ids.append(entry)
    else:
      raise errors.ConfigError(f"dolma.models entry {entry!r} is neither a params export folder nor a 16-digit hex "
                               "content id")
  return ids


def _import_scores_inputs(cfg):
  """Store, shards, aligned columns and request, decided before writing (also the dry run)."""
  d = cfg.dolma
  if not d.store:
    raise errors.ConfigError("set --config.dolma.store to the adopted store the scores were made on")
  store = data.TokenStore(d.store)
  specs = [("prior", d.prior, "prior")] + [(f"conditional_{i}", spec, "conditionals")
                                            for i, spec in enumerate(_as_list(d.conditionals))]
  if len(specs) < 2:
    raise errors.ConfigError("set --config.dolma.conditionals to one entry per conditional model (its score folders "
                             "joined by +)")
  shards, columns = {}, []
  for name, spec, field in specs:
    shards[name] = [read_shard(folder, d.rows) for folder in shard_folders(spec, field)]
    for shard in shards[name]:
      check_scored_pool(shard["path"], store)
    columns.append(align(shards[name], store.num_sequences, name))
  names = [name for name, _, _ in specs]
  models = [{"name": n, "id": i} for n, i in zip(names, model_ids(d.models, names, columns))]
  return store, shards, columns, models, score_lib.scores_request(store.id, models)


def _same_order(shards: dict) -> dict:
  """Per conditional: whether its rows come in the prior's order (what the original's select script required)."""
  prior = np.concatenate([s["ids"] for s in shards["prior"]])
  return {name: bool(np.array_equal(prior, np.concatenate([s["ids"] for s in group])))
          for name, group in shards.items() if name != "prior"}


def import_scores(cfg) -> pathlib.Path:
  output = _workdir(cfg)
  store, shards, columns, models, request = _import_scores_inputs(cfg)
  same = _same_order(shards)
  for name, group in shards.items():
    for shard in group:
      _print(f"dolma import_scores: {name}: {shard['path']}: {shard['rows']:,} rows ({shard['rule']})")
  if not all(same.values()):
    _print(f"dolma import_scores: rows of {[n for n, s in same.items() if not s]} come in another order than the "
           "prior's (the original's select script would have refused them); aligned by sequence id")
  if artifacts.up_to_date(output, request, "other scores", "delete it or choose another --config.workdir"):
    _print(f"dolma import_scores: {output} is up to date; nothing to do")
    return output
  if output.exists():
    raise data.DataError(f"{output} exists but is not a score folder; choose another --config.workdir")
  n, k = store.num_sequences, len(models)
  chunk_rows = max(1, min(n, SCORE_CHUNK_ROWS))
  manifest = {
      "format": score_lib.SCORES_FORMAT, "num_sequences": n, "columns": [m["name"] for m in models],
      "models": models, "store": {"path": artifacts.relative(store.path, output), "id": store.id,
                                  "seq_len": store.seq_len},
      "id": artifacts.content_id(request), "request": request, "dtype": "float32",
      "value": "per-sequence mean next-token NLL, as the original's Scorer wrote it", "chunk_rows": chunk_rows,
      "batch_size": None, "tokenizer": store.manifest["tokenizer"],
      "imported": {"from": "original CoLoR-Filter score shards (DictMemmapWriter)", "aligned": "by sequence id",
                   "same_row_order_as_prior": same,
                   "shards": {name: [{"path": str(s["path"]), "files": s["files"], "rows": s["rows"],
                                      "rule": s["rule"]} for s in group] for name, group in shards.items()}},
      "config": json.loads(cfg.to_json()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }

  def write(folder):
    nll = score_lib._zarr(folder / "nll.zarr", create=True, dtype=ts.float32, shape=[n, k],
                          fill_value=np.nan, chunk_layout=ts.ChunkLayout(chunk_shape=[chunk_rows, k]))
    nll.write(np.stack(columns, axis=1)).result()
    num_chunks = -(-n // chunk_rows)
    done = score_lib._zarr(folder / "done.zarr", create=True, dtype=ts.uint8, shape=[num_chunks],
                           fill_value=0, chunk_layout=ts.ChunkLayout(chunk_shape=[1]))
    done.write(np.ones(num_chunks, np.uint8)).result()
    artifacts.write_manifest(folder, manifest)

  with artifacts.Lock(output):
    _publish(output.with_name(output.name + ".partial"), output, write)
  _print(f"dolma import_scores: wrote {output}: {n:,} sequences x {k} models ({', '.join(manifest['columns'])}), "
         f"id {manifest['id']}")
  return output


# ----------------------------------------------------------------------------------------------------------------
# import_selection: selected_indices.npy -> a colorjax selection


def read_selected(path: pathlib.Path, n: int) -> np.ndarray:
  """select_index_np.py's output (headerless uint32 ids, ascending score), checked against a pool of n ids."""
  fix = "pass the selected_indices.npy that select_index_np.py wrote"
  if not path.is_file():
    raise data.DataError(f"{path} does not exist; {fix} (--config.dolma.selection)")
  _byte_rows(path, 4, "uint32 id", fix)
  with open(path, "rb") as f:
    if f.read(6) == b"\x93NUMPY":
      raise data.DataError(f"{path} is a NumPy .npy with a header, not the original's headerless ids; a colorjax "
                           "index needs no import: pass it as --config.data.index")
  ids = np.fromfile(path, dtype=np.uint32).astype(np.int64)
  if not ids.size:
    raise data.DataError(f"{path} holds no ids; {fix}")
  outside, repeated = ids[ids >= n], np.flatnonzero(np.bincount(ids, minlength=n) > 1)
  if outside.size:
    raise data.DataError(f"{path} selects ids {_examples(np.unique(outside))} outside the store's {n:,} sequences: it "
                         "was selected from another pool; pass the store adopted from the files it was scored on")
  if repeated.size:
    raise data.DataError(f"{path} selects ids {_examples(repeated)} more than once; it is not select_index_np.py's "
                         "output (or is corrupt)")
  return ids


def _selection_inputs(cfg):
  d = cfg.dolma
  if not d.store or not d.selection:
    raise errors.ConfigError("set --config.dolma.store (the adopted pool) and --config.dolma.selection (the "
                             "original's selected_indices.npy)")
  store = data.TokenStore(d.store)
  path = pathlib.Path(d.selection)
  path = (path / "selected_indices.npy" if path.is_dir() else path).resolve()
  ranked = read_selected(path, store.num_sequences)
  request = {"kind": "olmo_selection", "file": [path.name, artifacts.fingerprint(path)["sha256"]], "store": store.id}
  return store, path, ranked, request


def import_selection(cfg) -> pathlib.Path:
  output = _workdir(cfg)
  store, path, ranked, request = _selection_inputs(cfg)
  if artifacts.up_to_date(output, request, "another selection", "delete it or choose another --config.workdir"):
    _print(f"dolma import_selection: {output} is up to date; nothing to do")
    return output
  if output.exists():
    raise data.DataError(f"{output} exists but is not a selection; choose another --config.workdir")
  ids, n, k = np.sort(ranked), store.num_sequences, int(ranked.size)
  index_bytes = select_lib._npy_bytes(ids)
  manifest = {
      "format": "colorjax.selection", "id": artifacts.content_id(request), "method": "imported",
      "tau": float(n / k), "tau_requested": None, "tokens_requested": 0, "k": k, "num_sequences": n,
      "tokens": k * store.seq_len, "threshold": None, "seed": None, "conditional": None, "scores": None,
      "store_id": store.id, "store_path": artifacts.relative(store.path, output),
      "index_sha256": hashlib.sha256(index_bytes).hexdigest(), "score_stats": None,
      "sources": select_lib.label_rates(store, ids, 1 << 20),
      "imported": {"from": "original CoLoR-Filter select_index_np.py", "path": str(path),
                   "order": "file: ascending score (best last); index.npy: ascending id"},
      "request": request, "config": json.loads(cfg.to_json()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }

  def write(folder):
    (folder / "index.npy").write_bytes(index_bytes)
    artifacts.write_manifest(folder, manifest)

  with artifacts.Lock(output):
    _publish(output.with_name(output.name + ".partial"), output, write)
  _print(f"dolma import_selection: {k:,} of {n:,} sequences (tau {n / k:.2f}) -> {output}; train on it with "
         f"--config.data.train_store={store.path} --config.data.index={output}")
  return output


# ----------------------------------------------------------------------------------------------------------------
# export_selection: a selection -> dolma/OLMo token files and sharded Parquet


def host_range(n: int, host: int, hosts: int) -> tuple[int, int]:
  """The contiguous part [start, stop) of n items that host `host` of `hosts` writes."""
  return host * n // hosts, (host + 1) * n // hosts


def parquet_names(n: int, hosts: int, rows_per_file: int) -> list[tuple[str, int, int]]:
  """(file name, start, stop) of every Parquet file, over all hosts: each host's part cut into files."""
  out = []
  for host in range(hosts):
    start, stop = host_range(n, host, hosts)
    for j, first in enumerate(range(start, stop, rows_per_file)):
      out.append((f"part-h{host:03d}-{j:05d}.parquet", first, min(stop, first + rows_per_file)))
  return out


def _export_inputs(cfg):
  d = cfg.dolma
  if not d.selection:
    raise errors.ConfigError("set --config.dolma.selection to a selection folder (select or import_selection output)")
  formats = _as_list(d.formats)
  if not formats or any(f not in FORMATS for f in formats):
    raise errors.ConfigError(f"dolma.formats={tuple(formats)}: choose one or more of {FORMATS}")
  selection = pathlib.Path(d.selection).resolve()
  manifest = data.read_manifest(selection)
  if manifest.get("format") != "colorjax.selection":
    raise data.DataError(f"{selection / data.MANIFEST} is not a selection manifest; pass a select (or "
                         "import_selection) output folder")
  store = data.TokenStore(select_lib.store_of(selection, manifest))
  ids = data.load_index(selection, store)
  per_file = int(d.max_tokens_per_file) // store.seq_len
  if "tokens" in formats and per_file < 1:
    raise errors.ConfigError(f"dolma.max_tokens_per_file={d.max_tokens_per_file} holds no sequence of "
                             f"{store.seq_len} tokens; raise it")
  if "parquet" in formats and not 1 <= int(d.rows_per_file) < (1 << 31) // store.seq_len:
    raise errors.ConfigError(f"dolma.rows_per_file={d.rows_per_file}: give 1 to {(1 << 31) // store.seq_len - 1:,} "
                             "(a Parquet list column's offsets are int32)")
  request = {"kind": "dolma_export", "selection": manifest["id"], "store": store.id, "formats": sorted(formats),
             "max_tokens_per_file": int(d.max_tokens_per_file), "rows_per_file": int(d.rows_per_file),
             "hosts": jax.process_count()}
  return selection, manifest, store, ids, formats, per_file, request


def write_token_files(folder: pathlib.Path, store: data.TokenStore, ids: np.ndarray, per_file: int) -> list[dict]:
  """The sequences of `ids`, in that order, as headerless token files of at most `per_file` sequences each."""
  folder.mkdir(parents=True, exist_ok=True)
  entries = []
  for j, start in enumerate(range(0, ids.size, per_file)):
    part, name = ids[start:start + per_file], f"part-{j:05d}.npy"
    digest = hashlib.sha256()
    with open(folder / (name + ".tmp"), "wb") as f:
      for b in range(0, part.size, BLOCK_ROWS):
        chunk = np.ascontiguousarray(store.read(part[b:b + BLOCK_ROWS])).tobytes()
        digest.update(chunk)
        f.write(chunk)
    os.replace(folder / (name + ".tmp"), folder / name)
    entries.append({"name": name, "sequences": int(part.size), "tokens": int(part.size) * store.seq_len,
                    "first_id": int(part[0]), "last_id": int(part[-1]), "sha256": digest.hexdigest()})
  return entries


def token_sidecar(entries: list[dict], store: data.TokenStore, ids: np.ndarray, selection_id: str) -> dict:
  """What a reader of the token files needs: format, dtype, seq_len, tokenizer, files and where each row came from."""
  return {
      "format": "dolma/OLMo token files: headerless little-endian token ids, sequences of seq_len concatenated",
      "dtype": store.dtype.name, "seq_len": store.seq_len, "tokenizer": store.manifest["tokenizer"],
      "num_sequences": int(ids.size), "files": entries, "source_ids": "ids.npy (int64, row i of the files, in order)",
      "selection": selection_id, "store": store.id,
      "olmo": {"data.paths": [e["name"] for e in entries], "data.memmap_dtype": store.dtype.name,
               "model.max_sequence_length": store.seq_len},
  }


def parquet_schema():
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  return pa.schema([("id", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("score", pa.float32()),
                    ("source", pa.string())])


def parquet_block(store: data.TokenStore, ids: np.ndarray, scores, labels: list[str]):
  """One record batch of rows {id, input_ids, score (null without scores), source}."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  rows = store.read(ids)
  offsets = np.arange(0, (ids.size + 1) * store.seq_len, store.seq_len, dtype=np.int32)
  tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows.reshape(-1).astype(np.int32)))
  values = scores(ids)
  score = pa.nulls(ids.size, pa.float32()) if values is None else pa.array(np.asarray(values, np.float32))
  source = pa.array([labels[i] for i in store.label_ids(ids)], pa.string())
  return pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()), tokens, score, source], schema=parquet_schema())


def write_parquet_part(folder: pathlib.Path, store, ids, scores, labels, rows_per_file: int, host: int,
                       hosts: int) -> list[str]:
  """This host's contiguous part of `ids` as Parquet files of at most `rows_per_file` rows (names carry the host)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  start, stop = host_range(ids.size, host, hosts)
  written = []
  for name, first, last in parquet_names(ids.size, hosts, rows_per_file):
    if not start <= first < stop:
      continue
    with pq.ParquetWriter(folder / (name + ".tmp"), parquet_schema()) as writer:
      for b in range(first, last, BLOCK_ROWS):
        writer.write_batch(parquet_block(store, ids[b:min(last, b + BLOCK_ROWS)], scores, labels))
    os.replace(folder / (name + ".tmp"), folder / name)
    written.append(name)
  return written


def selection_scores(selection: pathlib.Path, manifest: dict):
  """ids -> the selection's float32 scores (color or conditional_only), or None (random and imported selections)."""
  if not manifest.get("scores"):
    return lambda ids: None
  scores = score_lib.Scores(artifacts.resolve(manifest["scores"]["path"], selection))
  conditional = manifest.get("conditional") or "conditional_0"
  return lambda ids: export_lib._scores_of(scores, manifest["method"], conditional, ids)


def _check_unfinished(output: pathlib.Path, request: dict) -> None:
  saved = artifacts.recorded_request(output)
  if output.exists() and saved is None:
    raise data.DataError(f"{output} exists but is not an export; choose another --config.workdir")
  if saved is not None and saved != artifacts.normalized(request):
    raise data.DataError(f"{output} holds an unfinished export of other settings (differs in "
                         f"{', '.join(artifacts.differences(saved, artifacts.normalized(request)))}); delete it or "
                         "choose another --config.workdir")


def export_selection(cfg) -> pathlib.Path:
  output = _workdir(cfg)
  selection, manifest, store, ids, formats, per_file, request = _export_inputs(cfg)
  if artifacts.up_to_date(output, request, "another export", "delete it or choose another --config.workdir"):
    _print(f"dolma export_selection: {output} is up to date; nothing to do")
    return output
  _check_unfinished(output, request)
  d, host, hosts = cfg.dolma, jax.process_index(), jax.process_count()
  labels = store.labels() or ["all"]

  def start():
    output.mkdir(parents=True, exist_ok=True)
    (output / artifacts.REQUEST).write_text(json.dumps({"request": request}, indent=1))

  def tokens():
    if "tokens" not in formats:
      return None
    entries = write_token_files(output / "tokens", store, ids, per_file)
    np.save(output / "tokens" / "ids.npy", ids)
    sidecar = token_sidecar(entries, store, ids, manifest["id"])
    (output / "tokens" / "tokens.json").write_text(json.dumps(sidecar, indent=1))
    (output / "tokens" / data.TOKENIZER).write_bytes(store.tokenizer_path().read_bytes())
    return sidecar

  def finish(sidecar):
    parquet = None
    if "parquet" in formats:
      parquet = [{"name": name, "rows": stop - first} for name, first, stop in
                 parquet_names(ids.size, hosts, int(d.rows_per_file))]
    artifacts.write_manifest(output, {
        "format": EXPORT_FORMAT, "id": artifacts.content_id(request), "request": request,
        "selection": {"path": str(selection), "id": manifest["id"], "method": manifest["method"]},
        "store": {"id": store.id, "dtype": store.dtype.name, "seq_len": store.seq_len},
        "num_sequences": int(ids.size), "tokens": sidecar, "parquet": parquet,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    (output / artifacts.REQUEST).unlink(missing_ok=True)

  with artifacts.Lock(output):
    metrics.on_main_then_sync(start, "dolma export start")
    if "parquet" in formats:
      write_parquet_part(output / "parquet", store, ids, selection_scores(selection, manifest), labels,
                         int(d.rows_per_file), host, hosts)
    sidecar = metrics.on_main_then_sync(tokens, "dolma export written")  # every host's Parquet part is written too
    metrics.on_main_then_sync(lambda: finish(sidecar), "dolma export finished")
  _print(f"dolma export_selection: {ids.size:,} sequences of {store.seq_len} {store.dtype.name} tokens -> {output} "
         f"({', '.join(formats)})")
  if "tokens" in formats:
    _print(f"  for OLMo: data.paths = {output / 'tokens'}/part-*.npy in name order (tokens.json \"olmo\"), "
           f"data.memmap_dtype={store.dtype.name}, model.max_sequence_length={store.seq_len}")
  return output


# ----------------------------------------------------------------------------------------------------------------
# Stage entry points


def _action(cfg) -> str:
  if cfg.dolma.action not in ACTIONS:
    raise errors.ConfigError(f"dolma.action={cfg.dolma.action!r}; choose one of {', '.join(ACTIONS)}")
  return cfg.dolma.action


def run(cfg) -> pathlib.Path:
  """The action's artifact, written by process 0 (the export's Parquet parts: by every host)."""
  action = _action(cfg)
  if action == "export_selection":
    return export_selection(cfg)
  writer = {"adopt": adopt, "import_scores": import_scores, "import_selection": import_selection}[action]
  metrics.on_main_then_sync(lambda: writer(cfg), f"dolma {action}")
  return _workdir(cfg)


def describe(cfg) -> None:
  """Dry run: what the action would read and write, checked the same way, writing nothing."""
  action = _action(cfg)
  if action == "adopt":
    s, _, tok_info, entries, request = _adopt_inputs(cfg)
    total = sum(e["sequences"] for e in entries)
    print(f"dolma adopt (dry run): {len(entries)} files -> {total:,} sequences of {s['seq_len']} {s['dtype']} "
          f"tokens, tokenizer {tok_info['name']}, store id {artifacts.content_id(request)}:")
    _report_order(s, entries)
  elif action == "import_scores":
    store, shards, _, models, request = _import_scores_inputs(cfg)
    for name, group in shards.items():
      print(f"dolma import_scores (dry run): {name}: {len(group)} shards, {sum(s['rows'] for s in group):,} rows "
            f"({', '.join(sorted({s['rule'] for s in group}))})")
    print(f"  -> {store.num_sequences:,} x {len(models)} scores of store {store.id}, id "
          f"{artifacts.content_id(request)}")
  elif action == "import_selection":
    store, path, ranked, request = _selection_inputs(cfg)
    print(f"dolma import_selection (dry run): {path}: {ranked.size:,} of {store.num_sequences:,} ids (tau "
          f"{store.num_sequences / ranked.size:.2f}) -> selection {artifacts.content_id(request)}")
  else:
    _, _, store, ids, formats, per_file, _ = _export_inputs(cfg)
    files = -(-ids.size // per_file) if "tokens" in formats else 0
    parquet = parquet_names(ids.size, jax.process_count(), int(cfg.dolma.rows_per_file)) if "parquet" in formats else []
    print(f"dolma export_selection (dry run): {ids.size:,} sequences of {store.seq_len} tokens -> {files} token "
          f"files, {len(parquet)} Parquet files")
