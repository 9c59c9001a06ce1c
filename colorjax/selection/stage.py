"""The one interface of a selection stage (select, dsir, distill, and the next one): what the pipeline asks of it.

A method's registry entry (`methods.Method.stage`) names the stage that makes its selections. The stage module
registers a `SelectionStage` with four functions, and the pipeline's runner, preflight and dry run loop over them:

  configure(cfg, inputs, selection) -> the stage's own config for one selection of the pipeline;
  expected(stage_cfg, known)        -> every artifact the stage will write for it, [(label, folder, request)], the
                                       selection itself last (label "selection"), each request built by the same
                                       code its run uses from the input ids the preflight knows (a request is None
                                       while an input it names is not known yet);
  plan(stage_cfg, sizes, counted)   -> the dry run: prints what the selection costs beyond training, returns its
                                       FLOPs (`counted`: the names of shared parts an earlier selection priced);
  run(stage_cfg)                    -> makes the selection (and its parts), returns its folder;
  check(cfg)                        -> (optional) refuses bad settings of the pipeline's config before any work;
  fits(stage_cfg, sizes)            -> (optional) refuses data too small for the selection, before any work.

Adding a stage is one module with these four functions, registered here, and its method's registry entry; nothing in
the pipeline changes (tests/test_structure.py adds one inside the test).
"""
import dataclasses
import pathlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Selection:
  """One selection a pipeline makes."""
  name: str  # its folder under selections/
  method: str  # the method's registry name
  tau: float
  seed: int
  role: str  # compare | budget | curve (the fixed-n random budget and curve runs)
  workdir: pathlib.Path
  keep: int | None = None  # sequences to keep (the fixed-n protocol), else None: 1/τ of its candidates
  within: pathlib.Path | None = None  # the nested pool it selects from (fixed n), else the whole pool
  shared_within: pathlib.Path | None = None  # what parts shared by every τ are drawn from (fixed n: the largest pool)


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The pipeline's shared artifacts a selection stage reads (paths; some may not exist yet)."""
  root: pathlib.Path
  pool: pathlib.Path  # the pool token store
  target_text: pathlib.Path | None  # a token store of target text (DSIR's target), when the pipeline has one
  prior: pathlib.Path  # params exports
  conditional: pathlib.Path
  scores: pathlib.Path | None  # the pool's scores, when the pipeline scores the pool
  parts: pathlib.Path  # where parts shared by every τ go (<root>/distill)
  seq_len: int


@dataclasses.dataclass(frozen=True)
class Known:
  """The content ids the preflight knows (None: missing, or being rebuilt)."""
  pool: str | None
  target_text: str | None
  prior: str | None
  conditional: str | None
  scores: str | None
  pools: dict  # str(folder) of a nested pool -> (id or None, sequences)

  def within(self, path) -> tuple[str | None, int] | None:
    """(id, sequences) of the nested pool at `path` (None when `path` is unset or names no nested pool)."""
    return self.pools.get(str(path)) if path else None

  def models(self) -> list[dict] | None:
    """The prior's and conditional's names and ids, as score requests name them (None until both are known)."""
    if not (self.prior and self.conditional):
      return None
    return [{"name": "prior", "id": self.prior}, {"name": "conditional_0", "id": self.conditional}]


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What a dry run knows of one selection's data."""
  candidates: int  # sequences it selects from
  shared_from: int  # sequences its shared parts are drawn from (the largest pool, or the candidates)
  seq_len: int
  tokens_per_s: float  # scoring speed per device it plans device-hours with (score.tokens_per_s_per_device)


@dataclasses.dataclass(frozen=True)
class SelectionStage:
  name: str  # what methods.Method.stage names
  configure: Callable  # (cfg, Inputs, Selection) -> ConfigDict
  expected: Callable  # (stage_cfg, Known) -> [(label, folder, request | None)], the selection last
  plan: Callable  # (stage_cfg, Sizes, counted: set) -> FLOPs
  run: Callable  # (stage_cfg) -> pathlib.Path
  check: Callable = lambda cfg: None  # the pipeline's config, before any work: its settings for this stage
  fits: Callable = lambda stage_cfg, sizes: None  # (stage_cfg, Sizes): refuses data too small for it, before work


STAGES: dict = {}


def register(stage: SelectionStage) -> SelectionStage:
  STAGES[stage.name] = stage
  return stage


def get(name: str) -> SelectionStage:
  if name not in STAGES:
    raise KeyError(f"no selection stage {name!r} is registered (known: {', '.join(STAGES)}); import the module that "
                   "registers it")
  return STAGES[name]


def place(stage_cfg, section_name: str, selection: Selection, seq_len: int) -> None:
  """What every selection stage's pipeline config shares: its work directory and seed, and under fixed n, select
  among `within` and keep `keep` sequences (a token budget)."""
  stage_cfg.workdir = str(selection.workdir)
  stage_cfg.seed = selection.seed
  section = stage_cfg[section_name]
  if selection.within is not None:
    section.within = str(selection.within)
  if selection.keep is not None:
    section.tokens = int(selection.keep) * int(seq_len)


def no_cost(stage_cfg, sizes: Sizes, counted: set) -> float:  # pylint: disable=unused-argument
  """The plan of a stage that scores nothing (its CPU work is not counted in FLOPs)."""
  return 0.0
