"""The original CoLoR-Filter's score shards and selections imported as colorjax artifacts (`dolma` actions
import_scores and import_selection).

* import_scores: the score shards `Scorer.score_model` writes (DictMemmapWriter: files.txt, mmap_index.npy, 1.npy,
  2.npy, ...) of the prior and of each conditional -> a colorjax score folder, aligned by sequence id (the
  original's select_index_np.py asserted equal row orders instead).
* import_selection: select_index_np.py's selected_indices.npy -> a colorjax selection (train --config.data.index).

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
# score._zarr is the writers' own pieces, reused here
# pylint: disable=protected-access
import hashlib
import json
import pathlib
import re
import time

import numpy as np
import tensorstore as ts

from colorjax import errors
from colorjax import score as score_lib
from colorjax.artifacts import formats
from colorjax.artifacts import hub_paths
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.interop import dolma_common as common
from colorjax.training import checkpoint
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib

PRESIZED_ROWS = 1 << 20  # DictMemmapWriter's file_seqs: the rows every score file N.npy is created with
SCORE_CHUNK_ROWS = 1 << 16  # nll.zarr row chunk of imported scores


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
      raise errors.DataError(f"{part} holds no files.txt (nor score/files.txt): not a score folder of the original; "
                             f"fix --config.dolma.{field}")
    folders.append(found.resolve())
  return folders


def score_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """A shard's float files in files.txt order, found by file name in its folder: the lines are the writer's paths
  (e.g. $CHECKPOINTS_PATH/<job>/score/1.npy), valid only where it ran."""
  listing = folder / "files.txt"
  lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
  if not lines:
    raise errors.DataError(f"{listing} lists no score file; the scoring run wrote nothing, score it again")
  files = []
  for number, line in enumerate(lines, 1):
    path = folder / pathlib.PurePosixPath(line).name
    if not path.is_file():
      raise errors.DataError(f"{listing}:{number} names {line}, and {folder} holds no {path.name} (lines are found by "
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
  sizes = [common.byte_rows(f, 4, "float32 score", fix) for f in files]
  file_rows = sizes[0] if len(files) > 1 else max(sizes[0], PRESIZED_ROWS)
  if any(n != sizes[0] for n in sizes[:-1]) or sizes[-1] > file_rows:
    raise errors.DataError(f"{folder}: score files {[f.name for f in files]} hold {sizes} rows; every file but the "
                           "last is full (the writer's file_seqs) and none holds more; copy them again from the "
                           "scoring run")
  capacity = sum(sizes)
  index_path = folder / "mmap_index.npy"
  if not index_path.is_file():
    raise errors.DataError(f"{index_path} is missing: a score folder holds files.txt, mmap_index.npy and 1.npy, ...; "
                           f"{fix}")
  room = min(common.byte_rows(index_path, 8, "int64 index", fix), capacity)
  index = np.fromfile(index_path, dtype=np.int64, count=room)
  nonzero = np.flatnonzero(index)
  nz = int(nonzero[-1]) + 1 if nonzero.size else 0
  cut = capacity if sizes[-1] < file_rows else None
  floats = _read_floats(files, file_rows, min(room, nz + 1))
  n, rule = written_rows(nz, room, cut, int(rows), float(floats[nz]) if nz < room else 0.0)
  if (cut is not None and n != cut) or not nz <= n <= min(nz + 1, room):
    raise errors.DataError(f"{folder}: the index names {nz:,} rows (+ at most one trailing id 0), the float files hold "
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
    raise errors.DataError(f"{what} ({names}) scores ids {_examples(outside)} outside the store's {n:,} sequences: the "
                           "scores index another pool; adopt the files they scored, in their order (the scoring run's "
                           "config.yaml data.paths)")
  counts = np.bincount(ids, minlength=n)
  missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
  if missing.size or repeated.size:
    where = {int(i): [s["path"].parent.name for s in shards if (s["ids"] == i).any()] for i in repeated[:5]}
    raise errors.DataError(
        f"{what} ({names}) must score every pool id once: missing ids: {_examples(missing) or 'none'}; ids scored "
        f"more than once: {_examples(repeated) or 'none'}{f' (in {where})' if where else ''}. List every shard of "
        "this model joined by + (each once), score the missing ids (another data_start_step); a shard whose last "
        "written id is 0 may need --config.dolma.rows")
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise errors.DataError(f"{what} ({names}) has non-finite scores at ids {_examples(ids[bad])}; score them again")
  column = np.empty(n, np.float32)
  column[ids] = values
  return column


def check_scored_pool(folder: pathlib.Path, store: stores.TokenStore) -> None:
  """The pool a shard's scoring run read (its config.yaml beside `score/`, when there) is the adopted store."""
  path = folder.parent / "config.yaml"
  if not path.is_file():
    return
  original = common.read_yaml(path)
  data_cfg, model_cfg = original.get("data") or {}, original.get("model") or {}
  scored = [pathlib.PurePosixPath(str(p)).name for p in data_cfg.get("paths") or []]
  adopted = [pathlib.Path(e.get("path", "")).name for e in store.files]
  fix = f"adopt the files it scored, in its order (--config.dolma.paths_from={path})"
  if scored and all(name.endswith(".npy") for name in scored) and scored != adopted:
    raise errors.DataError(f"{path} scored data.paths {scored}, but store {store.path} holds {adopted}: the scores "
                           f"index another pool; {fix}")
  length, dtype = model_cfg.get("max_sequence_length"), data_cfg.get("memmap_dtype")
  if (length and int(length) != store.seq_len) or (dtype and str(dtype) != store.dtype.name):
    raise errors.DataError(f"{path} scored {dtype} sequences of {length} tokens, store {store.path} holds "
                           f"{store.dtype.name} sequences of {store.seq_len}; {fix}")


def model_ids(given, columns: list[str], values: list[np.ndarray]) -> list[str]:
  """Each column's model id: the id of the params export named (or the id given), else a content id of the
  scores themselves (the imported column, so a cut and a pre-sized copy of the same shards agree)."""
  given = common.as_list(given)
  if not given:
    return [lineage.content_id({"kind": "olmo_scores", "nll_sha256": hashlib.sha256(v.tobytes()).hexdigest()})
            for v in values]
  if len(given) != len(columns):
    raise errors.ConfigError(f"dolma.models names {len(given)} models for the {len(columns)} columns {columns}; give "
                             "one per column (prior first) or none")
  ids = []
  for entry in given:
    if (pathlib.Path(entry) / formats.MANIFEST).is_file():
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
  store = stores.TokenStore(d.store)
  specs = [("prior", d.prior, "prior")] + [(f"conditional_{i}", spec, "conditionals")
                                           for i, spec in enumerate(common.as_list(d.conditionals))]
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
  request = hub_paths.with_origins(score_lib.scores_request(store.id, models),
                                   [s["path"] for group in shards.values() for s in group])
  return store, shards, columns, models, request


def _same_order(shards: dict) -> dict:
  """Per conditional: whether its rows come in the prior's order (what the original's select script required)."""
  prior = np.concatenate([s["ids"] for s in shards["prior"]])
  return {name: bool(np.array_equal(prior, np.concatenate([s["ids"] for s in group])))
          for name, group in shards.items() if name != "prior"}


def import_scores(cfg) -> pathlib.Path:
  output = common.workdir(cfg)
  store, shards, columns, models, request = _import_scores_inputs(cfg)
  same = _same_order(shards)
  for name, group in shards.items():
    for shard in group:
      common.print_main(f"dolma import_scores: {name}: {shard['path']}: {shard['rows']:,} rows ({shard['rule']})")
  if not all(same.values()):
    common.print_main(f"dolma import_scores: rows of {[n for n, s in same.items() if not s]} come in another order "
                      "than the prior's (the original's select script would have refused them); aligned by sequence "
                      "id")
  if lineage.up_to_date(output, request, "other scores", "delete it or choose another --config.workdir"):
    common.print_main(f"dolma import_scores: {output} is up to date; nothing to do")
    return output
  if output.exists():
    raise errors.DataError(f"{output} exists but is not a score folder; choose another --config.workdir")
  n, k = store.num_sequences, len(models)
  chunk_rows = max(1, min(n, SCORE_CHUNK_ROWS))
  manifest = {
      "format": formats.SCORES.format, "num_sequences": n, "columns": [m["name"] for m in models],
      "models": models, "store": {"path": lineage.relative(store.path, output), "id": store.id,
                                  "seq_len": store.seq_len},
      "id": lineage.content_id(request), "request": request, "dtype": "float32",
      "value": "per-sequence mean next-token NLL, as the original's Scorer wrote it", "chunk_rows": chunk_rows,
      "batch_size": None, "tokenizer": store.manifest["tokenizer"],
      "imported": {"from": "original CoLoR-Filter score shards (DictMemmapWriter)", "aligned": "by sequence id",
                   "same_row_order_as_prior": same,
                   "shards": {name: [{"path": str(s["path"]), "files": s["files"], "rows": s["rows"],
                                      "rule": s["rule"]} for s in group] for name, group in shards.items()}},
      "config": json.loads(cfg.to_json()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }

  def write(folder):
    nll = scores_lib.zarr(folder / "nll.zarr", create=True, dtype=ts.float32, shape=[n, k],
                          fill_value=np.nan, chunk_layout=ts.ChunkLayout(chunk_shape=[chunk_rows, k]))
    nll.write(np.stack(columns, axis=1)).result()
    num_chunks = -(-n // chunk_rows)
    done = scores_lib.zarr(folder / "done.zarr", create=True, dtype=ts.uint8, shape=[num_chunks],
                           fill_value=0, chunk_layout=ts.ChunkLayout(chunk_shape=[1]))
    done.write(np.ones(num_chunks, np.uint8)).result()
    lineage.write_manifest(folder, manifest)

  common.publish(output, write)
  common.print_main(f"dolma import_scores: wrote {output}: {n:,} sequences x {k} models "
                    f"({', '.join(manifest['columns'])}), id {manifest['id']}")
  return output


def describe_import_scores(cfg) -> None:
  """Dry run of import_scores: each model's shards and rows, and the score folder it would write."""
  store, shards, _, models, request = _import_scores_inputs(cfg)
  for name, group in shards.items():
    print(f"dolma import_scores (dry run): {name}: {len(group)} shards, {sum(s['rows'] for s in group):,} rows "
          f"({', '.join(sorted({s['rule'] for s in group}))})")
  print(f"  -> {store.num_sequences:,} x {len(models)} scores of store {store.id}, id "
        f"{lineage.content_id(request)}")


# ----------------------------------------------------------------------------------------------------------------
# import_selection: selected_indices.npy -> a colorjax selection


def read_selected(path: pathlib.Path, n: int) -> np.ndarray:
  """select_index_np.py's output (headerless uint32 ids, ascending score), checked against a pool of n ids."""
  fix = "pass the selected_indices.npy that select_index_np.py wrote"
  if not path.is_file():
    raise errors.DataError(f"{path} does not exist; {fix} (--config.dolma.selection)")
  common.byte_rows(path, 4, "uint32 id", fix)
  with open(path, "rb") as f:
    if f.read(6) == b"\x93NUMPY":
      raise errors.DataError(f"{path} is a NumPy .npy with a header, not the original's headerless ids; a colorjax "
                             "index needs no import: pass it as --config.data.index")
  ids = np.fromfile(path, dtype=np.uint32).astype(np.int64)
  if not ids.size:
    raise errors.DataError(f"{path} holds no ids; {fix}")
  outside = ids[ids >= n]
  if outside.size:
    raise errors.DataError(f"{path} selects ids {_examples(np.unique(outside))} outside the store's {n:,} sequences: "
                           "it was selected from another pool; pass the store adopted from the files it was scored on")
  repeated = np.flatnonzero(np.bincount(ids, minlength=n) > 1)
  if repeated.size:
    raise errors.DataError(f"{path} selects ids {_examples(repeated)} more than once; it is not select_index_np.py's "
                           "output (or is corrupt)")
  return ids


def _selection_inputs(cfg):
  d = cfg.dolma
  if not d.store or not d.selection:
    raise errors.ConfigError("set --config.dolma.store (the adopted pool) and --config.dolma.selection (the "
                             "original's selected_indices.npy)")
  store = stores.TokenStore(d.store)
  path = pathlib.Path(d.selection)
  path = common.absolute(path / "selected_indices.npy" if path.is_dir() else path)
  ranked = read_selected(path, store.num_sequences)
  request = hub_paths.with_origins({"kind": "olmo_selection", "store": store.id,
                                    "file": [path.name, lineage.fingerprint(path)["sha256"]]}, [path])
  return store, path, ranked, request


def import_selection(cfg) -> pathlib.Path:
  output = common.workdir(cfg)
  store, path, ranked, request = _selection_inputs(cfg)
  if lineage.up_to_date(output, request, "another selection", "delete it or choose another --config.workdir"):
    common.print_main(f"dolma import_selection: {output} is up to date; nothing to do")
    return output
  if output.exists():
    raise errors.DataError(f"{output} exists but is not a selection; choose another --config.workdir")
  ids, n, k = np.sort(ranked), store.num_sequences, int(ranked.size)
  index_bytes = selection_lib.npy_bytes(ids)
  manifest = {
      "format": formats.SELECTION.format, "id": lineage.content_id(request), "method": "imported",
      "tau": float(n / k), "tau_requested": None, "tokens_requested": 0, "k": k, "num_sequences": n,
      "tokens": k * store.seq_len, "threshold": None, "seed": None, "conditional": None, "scores": None,
      "store_id": store.id, "store_path": lineage.relative(store.path, output),
      "index_sha256": hashlib.sha256(index_bytes).hexdigest(), "score_stats": None,
      "sources": selection_lib.label_rates(store, ids, 1 << 20),
      "imported": {"from": "original CoLoR-Filter select_index_np.py", "path": str(path),
                   "order": "file: ascending score (best last); index.npy: ascending id"},
      "request": request, "config": json.loads(cfg.to_json()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }

  def write(folder):
    (folder / "index.npy").write_bytes(index_bytes)
    lineage.write_manifest(folder, manifest)

  common.publish(output, write)
  common.print_main(f"dolma import_selection: {k:,} of {n:,} sequences (tau {n / k:.2f}) -> {output}; train on it with "
                    f"--config.data.train_store={store.path} --config.data.index={output}")
  return output


def describe_import_selection(cfg) -> None:
  """Dry run of import_selection: how many ids it selects, and the selection it would write."""
  store, path, ranked, request = _selection_inputs(cfg)
  print(f"dolma import_selection (dry run): {path}: {ranked.size:,} of {store.num_sequences:,} ids (tau "
        f"{store.num_sequences / ranked.size:.2f}) -> selection {lineage.content_id(request)}")
