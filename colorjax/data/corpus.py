"""Text before tokenization: finding input files, grouping target documents into works, the finetune / held-out /
pool split, pool sampling, and size estimates for dry runs.

The split is by work (a play, a book, a repository), so no work is cut across finetune, held-out and pool; works are
documents sharing a JSON field's value (`group_field`), or runs of consecutive documents each begun by one matching
`group_regex`. Finetune, held-out and pool parts are disjoint at the document level.
"""
import dataclasses
import glob
import gzip
import hashlib
import json
import os
import pathlib
import re
import struct

import ml_collections
import numpy as np

from colorjax import config
from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import synthetic
from colorjax.data import text_files

PARTS = ("target_train", "target_eval", "pool")
MAX_RECORDED_WORKS = 10_000  # split.json lists work names up to this many per part (else only counts)


@dataclasses.dataclass(frozen=True)
class Split:
  """How target works are shared out (fractions of works) and how works are found."""
  finetune: float  # fraction of target works that finetune the conditional
  held_out: float  # fraction held out to evaluate targets
  pool: float  # fraction put into the candidate pool (the rest is left unused)
  group_field: str  # JSON field naming a document's work ("" = use group_regex)
  group_regex: str  # a document matching this starts a new work ("" and no field = each document is a work)
  seed: int
  max_chars_per_file: int  # sample whole pool documents up to about this many characters per file (0 = all)

  @classmethod
  def from_config(cls, pcfg) -> "Split":
    finetune, held_out = (float(x) for x in pcfg.target_split)
    split = cls(finetune, held_out, float(pcfg.target_pool_split), pcfg.group_field, pcfg.group_regex,
                int(pcfg.split_seed), int(pcfg.max_chars_per_file))
    split.check()
    return split

  def check(self) -> None:
    fractions = {"target_split[0] (finetune)": self.finetune, "target_split[1] (held-out)": self.held_out,
                 "target_pool_split": self.pool}
    for name, value in fractions.items():
      if not 0 <= value <= 1:
        raise errors.ConfigError(f"pipeline.{name}={value}: a fraction of the target's works, in [0, 1]")
    if self.finetune <= 0 or self.held_out <= 0:
      raise errors.ConfigError("pipeline.target_split needs a positive finetune and held-out fraction")
    if sum(fractions.values()) > 1 + 1e-9:
      raise errors.ConfigError(f"pipeline.target_split + target_pool_split = {sum(fractions.values()):g} > 1: the "
                               "parts would share works; lower one of them")
    if self.group_regex:
      try:
        re.compile(self.group_regex)
      except re.error as e:
        raise errors.ConfigError(f"pipeline.group_regex={self.group_regex!r} is not a valid regex ({e})") from e


def resolve_files(folder: str, patterns) -> list[pathlib.Path]:
  """Files named by paths or globs (relative to `folder`), in order, each glob sorted, duplicates removed."""
  out = []
  for pattern in patterns:
    full = pattern if os.path.isabs(pattern) or not folder else os.path.join(folder, pattern)
    matches = sorted(glob.glob(full))
    if not matches:
      raise errors.DataError(f"pipeline input {full!r} matches no file; fix --config.pipeline.data_dir or the file "
                             "lists (pipeline.target_files / pool_files)")
    out += [pathlib.Path(m).resolve() for m in matches]
  return list(dict.fromkeys(out))


def read_docs(path: pathlib.Path, group_field: str = "") -> list[dict]:
  docs = []
  for text, source in text_files.iter_documents(path, "text", "source"):
    docs.append({"text": text, "source": source})
  if group_field:
    values = _field_values(path, group_field)
    if len(values) != len(docs):
      raise errors.DataError(f"{path}: {len(values)} of {len(docs)} documents have a {group_field!r} field; give it to "
                             "every document, or set --config.pipeline.group_field=\"\" to group by group_regex")
    for doc, value in zip(docs, values):
      doc["work"] = value
  return docs


def _field_values(path: pathlib.Path, field: str) -> list[str]:
  opener = gzip.open if path.name.endswith(".gz") else open
  values = []
  with opener(path, "rt", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        doc = json.loads(line)
        if isinstance(doc, dict) and doc.get(field) is not None:
          values.append(str(doc[field]))
  return values


def write_docs(path: pathlib.Path, docs: list[dict]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with gzip.open(tmp, "wt", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc["text"], "source": doc["source"]}) + "\n")
  tmp.rename(path)
  return path


def digest(text: str) -> str:
  return hashlib.sha1(text.encode("utf-8")).hexdigest()


def sample_chars(docs: list[dict], budget: int, seed: int) -> list[dict]:
  """A seeded random sample of whole documents, in file order, of about `budget` characters."""
  order = sorted(range(len(docs)), key=lambda i: digest(f"{seed}/{docs[i]['text']}"))
  chosen, total = [], 0
  for i in order:
    if total >= budget:
      break
    chosen.append(i)
    total += len(docs[i]["text"])
  return [docs[i] for i in sorted(chosen)]


def works(docs: list[dict], split: Split) -> list[tuple[str, list[int]]]:
  """(name, document indices) of each work: by field value (first-appearance order), else by regex runs."""
  if split.group_field:
    groups: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
      groups.setdefault(doc["work"], []).append(i)
    return list(groups.items())
  if not split.group_regex:
    return [(_title(doc["text"]), [i]) for i, doc in enumerate(docs)]
  pattern = re.compile(split.group_regex)
  out: list[tuple[str, list[int]]] = []
  for i, doc in enumerate(docs):
    if not out or pattern.search(doc["text"][:2000]):
      out.append((_title(doc["text"]), []))
    out[-1][1].append(i)
  return out


def _title(text: str) -> str:
  first = next((line.strip() for line in text.splitlines() if line.strip()), "")
  return first[:80]


def split_request(split: Split, target_files, pool_files, known: dict) -> dict:
  """What decides the split's parts: the input files by name and content hash, and the split settings."""
  prints = lambda files: [[f.name, lineage.fingerprint(f, known.get(str(f)))["sha256"]] for f in files]
  return {"target_files": prints(target_files), "pool_files": prints(pool_files),
          "fractions": [split.finetune, split.held_out, split.pool], "group_field": split.group_field,
          "group_regex": split.group_regex, "max_chars_per_file": split.max_chars_per_file, "split_seed": split.seed}


def known_fingerprints(summary_path: pathlib.Path) -> dict:
  """Fingerprints a previous split recorded, so unchanged inputs are not hashed again."""
  if not summary_path.exists():
    return {}
  return formats.read_json(summary_path).get("fingerprints", {})


def part_paths(out: pathlib.Path, target_files, pool_files) -> dict:
  return {"target_train": [out / "target_train.jsonl.gz"], "target_eval": [out / "target_eval.jsonl.gz"],
          "pool": [out / "pool" / f"{text_files.source_label(f)}.jsonl.gz"
                   for f in list(target_files) + list(pool_files)]}


def _assign(num_works: int, split: Split, rng) -> list[str]:
  """Part of each work: a seeded permutation cut by the fractions (all leftover works go to the pool when the
  fractions sum to 1)."""
  n_train = int(round(split.finetune * num_works))
  n_eval = max(1, int(round(split.held_out * num_works)))
  leftover = num_works - n_train - n_eval
  n_pool = leftover if abs(split.finetune + split.held_out + split.pool - 1) < 1e-9 else min(
      leftover, int(round(split.pool * num_works)))
  parts = ["target_train"] * n_train + ["target_eval"] * n_eval + ["pool"] * max(n_pool, 0)
  parts += ["unused"] * (num_works - len(parts))
  order = rng.permutation(num_works)
  out = [""] * num_works
  for rank, work in enumerate(order):
    out[work] = parts[rank]
  return out


def split_target(split: Split, target_files, pool_files, out: pathlib.Path, request: dict) -> dict:
  """Write the finetune / held-out / pool parts and `split.json` (counts, and which works went where)."""
  rng = np.random.default_rng(split.seed)
  parts: dict[str, list] = {"target_train": [], "target_eval": []}
  pool_by_file: dict = {}
  names: dict[str, list[str]] = {"target_train": [], "target_eval": [], "pool": [], "unused": []}
  for path in target_files:
    docs = read_docs(path, split.group_field)
    groups = works(docs, split)
    assignment = _assign(len(groups), split, rng)
    for (name, members), part in zip(groups, assignment):
      names[part].append(f"{path.name}: {name}")
      chosen = pool_by_file.setdefault(path, []) if part == "pool" else parts.get(part)
      if chosen is not None:
        chosen += [docs[i] for i in members]
  for part in ("target_train", "target_eval"):
    if not parts[part]:
      how = (f"field {split.group_field!r}" if split.group_field else
             f"group_regex {split.group_regex!r}" if split.group_regex else "one work per document")
      found = sum(len(v) for v in names.values())
      raise errors.DataError(f"the target's {part} part is empty: {found} work(s) found by {how} in "
                             f"{', '.join(f.name for f in target_files)} (split {split.finetune:g}/"
                             f"{split.held_out:g}); set --config.pipeline.group_field or group_regex so the target "
                             "has several works, or change target_split")
  for path in pool_files:
    pool_by_file[path] = read_docs(path)

  held = {digest(d["text"]) for d in parts["target_train"]}
  parts["target_eval"] = [d for d in parts["target_eval"] if digest(d["text"]) not in held]
  held |= {digest(d["text"]) for d in parts["target_eval"]}
  counts, dropped = {}, 0
  for path in list(target_files) + list(pool_files):
    docs = pool_by_file.get(path, [])
    kept = [d for d in docs if digest(d["text"]) not in held]
    dropped += len(docs) - len(kept)
    if split.max_chars_per_file:
      kept = sample_chars(kept, split.max_chars_per_file, split.seed)
    write_docs(out / "pool" / f"{text_files.source_label(path)}.jsonl.gz", kept)
    counts[text_files.source_label(path)] = len(kept)
  if not sum(counts.values()):
    raise errors.DataError("the pool is empty: no pool file holds a document that is not part of the target's "
                           "finetune or held-out works; fix --config.pipeline.pool_files")
  write_docs(out / "target_train.jsonl.gz", parts["target_train"])
  write_docs(out / "target_eval.jsonl.gz", parts["target_eval"])
  known = {str(f): lineage.fingerprint(f) for f in list(target_files) + list(pool_files)}
  summary = {"request": request, "id": lineage.content_id(request),
             "documents": {"target_train": len(parts["target_train"]), "target_eval": len(parts["target_eval"]),
                           "pool": counts},
             "works": {k: (v if len(v) <= MAX_RECORDED_WORKS else len(v)) for k, v in names.items()},
             "pool_duplicates_dropped": dropped, "fingerprints": known}
  (out / "split.json").write_text(json.dumps(summary, indent=1))
  print(f"split: target finetune {len(parts['target_train'])} docs ({len(names['target_train'])} works), held-out "
        f"{len(parts['target_eval'])} docs ({len(names['target_eval'])} works); pool {sum(counts.values())} docs "
        f"({dropped} duplicates of target documents dropped)")
  return summary


def text_chars(path: pathlib.Path) -> int:
  """About how many characters a text file holds, without reading it (gzip: its trailer's size field)."""
  size = path.stat().st_size
  if path.name.endswith(".gz") and size >= 4:
    with open(path, "rb") as f:
      f.seek(-4, os.SEEK_END)
      raw = struct.unpack("<I", f.read(4))[0]
    return max(raw, size)  # the field is the size mod 2**32
  return size


# ----------------------------------------------------------------------------------------------------------------
# The pipeline's text steps: synthetic text (demo), the split by work, the tokenizer, prepare configs


def _marker_matches(path: pathlib.Path, request: dict) -> bool:
  return path.exists() and formats.read_json(path).get("request") == lineage.normalized(request)


def synthesize(cfg, root: pathlib.Path) -> pathlib.Path:
  """The demo's synthetic domains as jsonl.gz files (deterministic in the seed)."""
  pcfg = cfg.pipeline
  folder = root / "data" / "synthetic"
  request = {"docs": pcfg.synthetic_docs, "seed": pcfg.synthetic_seed, "domains": sorted(synthetic.DOMAINS)}
  marker = folder / "synthetic.json"
  if not _marker_matches(marker, request):
    for domain in synthetic.DOMAINS:
      synthetic.write_domain(folder / f"{domain}.jsonl.gz", domain, pcfg.synthetic_docs, seed=pcfg.synthetic_seed)
    marker.write_text(json.dumps({"request": request}))
  return folder


def data_dir(cfg, root: pathlib.Path, create: bool = True) -> str:
  if cfg.pipeline.synthetic_docs:
    return str(synthesize(cfg, root) if create else root / "data" / "synthetic")
  return cfg.pipeline.data_dir or default_corpus()


def input_files(cfg, folder: str):
  """The target and pool files; each needs its own source label, the name of its pool part and of its source in
  reports (two files with one label would write one part over the other)."""
  target_files = resolve_files(folder, cfg.pipeline.target_files)
  pool_files = [f for f in resolve_files(folder, cfg.pipeline.pool_files) if f not in target_files]
  by_label: dict = {}
  for path in list(target_files) + list(pool_files):
    other = by_label.setdefault(text_files.source_label(path), path)
    if other != path:
      raise errors.ConfigError(f"{other} and {path} have the same source label {text_files.source_label(path)!r}; "
                               "rename one (the pool keeps one part per label: --config.pipeline.target_files, "
                               "pool_files)")
  return target_files, pool_files


def split_request_for(cfg, root: pathlib.Path, folder: str) -> dict:
  target_files, pool_files = input_files(cfg, folder)
  known = known_fingerprints(root / "data" / "split.json")
  return split_request(Split.from_config(cfg.pipeline), target_files, pool_files, known)


def split_data(cfg, root: pathlib.Path, folder: str) -> dict:
  """Target documents split by work into finetune / held-out / pool parts, pool files (optionally sampled)."""
  target_files, pool_files = input_files(cfg, folder)
  request = split_request_for(cfg, root, folder)
  out = root / "data"
  if _marker_matches(out / "split.json", request):
    return part_paths(out, target_files, pool_files)
  if (out / "split.json").exists():
    saved = formats.read_json(out / "split.json").get("request") or {}
    raise errors.DataError(f"{out / 'split.json'} was made from other inputs or settings (differs in: "
                           f"{', '.join(lineage.differences(saved, lineage.normalized(request)))}); use a new "
                           "--config.workdir, or --config.pipeline.on_stale=redo (nothing was overwritten)")
  split_target(Split.from_config(cfg.pipeline), target_files, pool_files, out, request)
  return part_paths(out, target_files, pool_files)


def tokenizer_request(cfg, split_req: dict) -> dict:
  return {"vocab": cfg.pipeline.tokenizer_vocab, "split": lineage.content_id(split_req)}


def tokenizer_path(cfg, root: pathlib.Path, parts: dict, split_req: dict) -> pathlib.Path:
  """The configured tokenizer, or a byte-level BPE trained on the pool text (CPU-sized presets)."""
  if cfg.pipeline.tokenizer:
    return pathlib.Path(cfg.pipeline.tokenizer)
  path = root / "data" / "tokenizer.json"
  marker = root / "data" / "tokenizer.request.json"
  request = tokenizer_request(cfg, split_req)
  if not (_marker_matches(marker, request) and path.exists()):
    synthetic.train_tokenizer(parts["pool"], path, vocab_size=cfg.pipeline.tokenizer_vocab)
    marker.write_text(json.dumps({"request": request}))
  return path


def prepare_config(cfg, inputs, tokenizer, output: pathlib.Path) -> ml_collections.ConfigDict:
  pcfg = config.stage_config(cfg, "prepare")
  pcfg.prepare.inputs = tuple(str(p) for p in inputs)
  pcfg.prepare.tokenizer = str(tokenizer)
  pcfg.prepare.output = str(output)
  pcfg.prepare.seq_len = cfg.pipeline.seq_len
  return pcfg


def default_corpus() -> str:
  found = stores.shared_dir("corpus")
  if found is None:
    raise errors.DataError("no corpus folder: set --config.pipeline.data_dir (or $COLORJAX_DATA with a corpus/ "
                           "folder)")
  return found
