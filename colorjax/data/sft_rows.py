"""Downstream-task SFT rows as a padded token store: what decides its content (the request, so its id is known before
it is built), and building it. Task finetuning renders the rows with the tokenizer of the params it finetunes.
"""
import json
import pathlib
import socket
import time

import numpy as np

from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import tasks
from colorjax.data import tokenizer as tokenizer_lib


def sft_request(task_names, data_dir, split: str, tok_info: dict, seq_len: int, limit: int = 0) -> dict:
  """What decides an SFT store's content (task files by hash), so its id is known before it is built."""
  files = [tasks.split_path(t, split, data_dir) if data_dir else None for t in task_names]
  return {"kind": "sft", "version": formats.STORE.version, "tasks": list(task_names), "split": split,
          "limit": int(limit), "tokenizer_sha256": tok_info["sha256"], "eos_id": tok_info["eos_id"],
          "pad_id": tok_info["pad_id"], "seq_len": int(seq_len),
          "files": [lineage.fingerprint(f)["sha256"] if f else None for f in files]}


def build_sft_store(task_names, data_dir, split: str, tokenizer_path, tok_info: dict, seq_len: int, output,
                    limit: int = 0) -> pathlib.Path:
  """Downstream-task SFT rows as a padded token store: one document per row, its gold context + continuation,
  right-padded with PAD (rows longer than seq_len keep their last seq_len tokens, so the answer survives).

  Reused when a store made for the same request (tasks, split, files, tokenizer, seq_len) is already there.
  """
  output = pathlib.Path(output).resolve()
  tokenizer = tokenizer_lib.load_tokenizer(str(tokenizer_path))
  request = sft_request(task_names, data_dir, split, tok_info, seq_len, limit)
  if lineage.up_to_date(output, request, "SFT rows", "delete it or choose another folder"):
    return output
  with lineage.building(output, "a token store of SFT rows", "delete it or choose another folder") as partial:
    dtype, pad = stores.token_dtype(tok_info["vocab_size"]), tok_info["pad_id"]
    entries, offset = [], 0
    for i, task in enumerate(task_names):
      path = tasks.split_path(task, split, data_dir) if data_dir else None
      docs = tasks.load_docs(task, split, data_dir or None, limit=limit or None)
      encodings = tokenizer.encode_batch([tasks.render_sft(task, doc) for doc in docs], add_special_tokens=False)
      rows = np.full((len(docs), seq_len), pad, dtype)
      truncated = 0
      for row, encoding in zip(rows, encodings):
        ids = encoding.ids[-seq_len:]
        truncated += len(encoding.ids) > seq_len
        row[: len(ids)] = ids
      array = f"seqs-{i:05d}.npy"
      np.save(partial / array, rows)
      entries.append({"path": str(path or f"hf:{tasks.HF_SOURCES[task][0]}"), "sha256": request["files"][i],
                      "documents": len(docs), "tokens": int(sum(len(e.ids) for e in encodings)),
                      "sequences": len(docs), "truncated_rows": int(truncated), "array": array, "label": i,
                      "first_id": offset})
      offset += len(docs)
    if offset == 0:
      raise errors.DataError(f"tasks {', '.join(task_names)} have no {split!r} documents in {data_dir or 'the hub'}; "
                             "fix --config.sft.data_dir or the task list")
    manifest = {
        "format": formats.STORE.format, "version": formats.STORE.version, "kind": "sft", "padded": True,
        "id": lineage.content_id(request), "seq_len": int(seq_len), "dtype": dtype.name,
        "tokenizer": tok_info, "num_sequences": offset, "num_tokens": offset * int(seq_len),
        "num_documents": offset, "labels": list(task_names), "files": entries, "request": request,
        "created_by": {"stage": "sft", "split": split, "host": socket.gethostname(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    (partial / tokenizer_lib.TOKENIZER).write_text(tokenizer.to_str())
    lineage.write_manifest(partial, manifest)
  print(f"sft rows: {output}: {offset:,} rows of {seq_len} ({', '.join(task_names)}; split {split})")
  return output


def write_task_text(task_names, data_dir, split: str, path, limit: int = 0) -> pathlib.Path:
  """The tasks' examples rendered as SFT renders them (prompt + gold answer), one JSONL document each: the target
  text of methods that model it (DSIR, RHO-down's reference) when the target is the task suite. Rewritten only when
  its content changes, so a store prepared from it keeps its id."""
  lines = [json.dumps({"text": tasks.render_sft(task, doc), "source": task})
           for task in task_names for doc in tasks.load_docs(task, split, data_dir or None, limit=limit or None)]
  data = ("\n".join(lines) + "\n").encode("utf-8")
  path = pathlib.Path(path)
  if not (path.exists() and path.read_bytes() == data):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
  return path
