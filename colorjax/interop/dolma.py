"""The `dolma` stage: the original CoLoR-Filter's files (dolma/OLMo formats) as colorjax artifacts, and back.

The original (PyTorch/OLMo) keeps tokens, scores and selections as headerless memmaps. `--config.dolma.action`
picks one of four conversions; each writes its artifact to `--config.workdir`:

* adopt (here): token files (uint16/uint32 ids, documents joined by EOS) -> a token store whose manifest points at
  the files where they are (no copy). As OLMo's `MemMapDataset(*paths, chunk_size=seq_len)`, file i gives
  floor(tokens_i / seq_len) sequences (its tail ignored) and global ids run over the files in the given order: the
  original's ids exactly when the files come in its order, i.e. its config.yaml `data.paths` (a folder it globbed
  unsorted, in filesystem order, which no other listing reproduces).
* import_scores, import_selection (dolma_scores.py): the original's score shards and selected_indices.npy ->
  a colorjax score folder and selection.
* export_selection (dolma_export.py): a colorjax selection -> dolma/OLMo token files and sharded Parquet.
"""
import glob
import os
import pathlib
import socket
import time

import numpy as np

from colorjax import console
from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import hub_paths
from colorjax.artifacts import lineage
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.interop import dolma_common as common
from colorjax.interop import dolma_export
from colorjax.interop import dolma_scores

ACTIONS = ("adopt", "import_scores", "import_selection", "export_selection")
DTYPES = ("uint16", "uint32")
SAMPLE_TOKENS = 1 << 20  # leading tokens of each adopted file checked against the vocabulary (catches a wrong dtype)


# ----------------------------------------------------------------------------------------------------------------
# adopt: token files -> a token store, in place


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
      raise errors.DataError(f"token file {entry!r} does not exist (as given{where}); fix --config.dolma.paths or "
                             "--config.dolma.paths_from")
    if was_expanded:
      expanded.append(entry)
    files += [common.absolute(f) for f in found]
  return files, expanded


def _special(given: int, original) -> int:
  """A special token id: given (>= 0), else the original run's model.<name>, else -1 (the tokenizer's)."""
  if given >= 0:
    return int(given)
  return int(original) if original is not None else -1


def adopt_settings(cfg) -> dict:
  """Files, dtype, seq_len, special ids and labels: as given, else from the original run's config.yaml."""
  d = cfg.dolma
  given = common.as_list(d.paths)
  if given and d.paths_from:
    raise errors.ConfigError("give --config.dolma.paths or --config.dolma.paths_from, not both")
  original = common.read_yaml(d.paths_from) if d.paths_from else {}
  data_cfg, model_cfg = original.get("data") or {}, original.get("model") or {}
  entries = given or common.as_list(data_cfg.get("paths") or [])
  if d.paths_from and not entries:
    raise errors.DataError(f"{d.paths_from} lists no data.paths (its data came from data.datasets or a registry name); "
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
  labels = common.as_list(d.labels) or [f.stem for f in files]
  if len(labels) != len(files):
    raise errors.ConfigError(f"dolma.labels names {len(labels)} sources for {len(files)} files; give one per file "
                             "(names may repeat) or none (each file's stem)")
  return {"files": files, "entries": entries, "expanded": expanded, "dtype": dtype, "seq_len": seq_len,
          "eos_id": _special(d.eos_id, model_cfg.get("eos_token_id")),
          "pad_id": _special(d.pad_id, model_cfg.get("pad_token_id")), "labels": labels}


def token_file(path: pathlib.Path, dtype: str, seq_len: int, known: dict | None = None) -> dict:
  """A store entry for a headerless token file read in place: fingerprint, tokens, sequences, ignored tail."""
  tokens = common.byte_rows(path, np.dtype(dtype).itemsize, f"{dtype} token",
                            "check --config.dolma.dtype (the original's data.memmap_dtype) and the file")
  sequences = tokens // seq_len
  return {"name": path.name, "path": str(path), "format": "raw", **lineage.fingerprint(path, known),
          "tokens": tokens, "sequences": sequences, "dropped_tokens": tokens - sequences * seq_len}


def check_vocab(path: pathlib.Path, dtype: str, vocab_size: int) -> None:
  """The file's leading tokens are ids of the tokenizer: a wrong dtype or tokenizer shows here, not mid-training."""
  sample = np.fromfile(path, dtype=dtype, count=SAMPLE_TOKENS)
  if sample.size and int(sample.max()) >= vocab_size:
    raise errors.DataError(f"{path} holds token id {int(sample.max()):,} in its first {sample.size:,} tokens, outside "
                           f"the tokenizer's {vocab_size:,} ids; check --config.dolma.dtype ({dtype}) and "
                           "--config.dolma.tokenizer")


def adopt_request(entries: list[dict], dtype: str, seq_len: int, tok_info: dict) -> dict:
  """What decides an adopted store's content: the files (by hash, in order), dtype, seq_len and tokenizer (and the
  hub commit they came from)."""
  request = {"kind": "dolma", "version": formats.STORE.version,
             "files": [[e["name"], e["sha256"]] for e in entries], "dtype": dtype, "seq_len": int(seq_len),
             "tokenizer_sha256": tok_info["sha256"], "eos_id": tok_info["eos_id"], "pad_id": tok_info["pad_id"]}
  return hub_paths.with_origins(request, [e["path"] for e in entries])


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
  tokenizer = tokenizer_lib.load_tokenizer(cfg.dolma.tokenizer)
  tok_info = tokenizer_lib.tokenizer_info(tokenizer, cfg.dolma.tokenizer, s["eos_id"], s["pad_id"])
  output = common.workdir(cfg)
  manifest_path = output / formats.MANIFEST
  previous = formats.read_json(manifest_path).get("files", []) if manifest_path.exists() else []
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
      common.print_main(f"  ids [{first:,}, {first + entry['sequences']:,}) {entry['path']} "
                        f"({entry['dropped_tokens']} tail tokens ignored)")
    elif i == 8:
      common.print_main(f"  ... {len(entries) - 9} more files")
    first += entry["sequences"]
  if s["expanded"]:
    common.print_main(f"dolma adopt: warning: {', '.join(s['expanded'])} expanded in sorted order; the original "
                      "globbed a folder unsorted (filesystem order), so its ids are only reproduced from its own file "
                      "list: pass --config.dolma.paths_from=<its run>/config.yaml (data.paths)")


def adopt(cfg) -> pathlib.Path:
  output = common.workdir(cfg)
  s, tokenizer, tok_info, entries, request = _adopt_inputs(cfg)
  names, label_ids = label_table(s["labels"])
  common.print_main(f"dolma adopt: {len(entries)} {s['dtype']} files, seq_len {s['seq_len']}, in this order:")
  _report_order(s, entries)
  if lineage.up_to_date(output, request, "another token store", "delete it or choose another --config.workdir"):
    saved = formats.read_manifest(output)
    if saved.get("labels") != names or [e.get("label") for e in saved["files"]] != label_ids:
      raise errors.DataError(f"{output} holds these files with other labels ({saved.get('labels')}); delete it to "
                             "relabel (nothing was overwritten)")
    common.print_main(f"dolma adopt: {output} is up to date; nothing to do")
    return output
  lineage.check_new(output, "a token store", "choose another --config.workdir")
  first = 0
  for entry, label in zip(entries, label_ids):
    entry.update(first_id=first, label=label)
    first += entry["sequences"]
  if not first:
    raise errors.DataError(f"no file holds one sequence of {s['seq_len']} tokens; check --config.dolma.seq_len "
                           "(nothing was written)")
  manifest = {
      "format": formats.STORE.format, "version": formats.STORE.version, "id": lineage.content_id(request),
      "seq_len": s["seq_len"], "dtype": s["dtype"], "tokenizer": tok_info, "num_sequences": first,
      "num_tokens": first * s["seq_len"], "labels": names, "files": entries,
      "adopted": {"from": "dolma/OLMo token files, read in place", "entries": s["entries"],
                  "paths_from": cfg.dolma.paths_from or None, "sorted": s["expanded"]},
      "request": request,
      "created_by": {"stage": "dolma adopt", "config": cfg.to_dict(), "host": socket.gethostname(),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
  }

  def write(folder):
    (folder / tokenizer_lib.TOKENIZER).write_text(tokenizer.to_str())  # the bytes tok_info's sha256 is of
    lineage.write_manifest(folder, manifest)

  common.publish(output, write)
  common.print_main(f"dolma adopt: wrote {output}: {first:,} sequences of {s['seq_len']} tokens (id "
                    f"{manifest['id']}); the token files stay where they are and must not change")
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
    return dolma_export.export_selection(cfg)
  writer = {"adopt": adopt, "import_scores": dolma_scores.import_scores,
            "import_selection": dolma_scores.import_selection}[action]
  console.on_main_then_sync(lambda: writer(cfg), f"dolma {action}")
  return common.workdir(cfg)


def describe(cfg) -> None:
  """Dry run: what the action would read and write, checked the same way, writing nothing."""
  action = _action(cfg)
  if action == "adopt":
    s, _, tok_info, entries, request = _adopt_inputs(cfg)
    total = sum(e["sequences"] for e in entries)
    print(f"dolma adopt (dry run): {len(entries)} files -> {total:,} sequences of {s['seq_len']} {s['dtype']} "
          f"tokens, tokenizer {tok_info['name']}, store id {lineage.content_id(request)}:")
    _report_order(s, entries)
  else:
    {"import_scores": dolma_scores.describe_import_scores,
     "import_selection": dolma_scores.describe_import_selection,
     "export_selection": dolma_export.describe_export_selection}[action](cfg)
