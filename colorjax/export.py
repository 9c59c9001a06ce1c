"""The `export` stage: a selection written back out as text, so people can read, audit or share the filtered data.

Writes `<workdir>/selection.jsonl.gz` ({"id": global id, "score": CoLoR score or null, "source": label, "text":
detokenized sequence} per selected sequence, in id order; on N hosts each writes its share in parallel, to
`selection-<host>-of-<N>.jsonl.gz`) and `breakdown.json` (per-source pool and selected counts), and prints the
breakdown.
"""
import gzip
import json
import pathlib

import jax
import numpy as np

from colorjax import console
from colorjax import errors
from colorjax import methods
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import losses
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib

BREAKDOWN = "breakdown.json"


def run(cfg) -> pathlib.Path:
  if not cfg.export.selection:
    raise errors.ConfigError("set --config.export.selection to a selection folder (select stage output)")
  selection = pathlib.Path(cfg.export.selection).resolve()
  manifest = formats.open_manifest(selection, formats.SELECTION)
  store = stores.TokenStore(selection_lib.store_of(selection, manifest))
  ids = stores.load_index(selection, store)
  if cfg.export.max_rows:
    ids = ids[: cfg.export.max_rows]
  workdir = pathlib.Path(cfg.workdir).resolve() if cfg.workdir else selection / "export"
  host, hosts = jax.process_index(), jax.process_count()
  existing = [p for p in [workdir / n for n in output_names(hosts)] + [workdir / BREAKDOWN] if p.exists()]
  if existing:
    raise errors.DataError(f"{existing[0]} already exists; choose another --config.workdir (nothing was overwritten)")
  console.on_main_then_sync(lambda: None, f"export {workdir} checked")  # before any host writes
  tokenizer = tokenizer_lib.load_tokenizer(str(store.tokenizer_path()))
  scores_ref = manifest.get("scores")
  scores = scores_lib.Scores(lineage.resolve(scores_ref["path"], selection)) if scores_ref else None
  workdir.mkdir(parents=True, exist_ok=True)
  mine = np.array_split(ids, hosts)[host]  # every host writes its own contiguous share of the ids, in parallel
  out_path = workdir / output_names(hosts)[host]
  _write_rows(out_path, mine, store, tokenizer, scores, methods.score_columns_of(manifest["method"]),
              manifest.get("conditional") or "conditional_0")

  def finish():
    breakdown = selection_lib.label_rates(store, ids, 1 << 20)
    (workdir / BREAKDOWN).write_text(json.dumps(breakdown, indent=1))
    print(f"export: {ids.size:,} sequences -> {workdir / output_names(hosts)[0]}"
          f"{f' (+ {hosts - 1} more files, one per host)' if hosts > 1 else ''}")
    for name, r in sorted(breakdown.items(), key=lambda x: -x[1]["selected"]):
      print(f"  {name:<16} {r['selected']:>9,} of {r['pool']:>11,} ({r['rate']:.1%})")

  console.on_main_then_sync(lambda: None, f"export {workdir} rows written")
  if console.is_main():
    finish()
  return workdir


def output_names(hosts: int) -> list[str]:
  """One file on one host (selection.jsonl.gz); on N hosts one per host, in id order when read in name order."""
  if hosts == 1:
    return ["selection.jsonl.gz"]
  return [f"selection-{h:05d}-of-{hosts:05d}.jsonl.gz" for h in range(hosts)]


def _write_rows(out_path, ids, store, tokenizer, scores, columns, conditional) -> None:
  """Detokenized rows of `ids` to a gzipped JSONL file, renamed into place when complete."""
  labels = store.labels() or ["all"]
  tmp = out_path.with_name(out_path.name + ".tmp")
  bar = console.Progress(total=ids.size, unit="seq", desc="export")
  with gzip.open(tmp, "wt", encoding="utf-8") as f:
    for start in range(0, ids.size, 4096):
      block = ids[start:start + 4096]
      rows = store.read(block)
      texts = tokenizer.decode_batch([r.tolist() for r in rows], skip_special_tokens=False)
      label_ids = store.label_ids(block)
      values = scores_of(scores, columns, conditional, block)
      for i, sid in enumerate(block):
        f.write(json.dumps({"id": int(sid), "score": None if values is None else float(values[i]),
                            "source": labels[label_ids[i]], "text": texts[i]}) + "\n")
      bar.update(block.size)
  bar.close()
  tmp.rename(out_path)


def scores_of(scores, columns: tuple, conditional: str, ids: np.ndarray):
  """The score of each of `ids` by `columns` (methods.score_columns_of), from the selected rows only; None without
  scores."""
  if scores is None:
    return None
  cond = scores.column(conditional)
  rows = scores.read_ids(ids)
  return losses.color_score(rows[:, scores.column("prior")] if "prior" in columns else None, rows[:, cond])


def describe(cfg) -> None:
  manifest = formats.read_manifest(cfg.export.selection)
  print(f"export (dry run): {manifest['k']:,} sequences of {manifest['store_path']} -> text")
