"""The pipeline's experimental protocol, one object (`of(cfg)`): what each target run selects from and keeps, what
the prior trains on, what the scoring pass covers and how a target's schedule is set.

- fixed pool (the paper's 1.2B experiments): every selection keeps 1/τ of the pool; the random curve run keeps
  1/curve_tau of it.
- fixed n (the 150M experiments, Fig. 2; pools.py): n = the prior's sequences; each τ selects n from a nested pool
  of τ·n, random also runs at τ=1, at each `pipeline.random_budgets` multiple of n and on the curve run (1/curve_tau
  of the largest pool); one scoring pass of the largest pool serves every τ; the prior trains outside it when the
  store allows; every target's steps and schedule follow its own budget.
"""
import pathlib

from colorjax import methods
from colorjax.selection import stage as selection_stage
from colorjax.pipeline import pools


class FixedPool:
  """Keep 1/τ of one pool."""
  fixed_n = False
  n = None

  def __init__(self, cfg):
    self.cfg = cfg

  def candidates_and_kept(self, run, pool_sequences: int) -> tuple[int, int]:
    """(the sequences a run's selection draws from, the sequences it keeps)."""
    return pool_sequences, int(pool_sequences // run.tau)

  def selection(self, run, root: pathlib.Path) -> selection_stage.Selection:
    """What a run's selection is, for its stage to configure."""
    return selection_stage.Selection(run.selection, run.method, run.tau, run.seed, run.role,
                                     root / "selections" / run.selection)

  def extra_runs(self, cfg) -> list[dict]:
    """The runs besides each (method, τ, seed): the random curve run over 1/curve_tau of the pool."""
    baseline, tau = methods.BASELINE.name, float(cfg.pipeline.curve_tau)
    if not tau:
      return []
    return [dict(name=f"target-{baseline}-tau{tau:g}-s{seed}", method=baseline, tau=tau, seed=int(seed),
                 selection=f"{baseline}-tau{tau:g}-s{seed}", role="curve") for seed in cfg.pipeline.seeds]

  def score_index(self, root: pathlib.Path) -> str:
    """What the whole-pool scoring pass covers ("" = the pool)."""
    return ""

  def prior_index(self, root: pathlib.Path) -> str:
    """What the prior trains on ("" = the whole pool store)."""
    return ""

  def run_index(self, run, root: pathlib.Path) -> str:
    """What a RHO-down run draws its candidates from ("" = the whole pool)."""
    return ""

  def fit_schedule(self, train_cfg, run) -> None:
    """A target's steps and schedule: the recipe's own."""

  def draw_pools(self, root: pathlib.Path, store) -> None:
    """The pools the selections draw from, once the pool store exists: none but the store itself."""

  def scored_sequences(self, pool_sequences: int) -> int:
    return pool_sequences

  def prior_sequences(self, pool_sequences: int) -> int:
    return pool_sequences

  def shared_from(self, pool_sequences: int) -> int:
    """What a selection's τ-independent parts (a distill sample) are drawn from."""
    return pool_sequences


class FixedN(FixedPool):
  """Keep n of τ·n (pools.py)."""
  fixed_n = True

  def __init__(self, cfg):
    super().__init__(cfg)
    self.n = pools.fixed_n(cfg)
    self.sizes = pools.sizes(cfg)
    self.largest = pools.largest(cfg)

  def candidates_and_kept(self, run, pool_sequences: int) -> tuple[int, int]:
    candidates = self.sizes[run.pool_tau]
    if run.role == "budget":
      return candidates, pools.budget_sequences(self.cfg, run.budget)
    return candidates, (int(candidates // run.tau) if run.role == "curve" else self.n)

  def selection(self, run, root: pathlib.Path) -> selection_stage.Selection:
    keep = None if run.role == "curve" else self.candidates_and_kept(run, 0)[1]
    return selection_stage.Selection(run.selection, run.method, run.tau, run.seed, run.role,
                                     root / "selections" / run.selection, keep, pools.folder(root, run.pool_tau),
                                     pools.folder(root, self.largest))

  def extra_runs(self, cfg) -> list[dict]:
    baseline, largest = methods.BASELINE.name, self.largest
    runs = []
    if 1.0 not in cfg.pipeline.taus:  # random on n, from the τ=1 pool
      runs += [dict(name=f"target-{baseline}-tau1-s{seed}", method=baseline, tau=1.0, seed=int(seed),
                    selection=f"{baseline}-tau1-s{seed}", role="compare", pool_tau=1.0) for seed in cfg.pipeline.seeds]
    for budget in cfg.pipeline.random_budgets:  # random on b·n from the largest pool
      runs += [dict(name=f"target-{baseline}-{budget:g}n-s{seed}", method=baseline, tau=largest / float(budget),
                    seed=int(seed), selection=f"{baseline}-{budget:g}n-s{seed}", role="budget", pool_tau=largest,
                    budget=float(budget)) for seed in cfg.pipeline.seeds]
    if cfg.pipeline.curve_tau:  # named apart from a compared τ's run
      part = f"curve-tau{cfg.pipeline.curve_tau:g}"
      runs += [dict(name=f"target-{baseline}-{part}-s{seed}", method=baseline, tau=float(cfg.pipeline.curve_tau),
                    seed=int(seed), selection=f"{baseline}-{part}-s{seed}", role="curve", pool_tau=largest)
               for seed in cfg.pipeline.seeds]
    return runs

  def score_index(self, root: pathlib.Path) -> str:
    return str(pools.folder(root, self.largest))

  def prior_index(self, root: pathlib.Path) -> str:
    return str(pools.folder(root, pools.PRIOR))

  def run_index(self, run, root: pathlib.Path) -> str:
    return str(pools.folder(root, run.pool_tau))

  def fit_schedule(self, train_cfg, run) -> None:
    pools.fit_schedule(train_cfg, self.candidates_and_kept(run, 0)[1])

  def draw_pools(self, root: pathlib.Path, store) -> None:
    """The nested pools (refused with the numbers when the store is too small), and the prior's ids."""
    pools.check_fits(self.cfg, store.num_sequences)
    for tau, size in self.sizes.items():
      pools.make(pools.folder(root, tau), store, size, self.cfg.pipeline.split_seed)
    pools.make_prior(self.cfg, root, store)

  def scored_sequences(self, pool_sequences: int) -> int:
    return self.sizes[self.largest]

  def prior_sequences(self, pool_sequences: int) -> int:
    if not pools.prior_outside(self.cfg, pool_sequences):
      return pool_sequences
    return pool_sequences - self.sizes[self.largest]

  def shared_from(self, pool_sequences: int) -> int:
    return self.sizes[self.largest]


def of(cfg) -> FixedPool:
  """The protocol `pipeline.protocol` names."""
  return FixedN(cfg) if cfg.pipeline.protocol == "fixed_n" else FixedPool(cfg)
