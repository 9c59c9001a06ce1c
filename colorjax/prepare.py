"""The `prepare` stage: tokenize text files in parallel worker processes into a token store.

Each input file is tokenized by one worker (HF `tokenizers`, its Rust threads sharing the cores left over),
documents are joined with EOS (one after every document), and the file's token stream is cut into non-overlapping
`seq_len` sequences; the remainder of each file is dropped (as in the original). The store is built in
`<output>.partial/` and renamed into place only when complete, so a finished store is never half-written and an
interrupted prepare resumes file by file.
"""
import json
import multiprocessing
import os
import pathlib
import shutil
import socket
import time

import numpy as np

from colorjax import console
from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import hub_paths
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import text_files
from colorjax.data import tokenizer as tokenizer_lib

_PROGRESS = None  # worker side: the queue progress increments go to


def file_sha256(path: pathlib.Path) -> str:
  return lineage.fingerprint(path)["sha256"]


def _init_worker(progress_queue, rayon_threads: int):
  global _PROGRESS
  _PROGRESS = progress_queue
  os.environ["RAYON_NUM_THREADS"] = str(rayon_threads)
  os.environ["TOKENIZERS_PARALLELISM"] = "true"


def tokenize_file(job: dict) -> dict:
  """Tokenize one file into `<folder>/seqs-XXXXX.npy` (+ per-sequence labels when it mixes sources)."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  path, folder, seq_len = pathlib.Path(job["path"]), pathlib.Path(job["folder"]), job["seq_len"]
  tokenizer = Tokenizer.from_str(job["tokenizer_json"])
  dtype, eos = np.dtype(job["dtype"]), job["eos_id"]
  stem = f"{job['file_index']:05d}"
  raw_path = folder / f"tokens-{stem}.bin"
  doc_starts, doc_labels, label_names = [], [], {}
  num_docs = num_tokens = 0

  def flush(texts, labels):
    nonlocal num_docs, num_tokens
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    chunk = []
    for encoding, label in zip(encodings, labels):
      doc_starts.append(num_tokens)
      doc_labels.append(label_names.setdefault(label, len(label_names)))
      ids = encoding.ids
      chunk.append(np.asarray(ids, dtype=dtype))
      chunk.append(np.asarray([eos], dtype=dtype))
      num_tokens += len(ids) + 1
    num_docs += len(texts)
    if chunk:
      np.concatenate(chunk).tofile(raw)
    if _PROGRESS is not None:
      _PROGRESS.put((len(texts), sum(len(c) for c in chunk)))

  with open(raw_path, "wb") as raw:
    texts, labels = [], []
    for text, label in text_files.iter_documents(path, job["text_field"], job["source_field"]):
      texts.append(text)
      labels.append(label)
      if len(texts) >= job["docs_per_chunk"]:
        flush(texts, labels)
        texts, labels = [], []
    if texts:
      flush(texts, labels)

  num_sequences = num_tokens // seq_len
  array_name = f"seqs-{stem}.npy"
  out = np.lib.format.open_memmap(folder / array_name, mode="w+", dtype=dtype, shape=(num_sequences, seq_len))
  stream = np.memmap(raw_path, dtype=dtype, mode="r") if num_tokens else np.zeros(0, dtype)
  rows_per_copy = max(1, (64 << 20) // (seq_len * dtype.itemsize))
  for start in range(0, num_sequences, rows_per_copy):
    stop = min(num_sequences, start + rows_per_copy)
    out[start:stop] = np.asarray(stream[start * seq_len: stop * seq_len]).reshape(stop - start, seq_len)
  out.flush()
  del out, stream
  raw_path.unlink()

  entry = {
      "path": str(path),
      **job["fingerprint"],
      "documents": num_docs,
      "tokens": num_tokens,
      "sequences": num_sequences,
      "dropped_tokens": num_tokens - num_sequences * seq_len,
      "array": array_name,
      "label_names": sorted(label_names, key=label_names.get),
  }
  if len(label_names) > 1:  # label of the document holding each sequence's first token
    starts = np.asarray(doc_starts, dtype=np.int64)
    first_doc = np.searchsorted(starts, np.arange(num_sequences, dtype=np.int64) * seq_len, side="right") - 1
    label_array = f"labels-{stem}.npy"
    np.save(folder / label_array, np.asarray(doc_labels, dtype=np.uint16)[first_doc])
    entry["label_array"] = label_array
  (folder / f"done-{stem}.json").write_text(json.dumps(entry))
  return entry


def input_fingerprints(files, known_entries=()) -> list[dict]:
  """Each input's name and fingerprint; hashes are reused from a previous manifest's entries when a file's size
  and mtime are unchanged, so checking a large, unchanged input set costs a stat per file."""
  known = {e["path"]: e for e in known_entries}
  return [{"name": f.name, **lineage.fingerprint(f, known.get(str(f)))} for f in files]


def store_request(prints: list[dict], tok_info: dict, seq_len: int, text_field: str, source_field: str) -> dict:
  """What decides a token store's content: input contents (by hash, in order), tokenizer, seq_len, fields."""
  return {
      "kind": "text", "version": formats.STORE.version,
      "inputs": [[p["name"], p["sha256"]] for p in prints],
      "tokenizer_sha256": tok_info["sha256"], "eos_id": tok_info["eos_id"], "pad_id": tok_info["pad_id"],
      "seq_len": int(seq_len), "text_field": text_field, "source_field": source_field,
  }


def _changed_inputs(saved: dict, request: dict) -> str:
  """Which inputs differ between two store requests, for a message a user can act on."""
  old = {name: sha for name, sha in saved.get("inputs", [])}
  new = {name: sha for name, sha in request["inputs"]}
  changed = [n for n in new if n in old and old[n] != new[n]]
  parts = [f"content of {', '.join(changed)} changed"] if changed else []
  parts += [f"added {', '.join(n for n in new if n not in old)}"] if set(new) - set(old) else []
  parts += [f"removed {', '.join(n for n in old if n not in new)}"] if set(old) - set(new) else []
  others = [k for k in lineage.differences(saved, request) if k != "inputs"]
  return "; ".join(parts + ([f"settings differ: {', '.join(others)}"] if others else [])) or "order of inputs"


def _finalize_labels(entries: list, folder: pathlib.Path) -> tuple[list[str], list[pathlib.Path]]:
  """Global label list; single-label files get an id, mixed files' label arrays are remapped to global ids into new
  files (the per-file ones stay as the done markers describe them until the markers go: a kill here and a resume
  remap the same input again, never a remapped array twice). Returns the names and the per-file arrays to delete."""
  names: list[str] = []
  for entry in entries:
    for name in entry["label_names"]:
      if name not in names:
        names.append(name)
  local_arrays = []
  for entry in entries:
    local_names = entry.pop("label_names")
    if "label_array" in entry:
      to_global = np.asarray([names.index(n) for n in local_names], dtype=np.uint16)
      local = folder / entry["label_array"]
      entry["label_array"] = local.name.replace(".npy", ".global.npy")
      np.save(folder / entry["label_array"], to_global[np.load(local)])
      local_arrays.append(local)
    else:
      entry["label"] = names.index(local_names[0]) if local_names else 0
  return names, local_arrays


def _existing_entries(output: pathlib.Path) -> list:
  path = output / formats.MANIFEST
  return formats.read_json(path).get("files", []) if path.exists() else []


def check_inputs(cfg):
  """Inputs, tokenizer and the store request, checked before any work (also by the dry run)."""
  pcfg = cfg.prepare
  if not pcfg.output:
    raise errors.ConfigError("set --config.prepare.output to the token store folder to write")
  if pcfg.seq_len < 2:
    raise errors.ConfigError(f"prepare.seq_len={pcfg.seq_len}; a sequence needs at least 2 tokens")
  output = pathlib.Path(pcfg.output).resolve()
  files = text_files.expand_inputs(pcfg.inputs)
  tokenizer = tokenizer_lib.load_tokenizer(pcfg.tokenizer)
  tok_info = tokenizer_lib.tokenizer_info(tokenizer, pcfg.tokenizer, pcfg.eos_id, pcfg.pad_id)
  prints = input_fingerprints(files, _existing_entries(output))
  request = hub_paths.with_origins(store_request(prints, tok_info, pcfg.seq_len, pcfg.text_field,
                                                 pcfg.source_field), files)
  return output, files, tokenizer, tok_info, prints, request


def run(cfg) -> pathlib.Path:
  """Build (or find up to date) the token store described by cfg.prepare."""
  output, files, tokenizer, tok_info, prints, request = check_inputs(cfg)
  if (output / formats.MANIFEST).exists():
    saved = formats.read_json(output / formats.MANIFEST).get("request") or {}
    if saved == lineage.normalized(request):
      sequences = formats.read_manifest(output)["num_sequences"]
      print(f"prepare: {output} is up to date ({sequences:,} sequences); nothing to do")
      return output
    inputs_changed = saved.get("inputs") != request["inputs"]
    what = (f"is stale: {_changed_inputs(saved, request)} since it was built" if inputs_changed else
            f"was made with other settings ({_changed_inputs(saved, request)})")
    raise errors.DataError(f"{output} {what}. Delete it and re-run prepare (and every stage built from it), or choose "
                           "another --config.prepare.output (nothing was overwritten)")
  if output.exists():
    raise errors.DataError(f"{output} exists but is not a token store; choose another --config.prepare.output")
  with lineage.Lock(output):
    return _build(cfg, output, files, tokenizer, tok_info, prints, request)


def _build(cfg, output, files, tokenizer, tok_info, prints, request) -> pathlib.Path:
  pcfg = cfg.prepare
  partial = output.with_name(output.name + ".partial")
  partial.mkdir(parents=True, exist_ok=True)
  request_path = partial / "request.json"
  saved = formats.read_json(request_path) if request_path.exists() else None
  if saved is not None and lineage.differences(saved, lineage.normalized(request)) not in ([], ["inputs"]):
    print(f"prepare: discarding {partial}: an interrupted prepare with other settings")
    shutil.rmtree(partial)
    partial.mkdir(parents=True)
  request_path.write_text(json.dumps(request, indent=1))

  done = {}
  for i in range(len(files)):  # files finished by an interrupted run are kept if their content is unchanged
    marker = partial / f"done-{i:05d}.json"
    if marker.exists():
      entry = json.loads(marker.read_text())
      if entry["path"] == str(files[i]) and entry["sha256"] == prints[i]["sha256"]:
        done[i] = entry
      else:
        marker.unlink()
  jobs = [dict(file_index=i, path=str(f), folder=str(partial), seq_len=int(pcfg.seq_len),
               tokenizer_json=tokenizer.to_str(), dtype=stores.token_dtype(tok_info["vocab_size"]).str,
               eos_id=tok_info["eos_id"], text_field=pcfg.text_field, source_field=pcfg.source_field,
               docs_per_chunk=int(pcfg.docs_per_chunk), fingerprint={k: prints[i][k] for k in ("sha256", "bytes",
                                                                                               "mtime_ns")})
          for i, f in enumerate(files) if i not in done]
  cores = os.cpu_count() or 1
  workers = max(1, min(pcfg.workers or cores, len(jobs) or 1))
  print(f"prepare: {len(files)} files ({len(done)} already done), {workers} workers, tokenizer "
        f"{tok_info['name']} (vocab {tok_info['vocab_size']}), seq_len {pcfg.seq_len} -> {output}")

  if jobs:
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    bar = console.Progress(total=None, unit="docs", desc="prepare")
    tokens = 0
    with ctx.Pool(workers, initializer=_init_worker, initargs=(progress_queue, max(1, cores // workers))) as pool:
      pending = pool.map_async(tokenize_file, jobs, chunksize=1)
      while not pending.ready() or not progress_queue.empty():
        try:
          ndocs, ntokens = progress_queue.get(timeout=0.2)
        except Exception:  # queue.Empty from a multiprocessing queue
          continue
        tokens += ntokens
        bar.update(ndocs, extra=f"{tokens / max(bar.elapsed, 1e-9):,.0f} tok/s, {tokens:,} tokens")
      for entry in pending.get():
        done[int(pathlib.Path(entry["array"]).stem.split("-")[1])] = entry
    bar.close()

  entries = [done[i] for i in range(len(files))]
  _check_not_empty(entries, partial, int(pcfg.seq_len))
  labels, local_label_arrays = _finalize_labels(entries, partial)
  offset = 0
  for entry in entries:
    entry["first_id"] = offset
    offset += entry["sequences"]
  manifest = {
      "format": formats.STORE.format,
      "version": formats.STORE.version,
      "id": lineage.content_id(request),
      "seq_len": int(pcfg.seq_len),
      "dtype": stores.token_dtype(tok_info["vocab_size"]).name,
      "tokenizer": tok_info,
      "num_sequences": offset,
      "num_tokens": offset * int(pcfg.seq_len),
      "num_documents": sum(e["documents"] for e in entries),
      "labels": labels,
      "files": entries,
      "request": request,
      "created_by": {"stage": "prepare", "config": cfg.to_dict(), "host": socket.gethostname(),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
  }
  for marker in partial.glob("done-*.json"):
    marker.unlink()
  for local in local_label_arrays:
    local.unlink()
  request_path.unlink()
  (partial / tokenizer_lib.TOKENIZER).write_text(tokenizer.to_str())
  lineage.write_manifest(partial, manifest)
  lineage.publish(partial, output)
  print(f"prepare: wrote {output}: {offset:,} sequences of {pcfg.seq_len} tokens "
        f"({manifest['num_documents']:,} documents, id {manifest['id']})")
  return output


def _check_not_empty(entries: list, partial: pathlib.Path, seq_len: int) -> None:
  """A store with no sequence is an error (nothing downstream can use it); files too short to fill one are named."""
  short = [e for e in entries if e["sequences"] == 0]
  if len(short) == len(entries):
    shutil.rmtree(partial)
    detail = ", ".join(f"{pathlib.Path(e['path']).name}: {e['documents']} documents, {e['tokens']} tokens"
                       for e in short[:5])
    raise errors.DataError(f"no input holds one full sequence of {seq_len} tokens ({detail}); add text or lower "
                           "--config.prepare.seq_len (nothing was written)")
  for e in short:
    print(f"prepare: warning: {e['path']} holds {e['tokens']} tokens, less than one sequence of {seq_len}; it "
          "contributes nothing")


def describe(cfg) -> None:
  """Dry run: check inputs and tokenizer, report what would be written."""
  output, files, _, tok_info, _, _ = check_inputs(cfg)
  total = sum(f.stat().st_size for f in files)
  print(f"prepare (dry run): {len(files)} files, {total / 1e6:,.1f} MB, tokenizer {tok_info['name']} "
        f"vocab {tok_info['vocab_size']} (sha256 {tok_info['sha256'][:12]}), seq_len {cfg.prepare.seq_len}, dtype "
        f"{stores.token_dtype(tok_info['vocab_size']).name} -> {output}")
