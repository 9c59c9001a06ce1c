"""The `pipeline` stage: CoLoR-Filter end to end in one work directory.

prepare -> pretrain the prior -> finetune the conditional -> score the pool -> select (each τ; CoLoR, and the
random baseline per seed) -> train a target on every selection -> evaluate (in-loop, at the end of each target
run) -> report. Every step builds an ordinary stage config and calls the stage module, so any step can be run alone
with the same result; a step whose finished artifact already exists and matches its config is skipped, so a rerun
after a crash, or with an added τ, only does the missing work.

Work directory:
  data/              split.json (which documents went where), tokenizer.json (when trained), text parts
  stores/            pool, target_train, target_eval token stores
  runs/              prior, conditional, target-<method>-tau<τ>-s<seed>
  scores/            the pool's NLL under the prior and the conditional
  selections/        <method>-tau<τ>[-s<seed>]
  pipeline.json      the runs of this pipeline (what report.py reads)
  report.md, report.json, plots/
"""
import glob
import gzip
import hashlib
import json
import os
import pathlib
import re
import time

import ml_collections
import numpy as np

from colorjax import data
from colorjax import errors
from colorjax import metrics
from colorjax import prepare
from colorjax import report
from colorjax import score
from colorjax import select
from colorjax import synthetic
from colorjax import train
from configs import base


class Steps:
  """Prints what each step did and how long it took."""

  def __init__(self):
    self.start = time.time()

  def __call__(self, name: str, fn, *args, **kwargs):
    t0 = time.time()
    if metrics.is_main():
      print(f"\n=== pipeline: {name}", flush=True)
    result = fn(*args, **kwargs)
    if metrics.is_main():
      print(f"=== pipeline: {name} ({time.time() - t0:.1f}s; {time.time() - self.start:.0f}s total)", flush=True)
    return result


def stage_config(cfg, stage: str, **sections) -> ml_collections.ConfigDict:
  """A single-stage config derived from the pipeline's: shared sections copied, then the given ones."""
  out = base.get_config()
  out.stage = stage
  out.seed = cfg.seed
  out.dry_run_devices = cfg.dry_run_devices
  for name in ("mesh", "data", "eval", "sft", "score", "select"):
    out[name] = ml_collections.ConfigDict(cfg[name].to_dict())
  for name, value in sections.items():
    out[name] = ml_collections.ConfigDict(value.to_dict()) if isinstance(value, ml_collections.ConfigDict) else value
  return out


# ----------------------------------------------------------------------------------------------------------------
# Data: synthetic text (demo), the target split, pool sampling, the tokenizer


def _write_json_if_changed(path: pathlib.Path, request: dict) -> bool:
  """True if `path` already records this request (the step is done); raises if it records another."""
  request = json.loads(json.dumps(request))  # compare in JSON form (tuples become lists)
  if path.exists():
    saved = json.loads(path.read_text())
    if saved.get("request") == request:
      return True
    raise data.DataError(f"{path} was made with other settings ({_diff(saved.get('request', {}), request)}); use a "
                         "new --config.workdir, or delete the work directory's data/ and everything after it")
  return False


def _diff(a: dict, b: dict) -> str:
  keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return ", ".join(keys) or "?"


def synthesize(cfg, root: pathlib.Path) -> pathlib.Path:
  """The demo's synthetic domains as jsonl.gz files (deterministic in the seed)."""
  pcfg = cfg.pipeline
  folder = root / "data" / "synthetic"
  request = {"docs": pcfg.synthetic_docs, "seed": pcfg.synthetic_seed, "domains": sorted(synthetic.DOMAINS)}
  marker = folder / "synthetic.json"
  if _write_json_if_changed(marker, request):
    return folder
  for domain in synthetic.DOMAINS:
    synthetic.write_domain(folder / f"{domain}.jsonl.gz", domain, pcfg.synthetic_docs, seed=pcfg.synthetic_seed)
  marker.write_text(json.dumps({"request": request}))
  return folder


def _read_docs(path: pathlib.Path) -> list[dict]:
  return [{"text": text, "source": source} for text, source in prepare.iter_documents(path, "text", "source")]


def _write_docs(path: pathlib.Path, docs: list[dict]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with gzip.open(tmp, "wt", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps(doc) + "\n")
  tmp.rename(path)
  return path


def _digest(text: str) -> str:
  return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _sample_chars(docs: list[dict], budget: int, seed: int) -> list[dict]:
  """A seeded random sample of whole documents, in file order, of about `budget` characters."""
  order = sorted(range(len(docs)), key=lambda i: _digest(f"{seed}/{docs[i]['text']}"))
  chosen, total = [], 0
  for i in order:
    if total >= budget:
      break
    chosen.append(i)
    total += len(docs[i]["text"])
  return [docs[i] for i in sorted(chosen)]


def _groups(docs: list[dict], regex: str) -> list[list[int]]:
  """Consecutive documents grouped into works: a document matching `regex` starts a new group ('' = one each)."""
  if not regex:
    return [[i] for i in range(len(docs))]
  pattern = re.compile(regex)
  groups: list[list[int]] = []
  for i, doc in enumerate(docs):
    if not groups or pattern.search(doc["text"][:2000]):
      groups.append([])
    groups[-1].append(i)
  return groups


def _resolve(folder: str, patterns) -> list[pathlib.Path]:
  out = []
  for pattern in patterns:
    full = pattern if os.path.isabs(pattern) or not folder else os.path.join(folder, pattern)
    matches = sorted(glob.glob(full))
    if not matches:
      raise data.DataError(f"pipeline input {full!r} matches no file; fix --config.pipeline.data_dir or the file "
                           "lists (pipeline.target_files / pool_files)")
    out += [pathlib.Path(m).resolve() for m in matches]
  return list(dict.fromkeys(out))


def split_data(cfg, root: pathlib.Path, data_dir: str) -> dict:
  """Target documents split by work into finetune / held-out eval / pool parts; pool files (optionally sampled).

  Finetune, eval and pool are disjoint at the document level: any pool document whose text equals a finetune or
  eval document is dropped from the pool (and counted in split.json).
  """
  pcfg = cfg.pipeline
  target_files = _resolve(data_dir, pcfg.target_files)
  pool_files = [f for f in _resolve(data_dir, pcfg.pool_files) if f not in target_files]
  out = root / "data"
  marker = out / "split.json"
  request = {"target_files": [(str(f), prepare.file_sha256(f)) for f in target_files],
             "pool_files": [str(f) for f in pool_files], "fractions": list(pcfg.target_split),
             "group_regex": pcfg.group_regex, "max_chars_per_file": pcfg.max_chars_per_file,
             "split_seed": pcfg.split_seed}
  parts = {"target_train": [out / "target_train.jsonl.gz"], "target_eval": [out / "target_eval.jsonl.gz"],
           "pool": [out / "pool" / f"{prepare.source_label(f)}.jsonl.gz" for f in target_files + pool_files]}
  if _write_json_if_changed(marker, request):
    return parts

  rng = np.random.default_rng(pcfg.split_seed)
  finetune, held_out, pool_by_file = [], [], {}
  frac_train, frac_eval = pcfg.target_split
  for path in target_files:
    docs = _read_docs(path)
    groups = _groups(docs, pcfg.group_regex)
    order = rng.permutation(len(groups))
    n_train = int(round(frac_train * len(groups)))
    n_eval = max(1, int(round(frac_eval * len(groups))))
    assignment = {}
    for rank, g in enumerate(order):
      assignment[g] = "train" if rank < n_train else "eval" if rank < n_train + n_eval else "pool"
    for g, members in enumerate(groups):
      chosen = {"train": finetune, "eval": held_out, "pool": pool_by_file.setdefault(path, [])}[assignment[g]]
      chosen += [docs[i] for i in members]
  for path in pool_files:
    pool_by_file[path] = _read_docs(path)

  held = {_digest(d["text"]) for d in finetune}
  held_out = [d for d in held_out if _digest(d["text"]) not in held]
  held |= {_digest(d["text"]) for d in held_out}
  counts, dropped = {}, 0
  for path in target_files + pool_files:
    docs = pool_by_file.get(path, [])
    kept = [d for d in docs if _digest(d["text"]) not in held]
    dropped += len(docs) - len(kept)
    if pcfg.max_chars_per_file:
      kept = _sample_chars(kept, pcfg.max_chars_per_file, pcfg.split_seed)
    _write_docs(out / "pool" / f"{prepare.source_label(path)}.jsonl.gz", kept)
    counts[prepare.source_label(path)] = len(kept)
  _write_docs(parts["target_train"][0], finetune)
  _write_docs(parts["target_eval"][0], held_out)
  summary = {"request": request, "documents": {"target_train": len(finetune), "target_eval": len(held_out),
                                               "pool": counts},
             "pool_duplicates_dropped": dropped}
  marker.write_text(json.dumps(summary, indent=1))
  print(f"split: target finetune {len(finetune)} docs, held-out {len(held_out)} docs; pool {sum(counts.values())} "
        f"docs ({dropped} duplicates of target documents dropped)")
  return parts


def tokenizer_path(cfg, root: pathlib.Path, parts: dict) -> pathlib.Path:
  """The configured tokenizer, or a byte-level BPE trained on the pool text (CPU-sized presets)."""
  if cfg.pipeline.tokenizer:
    return pathlib.Path(cfg.pipeline.tokenizer)
  path = root / "data" / "tokenizer.json"
  request = {"vocab": cfg.pipeline.tokenizer_vocab, "files": [str(p) for p in parts["pool"]]}
  if not _write_json_if_changed(root / "data" / "tokenizer.request.json", request):
    synthetic.train_tokenizer(parts["pool"], path, vocab_size=cfg.pipeline.tokenizer_vocab)
    (root / "data" / "tokenizer.request.json").write_text(json.dumps({"request": request}))
  return path


def prepare_store(cfg, inputs, tokenizer, output: pathlib.Path) -> pathlib.Path:
  pcfg = stage_config(cfg, "prepare")
  pcfg.prepare.inputs = tuple(str(p) for p in inputs)
  pcfg.prepare.tokenizer = str(tokenizer)
  pcfg.prepare.output = str(output)
  pcfg.prepare.seq_len = cfg.pipeline.seq_len
  return metrics.on_main_then_sync(lambda: prepare.run(pcfg), f"prepare {output}") or output


# ----------------------------------------------------------------------------------------------------------------
# The plan


def target_runs(cfg) -> list[dict]:
  """Every selection and target run: (method, τ, seed) -> names; the random-curve runs last."""
  pcfg = cfg.pipeline
  runs = []
  for tau in pcfg.taus:
    for seed in pcfg.seeds:
      for method in pcfg.methods:
        selection = f"{method}-tau{tau:g}" + (f"-s{seed}" if method == "random" else "")
        runs.append({"name": f"target-{method}-tau{tau:g}-s{seed}", "method": method, "tau": float(tau),
                     "seed": int(seed), "selection": selection, "role": "compare"})
  if pcfg.curve_tau:
    for seed in pcfg.seeds:
      runs.append({"name": f"target-random-tau{pcfg.curve_tau:g}-s{seed}", "method": "random",
                   "tau": float(pcfg.curve_tau), "seed": int(seed),
                   "selection": f"random-tau{pcfg.curve_tau:g}-s{seed}", "role": "curve"})
  return runs


def _train(cfg, section, stage: str, workdir: pathlib.Path, store, eval_stores, seed=None, **data_kw):
  tcfg = stage_config(cfg, stage, model=section.model if "model" in section else cfg.prior.model, train=section.train)
  tcfg.workdir = str(workdir)
  tcfg.data.train_store = str(store) if store else ""
  tcfg.data.eval_stores = tuple(f"{k}={v}" for k, v in eval_stores.items())
  tcfg.train.resume = True
  if seed is not None:
    tcfg.seed = seed
  for key, value in data_kw.items():
    tcfg.data[key] = value
  return tcfg


def run(cfg):
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the pipeline's work directory")
  root = pathlib.Path(cfg.workdir).resolve()
  root.mkdir(parents=True, exist_ok=True)
  pcfg = cfg.pipeline
  step = Steps()
  tasks_target = pcfg.target == "tasks"
  if tasks_target:
    _default_task_dirs(cfg)

  # 1. data and token stores
  if pcfg.pool_store:
    stores = {"pool": pathlib.Path(pcfg.pool_store)}
    if not tasks_target:
      stores["target_train"] = pathlib.Path(pcfg.target_train_store)
      stores["target_eval"] = pathlib.Path(pcfg.target_eval_store)
  else:
    data_dir = str(synthesize(cfg, root)) if pcfg.synthetic_docs else pcfg.data_dir or _default_corpus()
    parts = metrics.on_main_then_sync(lambda: step("split data", split_data, cfg, root, data_dir), "split")
    parts = parts or split_data(cfg, root, data_dir)
    tokenizer = metrics.on_main_then_sync(lambda: tokenizer_path(cfg, root, parts), "tokenizer")
    tokenizer = tokenizer or root / "data" / "tokenizer.json"
    names = ("pool",) if tasks_target else ("pool", "target_train", "target_eval")
    stores = {name: step(f"prepare {name}", prepare_store, cfg, parts[name], tokenizer, root / "stores" / name)
              for name in names}
  target_evals = {} if tasks_target else {"target": stores["target_eval"]}

  # 2. prior and conditional
  prior_cfg = _train(cfg, cfg.prior, "pretrain", root / "runs" / "prior", stores["pool"], target_evals)
  prior = step("pretrain prior", train.run, prior_cfg)
  cond_cfg = _train(cfg, cfg.conditional, "finetune", root / "runs" / "conditional",
                    None if tasks_target else stores["target_train"], target_evals)
  cond_cfg.train.init_from = str(prior)
  if tasks_target:
    cond_cfg.sft.tasks = tuple(pcfg.tasks)
  conditional = step("finetune conditional", train.run, cond_cfg)
  if tasks_target:
    target_evals = {f"tasks_{cfg.sft.eval_split}": root / "runs" / "conditional" / "sft_eval"}

  # 3. score and select
  score_cfg = stage_config(cfg, "score", model=cfg.prior.model)
  score_cfg.workdir = str(root / "scores")
  score_cfg.score.store = str(stores["pool"])
  score_cfg.score.prior = str(prior)
  score_cfg.score.conditionals = (str(conditional),)
  scores = step("score pool", score.run, score_cfg)
  runs = target_runs(cfg)
  selections = {}
  for r in runs:
    if r["selection"] in selections:
      continue
    sel_cfg = stage_config(cfg, "select")
    sel_cfg.workdir = str(root / "selections" / r["selection"])
    sel_cfg.select.scores = str(scores)
    sel_cfg.select.method = r["method"]
    sel_cfg.select.tau = r["tau"]
    sel_cfg.seed = r["seed"]
    selections[r["selection"]] = metrics.on_main_then_sync(
        lambda c=sel_cfg: step(f"select {r['selection']}", select.run, c), "select") or pathlib.Path(sel_cfg.workdir)

  # 4. targets (evaluated in-loop: held-out target loss, and the task suite when configured)
  for r in runs:
    workdir = root / "runs" / r["name"]
    _check_fresh(workdir, selections[r["selection"]])
    tcfg = _train(cfg, cfg.target, "pretrain", workdir, stores["pool"], target_evals, seed=r["seed"],
                  index=str(selections[r["selection"]]))
    if r["role"] == "curve":
      tcfg.train.eval_every = cfg.pipeline.curve_eval_every or tcfg.train.eval_every
    r["workdir"] = str(workdir)
    r["selection_dir"] = str(selections[r["selection"]])
    step(f"train {r['name']}", train.run, tcfg)

  # 5. report
  plan = {"preset": pcfg.preset, "target": pcfg.target, "runs": runs, "scores": str(scores),
          "stores": {k: str(v) for k, v in stores.items()}, "prior": str(prior), "conditional": str(conditional),
          "split": str(root / "data" / "split.json") if not pcfg.pool_store else None}
  if metrics.is_main():
    (root / "pipeline.json").write_text(json.dumps(plan, indent=1))
    path = step("report", report.write, root)
    print(f"\npipeline: done in {time.time() - step.start:.0f}s. Report: {path}")
  return root


def _check_fresh(workdir: pathlib.Path, selection: pathlib.Path):
  """A finished target run must have been trained on the selection that is there now."""
  manifest_path = workdir / "params" / data.MANIFEST
  if manifest_path.exists():
    trained_on = json.loads(manifest_path.read_text()).get("index_id")
    if trained_on != data.index_id(selection):
      raise data.DataError(f"{workdir} was trained on another version of {selection}; delete {workdir} to retrain "
                           "it on the current selection")


def _shared_data(sub: str) -> str | None:
  for candidate in (os.environ.get("COLORJAX_DATA"), "../shared/data"):
    if candidate and pathlib.Path(candidate, sub).is_dir():
      return str(pathlib.Path(candidate, sub).resolve())
  return None


def _default_corpus() -> str:
  found = _shared_data("corpus")
  if found is None:
    raise data.DataError("no corpus folder: set --config.pipeline.data_dir (or $COLORJAX_DATA with a corpus/ folder)")
  return found


def _default_task_dirs(cfg):
  """Task data from $COLORJAX_DATA/tasks or ../shared/data/tasks when not configured (else HuggingFace)."""
  found = _shared_data("tasks")
  if found:
    cfg.sft.data_dir = cfg.sft.data_dir or found
    cfg.eval.tasks_dir = cfg.eval.tasks_dir or found


def describe(cfg):
  """Dry run of every stage: step counts, tokens, FLOPs and per-device memory; nothing is read or allocated."""
  pcfg = cfg.pipeline
  n = pcfg.pool_sequences
  seq = pcfg.seq_len
  total_flops = 0.0
  print(f"pipeline {pcfg.preset} (dry run): pool of {n:,} sequences x {seq} tokens (nominal), taus "
        f"{list(pcfg.taus)}, seeds {list(pcfg.seeds)}, methods {list(pcfg.methods)}\n")
  prior_cfg = stage_config(cfg, "pretrain", model=cfg.prior.model, train=cfg.prior.train)
  total_flops += train.describe(prior_cfg, num_items=n)["total_flops"]
  print()
  cond_cfg = stage_config(cfg, "finetune", model=cfg.prior.model, train=cfg.conditional.train)
  total_flops += train.describe(cond_cfg, num_items=pcfg.target_sequences)["total_flops"]
  print()
  score_cfg = stage_config(cfg, "score", model=cfg.prior.model)
  total_flops += score.describe_nominal(score_cfg, n, seq, models=2)
  print()
  sizes = {}
  for r in target_runs(cfg):
    sizes.setdefault(r["tau"], []).append(r)
  for tau, runs in sizes.items():
    k = int(n // tau)
    print(f"select tau={tau:g}: {k:,} sequences ({k * seq:,} tokens); {len(runs)} target runs")
    tcfg = stage_config(cfg, "pretrain", model=cfg.target.model, train=cfg.target.train)
    flops = train.describe(tcfg, num_items=k)["total_flops"]
    total_flops += flops * len(runs)
    print()
  print(f"pipeline total: {total_flops:.3e} FLOPs")
