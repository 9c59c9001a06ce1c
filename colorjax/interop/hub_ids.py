"""Do the original's global sequence ids follow the token files' order? The check behind `hub selection`.

The original read its token files in the order its config listed them, and a folder it globbed unsorted, in
filesystem order: the ids of its released scores and selections need not follow the files' name order, and a store
adopted in the wrong order would train on the wrong rows without any error. The check rescores a few rows of every
token file with the released prior (read straight from the files, before anything is adopted or hashed) and compares
them with the released prior's scores at the ids the assumed order gives them. When they differ it walks the files
from id 0, taking at each step the one file whose rows match the scores there, which is the order that reproduces
the original's ids (or it says that no single order does).
"""
import dataclasses
import pathlib

import jax
import numpy as np

from colorjax.interop import dolma_common as common
from colorjax.interop import dolma_scores
from colorjax.model import losses
from colorjax.model import transformer

BATCH = 8  # rows rescored per step (one compiled shape)


@dataclasses.dataclass
class FileSample:
  """A token file, its sequence count and the rescored NLL of some of its rows (local row numbers)."""
  path: pathlib.Path
  sequences: int
  rows: np.ndarray
  nll: np.ndarray


def sample_rows(sequences: int, count: int) -> np.ndarray:
  """`count` local rows spread over a file, its first and last among them."""
  if sequences <= 0 or count <= 0:
    return np.zeros(0, np.int64)
  return np.unique(np.linspace(0, sequences - 1, min(count, sequences)).round().astype(np.int64))


def read_rows(path: pathlib.Path, dtype: str, seq_len: int, rows: np.ndarray) -> np.ndarray:
  """Rows of a headerless token file (sequence r = tokens [r * seq_len, (r + 1) * seq_len)) as int32."""
  tokens = np.memmap(path, dtype=dtype, mode="r")
  return np.stack([np.asarray(tokens[r * seq_len:(r + 1) * seq_len], np.int32) for r in rows])


def rescore(spec: transformer.ModelSpec, params, tokens: np.ndarray) -> np.ndarray:
  """Per-sequence mean next-token NLL of `tokens` [n, seq_len], as the original's Scorer (no PAD excluded)."""
  fn = jax.jit(lambda p, t: losses.sequence_nll(spec, p, t, None))
  out = []
  for start in range(0, len(tokens), BATCH):
    part = tokens[start:start + BATCH]
    padded = np.concatenate([part, np.repeat(part[-1:], BATCH - len(part), axis=0)])
    out.append(np.asarray(fn(params, padded))[:len(part)])
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def samples(files, dtype: str, seq_len: int, rows_per_file: int, score_fn) -> list[FileSample]:
  """Each file's sampled rows, rescored by `score_fn(tokens) -> nll` in one pass over all files."""
  itemsize = np.dtype(dtype).itemsize
  counts = [common.byte_rows(pathlib.Path(f), itemsize, f"{dtype} token", "check the file") // seq_len
            for f in files]
  rows = [sample_rows(n, rows_per_file) for n in counts]
  tokens = [read_rows(pathlib.Path(f), dtype, seq_len, r) for f, r in zip(files, rows) if r.size]
  nll = score_fn(np.concatenate(tokens)) if tokens else np.zeros(0, np.float32)
  out, first = [], 0
  for f, n, r in zip(files, counts, rows):
    out.append(FileSample(pathlib.Path(f), n, r, nll[first:first + r.size]))
    first += r.size
  return out


def released_column(shard_folders, rows: int = 0) -> np.ndarray:
  """The released prior NLL by global id (NaN where no shard scored the id), over the original's score shards."""
  shards = [dolma_scores.read_shard(pathlib.Path(f), rows) for f in shard_folders]
  ids = np.concatenate([s["ids"] for s in shards]) if shards else np.zeros(0, np.int64)
  column = np.full(int(ids.max()) + 1 if ids.size else 0, np.nan, np.float32)
  for shard in shards:
    column[shard["ids"]] = shard["values"]
  return column


def mismatch(sample: FileSample, column: np.ndarray, first_id: int) -> float:
  """Largest |rescored - released| of a file's rows when the file starts at `first_id` (inf: unscored ids)."""
  ids = first_id + sample.rows
  if not sample.rows.size:
    return 0.0
  if ids[-1] >= column.size or np.isnan(column[ids]).any():
    return float("inf")
  return float(np.max(np.abs(sample.nll - column[ids])))


def find_order(file_samples: list[FileSample], column: np.ndarray, tolerance: float) -> tuple[list[int] | None, str]:
  """The file order whose ids reproduce the released scores (indices into file_samples), found by walking from id 0
  and taking the one file that matches there; None and why when no file or several do at some step."""
  left, order, first = [i for i, s in enumerate(file_samples) if s.sequences], [], 0
  while left:
    fitting = [i for i in left if mismatch(file_samples[i], column, first) <= tolerance]
    if len(fitting) != 1:
      names = [file_samples[i].path.name for i in fitting]
      why = (f"no file's rows match the released scores at id {first:,}" if not fitting else
             f"{len(fitting)} files match at id {first:,} ({', '.join(names[:4])}); rescore more rows "
             "(--config.hub.check_rows) or lower --config.hub.check_tolerance")
      return None, why
    order.append(fitting[0])
    left.remove(fitting[0])
    first += file_samples[fitting[0]].sequences
  empty = [i for i, s in enumerate(file_samples) if not s.sequences]  # no ids: anywhere, here last
  return order + empty, "every file's rows match"


def check(file_samples: list[FileSample], column: np.ndarray, tolerance: float) -> dict:
  """What the check found, as JSON: the assumed order matches or not, per file the ids it was given and the
  largest difference, and (when it does not match) the order that does."""
  files, first = [], 0
  for s in file_samples:
    files.append({"name": s.path.name, "first_id": first, "sequences": s.sequences, "rows": s.rows.tolist(),
                  "max_abs_diff": mismatch(s, column, first)})
    first += s.sequences
  worst = max((f["max_abs_diff"] for f in files), default=0.0)
  report = {"matches": bool(worst <= tolerance), "tolerance": tolerance, "max_abs_diff": worst,
            "rows_checked": int(sum(s.rows.size for s in file_samples)), "sequences": first,
            "released_ids": int(np.count_nonzero(~np.isnan(column))), "files": files, "matching_order": None}
  if not report["matches"]:
    order, why = find_order(file_samples, column, tolerance)
    report["matching_order"] = [file_samples[i].path.name for i in order] if order is not None else None
    report["search"] = why
  return report


def summary(report: dict) -> str:
  """One line saying what the check found."""
  head = (f"{report['rows_checked']} rows of {len(report['files'])} token files rescored with the released prior "
          f"against its released scores ({report['released_ids']:,} ids)")
  if report["matches"]:
    return (f"ids follow the files' given order: {head} match (max |diff| {report['max_abs_diff']:.2g} <= "
            f"{report['tolerance']:g})")
  bad = [f["name"] for f in report["files"] if f["max_abs_diff"] > report["tolerance"]]
  found = (f"the order that matches is ({', '.join(report['matching_order'])})" if report["matching_order"]
           else f"no order of these files matches ({report.get('search')})")
  return (f"ids do NOT follow the files' given order: {head}; the rows of {', '.join(bad[:6])}"
          f"{' and more' if len(bad) > 6 else ''} differ; {found}")
