"""The `pipeline` stage: CoLoR-Filter end to end in one work directory.

prepare -> pretrain the prior -> finetune the conditional -> score the pool -> select (each τ; CoLoR, and the
random baseline per seed) -> train a target on every selection -> evaluate (in-loop, at the end of each target
run) -> report. Every step builds an ordinary stage config and calls the stage module, so any step can be run alone
with the same result.

Before any work, a preflight recomputes the request (inputs by content id, settings) every artifact of the work
directory must have been made for, from what is there now: a finished artifact that matches is reused, a missing one
is built, and stale ones (e.g. a conditional finetuned from a prior that has since been retrained) are listed all at
once and refused, or with `pipeline.on_stale=redo` moved to `stale/<time>/` and rebuilt. Every setting of every step
(batch sizes against the data and the mesh, τ against the pool) is checked once the stores exist, before training.

Work directory (paths recorded relative to it, so it can be moved or copied):
  data/              split.json (which works went where), tokenizer.json (when trained), text parts
  stores/            pool, target_train, target_eval token stores
  runs/              prior, conditional, target-<method>-tau<τ>-s<seed>
  scores/            the pool's NLL under the prior and the conditional
  selections/        <method>-tau<τ>[-s<seed>]
  pipeline.json      the runs of this pipeline (what report.py reads)
  report.md, report.json, plots/
"""
import dataclasses
import gzip
import json
import math
import pathlib
import shutil
import time

import jax
import ml_collections

from colorjax import artifacts
from colorjax import corpus
from colorjax import data
from colorjax import errors
from colorjax import metrics
from colorjax import model
from colorjax import prepare
from colorjax import report
from colorjax import score
from colorjax import select
from colorjax import sharding
from colorjax import synthetic
from colorjax import tasks as tasks_lib
from colorjax import train
from configs import base

STORE_NAMES = ("pool", "target_train", "target_eval")
ON_STALE = ("refuse", "redo")


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


def check_settings(cfg) -> None:
  """Settings that need no data: lists without repeats, known methods, τ ≥ 1, split fractions."""
  pcfg = cfg.pipeline
  for field in ("taus", "seeds", "methods"):
    values = list(pcfg[field])
    if not values:
      raise errors.ConfigError(f"pipeline.{field} is empty")
    if len(set(values)) != len(values):
      raise errors.ConfigError(f"pipeline.{field}={tuple(values)} repeats a value; give each once")
  for method in pcfg.methods:
    if method not in select.METHODS:
      raise errors.ConfigError(f"pipeline.methods has {method!r}; choose from {', '.join(select.METHODS)}")
  for tau in list(pcfg.taus) + ([pcfg.curve_tau] if pcfg.curve_tau else []):
    if not (math.isfinite(tau) and tau >= 1):
      raise errors.ConfigError(f"pipeline tau {tau}: keep the top 1/tau of the pool, so tau is a number >= 1")
  if pcfg.on_stale not in ON_STALE:
    raise errors.ConfigError(f"pipeline.on_stale={pcfg.on_stale!r}; choose {' or '.join(ON_STALE)}")
  if not pcfg.pool_store:
    corpus.Split.from_config(pcfg)
  elif pcfg.target != "tasks" and not (pcfg.target_train_store and pcfg.target_eval_store):
    raise errors.ConfigError("with pipeline.pool_store, a text target needs pipeline.target_train_store and "
                             "target_eval_store (token stores of the target's finetune and held-out text)")


# ----------------------------------------------------------------------------------------------------------------
# Data: synthetic text (demo), the target split, the tokenizer, token stores


def _marker_matches(path: pathlib.Path, request: dict) -> bool:
  return path.exists() and artifacts.read_json(path).get("request") == artifacts.normalized(request)


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
  return cfg.pipeline.data_dir or _default_corpus()


def input_files(cfg, folder: str):
  target_files = corpus.resolve_files(folder, cfg.pipeline.target_files)
  pool_files = [f for f in corpus.resolve_files(folder, cfg.pipeline.pool_files) if f not in target_files]
  return target_files, pool_files


def split_request(cfg, root: pathlib.Path, folder: str) -> dict:
  target_files, pool_files = input_files(cfg, folder)
  known = corpus.known_fingerprints(root / "data" / "split.json")
  return corpus.split_request(corpus.Split.from_config(cfg.pipeline), target_files, pool_files, known)


def split_data(cfg, root: pathlib.Path, folder: str) -> dict:
  """Target documents split by work into finetune / held-out / pool parts, pool files (optionally sampled)."""
  target_files, pool_files = input_files(cfg, folder)
  request = split_request(cfg, root, folder)
  out = root / "data"
  if _marker_matches(out / "split.json", request):
    return corpus.part_paths(out, target_files, pool_files)
  if (out / "split.json").exists():
    saved = artifacts.read_json(out / "split.json").get("request") or {}
    raise errors.DataError(f"{out / 'split.json'} was made from other inputs or settings (differs in: "
                           f"{', '.join(artifacts.differences(saved, artifacts.normalized(request)))}); use a new "
                           "--config.workdir, or --config.pipeline.on_stale=redo (nothing was overwritten)")
  corpus.split_target(corpus.Split.from_config(cfg.pipeline), target_files, pool_files, out, request)
  return corpus.part_paths(out, target_files, pool_files)


def tokenizer_request(cfg, split_req: dict) -> dict:
  return {"vocab": cfg.pipeline.tokenizer_vocab, "split": artifacts.content_id(split_req)}


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
  pcfg = stage_config(cfg, "prepare")
  pcfg.prepare.inputs = tuple(str(p) for p in inputs)
  pcfg.prepare.tokenizer = str(tokenizer)
  pcfg.prepare.output = str(output)
  pcfg.prepare.seq_len = cfg.pipeline.seq_len
  return pcfg


# ----------------------------------------------------------------------------------------------------------------
# The plan: every step's stage config


@dataclasses.dataclass
class Plan:
  stores: dict  # name -> token store path
  prior: ml_collections.ConfigDict
  conditional: ml_collections.ConfigDict
  score: ml_collections.ConfigDict
  selections: dict  # selection name -> select config
  runs: list  # target runs: dicts (name, method, tau, seed, selection, role) with "config"


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


def _train_config(cfg, section, stage: str, workdir: pathlib.Path, store, eval_stores, seed=None, **data_kw):
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


def make_plan(cfg, root: pathlib.Path) -> Plan:
  pcfg = cfg.pipeline
  tasks_target = pcfg.target == "tasks"
  if pcfg.pool_store:
    stores = {"pool": pathlib.Path(pcfg.pool_store).resolve()}
    if not tasks_target:
      stores["target_train"] = pathlib.Path(pcfg.target_train_store).resolve()
      stores["target_eval"] = pathlib.Path(pcfg.target_eval_store).resolve()
  else:
    stores = {name: root / "stores" / name for name in (("pool",) if tasks_target else STORE_NAMES)}
  evals = {} if tasks_target else {"target": stores["target_eval"]}
  prior = _train_config(cfg, cfg.prior, "pretrain", root / "runs" / "prior", stores["pool"], evals)
  cond = _train_config(cfg, cfg.conditional, "finetune", root / "runs" / "conditional",
                       None if tasks_target else stores["target_train"], evals)
  cond.train.init_from = str(root / "runs" / "prior" / "params")
  if tasks_target:
    cond.sft.tasks = tuple(pcfg.tasks)
    evals = {f"tasks_{cfg.sft.eval_split}": root / "runs" / "conditional" / "sft_eval"}
  score_cfg = stage_config(cfg, "score", model=cfg.prior.model)
  score_cfg.workdir = str(root / "scores")
  score_cfg.score.store = str(stores["pool"])
  score_cfg.score.prior = str(root / "runs" / "prior" / "params")
  score_cfg.score.conditionals = (str(root / "runs" / "conditional" / "params"),)
  runs, selections = target_runs(cfg), {}
  for r in runs:
    sel = stage_config(cfg, "select")
    sel.workdir = str(root / "selections" / r["selection"])
    sel.select.scores = str(root / "scores")
    sel.select.method = r["method"]
    sel.select.tau = r["tau"]
    sel.seed = r["seed"]
    selections.setdefault(r["selection"], sel)
    tcfg = _train_config(cfg, cfg.target, "pretrain", root / "runs" / r["name"], stores["pool"], evals,
                         seed=r["seed"], index=sel.workdir)
    if r["role"] == "curve":
      tcfg.train.eval_every = pcfg.curve_eval_every or tcfg.train.eval_every
    r["config"] = tcfg
  return Plan(stores, prior, cond, score_cfg, selections, runs)


def check_plan(cfg, plan: Plan, sizes: dict, data_parallel: int) -> list[tuple[str, object]]:
  """Every training step's batch plan against its data size and the mesh; one error listing every problem."""
  problems, plans = [], []
  def step(name, tcfg, num_items, seq_len):
    try:
      plans.append((name, train.step_plan(tcfg, num_items, seq_len, data_parallel)))
    except errors.ConfigError as e:
      problems.append(f"{name}: {e}")
  seq = sizes["seq_len"]
  step("prior", plan.prior, sizes["pool"], seq)
  step("conditional", plan.conditional, sizes["target_train"], sizes.get("sft_seq_len", seq))
  for r in plan.runs:
    k = int(sizes["pool"] // r["tau"])
    if k <= 0:
      problems.append(f"select {r['selection']}: tau {r['tau']:g} keeps 0 of {sizes['pool']:,} pool sequences")
      continue
    step(r["name"], r["config"], k, seq)
  if problems:
    raise errors.ConfigError("the pipeline's settings do not fit its data (nothing was trained):\n  "
                             + "\n  ".join(problems))
  return plans


# ----------------------------------------------------------------------------------------------------------------
# Lineage: what every artifact must have been made for, from what is there now


@dataclasses.dataclass(frozen=True)
class Expected:
  label: str
  path: pathlib.Path  # folder (or file) of the artifact
  request: dict | None  # None: an input is missing or will be rebuilt, so its id is not known yet
  recorded: dict | None  # the request the existing artifact was made for (None: absent)
  exists: bool


def _recorded(path: pathlib.Path, marker: pathlib.Path | None = None) -> tuple[dict | None, bool]:
  if marker is not None:
    return (artifacts.read_json(marker).get("request") if marker.exists() else None), path.exists()
  for folder in (path / "params", path):
    found = artifacts.recorded_request(folder)
    if found is not None:
      return found, True
  return None, path.exists() and any(path.iterdir())


def _expect(label, path, request, marker=None) -> Expected:
  recorded, exists = _recorded(path, marker)
  return Expected(label, path, request, recorded, exists)


def _id(expected: Expected) -> str | None:
  return artifacts.content_id(expected.request) if expected.request is not None else None


def lineage(cfg, root: pathlib.Path, plan: Plan) -> list[Expected]:
  """Every artifact of the work directory with the request it must have been made for, in pipeline order."""
  pcfg = cfg.pipeline
  out: list[Expected] = []
  if pcfg.pool_store:
    ids = {name: data.TokenStore(path).id for name, path in plan.stores.items()}
    tok_info = data.TokenStore(plan.stores["pool"]).manifest["tokenizer"]
  else:
    folder = data_dir(cfg, root, create=False)
    split_req = split_request(cfg, root, folder) if pathlib.Path(folder).exists() else None
    out.append(_expect("data split", root / "data" / "split.json", split_req, root / "data" / "split.json"))
    split_ok = split_req is not None and out[-1].recorded == artifacts.normalized(split_req)
    tok_path = pathlib.Path(pcfg.tokenizer) if pcfg.tokenizer else root / "data" / "tokenizer.json"
    tok_ok = split_ok
    if not pcfg.tokenizer and split_req is not None:
      out.append(_expect("tokenizer", tok_path, tokenizer_request(cfg, split_req),
                         root / "data" / "tokenizer.request.json"))
      tok_ok = split_ok and out[-1].recorded == artifacts.normalized(out[-1].request) and tok_path.exists()
    parts = corpus.part_paths(root / "data", *input_files(cfg, folder)) if split_ok else None
    ids, tok_info = {}, None
    for name, path in plan.stores.items():
      request = None
      if tok_ok:
        request = prepare.check_inputs(prepare_config(cfg, parts[name], tok_path, path))[-1]
        tok_info = tok_info or data.tokenizer_info(data.load_tokenizer(str(tok_path)), str(tok_path))
      out.append(_expect(f"store {name}", path, request, path / data.MANIFEST))
      ids[name] = _id(out[-1])
  prior_spec = model.ModelSpec.from_config(plan.prior.model)
  pool_id = ids.get("pool")
  prior_req = train.run_request(plan.prior, prior_spec, pool_id, False, None, None) if pool_id else None
  out.append(_expect("prior", root / "runs" / "prior", prior_req))
  cond = plan.conditional
  if cond.sft.tasks:
    sft = prepare.sft_request(cond.sft.tasks, cond.sft.data_dir, cond.sft.train_split, tok_info,
                              prior_spec.max_seq_len, cond.sft.limit) if tok_info else None
    cond_store, padded = (artifacts.content_id(sft) if sft else None), True
  else:
    cond_store, padded = ids.get("target_train"), False
  cond_req = None
  if prior_req and cond_store:
    cond_req = train.run_request(cond, prior_spec, cond_store, padded, None, artifacts.content_id(prior_req))
  out.append(_expect("conditional", root / "runs" / "conditional", cond_req))
  scores_req = None
  if cond_req:
    models = [{"name": "prior", "id": _id(out[-2])}, {"name": "conditional_0", "id": _id(out[-1])}]
    scores_req = score.scores_request(pool_id, models)
  out.append(_expect("scores", root / "scores", scores_req, root / "scores" / data.MANIFEST))
  scores_id = _id(out[-1])
  selection_ids = {}
  for name, sel in plan.selections.items():
    known = scores_id or (sel.select.method == "random" and pool_id)
    req = select.selection_request(sel, scores_id, pool_id) if known else None
    out.append(_expect(f"selection {name}", pathlib.Path(sel.workdir), req, pathlib.Path(sel.workdir) / data.MANIFEST))
    selection_ids[name] = _id(out[-1])
  for r in plan.runs:
    tcfg, sel_id = r["config"], selection_ids[r["selection"]]
    req = (train.run_request(tcfg, model.ModelSpec.from_config(tcfg.model), pool_id, False, sel_id, None)
           if sel_id else None)
    out.append(_expect(f"target {r['name']}", pathlib.Path(tcfg.workdir), req))
  return out


def stale(expected: list[Expected], root: pathlib.Path) -> list[tuple[Expected, str]]:
  """Artifacts that exist but were made for another request (or from inputs that are being rebuilt)."""
  out = []
  for e in expected:
    if not e.exists:
      continue
    if e.request is None:
      out.append((e, "built from inputs that are missing or stale"))
    elif e.recorded != artifacts.normalized(e.request):
      changed = artifacts.differences(e.recorded or {}, artifacts.normalized(e.request))
      out.append((e, f"made from other inputs or settings ({', '.join(changed) or 'no request recorded'})"))
  return out


def handle_stale(cfg, root: pathlib.Path, found: list[tuple[Expected, str]]) -> None:
  """Refuse with every stale artifact listed, or (on_stale=redo) move them to stale/<time>/ to be rebuilt."""
  if not found:
    return
  lines = "\n".join(f"  - {e.label} ({artifacts.relative(e.path, root)}): {why}" for e, why in found)
  if cfg.pipeline.on_stale != "redo":
    raise errors.DataError(f"{len(found)} artifact(s) in {root} are stale:\n{lines}\nRe-run with "
                           "--config.pipeline.on_stale=redo to move them to stale/ and rebuild them, or use a new "
                           "--config.workdir (nothing was changed)")
  aside = root / "stale" / time.strftime("%Y%m%d-%H%M%S")
  print(f"pipeline: moving {len(found)} stale artifact(s) to {aside} to rebuild them:\n{lines}")
  moved: list[pathlib.Path] = []
  for e, _ in found:
    paths = [e.path] + ([root / "data" / "tokenizer.request.json"] if e.label == "tokenizer" else [])
    if e.label == "data split":
      paths = [root / "data"]
    for path in paths:
      if path.exists() and not any(m in path.parents or m == path for m in moved):
        target = aside / artifacts.relative(path, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
        moved.append(path)


# ----------------------------------------------------------------------------------------------------------------
# Running


def store_sizes(plan: Plan, cfg) -> dict:
  pool = data.TokenStore(plan.stores["pool"])
  sizes = {"pool": pool.num_sequences, "seq_len": pool.seq_len}
  if "target_train" in plan.stores:
    sizes["target_train"] = data.TokenStore(plan.stores["target_train"]).num_sequences
  else:
    sizes["target_train"] = sft_rows(cfg)
    sizes["sft_seq_len"] = model.ModelSpec.from_config(cfg.prior.model).max_seq_len
  return sizes


def sft_rows(cfg) -> int:
  """How many SFT rows the conditional finetunes on: one per train document of each task (capped by sft.limit)."""
  if not cfg.sft.data_dir:
    return int(cfg.pipeline.target_sequences)
  total = 0
  for task in cfg.pipeline.tasks:
    path = tasks_lib.split_path(task, cfg.sft.train_split, cfg.sft.data_dir)
    if path is None:
      raise errors.DataError(f"{cfg.sft.data_dir}/{task} has no {cfg.sft.train_split!r} split; fix "
                             "--config.sft.data_dir or pipeline.tasks")
    with (gzip.open(path, "rt") if path.name.endswith(".gz") else open(path, encoding="utf-8")) as f:
      count = sum(1 for line in f if line.strip())
    total += min(count, cfg.sft.limit) if cfg.sft.limit else count
  return total


def run(cfg):
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the pipeline's work directory")
  check_settings(cfg)
  root = pathlib.Path(cfg.workdir).resolve()
  if cfg.pipeline.target == "tasks":
    _default_task_dirs(cfg)
  root.mkdir(parents=True, exist_ok=True)
  with artifacts.Lock(root):
    return _run(cfg, root)


def _run(cfg, root: pathlib.Path):
  pcfg = cfg.pipeline
  step = Steps()
  plan = make_plan(cfg, root)
  if not pcfg.pool_store:
    metrics.on_main_then_sync(lambda: data_dir(cfg, root), "synthesize")
  handle_stale(cfg, root, stale(lineage(cfg, root, plan), root))

  # 1. data and token stores
  if not pcfg.pool_store:
    folder = data_dir(cfg, root, create=False)
    split_req = split_request(cfg, root, folder)
    parts = metrics.on_main_then_sync(lambda: step("split data", split_data, cfg, root, folder), "split")
    parts = parts or corpus.part_paths(root / "data", *input_files(cfg, folder))
    tokenizer = metrics.on_main_then_sync(lambda: tokenizer_path(cfg, root, parts, split_req), "tokenizer")
    tokenizer = tokenizer or root / "data" / "tokenizer.json"
    for name, path in plan.stores.items():
      pcfg_prepare = prepare_config(cfg, parts[name], tokenizer, path)
      step(f"prepare {name}", metrics.on_main_then_sync, lambda c=pcfg_prepare: prepare.run(c), f"prepare {name}")
  check_plan(cfg, plan, store_sizes(plan, cfg), sharding.data_parallel_size(sharding.make_mesh(cfg.mesh)))

  # 2. prior and conditional; 3. score and select
  prior = step("pretrain prior", train.run, plan.prior)
  conditional = step("finetune conditional", train.run, plan.conditional)
  scores = step("score pool", score.run, plan.score)
  selections = {}
  for name, sel in plan.selections.items():
    selections[name] = metrics.on_main_then_sync(lambda c=sel, n=name: step(f"select {n}", select.run, c),
                                                 "select") or pathlib.Path(sel.workdir)

  # 4. targets (evaluated in-loop: held-out target loss, and the task suite when configured)
  runs = []
  for r in plan.runs:
    step(f"train {r['name']}", train.run, r["config"])
    runs.append({k: v for k, v in r.items() if k != "config"} | {
        "workdir": artifacts.relative(r["config"].workdir, root),
        "selection_dir": artifacts.relative(selections[r["selection"]], root)})

  # 5. report
  rel = lambda p: artifacts.relative(p, root)
  record = {"preset": pcfg.preset, "target": pcfg.target, "runs": runs, "scores": rel(scores),
            "stores": {k: rel(v) for k, v in plan.stores.items()}, "prior": rel(prior),
            "conditional": rel(conditional), "split": None if pcfg.pool_store else "data/split.json",
            "config": json.loads(cfg.to_json())}
  if metrics.is_main():
    (root / "pipeline.json").write_text(json.dumps(record, indent=1))
    path = step("report", report.write, root)
    print(f"\npipeline: done in {time.time() - step.start:.0f}s. Report: {path}")
  return root


def _default_corpus() -> str:
  found = data.shared_dir("corpus")
  if found is None:
    raise errors.DataError("no corpus folder: set --config.pipeline.data_dir (or $COLORJAX_DATA with a corpus/ "
                           "folder)")
  return found


def _default_task_dirs(cfg):
  """Task data from $COLORJAX_DATA/tasks or ../shared/data/tasks when not configured (else HuggingFace)."""
  found = tasks_lib.default_dir()
  if found:
    cfg.sft.data_dir = cfg.sft.data_dir or found
    cfg.eval.tasks_dir = cfg.eval.tasks_dir or found


# ----------------------------------------------------------------------------------------------------------------
# Dry run


def estimated_sizes(cfg, root: pathlib.Path, plan: Plan) -> tuple[dict, str]:
  """Sequences of every store: real when the stores exist, given (pool_sequences / target_sequences), or
  estimated from the input text's size at pipeline.chars_per_token."""
  pcfg = cfg.pipeline
  if all((pathlib.Path(p) / data.MANIFEST).exists() for p in plan.stores.values()):
    return store_sizes(plan, cfg), "from the token stores"
  seq = pcfg.seq_len
  if pcfg.pool_sequences:
    sizes = {"pool": int(pcfg.pool_sequences), "seq_len": seq, "target_train": int(pcfg.target_sequences)}
    how = "as given (pipeline.pool_sequences / target_sequences)"
  else:
    split = corpus.Split.from_config(pcfg)
    if pcfg.synthetic_docs:
      chars = {d: sum(map(len, synthetic.documents(d, pcfg.synthetic_docs, pcfg.synthetic_seed)))
               for d in synthetic.DOMAINS}
      target_names = [pathlib.Path(f).name.split(".")[0] for f in pcfg.target_files]
      target_chars = sum(c for d, c in chars.items() if d in target_names)
      pool_chars = [c for d, c in chars.items() if d not in target_names]
    else:
      target_files, pool_files = input_files(cfg, data_dir(cfg, root, create=False))
      target_chars = sum(corpus.text_chars(f) for f in target_files)
      pool_chars = [corpus.text_chars(f) for f in pool_files]
    cap = pcfg.max_chars_per_file or float("inf")
    pool_total = min(target_chars * split.pool, cap) + sum(min(c, cap) for c in pool_chars)
    to_seqs = lambda c: int(c / pcfg.chars_per_token // seq)
    sizes = {"pool": to_seqs(pool_total), "seq_len": seq, "target_train": to_seqs(target_chars * split.finetune)}
    how = f"estimated from the input text at {pcfg.chars_per_token:g} characters per token"
  if pcfg.target == "tasks":
    sizes["target_train"] = sft_rows(cfg) or sizes["target_train"]
    sizes["sft_seq_len"] = model.ModelSpec.from_config(cfg.prior.model).max_seq_len
  return sizes, how


def describe(cfg):
  """Dry run of every stage: sizes, steps, tokens, FLOPs and per-device memory; checks every step's settings."""
  check_settings(cfg)
  pcfg = cfg.pipeline
  if pcfg.target == "tasks":
    _default_task_dirs(cfg)
  root = pathlib.Path(cfg.workdir or f"runs/{pcfg.preset}").resolve()
  plan = make_plan(cfg, root)
  sizes, how = estimated_sizes(cfg, root, plan)
  devices = cfg.dry_run_devices or jax.device_count()
  mesh = sharding.abstract_mesh(cfg.mesh, devices)
  dp = sharding.data_parallel_size(mesh)
  check_plan(cfg, plan, sizes, dp)
  n, seq = sizes["pool"], sizes["seq_len"]
  print(f"pipeline {pcfg.preset} (dry run): pool {n:,} sequences x {seq} tokens, conditional data "
        f"{sizes['target_train']:,} sequences ({how}); taus {list(pcfg.taus)}, seeds {list(pcfg.seeds)}, methods "
        f"{list(pcfg.methods)}; {devices} device(s)\n")
  total_flops = train.describe(plan.prior, n, seq, how)["total_flops"]
  print()
  total_flops += train.describe(plan.conditional, sizes["target_train"], sizes.get("sft_seq_len", seq),
                                how)["total_flops"]
  print()
  total_flops += score.describe_nominal(plan.score, n, seq, models=2)
  print()
  by_tau: dict = {}
  for r in plan.runs:
    by_tau.setdefault(r["tau"], []).append(r)
  for tau, runs in by_tau.items():
    k = int(n // tau)
    print(f"select tau={tau:g}: {k:,} sequences ({k * seq:,} tokens); {len(runs)} target runs")
    total_flops += train.describe(runs[0]["config"], k, seq, f"1/{tau:g} of the pool, {how}")["total_flops"] * len(runs)
    print()
  print(f"pipeline total: {total_flops:.3e} FLOPs")
