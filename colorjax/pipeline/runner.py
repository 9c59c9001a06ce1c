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
import json
import math
import pathlib
import time

import jax
import ml_collections

from colorjax import config
from colorjax import console
from colorjax import distill
from colorjax import dsir
from colorjax import errors
from colorjax import methods
from colorjax import prepare
from colorjax import score
from colorjax import select
from colorjax import sharding
from colorjax import train
from colorjax.aot import steps as aot_steps
from colorjax.artifacts import lineage
from colorjax.data import corpus
from colorjax.data import sft_rows
from colorjax.data import stores as stores_lib
from colorjax.data import tasks as tasks_lib
from colorjax.model import transformer
from colorjax.pipeline import pools
from colorjax.pipeline import preflight
from colorjax.report import results
from colorjax.training import metrics
from colorjax.training import rho as rho_lib

STORE_NAMES = ("pool", "target_train", "target_eval")
ON_STALE = ("refuse", "redo")
# The pipeline's list settings: (field, what each entry must be, an example value).
LISTS = (("taus", "numbers", "(4, 8)"), ("seeds", "integers", "(0, 1)"), ("methods", "names", "('color', 'random')"))


def _is(value, kind: str) -> bool:
  """Whether one entry of a list setting is of `kind` (a bool is no number; 2.0 is no integer seed)."""
  if kind == "names":
    return isinstance(value, str)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  return kind == "numbers" or isinstance(value, int)


class Steps:
  """Prints what each step did and how long it took."""

  def __init__(self):
    self.start = time.time()

  def __call__(self, name: str, fn, *args, **kwargs):
    t0 = time.time()
    if console.is_main():
      print(f"\n=== pipeline: {name}", flush=True)
    result = fn(*args, **kwargs)
    if console.is_main():
      print(f"=== pipeline: {name} ({time.time() - t0:.1f}s; {time.time() - self.start:.0f}s total)", flush=True)
    return result


def check_settings(cfg) -> None:
  """Settings that need no data: lists without repeats, known methods, τ ≥ 1, split fractions."""
  pcfg = cfg.pipeline
  for field, kind, example in LISTS:
    values = pcfg[field]
    if not isinstance(values, (tuple, list)) or not all(_is(v, kind) for v in values):
      raise errors.ConfigError(f"pipeline.{field}={values!r}: give a tuple of {kind}, e.g. "
                               f"--config.pipeline.{field}=\"{example}\"")
    if not values:
      raise errors.ConfigError(f"pipeline.{field} is empty")
    if len(set(values)) != len(values):
      raise errors.ConfigError(f"pipeline.{field}={tuple(values)} repeats a value; give each once")
  for name in pcfg.methods:
    methods.get(name, "pipeline.methods")
  if pcfg.protocol not in pools.PROTOCOLS:
    raise errors.ConfigError(f"pipeline.protocol={pcfg.protocol!r}; choose {' or '.join(pools.PROTOCOLS)}")
  if pcfg.protocol == "fixed_n" and not (cfg.prior.train.max_steps > 0 and cfg.prior.train.global_batch_size > 0):
    raise errors.ConfigError("pipeline.protocol=fixed_n: n is the prior's prior.train.max_steps x global_batch_size "
                             "sequences; set both > 0")
  if min(pcfg.seeds) < 0 or cfg.seed < 0:
    raise errors.ConfigError(f"seed={cfg.seed}, pipeline.seeds={tuple(pcfg.seeds)}: seeds are integers >= 0")
  named = [(f"pipeline.taus has {tau}", tau) for tau in pcfg.taus]
  named += [(f"pipeline.curve_tau={pcfg.curve_tau}", pcfg.curve_tau)] if pcfg.curve_tau else []
  for name, tau in named:
    if not (math.isfinite(tau) and tau >= 1):
      raise errors.ConfigError(f"{name}: keep the top 1/tau of the pool, so tau is a number >= 1")
  if pcfg.on_stale not in ON_STALE:
    raise errors.ConfigError(f"pipeline.on_stale={pcfg.on_stale!r}; choose {' or '.join(ON_STALE)}")
  if not pcfg.pool_store:
    corpus.Split.from_config(pcfg)
  elif pcfg.target != "tasks" and not (pcfg.target_train_store and pcfg.target_eval_store):
    raise errors.ConfigError("with pipeline.pool_store, a text target needs pipeline.target_train_store and "
                             "target_eval_store (token stores of the target's finetune and held-out text)")
  for section in ("prior", "conditional", "reference", "target"):  # a missing mirror package: before any stage runs
    metrics.check_mirrors(cfg[section].train, f"{section}.train")
  check_unused_sections(cfg)


# Top-level fields a pipeline never reads (each stage has its own section), and where the setting goes instead.
UNUSED = {"train": "prior.train, conditional.train, reference.train or target.train",
          "model": "prior.model (prior and conditional) or target.model",
          "prepare.seq_len": "pipeline.seq_len", "prepare.tokenizer": "pipeline.tokenizer",
          "prepare.inputs": "pipeline.target_files / pool_files", "prepare.output": "(the pipeline's workdir)"}


def check_unused_sections(cfg) -> None:
  """An override of a field the pipeline ignores fails here, naming the field that takes the setting."""
  defaults = config.get_config()
  for name, instead in UNUSED.items():
    section, _, field = name.partition(".")
    given, default = cfg[section], defaults[section]
    if field:
      changed = [field] if given[field] != default[field] else []
    else:
      changed = [k for k, v in given.to_dict().items() if v != default[k]]
    if changed:
      fields = ", ".join(f"{section}.{k}" for k in changed) if not field else name
      raise errors.ConfigError(f"{fields}: a pipeline does not read the top-level {section!r} settings; set "
                               f"{'it' if field else 'them'} in {instead}")


# ----------------------------------------------------------------------------------------------------------------
# Every step's stage config


@dataclasses.dataclass
class StageConfigs:
  stores: dict  # name -> token store path
  prior: ml_collections.ConfigDict
  conditional: ml_collections.ConfigDict
  score: ml_collections.ConfigDict
  selections: dict  # selection name -> select (or dsir) stage config
  runs: list  # target runs: dicts (name, method, tau, seed, selection, role) with "config"
  reference: ml_collections.ConfigDict | None = None  # RHO-down's reference: a model trained on target text only


def target_runs(cfg) -> list[dict]:
  """Every selection and target run: (method, τ, seed) -> names; the random-curve runs last. Under the fixed-n
  protocol each run also names the nested pool it draws from ("pool_tau"), the random baseline runs at τ=1 too, and
  the curve run takes 1/curve_tau of the largest pool (named "curve": its τ may equal a compared τ)."""
  pcfg = cfg.pipeline
  fixed_n = pools.fixed_n(cfg) is not None
  baseline = methods.BASELINE.name
  runs = []
  for tau in pcfg.taus:
    for seed in pcfg.seeds:
      for name in pcfg.methods:
        method = methods.REGISTRY[name]
        selection = None if method.stage == "train" else f"{name}-tau{tau:g}" + (f"-s{seed}" if method.seeded else "")
        runs.append({"name": f"target-{name}-tau{tau:g}-s{seed}", "method": name, "tau": float(tau),
                     "seed": int(seed), "selection": selection, "role": "compare",
                     "pool_tau": float(tau) if fixed_n else None})
  if fixed_n and 1.0 not in pcfg.taus:
    for seed in pcfg.seeds:
      runs.append({"name": f"target-{baseline}-tau1-s{seed}", "method": baseline, "tau": 1.0, "seed": int(seed),
                   "selection": f"{baseline}-tau1-s{seed}", "role": "compare", "pool_tau": 1.0})
  if pcfg.curve_tau:
    part = f"curve-tau{pcfg.curve_tau:g}" if fixed_n else f"tau{pcfg.curve_tau:g}"  # fixed n: never a compare run's
    for seed in pcfg.seeds:
      runs.append({"name": f"target-{baseline}-{part}-s{seed}", "method": baseline,
                   "tau": float(pcfg.curve_tau), "seed": int(seed),
                   "selection": f"{baseline}-{part}-s{seed}", "role": "curve",
                   "pool_tau": pools.largest(cfg) if fixed_n else None})
  return runs


def _train_config(cfg, section, stage: str, workdir: pathlib.Path, store, eval_stores, seed=None, **data_kw):
  architecture = section.model if "model" in section else cfg.prior.model
  tcfg = config.stage_config(cfg, stage, model=architecture, train=section.train)
  tcfg.workdir = str(workdir)
  tcfg.data.train_store = str(store) if store else ""
  tcfg.data.eval_stores = tuple(f"{k}={v}" for k, v in eval_stores.items())
  tcfg.train.resume = True
  if seed is not None:
    tcfg.seed = seed
  for key, value in data_kw.items():
    tcfg.data[key] = value
  return tcfg


def stage_configs(cfg, root: pathlib.Path) -> StageConfigs:
  pcfg = cfg.pipeline
  tasks_target = pcfg.target == "tasks"
  # DSIR and RHO-down model the target's text: with the tasks as target, their rendered train examples
  tasks_text = tasks_target and any(methods.REGISTRY[m].text_target for m in pcfg.methods)
  if pcfg.pool_store:
    stores = {"pool": pathlib.Path(pcfg.pool_store).resolve()}
    if not tasks_target:
      stores["target_train"] = pathlib.Path(pcfg.target_train_store).resolve()
      stores["target_eval"] = pathlib.Path(pcfg.target_eval_store).resolve()
    elif tasks_text:
      stores["target_train"] = (pathlib.Path(pcfg.target_train_store).resolve() if pcfg.target_train_store
                                else root / "stores" / "target_train")
  else:
    names = (("pool", "target_train") if tasks_text else ("pool",)) if tasks_target else STORE_NAMES
    stores = {name: root / "stores" / name for name in names}
  evals = {} if tasks_target else {"target": stores["target_eval"]}
  prior = _train_config(cfg, cfg.prior, "pretrain", root / "runs" / "prior", stores["pool"], evals)
  cond = _train_config(cfg, cfg.conditional, "finetune", root / "runs" / "conditional",
                       None if tasks_target else stores["target_train"], evals)
  cond.train.init_from = str(root / "runs" / "prior" / "params")
  if tasks_target:
    cond.sft.tasks = tuple(pcfg.tasks)
    evals = {f"tasks_{cfg.sft.eval_split}": root / "runs" / "conditional" / "sft_eval"}
  score_cfg = config.stage_config(cfg, "score", model=cfg.prior.model)
  score_cfg.workdir = str(root / "scores")
  score_cfg.score.store = str(stores["pool"])
  score_cfg.score.prior = str(root / "runs" / "prior" / "params")
  score_cfg.score.conditionals = (str(root / "runs" / "conditional" / "params"),)
  if pools.fixed_n(cfg) is not None:  # one scoring pass of the largest nested pool serves every τ
    score_cfg.score.index = str(pools.folder(root, pools.largest(cfg)))
  reference = None
  if "reference" in methods.shared_work(pcfg.methods):
    reference = _train_config(cfg, cfg.reference, "pretrain", root / "runs" / "reference", stores["target_train"],
                              evals)
  runs, selections = target_runs(cfg), {}
  for r in runs:
    if r["selection"] is None:  # selects online from the whole pool, against its reference (RHO-down)
      tcfg = _train_config(cfg, cfg.target, "pretrain", root / "runs" / r["name"], stores["pool"], evals,
                           seed=r["seed"])
      tcfg.train.rho_tau = r["tau"]
      tcfg.train.rho_reference = str(root / "runs" / methods.REGISTRY[r["method"]].reference / "params")
      if r["pool_tau"] is not None:  # fixed n: one pass over its nested pool of τ·n keeps n
        tcfg.data.index = str(pools.folder(root, r["pool_tau"]))
    else:
      sel = selections.setdefault(r["selection"], _selection_config(cfg, root, stores, r))
      tcfg = _train_config(cfg, cfg.target, "pretrain", root / "runs" / r["name"], stores["pool"], evals,
                           seed=r["seed"], index=sel.workdir)
    if r["role"] == "curve":
      tcfg.train.eval_every = pcfg.curve_eval_every or tcfg.train.eval_every
    r["config"] = tcfg
  return StageConfigs(stores, prior, cond, score_cfg, selections, runs, reference)


def _selection_config(cfg, root: pathlib.Path, stores: dict, r: dict) -> ml_collections.ConfigDict:
  """The config of the stage that makes a method's selection (methods.Method.stage): select, dsir or distill."""
  stage = methods.REGISTRY[r["method"]].stage
  if stage == "dsir":
    sel = config.stage_config(cfg, "dsir")
    sel.dsir.store = str(stores["pool"])
    sel.dsir.target = str(stores["target_train"])
    sel.dsir.tau = r["tau"]
  elif stage == "distill":  # the sample, its scores, the scorer and the predictions serve every τ
    sel = config.stage_config(cfg, "distill", model=cfg.prior.model)
    sel.distill.store = str(stores["pool"])
    sel.distill.prior = str(root / "runs" / "prior" / "params")
    sel.distill.conditional = str(root / "runs" / "conditional" / "params")
    sel.distill.parts = str(root / "distill")
    sel.distill.method = r["method"]
    sel.distill.tau = r["tau"]
  else:
    sel = config.stage_config(cfg, "select")
    sel.select.scores = str(root / "scores")
    sel.select.method = r["method"]
    sel.select.tau = r["tau"]
  if r["pool_tau"] is not None:  # fixed n: n sequences from its nested pool (the curve run: 1/curve_tau of it)
    section = sel[stage] if stage in ("dsir", "distill") else sel.select
    section.within = str(pools.folder(root, r["pool_tau"]))
    if r["role"] != "curve":
      section.tokens = pools.fixed_n(cfg) * seq_len(cfg)
  sel.workdir = str(root / "selections" / r["selection"])
  sel.seed = r["seed"]
  return sel


def seq_len(cfg) -> int:
  """Tokens per sequence of the pipeline's stores (an existing pool store's own)."""
  return stores_lib.TokenStore(cfg.pipeline.pool_store).seq_len if cfg.pipeline.pool_store else cfg.pipeline.seq_len


# ----------------------------------------------------------------------------------------------------------------
# Running


def run(cfg):
  if cfg.compile_for:  # every stage's step compiled for a slice; nothing runs
    root = pathlib.Path(cfg.workdir or f"runs/{cfg.pipeline.preset}").resolve()
    return aot_steps.compile_pipeline(cfg, stage_configs(cfg, root), seq_len(cfg))
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the pipeline's work directory")
  check_settings(cfg)
  root = pathlib.Path(cfg.workdir).resolve()
  if cfg.pipeline.target == "tasks":
    _default_task_dirs(cfg)
  root.mkdir(parents=True, exist_ok=True)
  with lineage.Lock(root):
    return _run(cfg, root)


def _run(cfg, root: pathlib.Path):
  pcfg = cfg.pipeline
  step = Steps()
  stages = stage_configs(cfg, root)
  if not pcfg.pool_store:
    console.on_main_then_sync(lambda: corpus.data_dir(cfg, root), "synthesize")
  preflight.handle_stale(cfg, root, preflight.stale(preflight.lineage(cfg, root, stages), root))

  # 1. data and token stores
  if not pcfg.pool_store:
    folder = corpus.data_dir(cfg, root, create=False)
    split_req = corpus.split_request_for(cfg, root, folder)
    parts = console.on_main_then_sync(lambda: step("split data", corpus.split_data, cfg, root, folder), "split")
    parts = parts or corpus.part_paths(root / "data", *corpus.input_files(cfg, folder))
    tokenizer = console.on_main_then_sync(lambda: corpus.tokenizer_path(cfg, root, parts, split_req), "tokenizer")
    tokenizer = tokenizer or root / "data" / "tokenizer.json"
    for name, path in stages.stores.items():
      if not (name == "target_train" and pcfg.target == "tasks"):
        pcfg_prepare = corpus.prepare_config(cfg, parts[name], tokenizer, path)
        step(f"prepare {name}", console.on_main_then_sync, lambda c=pcfg_prepare: prepare.run(c), f"prepare {name}")
  if pcfg.target == "tasks" and "target_train" in stages.stores and not pcfg.target_train_store:
    step("prepare target_train (the tasks' rendered train examples)", console.on_main_then_sync,
         lambda: _tasks_text_store(cfg, root, stages), "prepare target_train")
  if pools.fixed_n(cfg) is not None:
    pool_store = stores_lib.TokenStore(stages.stores["pool"])
    pools.check_fits(cfg, pool_store.num_sequences)
    for tau, size in pools.sizes(cfg).items():
      console.on_main_then_sync(lambda t=tau, m=size: pools.make(pools.folder(root, t), pool_store, m,
                                                                  pcfg.split_seed), "nested pools")
  data_parallel = sharding.data_parallel_size(sharding.make_mesh(cfg.mesh))
  # before anything trains
  preflight.check_stage_settings(cfg, stages, preflight.store_sizes(stages, cfg), data_parallel)

  # 2. prior and conditional; 3. score and select
  prior = step("pretrain prior", train.run, stages.prior)
  conditional = step("finetune conditional", train.run, stages.conditional)
  if stages.reference is not None:
    step("train the RHO-down reference", train.run, stages.reference)
  scores = step("score pool", score.run, stages.score)
  selections = {}
  for name, sel in stages.selections.items():
    stage = {"dsir": dsir.run, "distill": distill.run}.get(sel.stage, select.run)
    selections[name] = console.on_main_then_sync(lambda c=sel, n=name, f=stage: step(f"select {n}", f, c),
                                                 "select") or pathlib.Path(sel.workdir)

  # 4. targets (evaluated in-loop: held-out target loss, and the task suite when configured)
  runs = []
  for r in stages.runs:
    step(f"train {r['name']}", train.run, r["config"])
    runs.append({k: v for k, v in r.items() if k != "config"} | {
        "workdir": lineage.relative(r["config"].workdir, root),
        "selection_dir": lineage.relative(selections[r["selection"]], root) if r["selection"] else None})

  # 5. report
  rel = lambda p: lineage.relative(p, root)
  record = {"preset": pcfg.preset, "target": pcfg.target, "runs": runs, "scores": rel(scores),
            "stores": {k: rel(v) for k, v in stages.stores.items()}, "prior": rel(prior),
            "conditional": rel(conditional), "split": None if pcfg.pool_store else "data/split.json",
            "reference": rel(stages.reference.workdir) if stages.reference is not None else None,
            "distill": rel(root / "distill") if (root / "distill").is_dir() else None,
            "config": json.loads(cfg.to_json())}
  if console.is_main():
    (root / "pipeline.json").write_text(json.dumps(record, indent=1))
    path = step("report", results.write, root)
    print(f"\npipeline: done in {time.time() - step.start:.0f}s. Report: {path}")
  return root


def _tasks_text_store(cfg, root: pathlib.Path, stages: StageConfigs) -> None:
  """The target text of DSIR and RHO-down's reference when the target is the task suite: the tasks' train examples
  rendered as the conditional finetunes on them (prompt + gold answer), as a token store with the pool's tokenizer."""
  cond = stages.conditional
  text = sft_rows.write_task_text(cond.sft.tasks, cond.sft.data_dir, cond.sft.train_split,
                                  root / "data" / "tasks_train.jsonl", cond.sft.limit)
  pool = stores_lib.TokenStore(stages.stores["pool"])
  prepare.run(corpus.prepare_config(cfg, [text], pool.tokenizer_path(), stages.stores["target_train"]))


def _default_task_dirs(cfg):
  """Task data from $COLORJAX_DATA/tasks or ../shared/data/tasks when not configured (else HuggingFace)."""
  found = tasks_lib.default_dir()
  if found:
    cfg.sft.data_dir = cfg.sft.data_dir or found
    cfg.eval.tasks_dir = cfg.eval.tasks_dir or found


# ----------------------------------------------------------------------------------------------------------------
# Dry run


def _distill_cost(cfg, name: str, sel, n: int, seq: int, sampled: bool) -> float:
  """Prints the scoring a distill-stage selection needs (the sample; a cascade's rescored candidates), in FLOPs and
  device-hours at score.tokens_per_s_per_device, beside scoring the whole pool; returns what it adds to the plan's
  total (the sample, shared by every τ and both methods, only once: `sampled` says it is counted already)."""
  per_sequence = 2 * transformer.flops_per_token(transformer.ModelSpec.from_config(cfg.prior.model), seq,
                                                 training=False) * seq
  d = sel.distill
  sample = max(2, min(n, int(round(d.sample_fraction * n))))
  k = select.keep_count(n, seq, d.tau, d.tokens, "distill")
  rescored = distill.candidate_count(sel, n, k) if d.method == distill.CASCADE else 0
  flops = per_sequence * (sample + rescored)
  hours = (sample + rescored) * seq / max(cfg.score.tokens_per_s_per_device, 1.0) / 3600
  print(f"  {name}: scores {sample:,} sampled + {rescored:,} rescored sequences = {flops:.3e} FLOPs "
        f"({(sample + rescored) / n:.1%} of scoring the pool), {hours:,.2f} device-hours at "
        f"{cfg.score.tokens_per_s_per_device:,.0f} pool tok/s per device")
  return per_sequence * rescored if sampled else flops


def describe(cfg):
  """Dry run of every stage: sizes, steps, tokens, FLOPs and per-device memory; checks every step's settings."""
  check_settings(cfg)
  pcfg = cfg.pipeline
  if pcfg.target == "tasks":
    _default_task_dirs(cfg)
  root = pathlib.Path(cfg.workdir or f"runs/{pcfg.preset}").resolve()
  stages = stage_configs(cfg, root)
  sizes, how = preflight.estimated_sizes(cfg, root, stages)
  devices = cfg.dry_run_devices or jax.device_count()
  mesh = sharding.abstract_mesh(cfg.mesh, devices)
  dp = sharding.data_parallel_size(mesh)
  preflight.check_stage_settings(cfg, stages, sizes, dp)
  n, seq = sizes["pool"], sizes["seq_len"]
  print(f"pipeline {pcfg.preset} (dry run): pool {n:,} sequences x {seq} tokens, conditional data "
        f"{sizes['target_train']:,} sequences ({how}); taus {list(pcfg.taus)}, seeds {list(pcfg.seeds)}, methods "
        f"{list(pcfg.methods)}; {devices} device(s)\n")
  total_flops = train.describe(stages.prior, n, seq, how)["total_flops"]
  print()
  total_flops += train.describe(stages.conditional, sizes["target_train"], sizes.get("sft_seq_len", seq),
                                how)["total_flops"]
  print()
  fixed_n = pools.fixed_n(cfg)
  if fixed_n is not None:
    print(f"fixed n: n = {fixed_n:,} sequences ({fixed_n * seq:,} tokens, the prior's); nested pools of tau x n: "
          + ", ".join(f"tau {t:g}: {m:,}" for t, m in pools.sizes(cfg).items()) + "\n")
  scored = pools.sizes(cfg)[pools.largest(cfg)] if fixed_n is not None else n
  total_flops += score.describe_nominal(stages.score, scored, seq, models=2)
  print()
  if stages.reference is not None:
    total_flops += train.describe(stages.reference, sizes.get("target_text", sizes["target_train"]), seq,
                                  how)["total_flops"]
    print()
  groups: dict = {}
  sampled = False
  for r in stages.runs:
    groups.setdefault((r["tau"], r["role"], pools.candidates_and_kept(cfg, r, n)), []).append(r)
  for (tau, role, (candidates, k)), runs in groups.items():
    offline, online = [r for r in runs if r["selection"]], [r for r in runs if not r["selection"]]
    drawn = "the pool" if candidates == n else f"a pool of {candidates:,}"
    if offline:
      print(f"select tau={tau:g}{' (random curve)' if role == 'curve' else ''}: {k:,} of {drawn} sequences "
            f"({k * seq:,} tokens); {len(offline)} target runs")
      for name, sel in stages.selections.items():
        if sel.stage == "distill" and f"tau{tau:g}" in name:
          total_flops += _distill_cost(cfg, name, sel, candidates, seq, sampled)
          sampled = True
      total_flops += train.describe(offline[0]["config"], k, seq, f"{k:,} of {drawn}, {how}")["total_flops"] * len(
          offline)
      print()
    if online:
      print(f"RHO-down tau={tau:g}: {len(online)} target runs selecting online from {drawn}")
      planned = train.describe(online[0]["config"], candidates, seq, how)
      reference = transformer.ModelSpec.from_config(cfg.prior.model)
      rho = rho_lib.Rho(transformer.ModelSpec.from_config(cfg.target.model), reference, 0, None, 0)
      extra = rho_lib.forward_flops_per_step(rho, int(round(tau * planned["global_batch"])), seq) * planned["steps"]
      print(f"selection forwards: {extra:.3e} FLOPs per run (both models over every candidate)\n")
      total_flops += (planned["total_flops"] + extra) * len(online)
  print(f"pipeline total: {total_flops:.3e} FLOPs")
  if cfg.compile_for:  # and compiled: the steps' memory and cost as the compiler reports them
    print()
    aot_steps.compile_pipeline(cfg, stages, seq)

