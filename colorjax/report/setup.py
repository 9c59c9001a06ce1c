"""The report's setup section: what the target, held-out and pool data are, the models, and what target_loss
measures, from whatever of pipeline.json's config, data/split.json and the manifests a work directory still holds.
Also where a work directory keeps what the report reads (`at`, `load`, `run_dir`), for report.py and this module.
"""
import dataclasses
import json
import pathlib

from colorjax import errors
from colorjax.artifacts import formats
from colorjax.data import text_files
from colorjax.model import transformer
from colorjax.report import markdown


def at(root: pathlib.Path, path) -> pathlib.Path | None:
  """A pipeline.json path: relative to the work directory so the directory can move (absolute ones stay)."""
  return (root / path).resolve() if path else None


def load(path) -> dict:
  """A JSON file, or {} when absent: older work directories lack some of the report's inputs."""
  return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def shown(path, root: pathlib.Path) -> str:
  """A path as the report prints it: relative to the work directory when inside it."""
  path = pathlib.Path(path)
  return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def run_dir(root: pathlib.Path, run: dict) -> pathlib.Path:
  return at(root, run.get("workdir")) or root / "runs" / run["name"]


# ----------------------------------------------------------------------------------------------------------------
# Setup


def _source_of(entry: dict, labels: list) -> str:
  label = entry.get("label")
  return labels[label] if isinstance(label, int) and label < len(labels) else pathlib.Path(entry.get("path", "?")).name


def store_summary(manifest: dict, path, root: pathlib.Path) -> dict:
  """Size and per-source make-up of a token store from its manifest ({} without one)."""
  if not manifest:
    return {}
  seq_len = int(manifest["seq_len"])
  files = manifest.get("files", [])
  sources: dict = {}
  for entry in files:
    s = sources.setdefault(_source_of(entry, manifest.get("labels") or []), {"documents": 0, "sequences": 0,
                                                                             "tokens": 0})
    s["documents"] += entry.get("documents", 0)
    s["sequences"] += entry.get("sequences", 0)
    s["tokens"] += entry.get("sequences", 0) * seq_len
  tokenizer = manifest.get("tokenizer", {})
  return {"path": shown(path, root), "sequences": manifest.get("num_sequences"),
          "tokens": manifest.get("num_tokens"), "seq_len": seq_len,
          "documents": manifest.get("num_documents", sum(e.get("documents", 0) for e in files)),
          "files": [shown(e["path"], root) for e in files if "path" in e], "sources": sources,
          "tokenizer": {"name": pathlib.Path(tokenizer.get("name", "")).name,
                        "vocab_size": tokenizer.get("vocab_size")}}


def _tasks_eval_dir(pipeline_record: dict, root: pathlib.Path) -> pathlib.Path:
  """Where the conditional's stage wrote the task validation rows the targets are scored on (target=tasks)."""
  conditional = at(root, pipeline_record.get("conditional"))
  return (conditional.parent if conditional else root / "runs" / "conditional") / "sft_eval"


def stores_summary(pipeline_record: dict, root: pathlib.Path) -> dict:
  paths = {name: at(root, path) for name, path in (pipeline_record.get("stores") or {}).items() if path}
  if pipeline_record.get("target") == "tasks":
    paths["tasks_eval"] = _tasks_eval_dir(pipeline_record, root)
  out = {name: store_summary(load(path / formats.MANIFEST), path, root) for name, path in paths.items()}
  return {name: s for name, s in out.items() if s}


def _names(entries: list, root: pathlib.Path) -> list[str]:
  """Input files as split.json records them: [name, sha256] pairs (older: [path, sha256], or bare paths)."""
  return [shown(e[0] if isinstance(e, list) else e, root) for e in entries]


def _works(split: dict, part: str, documents, one_per_document: bool) -> int | None:
  """Works in a part: split.json's list (or its count, when there were too many to list), else the documents when
  each document is its own work."""
  recorded = (split.get("works") or {}).get(part)
  if recorded is not None:
    return recorded if isinstance(recorded, int) else len(recorded)
  return documents if one_per_document else None


def _target_parts(split: dict, stores: dict, files: list, one_per_document: bool) -> dict:
  """Works, documents, sequences and tokens of each part of the target files (pool: the target's share of it)."""
  documents = split.get("documents", {})
  parts = {part: {"works": _works(split, part, documents.get(part), one_per_document),
                  "documents": documents.get(part), "sequences": stores.get(part, {}).get("sequences"),
                  "tokens": stores.get(part, {}).get("tokens")} for part in ("target_train", "target_eval")}
  labels = {text_files.source_label(pathlib.Path(f)) for f in files}
  in_pool = [v for k, v in stores.get("pool", {}).get("sources", {}).items() if k in labels]
  pool_docs = sum(n for k, n in documents["pool"].items() if k in labels) if documents.get("pool") else None
  parts["pool"] = {"works": _works(split, "pool", pool_docs, one_per_document), "documents": pool_docs,
                   "sequences": sum(s["sequences"] for s in in_pool) if in_pool else None,
                   "tokens": sum(s["tokens"] for s in in_pool) if in_pool else None}
  unused = _works(split, "unused", None, False)
  if unused:
    parts["unused"] = {"works": unused, "documents": None, "sequences": None, "tokens": None}
  return parts


def target_summary(pipeline_record: dict, root: pathlib.Path, config: dict, split: dict, stores: dict) -> dict:
  """The target: its files and how their works were split (target=text), or the task suite (target=tasks)."""
  pcfg = config.get("pipeline", {})
  if pipeline_record.get("target") == "tasks":
    return {"kind": "tasks", "finetune_tasks": list(pcfg.get("tasks", [])),
            "eval_tasks": list(config.get("eval", {}).get("tasks", [])),
            "heldout_split": config.get("sft", {}).get("eval_split", "validation")}
  request = split.get("request", {})
  files = _names(request.get("target_files", []), root) or list(pcfg.get("target_files", []))
  field = request.get("group_field", pcfg.get("group_field")) or ""
  regex = request.get("group_regex", pcfg.get("group_regex"))
  held_out = (split.get("works") or {}).get("target_eval")
  return {"kind": "text", "files": files, "data_dir": pcfg.get("data_dir") or None,
          "fractions": request.get("fractions", pcfg.get("target_split")), "group_field": field,
          "group_regex": regex, "parts": _target_parts(split, stores, files, not field and regex == ""),
          "heldout_works": held_out if isinstance(held_out, list) else None}


def pool_summary(root: pathlib.Path, config: dict, split: dict) -> dict:
  """The pool's input files and document counts per source (split.json), as sampled and deduplicated."""
  request = split.get("request", {})
  files = _names(request.get("target_files", []) + request.get("pool_files", []), root)
  return {"files": files or list(config.get("pipeline", {}).get("pool_files", [])),
          "documents": split.get("documents", {}).get("pool"),
          "duplicates_dropped": split.get("pool_duplicates_dropped"),
          "max_chars_per_file": request.get("max_chars_per_file")}


def model_info(spec_fields: dict | None) -> dict | None:
  """Architecture and parameter counts from ModelSpec fields (a params manifest's model_spec, or a config's model)."""
  names = {f.name for f in dataclasses.fields(transformer.ModelSpec)}
  try:
    spec = transformer.ModelSpec(**{k: v for k, v in (spec_fields or {}).items() if k in names})
  except (TypeError, errors.ConfigError):
    return None
  counts = transformer.param_counts(spec)
  return {"d_model": spec.d_model, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
          "mlp_hidden": spec.mlp_hidden, "vocab_size": spec.vocab_size, "params_total": counts["total"],
          "params_non_embedding": counts["non_embedding"]}


def _params_manifest(root: pathlib.Path, params) -> dict:
  return load(at(root, params) / formats.MANIFEST) if params else {}


def _first_target_manifest(pipeline_record: dict, root: pathlib.Path) -> dict:
  for r in pipeline_record.get("runs", []):
    manifest = load(run_dir(root, r) / "params" / formats.MANIFEST)
    if manifest:
      return manifest
  return {}


def models_summary(pipeline_record: dict, root: pathlib.Path, config: dict, target_manifest: dict) -> dict:
  """Prior, conditional (the prior's architecture, finetuned) and target models: sizes and training tokens."""
  prior_model = config.get("prior", {}).get("model")
  sources = {"prior": (_params_manifest(root, pipeline_record.get("prior")), prior_model),
             "conditional": (_params_manifest(root, pipeline_record.get("conditional")), prior_model),
             "target": (target_manifest, config.get("target", {}).get("model"))}
  out = {}
  for name, (manifest, fallback) in sources.items():
    info = model_info(manifest.get("model_spec") or fallback)
    if info is not None:
      if name != "target":
        info.update(tokens=manifest.get("tokens"), steps=manifest.get("steps"))
      out[name] = info
  return out


def _eval_sample(config: dict) -> str:
  """Which sequences of the held-out store a held-out eval reads (train.eval_batches, eval.shuffle)."""
  batches = config.get("train", {}).get("eval_batches", 0)
  if not batches:
    return "every sequence"
  ecfg, tcfg = config.get("eval", {}), config.get("train", {})
  size = ecfg.get("batch_size") or tcfg.get("micro_batch_size") or tcfg.get("global_batch_size")
  order = "a fixed random sample" if ecfg.get("shuffle") else "the first sequences in id order"
  return f"{batches} batches of about {size} sequences ({order}, the same for every run)"


def target_loss_text(loss_name: str | None, stores: dict, run_config: dict) -> str:
  """What the target_loss column measures, with the store it is computed on."""
  tasks = bool(loss_name and loss_name.startswith("tasks_"))
  store = stores.get("tasks_eval" if tasks else "target_eval", {})
  where = (f"`{store['path']}`: {markdown.count(store['sequences'])} sequences of {store['seq_len']} tokens"
           if store else "the held-out store")
  what = "the task validation rows" if tasks else "the held-out target documents"
  padding = (" (padding included, sft.loss_on_padding)" if run_config.get("sft", {}).get("loss_on_padding")
             else " (padding excluded)") if tasks else ""
  return (f"`{loss_name or 'target_loss'}` is the mean over the sequences of {what} ({where}) of each sequence's "
          f"mean next-token negative log-likelihood{padding}, in nats, computed in fp32 without z-loss at the "
          f"store's sequence length, after the run's last step; read over {_eval_sample(run_config)}.")


def setup(pipeline_record: dict, root: pathlib.Path, rows: list[dict], efficiency_method: str) -> dict:
  """What the report is about, from whatever of pipeline.json's config, split.json and the manifests exists."""
  config = pipeline_record.get("config") or {}
  split = load(at(root, pipeline_record.get("split")) or root / "data" / "split.json")
  stores = stores_summary(pipeline_record, root)
  target_manifest = _first_target_manifest(pipeline_record, root)
  run_config = target_manifest.get("config") or {"train": config.get("target", {}).get("train", {}),
                                                 "eval": config.get("eval", {}), "sft": config.get("sft", {})}
  loss_name = next((r["loss_name"] for r in rows if r["loss_name"]), None)
  return {"target": target_summary(pipeline_record, root, config, split, stores),
          "pool": pool_summary(root, config, split),
          "stores": stores, "models": models_summary(pipeline_record, root, config, target_manifest),
          "target_loss": target_loss_text(loss_name, stores, run_config),
          "prior_data": load(root / "pools" / "prior" / "manifest.json") or None,  # fixed n: where the prior drew
          "data_efficiency_method": efficiency_method}
