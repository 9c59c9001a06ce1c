"""A colorjax selection exported for other trainers (`dolma` action export_selection): token files in the
dolma/OLMo format plus a JSON sidecar, and sharded Parquet {id, input_ids, score, source}, for the original
trainer, OLMo-core, MaxText or HF datasets. Every host writes its own part of the Parquet files.
"""
# export._scores_of is the export stage's own reading of a selection's scores, reused here
# pylint: disable=protected-access
import hashlib
import json
import os
import pathlib
import time

import jax
import numpy as np

from colorjax import console
from colorjax import errors
from colorjax import export as export_lib
from colorjax import methods
from colorjax.artifacts import formats as formats_lib
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.interop import dolma_common as common
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib

FORMATS = ("tokens", "parquet")
BLOCK_ROWS = 4096  # sequences read from a store at a time when exporting
EXPORT_FORMAT = "colorjax.dolma_export"


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
  formats = common.as_list(d.formats)
  if not formats or any(f not in FORMATS for f in formats):
    raise errors.ConfigError(f"dolma.formats={tuple(formats)}: choose one or more of {FORMATS}")
  selection = pathlib.Path(d.selection).resolve()
  manifest = formats_lib.open_manifest(selection, formats_lib.SELECTION)
  store = stores.TokenStore(selection_lib.store_of(selection, manifest))
  ids = stores.load_index(selection, store)
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


def write_token_files(folder: pathlib.Path, store: stores.TokenStore, ids: np.ndarray, per_file: int) -> list[dict]:
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


def token_sidecar(entries: list[dict], store: stores.TokenStore, ids: np.ndarray, selection_id: str) -> dict:
  """What a reader of the token files needs: format, dtype, seq_len, tokenizer, files and where each row came from."""
  return {
      "format": "dolma/OLMo token files: headerless little-endian token ids, sequences of seq_len concatenated",
      "dtype": store.dtype.name, "seq_len": store.seq_len, "tokenizer": store.manifest["tokenizer"],
      "num_sequences": int(ids.size), "files": entries, "source_ids": "ids.npy (int64, row i of the files, in order)",
      "selection": selection_id, "store": store.id,
      "olmo": {"data.paths": [e["name"] for e in entries], "data.memmap_dtype": store.dtype.name,
               "model.max_sequence_length": store.seq_len},
  }


def parquet_schema(text: bool = False):
  """{id, input_ids, score, source}, and the detokenized `text` when asked (a dataset for people, hub push)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  return pa.schema([("id", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("score", pa.float32()),
                    ("source", pa.string())] + ([("text", pa.string())] if text else []))


def parquet_block(store: stores.TokenStore, ids: np.ndarray, scores, labels: list[str], tokenizer=None):
  """One record batch of rows {id, input_ids, score (null without scores), source} (+ text with a tokenizer)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  rows = store.read(ids)
  offsets = np.arange(0, (ids.size + 1) * store.seq_len, store.seq_len, dtype=np.int32)
  tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows.reshape(-1).astype(np.int32)))
  values = scores(ids)
  score = pa.nulls(ids.size, pa.float32()) if values is None else pa.array(np.asarray(values, np.float32))
  source = pa.array([labels[i] for i in store.label_ids(ids)], pa.string())
  columns = [pa.array(ids, pa.int64()), tokens, score, source]
  if tokenizer is not None:
    columns.append(pa.array(tokenizer.decode_batch([r.tolist() for r in rows], skip_special_tokens=False)))
  return pa.RecordBatch.from_arrays(columns, schema=parquet_schema(tokenizer is not None))


def write_parquet_part(folder: pathlib.Path, store, ids, scores, labels, rows_per_file: int, host: int,
                       hosts: int, tokenizer=None) -> list[str]:
  """This host's contiguous part of `ids` as Parquet files of at most `rows_per_file` rows (names carry the host);
  with a tokenizer, each row's text too."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  start, stop = host_range(ids.size, host, hosts)
  written = []
  for name, first, last in parquet_names(ids.size, hosts, rows_per_file):
    if not start <= first < stop:
      continue
    with pq.ParquetWriter(folder / (name + ".tmp"), parquet_schema(tokenizer is not None)) as writer:
      for b in range(first, last, BLOCK_ROWS):
        writer.write_batch(parquet_block(store, ids[b:min(last, b + BLOCK_ROWS)], scores, labels, tokenizer))
    os.replace(folder / (name + ".tmp"), folder / name)
    written.append(name)
  return written


def selection_scores(selection: pathlib.Path, manifest: dict):
  """ids -> the selection's float32 scores (methods.score_columns_of), or None when it names no scores (DSIR and
  imported selections)."""
  if not manifest.get("scores"):
    return lambda ids: None
  scores = scores_lib.Scores(lineage.resolve(manifest["scores"]["path"], selection))
  conditional = manifest.get("conditional") or "conditional_0"
  columns = methods.score_columns_of(manifest["method"])
  return lambda ids: export_lib.scores_of(scores, columns, conditional, ids)


def _check_unfinished(output: pathlib.Path, request: dict) -> None:
  saved = lineage.recorded_request(output)
  if output.exists() and saved is None:
    raise errors.DataError(f"{output} exists but is not an export; choose another --config.workdir")
  if saved is not None and saved != lineage.normalized(request):
    raise errors.DataError(f"{output} holds an unfinished export of other settings (differs in "
                           f"{', '.join(lineage.differences(saved, lineage.normalized(request)))}); delete it or "
                           "choose another --config.workdir")


def export_selection(cfg) -> pathlib.Path:
  output = common.workdir(cfg)
  selection, manifest, store, ids, formats, per_file, request = _export_inputs(cfg)
  if lineage.up_to_date(output, request, "another export", "delete it or choose another --config.workdir"):
    common.print_main(f"dolma export_selection: {output} is up to date; nothing to do")
    return output
  _check_unfinished(output, request)
  d, host, hosts = cfg.dolma, jax.process_index(), jax.process_count()
  labels = store.labels() or ["all"]

  def start():
    output.mkdir(parents=True, exist_ok=True)
    (output / formats_lib.REQUEST).write_text(json.dumps({"request": request}, indent=1))

  def tokens():
    if "tokens" not in formats:
      return None
    entries = write_token_files(output / "tokens", store, ids, per_file)
    np.save(output / "tokens" / "ids.npy", ids)
    sidecar = token_sidecar(entries, store, ids, manifest["id"])
    (output / "tokens" / "tokens.json").write_text(json.dumps(sidecar, indent=1))
    (output / "tokens" / tokenizer_lib.TOKENIZER).write_bytes(store.tokenizer_path().read_bytes())
    return sidecar

  def finish(sidecar):
    parquet = None
    if "parquet" in formats:
      parquet = [{"name": name, "rows": stop - first} for name, first, stop in
                 parquet_names(ids.size, hosts, int(d.rows_per_file))]
    lineage.write_manifest(output, {
        "format": EXPORT_FORMAT, "id": lineage.content_id(request), "request": request,
        "selection": {"path": str(selection), "id": manifest["id"], "method": manifest["method"]},
        "store": {"id": store.id, "dtype": store.dtype.name, "seq_len": store.seq_len},
        "num_sequences": int(ids.size), "tokens": sidecar, "parquet": parquet,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    (output / formats_lib.REQUEST).unlink(missing_ok=True)

  with lineage.Lock(output):
    console.on_main_then_sync(start, "dolma export start")
    if "parquet" in formats:
      write_parquet_part(output / "parquet", store, ids, selection_scores(selection, manifest), labels,
                         int(d.rows_per_file), host, hosts)
    sidecar = console.on_main_then_sync(tokens, "dolma export written")  # every host's Parquet part is written too
    console.on_main_then_sync(lambda: finish(sidecar), "dolma export finished")
  common.print_main(f"dolma export_selection: {ids.size:,} sequences of {store.seq_len} {store.dtype.name} tokens -> "
                    f"{output} ({', '.join(formats)})")
  if "tokens" in formats:
    common.print_main(f"  for OLMo: data.paths = {output / 'tokens'}/part-*.npy in name order (tokens.json \"olmo\"), "
                      f"data.memmap_dtype={store.dtype.name}, model.max_sequence_length={store.seq_len}")
  return output


def describe_export_selection(cfg) -> None:
  """Dry run of export_selection: how many token and Parquet files it would write."""
  _, _, store, ids, formats, per_file, _ = _export_inputs(cfg)
  files = -(-ids.size // per_file) if "tokens" in formats else 0
  parquet = parquet_names(ids.size, jax.process_count(), int(cfg.dolma.rows_per_file)) if "parquet" in formats else []
  print(f"dolma export_selection (dry run): {ids.size:,} sequences of {store.seq_len} tokens -> {files} token "
        f"files, {len(parquet)} Parquet files")
