"""The `report` stage: report.md + report.json + plots for a pipeline work directory. This module reads the work
directory and computes the result (report.json); report_markdown.py renders it as report.md and report_plots.py
draws the plots.

Reads `pipeline.json` (the runs; its paths are relative to the work directory, absolute in older ones), each run's
metrics.jsonl and params manifest, data/split.json, the token stores', selections' and prior/conditional manifests
and the scores. Everything but pipeline.json may be missing (older or partial work directories): the report then
leaves that part out. report.json:
  {"preset", "target",
   "setup": {"target", "pool", "stores", "models", "target_loss", "data_efficiency_method"},
   "runs": [{"name", "method", "tau", "seed", "role", "train_tokens", "finished", "target_loss", "loss_name",
             "tasks": {task: acc}, "tasks_mean", "curve": [[tokens, loss], ...], "schedule"}],
   "summary": [{"method", "tau", "seeds", "train_tokens", "compute_mean", "target_loss_mean", "target_loss_std",
                "tasks_mean"}],
   "compute": {shared step: FLOPs} (each run also gets "compute": {"train", "selection_forward", "shared", "total"}),
   "data_efficiency": {"tau<τ>": {"color_tokens", "color_loss", "random_points", "random_tokens_to_match", "ratio",
                                  "bound", "curve_tokens_to_match", "curve_ratio", "curve_lower_bound"}},
   "selections": {...}, "examples": {...}, "plots": [...]}
"""
import dataclasses
import json
import math
import pathlib

import numpy as np

from colorjax import data
from colorjax import errors
from colorjax import losses
from colorjax import metrics
from colorjax import model
from colorjax import report_compute
from colorjax import report_markdown
from colorjax import report_plots
from colorjax import score as score_lib
from colorjax import select as select_lib
from colorjax import text_files
from colorjax import tokenizer as tokenizer_lib

EFFICIENCY_METHOD = (
    "Every finished random run (the random comparison run at each τ, and the curve run over 1/curve_tau of the "
    "pool) gives one point (training tokens, final held-out loss), averaged over seeds per budget. The tokens at "
    "which random reaches CoLoR's mean final loss are interpolated between adjacent budgets with the loss linear in "
    "log(tokens); ratio = those tokens / CoLoR's tokens. When CoLoR's loss is below every random point the ratio is "
    "a lower bound (\">\": largest random budget / CoLoR's tokens); when even the smallest random budget does "
    "better, an upper bound (\"<\": smallest budget / CoLoR's tokens). The secondary figure reads the same off the "
    "curve runs' learning curve (linear between eval points) while they are still mid-schedule (learning rate not "
    "annealed), so it understates the ratio.")


def _at(root: pathlib.Path, path) -> pathlib.Path | None:
  """A pipeline.json path: relative to the work directory so the directory can move (absolute ones stay)."""
  return (root / path).resolve() if path else None


def _load(path) -> dict:
  """A JSON file, or {} when absent: older work directories lack some of the report's inputs."""
  return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _shown(path, root: pathlib.Path) -> str:
  """A path as the report prints it: relative to the work directory when inside it."""
  path = pathlib.Path(path)
  return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


# ----------------------------------------------------------------------------------------------------------------
# Runs


def _final_eval(records: list[dict]) -> dict:
  evals = [r for r in records if r.get("event") == "eval"]
  return evals[-1] if evals else {}


def _loss_key(record: dict) -> str | None:
  keys = [k for k in record if k.startswith("eval/") and k.endswith("_loss")]
  for prefix in ("eval/target", "eval/tasks_"):
    for key in keys:
      if key.startswith(prefix):
        return key
  return keys[0] if keys else None


def _run_dir(root: pathlib.Path, run: dict) -> pathlib.Path:
  return _at(root, run.get("workdir")) or root / "runs" / run["name"]


def collect_runs(plan: dict, root: pathlib.Path) -> list[dict]:
  rows = []
  for r in plan["runs"]:
    workdir = _run_dir(root, r)
    records = metrics.read_metrics(workdir)
    final = _final_eval(records)
    key = _loss_key(final)
    manifest = _load(workdir / "params" / data.MANIFEST)
    tasks = {k[len("eval/mc/"):]: v for k, v in final.items() if k.startswith("eval/mc/") and k != "eval/mc/mean"}
    start = next((x for x in records if x.get("event") == "start"), {})
    tokens_per_step = (start.get("tokens_planned", 0) / start["total_steps"]) if start.get("total_steps") else 0
    curve = [[x["step"] * tokens_per_step, x[key]] for x in records if x.get("event") == "eval" and key in x]
    rows.append({
        "name": r["name"], "method": r["method"], "tau": r["tau"], "seed": r["seed"], "role": r["role"],
        "train_tokens": manifest.get("tokens"), "finished": bool(manifest), "target_loss": final.get(key),
        "loss_name": key[len("eval/"):] if key else None, "tasks": tasks,
        "tasks_mean": final.get("eval/mc/mean"), "curve": curve, "schedule": manifest.get("schedule"),
    })
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  """Mean and sample std (None for one seed: no spread to report) over seeds of each (method, τ) comparison."""
  groups: dict = {}
  for r in rows:
    if r["role"] == "compare" and r["target_loss"] is not None:
      groups.setdefault((r["method"], r["tau"]), []).append(r)
  out = []
  for (method, tau), members in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
    losses = np.array([m["target_loss"] for m in members])
    means = [m["tasks_mean"] for m in members if m["tasks_mean"] is not None]
    totals = [m["compute"]["total"] for m in members if (m.get("compute") or {}).get("total") is not None]
    out.append({"method": method, "tau": tau, "seeds": len(members), "train_tokens": members[0]["train_tokens"],
                "compute_mean": float(np.mean(totals)) if len(totals) == len(members) else None,
                "target_loss_mean": float(losses.mean()),
                "target_loss_std": float(losses.std(ddof=1)) if len(members) > 1 else None,
                "tasks_mean": float(np.mean(means)) if means else None})
  return out


# ----------------------------------------------------------------------------------------------------------------
# Data efficiency


def tokens_to_reach(curve: list, loss: float):
  """First token count at which a (tokens, loss) curve reaches `loss` (linear interpolation), or None."""
  if curve and curve[0][1] <= loss:
    return curve[0][0]
  for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
    if l1 <= loss:
      return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)
  return None


def random_points(rows: list[dict]) -> list[list]:
  """[tokens, final held-out loss] of the finished random runs, averaged over seeds per budget, by tokens."""
  budgets: dict = {}
  for r in rows:
    if r["method"] == "random" and r["finished"] and r["train_tokens"] and r["target_loss"] is not None:
      budgets.setdefault(r["train_tokens"], []).append(r["target_loss"])
  return [[tokens, float(np.mean(losses))] for tokens, losses in sorted(budgets.items())]


def random_tokens_to_match(points: list, loss: float) -> tuple:
  """(tokens, bound): where random's (tokens, loss) points, sorted by tokens, reach `loss`, with the loss linear in
  log(tokens) between adjacent budgets (finished runs at a few budgets, so log spacing is the natural scale).

  bound None: an interpolated match. "lower": `loss` is below every point, random needs more than its largest
  budget (returned). "upper": the smallest budget (returned) already does better. (None, None) without points.
  """
  if not points:
    return None, None
  if points[0][1] <= loss:
    return points[0][0], ("upper" if points[0][1] < loss else None)
  for (t0, l0), (t1, l1) in zip(points, points[1:]):
    if l1 <= loss:
      frac = (l0 - loss) / (l0 - l1)
      return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))), None
  return points[-1][0], "lower"


def mean_curve(rows: list[dict]) -> list[list]:
  """The curve runs' learning curves averaged over seeds (eval points aligned by index)."""
  curves = [r["curve"] for r in rows if r["role"] == "curve" and len(r["curve"]) > 1]
  if not curves:
    return []
  length = min(len(c) for c in curves)
  return [[curves[0][i][0], float(np.mean([c[i][1] for c in curves]))] for i in range(length)]


def _ratio(tokens, color_tokens):
  return tokens / color_tokens if tokens is not None and color_tokens else None


def data_efficiency(rows: list[dict], summary: list[dict]) -> dict:
  """Per τ: random tokens to reach CoLoR's final loss over CoLoR's tokens, from finished runs (primary) and from
  the mid-schedule learning curve (secondary, understates); see EFFICIENCY_METHOD."""
  points, curve = random_points(rows), mean_curve(rows)
  if not points and not curve:
    return {}
  out = {}
  for s in summary:
    if s["method"] != "color":
      continue
    tokens, loss = s["train_tokens"], s["target_loss_mean"]
    match, bound = random_tokens_to_match(points, loss)
    reach = tokens_to_reach(curve, loss) if curve else None
    out[f"tau{s['tau']:g}"] = {
        "color_tokens": tokens, "color_loss": loss, "random_points": points,
        "random_tokens_to_match": match, "ratio": _ratio(match, tokens), "bound": bound,
        "curve_tokens_to_match": reach,
        "curve_ratio": _ratio(reach if reach is not None else curve[-1][0], tokens) if curve else None,
        "curve_lower_bound": (reach is None) if curve else None,
    }
  return out


# ----------------------------------------------------------------------------------------------------------------
# Setup: what the target, held-out and pool data are, the models, and what target_loss measures


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
  return {"path": _shown(path, root), "sequences": manifest.get("num_sequences"),
          "tokens": manifest.get("num_tokens"), "seq_len": seq_len,
          "documents": manifest.get("num_documents", sum(e.get("documents", 0) for e in files)),
          "files": [_shown(e["path"], root) for e in files if "path" in e], "sources": sources,
          "tokenizer": {"name": pathlib.Path(tokenizer.get("name", "")).name,
                        "vocab_size": tokenizer.get("vocab_size")}}


def _tasks_eval_dir(plan: dict, root: pathlib.Path) -> pathlib.Path:
  """Where the conditional's stage wrote the task validation rows the targets are scored on (target=tasks)."""
  conditional = _at(root, plan.get("conditional"))
  return (conditional.parent if conditional else root / "runs" / "conditional") / "sft_eval"


def stores_summary(plan: dict, root: pathlib.Path) -> dict:
  paths = {name: _at(root, path) for name, path in (plan.get("stores") or {}).items() if path}
  if plan.get("target") == "tasks":
    paths["tasks_eval"] = _tasks_eval_dir(plan, root)
  out = {name: store_summary(_load(path / data.MANIFEST), path, root) for name, path in paths.items()}
  return {name: s for name, s in out.items() if s}


def _names(entries: list, root: pathlib.Path) -> list[str]:
  """Input files as split.json records them: [name, sha256] pairs (older: [path, sha256], or bare paths)."""
  return [_shown(e[0] if isinstance(e, list) else e, root) for e in entries]


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


def target_summary(plan: dict, root: pathlib.Path, config: dict, split: dict, stores: dict) -> dict:
  """The target: its files and how their works were split (target=text), or the task suite (target=tasks)."""
  pcfg = config.get("pipeline", {})
  if plan.get("target") == "tasks":
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
  names = {f.name for f in dataclasses.fields(model.ModelSpec)}
  try:
    spec = model.ModelSpec(**{k: v for k, v in (spec_fields or {}).items() if k in names})
  except (TypeError, errors.ConfigError):
    return None
  counts = model.param_counts(spec)
  return {"d_model": spec.d_model, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
          "mlp_hidden": spec.mlp_hidden, "vocab_size": spec.vocab_size, "params_total": counts["total"],
          "params_non_embedding": counts["non_embedding"]}


def _params_manifest(root: pathlib.Path, params) -> dict:
  return _load(_at(root, params) / data.MANIFEST) if params else {}


def _first_target_manifest(plan: dict, root: pathlib.Path) -> dict:
  for r in plan.get("runs", []):
    manifest = _load(_run_dir(root, r) / "params" / data.MANIFEST)
    if manifest:
      return manifest
  return {}


def models_summary(plan: dict, root: pathlib.Path, config: dict, target_manifest: dict) -> dict:
  """Prior, conditional (the prior's architecture, finetuned) and target models: sizes and training tokens."""
  prior_model = config.get("prior", {}).get("model")
  sources = {"prior": (_params_manifest(root, plan.get("prior")), prior_model),
             "conditional": (_params_manifest(root, plan.get("conditional")), prior_model),
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
  where = (f"`{store['path']}`: {report_markdown.count(store['sequences'])} sequences of {store['seq_len']} tokens"
           if store else "the held-out store")
  what = "the task validation rows" if tasks else "the held-out target documents"
  padding = (" (padding included, sft.loss_on_padding)" if run_config.get("sft", {}).get("loss_on_padding")
             else " (padding excluded)") if tasks else ""
  return (f"`{loss_name or 'target_loss'}` is the mean over the sequences of {what} ({where}) of each sequence's "
          f"mean next-token negative log-likelihood{padding}, in nats, computed in fp32 without z-loss at the "
          f"store's sequence length, after the run's last step; read over {_eval_sample(run_config)}.")


def setup(plan: dict, root: pathlib.Path, rows: list[dict]) -> dict:
  """What the report is about, from whatever of pipeline.json's config, split.json and the manifests exists."""
  config = plan.get("config") or {}
  split = _load(_at(root, plan.get("split")) or root / "data" / "split.json")
  stores = stores_summary(plan, root)
  target_manifest = _first_target_manifest(plan, root)
  run_config = target_manifest.get("config") or {"train": config.get("target", {}).get("train", {}),
                                                 "eval": config.get("eval", {}), "sft": config.get("sft", {})}
  loss_name = next((r["loss_name"] for r in rows if r["loss_name"]), None)
  return {"target": target_summary(plan, root, config, split, stores), "pool": pool_summary(root, config, split),
          "stores": stores, "models": models_summary(plan, root, config, target_manifest),
          "target_loss": target_loss_text(loss_name, stores, run_config),
          "data_efficiency_method": EFFICIENCY_METHOD}


# ----------------------------------------------------------------------------------------------------------------
# Selections, examples


def selection_diagnostics(root: pathlib.Path) -> dict:
  out = {}
  for folder in sorted((root / "selections").glob("*")):
    if (folder / data.MANIFEST).exists():
      m = json.loads((folder / data.MANIFEST).read_text())
      out[folder.name] = {"method": m["method"], "tau": m["tau"], "k": m["k"], "threshold": m["threshold"],
                          "sources": m["sources"], "score_stats": m.get("score_stats")}
  return out


class _Negated:
  def __init__(self, stream):
    self.stream = stream

  def __iter__(self):
    for start, values in self.stream:
      yield start, -values


def examples(plan: dict, root: pathlib.Path, k: int = 3, chars: int = 240) -> dict:
  """Highest and lowest CoLoR-scored sequences of the pool, decoded ({} when the scores or the pool are gone)."""
  scores_path, pool_path = _at(root, plan.get("scores")), _at(root, (plan.get("stores") or {}).get("pool"))
  if not all(p is not None and (p / data.MANIFEST).is_file() for p in (scores_path, pool_path)):
    return {}
  scores = score_lib.Scores(scores_path)
  store = data.TokenStore(pool_path)
  tokenizer = tokenizer_lib.load_tokenizer(str(store.tokenizer_path()))
  stream = select_lib.ScoreStream(scores, "color", "conditional_0", 1 << 20)
  out = {}
  for name, source in (("top", stream), ("bottom", _Negated(stream))):
    ids, _ = select_lib.top_k(source, min(k, scores.num_sequences))
    rows = scores.nll.oindex[ids].read().result()
    values = losses.color_score(rows[:, scores.column("prior")], rows[:, scores.column("conditional_0")])
    labels = store.labels() or ["all"]
    texts = tokenizer.decode_batch([r.tolist() for r in store.read(ids)], skip_special_tokens=False)
    out[name] = sorted([{"id": int(i), "score": float(value), "source": labels[lab],
                         "text": " ".join(t.split())[:chars]}
                        for i, value, lab, t in zip(ids, values, store.label_ids(ids), texts)],
                       key=lambda e: -e["score"] if name == "top" else e["score"])
  return out



def write(root) -> pathlib.Path:
  root = pathlib.Path(root).resolve()
  plan_path = root / "pipeline.json"
  if not plan_path.exists():
    raise data.DataError(f"{plan_path} is missing: {root} is not a pipeline work directory (run the pipeline stage)")
  plan = json.loads(plan_path.read_text())
  rows = collect_runs(plan, root)
  costs = report_compute.account(rows, plan, lambda path: _at(root, path))
  summary = summarize(rows)
  selections = selection_diagnostics(root)
  result = {"preset": plan.get("preset", "?"), "target": plan.get("target", "text"), "setup": setup(plan, root, rows),
            "runs": rows, "summary": summary, "data_efficiency": data_efficiency(rows, summary),
            "compute": costs, "selections": selections, "examples": examples(plan, root),
            "plots": report_plots.draw(rows, selections, root / "plots") + report_compute.plot(rows, root / "plots")}
  (root / "report.json").write_text(json.dumps(result, indent=1))
  (root / "report.md").write_text(report_markdown.markdown(result))
  report_markdown.print_summary(result)
  return root / "report.md"


def run(cfg):
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to a pipeline work directory")
  path = write(cfg.workdir)
  print(f"report: {path}")
  return path


def describe(cfg):
  print(f"report (dry run): would read {pathlib.Path(cfg.workdir) / 'pipeline.json'} and write report.md/json")
