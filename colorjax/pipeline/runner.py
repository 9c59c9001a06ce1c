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
import json
import pathlib
import time

import jax

from colorjax import console
from colorjax import errors
from colorjax import methods
from colorjax import prepare
from colorjax import score
from colorjax.selection import stage as selection_stage
from colorjax import sharding
from colorjax import train
from colorjax.aot import steps as aot_steps
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import corpus
from colorjax.data import sft_rows
from colorjax.data import stores as stores_lib
from colorjax.data import tasks as tasks_lib
from colorjax.model import transformer
from colorjax.pipeline import plan
from colorjax.pipeline import pools
from colorjax.pipeline import preflight
from colorjax.pipeline import protocol as protocol_lib
from colorjax.report import results
from colorjax.training import rho as rho_lib


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


# ----------------------------------------------------------------------------------------------------------------
# Running


def run(cfg):
  if cfg.compile_for:  # every stage's step compiled for a slice; nothing runs
    root = pathlib.Path(cfg.workdir or f"runs/{cfg.pipeline.preset}").resolve()
    return aot_steps.compile_pipeline(cfg, plan.stage_configs(cfg, root), plan.seq_len(cfg))
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the pipeline's work directory")
  plan.check_settings(cfg)
  root = pathlib.Path(cfg.workdir).resolve()
  if cfg.pipeline.target == "tasks":
    _default_task_dirs(cfg)
  root.mkdir(parents=True, exist_ok=True)
  with lineage.Lock(root):
    return _run(cfg, root)


def _run(cfg, root: pathlib.Path):
  pcfg = cfg.pipeline
  step = Steps()
  stages = plan.stage_configs(cfg, root)
  proto = protocol_lib.of(cfg)
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
  pool_store = stores_lib.TokenStore(stages.stores["pool"])
  console.on_main_then_sync(lambda: proto.draw_pools(root, pool_store), "nested pools")  # fixed n
  data_parallel = sharding.data_parallel_size(sharding.make_mesh(cfg.mesh))
  # before anything trains
  preflight.check_stage_settings(cfg, stages, preflight.store_sizes(stages, cfg), data_parallel)

  # 2. prior and conditional; 3. score and select
  prior = step("pretrain prior", train.run, stages.prior)
  conditional = step("finetune conditional", train.run, stages.conditional)
  if stages.reference is not None:
    step("train the RHO-down reference", train.run, stages.reference)
  scores = None
  if methods.needs_pool_scores(pcfg.methods):  # cascade, distilled, DSIR and random score no whole pool
    scores = step("score pool", score.run, stages.score)
  selections = {}
  for name, sel in stages.selections.items():  # each by its stage (colorjax.selection_stage)
    stage = selection_stage.get(sel.stage).run
    selections[name] = console.on_main_then_sync(lambda c=sel, n=name, f=stage: step(f"select {n}", f, c),
                                                 "select") or pathlib.Path(sel.workdir)

  # 4. targets (evaluated in-loop: held-out target loss, and the task suite when configured)
  runs = []
  for r in stages.runs:
    step(f"train {r.name}", train.run, r.config)
    selection_dir = lineage.relative(selections[r.selection], root) if r.selection else None
    runs.append(r.record() | {"workdir": lineage.relative(r.config.workdir, root), "selection_dir": selection_dir})

  # 5. report
  rel = lambda p: lineage.relative(p, root)
  record = {"preset": pcfg.preset, "target": pcfg.target, "runs": runs,
            "scores": rel(scores) if scores is not None else None,
            "stores": {k: rel(v) for k, v in stages.stores.items()}, "prior": rel(prior),
            "conditional": rel(conditional), "split": None if pcfg.pool_store else "data/split.json",
            "reference": rel(stages.reference.workdir) if stages.reference is not None else None,
            "distill": rel(root / "distill") if (root / "distill").is_dir() else None,
            "pool_scoring": {"sequences": proto.scored_sequences(pool_store.num_sequences),
                             "seq_len": pool_store.seq_len},
            "config": json.loads(cfg.to_json())}
  if console.is_main():
    (root / "pipeline.json").write_text(formats.json_text(record))
    path = step("report", results.write, root)
    print(f"\npipeline: done in {time.time() - step.start:.0f}s. Report: {path}")
  return root


def _tasks_text_store(cfg, root: pathlib.Path, stages: plan.StageConfigs) -> None:
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


def describe(cfg):
  """Dry run of every stage: sizes, steps, tokens, FLOPs and per-device memory; checks every step's settings."""
  plan.check_settings(cfg)
  pcfg = cfg.pipeline
  if pcfg.target == "tasks":
    _default_task_dirs(cfg)
  root = pathlib.Path(cfg.workdir or f"runs/{pcfg.preset}").resolve()
  stages = plan.stage_configs(cfg, root)
  proto = protocol_lib.of(cfg)
  sizes, how = preflight.estimated_sizes(cfg, root, stages)
  devices = cfg.dry_run_devices or jax.device_count()
  mesh = sharding.abstract_mesh(cfg.mesh, devices)
  preflight.check_stage_settings(cfg, stages, sizes, sharding.data_parallel_size(mesh))
  n, seq = sizes["pool"], sizes["seq_len"]
  print(f"pipeline {pcfg.preset} (dry run): pool {n:,} sequences x {seq} tokens, conditional data "
        f"{sizes['target_train']:,} sequences ({how}); taus {list(pcfg.taus)}, seeds {list(pcfg.seeds)}, methods "
        f"{list(pcfg.methods)}; {devices} device(s)\n")
  prior_items = proto.prior_sequences(n)
  prior_note = how if prior_items == n else f"the {prior_items:,} outside the largest pool, {how}"
  total_flops = train.describe(stages.prior, prior_items, seq, prior_note)["total_flops"]
  print()
  total_flops += train.describe(stages.conditional, sizes["target_train"], sizes.get("sft_seq_len", seq),
                                how)["total_flops"]
  print()
  if proto.fixed_n:
    outside = ("the prior's n come from outside the largest pool" if pools.prior_outside(cfg, n) else
               "the store is too small to keep the prior's n outside the largest pool: the prior draws from all of it")
    print(f"fixed n: n = {proto.n:,} sequences ({proto.n * seq:,} tokens, the prior's); nested pools of tau x n: "
          + ", ".join(f"tau {t:g}: {m:,}" for t, m in proto.sizes.items()) + f"; {outside}\n")
  scored = proto.scored_sequences(n)
  if methods.needs_pool_scores(pcfg.methods):
    total_flops += score.describe_nominal(stages.score, scored, seq, models=2)
  else:
    print(f"score: none of {', '.join(pcfg.methods)} ranks the whole pool's scores: the {scored:,} candidates are "
          "not scored (the distilled methods score their sample and candidates, below)")
  print()
  if stages.reference is not None:
    total_flops += train.describe(stages.reference, sizes.get("target_text", sizes["target_train"]), seq,
                                  how)["total_flops"]
    print()
  total_flops += _describe_targets(cfg, stages, proto, n, seq, how)
  if cfg.compile_for:  # and compiled: the steps' memory and cost as the compiler reports them
    print()
    aot_steps.compile_pipeline(cfg, stages, seq)
  return total_flops


def _describe_targets(cfg, stages, proto, n: int, seq: int, how: str) -> float:
  """The selections (each stage's own plan) and the target runs, grouped by τ, role and size; prints the total."""
  groups: dict = {}
  counted: set = set()  # shared parts a stage's plan has priced already
  total_flops = 0.0
  for r in stages.runs:
    groups.setdefault((r.tau, r.role, proto.candidates_and_kept(r, n)), []).append(r)
  for (tau, role, (candidates, k)), runs in groups.items():
    offline, online = [r for r in runs if r.selection], [r for r in runs if not r.selection]
    drawn = "the pool" if candidates == n else f"a pool of {candidates:,}"
    if offline:
      head = (f"select random at {offline[0].budget:g}n" if role == "budget" else
              f"select tau={tau:g}{' (random curve)' if role == 'curve' else ''}")
      print(f"{head}: {k:,} of {drawn} sequences ({k * seq:,} tokens); {len(offline)} target runs")
      sizes = selection_stage.Sizes(candidates, proto.shared_from(n) if proto.fixed_n else candidates, seq,
                                    cfg.score.tokens_per_s_per_device)
      for name in dict.fromkeys(r.selection for r in offline):  # each selection of this group once
        sel = stages.selections[name]
        total_flops += selection_stage.get(sel.stage).plan(sel, sizes, counted)
      planned = train.describe(offline[0].config, k, seq, f"{k:,} of {drawn}, {how}")
      print(f"each target: {planned['tokens']:,} tokens ({planned['steps']:,} steps x {planned['global_batch']} x "
            f"{seq}), schedule {planned['schedule_steps']:,} steps, warmup {offline[0].config.train.warmup_steps:,}")
      total_flops += planned["total_flops"] * len(offline)
      print()
    if online:
      print(f"RHO-down tau={tau:g}: {len(online)} target runs selecting online from {drawn}")
      planned = train.describe(online[0].config, candidates, seq, how)
      reference = transformer.ModelSpec.from_config(cfg.prior.model)
      rho = rho_lib.Rho(transformer.ModelSpec.from_config(cfg.target.model), reference, 0, None, 0)
      extra = rho_lib.forward_flops_per_step(rho, int(round(tau * planned["global_batch"])), seq) * planned["steps"]
      print(f"selection forwards: {extra:.3e} FLOPs per run (both models over every candidate)\n")
      total_flops += (planned["total_flops"] + extra) * len(online)
  print(f"pipeline total: {total_flops:.3e} FLOPs")
  return total_flops
