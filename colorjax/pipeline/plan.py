"""The pipeline's plan: its settings checked, every target run (a `TargetRun`) and every step's stage config, built
from the config alone — what the runner runs, the preflight checks and the dry run prices.

A selection's stage config comes from its stage (colorjax.selection.stage: select, dsir, distill, or one registered
later), given the pipeline's shared artifacts (`inputs`) and what the protocol (protocol.py) says it selects from.
"""
import dataclasses
import math
import pathlib

import ml_collections

from colorjax import config
from colorjax import dsir  # pylint: disable=unused-import  (registers the dsir selection stage)
from colorjax import errors
from colorjax import methods
from colorjax import select  # pylint: disable=unused-import  (registers the select selection stage)
from colorjax.selection import stage as selection_stage
from colorjax.data import corpus
from colorjax.distill import stage as distill  # pylint: disable=unused-import  (registers the distill stage)
from colorjax.data import stores as stores_lib
from colorjax.pipeline import pools
from colorjax.pipeline import protocol as protocol_lib
from colorjax.training import metrics

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
  check_names(pcfg)
  pools.check_budgets(cfg)
  for stage in {methods.REGISTRY[m].stage for m in pcfg.methods} - {"train"}:  # before any work, not after scoring
    selection_stage.get(stage).check(cfg)
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


def check_names(pcfg) -> None:
  """Runs and selections are named by τ as `tau{τ:g}`: τ values (and random budgets) whose names collide would
  share, and overwrite, each other's runs."""
  for field in ("taus", "random_budgets"):
    by_name: dict = {}
    for value in pcfg[field]:
      by_name.setdefault(f"{value:g}", []).append(value)
    for name, values in by_name.items():
      if len(values) > 1:
        raise errors.ConfigError(f"pipeline.{field}={tuple(pcfg[field])}: {' and '.join(map(repr, values))} are both "
                                 f"named {name!r} in run and selection names; give values that differ in their first "
                                 "6 significant digits")


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
# Target runs and every step's stage config


@dataclasses.dataclass
class TargetRun:
  """One target model the pipeline trains: on a selection (`selection` names its folder), or selecting online
  (RHO-down: `selection` None)."""
  name: str  # runs/<name>
  method: str
  tau: float
  seed: int
  selection: str | None
  role: str  # compare | budget (fixed n: random on budget x n) | curve (the random learning-curve run)
  pool_tau: float | None = None  # fixed n: the nested pool it draws from
  budget: float | None = None  # role budget: its multiple of n
  config: ml_collections.ConfigDict | None = None  # its train stage config

  def record(self) -> dict:
    """What pipeline.json records of it (the report reads these)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "config"}


@dataclasses.dataclass
class StageConfigs:
  stores: dict  # name -> token store path
  prior: ml_collections.ConfigDict
  conditional: ml_collections.ConfigDict
  score: ml_collections.ConfigDict
  selections: dict  # selection name -> its stage's config (config.stage names the stage)
  runs: list  # TargetRun, each with its config
  reference: ml_collections.ConfigDict | None = None  # RHO-down's reference: a model trained on target text only
  inputs: selection_stage.Inputs | None = None  # the shared artifacts the selection stages read


def target_runs(cfg) -> list[TargetRun]:
  """Every target run: (method, τ, seed) at each τ, then what the protocol adds (protocol.extra_runs: the random
  curve run; under fixed n random at τ=1 and at each budget)."""
  pcfg = cfg.pipeline
  proto = protocol_lib.of(cfg)
  runs = []
  for tau in pcfg.taus:
    for seed in pcfg.seeds:
      for name in pcfg.methods:
        method = methods.REGISTRY[name]
        selection = None if method.stage == "train" else f"{name}-tau{tau:g}" + (f"-s{seed}" if method.seeded else "")
        runs.append(TargetRun(f"target-{name}-tau{tau:g}-s{seed}", name, float(tau), int(seed), selection, "compare",
                              float(tau) if proto.fixed_n else None))
  return runs + [TargetRun(**r) for r in proto.extra_runs(cfg)]


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


def _stores(cfg, root: pathlib.Path) -> dict:
  """name -> token store path: given (pipeline.pool_store, ...) or the work directory's."""
  pcfg = cfg.pipeline
  tasks_target = pcfg.target == "tasks"
  # DSIR and RHO-down model the target's text: with the tasks as target, their rendered train examples
  tasks_text = tasks_target and any(methods.REGISTRY[m].text_target for m in pcfg.methods)
  if not pcfg.pool_store:
    names = (("pool", "target_train") if tasks_text else ("pool",)) if tasks_target else STORE_NAMES
    return {name: root / "stores" / name for name in names}
  stores = {"pool": pathlib.Path(pcfg.pool_store).resolve()}
  if not tasks_target:
    stores["target_train"] = pathlib.Path(pcfg.target_train_store).resolve()
    stores["target_eval"] = pathlib.Path(pcfg.target_eval_store).resolve()
  elif tasks_text:
    stores["target_train"] = (pathlib.Path(pcfg.target_train_store).resolve() if pcfg.target_train_store
                              else root / "stores" / "target_train")
  return stores


def stage_configs(cfg, root: pathlib.Path) -> StageConfigs:
  pcfg = cfg.pipeline
  proto = protocol_lib.of(cfg)
  tasks_target = pcfg.target == "tasks"
  stores = _stores(cfg, root)
  evals = {} if tasks_target else {"target": stores["target_eval"]}
  prior = _train_config(cfg, cfg.prior, "pretrain", root / "runs" / "prior", stores["pool"], evals)
  prior.data.index = proto.prior_index(root)  # fixed n: outside the largest pool when the store holds it
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
  score_cfg.score.index = proto.score_index(root)  # fixed n: one pass of the largest nested pool serves every τ
  reference = None
  if "reference" in methods.shared_work(pcfg.methods):
    reference = _train_config(cfg, cfg.reference, "pretrain", root / "runs" / "reference", stores["target_train"],
                              evals)
  inputs = selection_stage.Inputs(root, stores["pool"], stores.get("target_train"), root / "runs" / "prior" / "params",
                                  root / "runs" / "conditional" / "params",
                                  root / "scores" if methods.needs_pool_scores(pcfg.methods) else None,
                                  root / "distill", seq_len(cfg))
  runs, selections = target_runs(cfg), {}
  for r in runs:
    if r.selection is None:  # selects online from its candidates, against its reference (RHO-down)
      tcfg = _train_config(cfg, cfg.target, "pretrain", root / "runs" / r.name, stores["pool"], evals, seed=r.seed)
      tcfg.train.rho_tau = r.tau
      tcfg.train.rho_reference = str(root / "runs" / methods.REGISTRY[r.method].reference / "params")
      tcfg.data.index = proto.run_index(r, root)  # fixed n: one pass over its nested pool of τ·n keeps n
    else:
      stage = selection_stage.get(methods.REGISTRY[r.method].stage)
      sel = selections.setdefault(r.selection, stage.configure(cfg, inputs, proto.selection(r, root)))
      tcfg = _train_config(cfg, cfg.target, "pretrain", root / "runs" / r.name, stores["pool"], evals, seed=r.seed,
                           index=sel.workdir)
    if r.role == "curve":
      tcfg.train.eval_every = pcfg.curve_eval_every or tcfg.train.eval_every
    proto.fit_schedule(tcfg.train, r)  # fixed n: steps and schedule follow this run's own tokens
    r.config = tcfg
  return StageConfigs(stores, prior, cond, score_cfg, selections, runs, reference, inputs)


def seq_len(cfg) -> int:
  """Tokens per sequence of the pipeline's stores (an existing pool store's own)."""
  return stores_lib.TokenStore(cfg.pipeline.pool_store).seq_len if cfg.pipeline.pool_store else cfg.pipeline.seq_len
