"""The paper's fixed-n protocol (§5.1, Fig. 2): n, the prior's training sequences, is the size of every selection
and of every target's training; the candidates for τ are a pool of τ·n sequences, and the pools are nested (the
τ=4 pool inside the τ=8 pool), drawn once from the pool store by a seeded permutation, so results along τ differ
only by how many candidates each selection saw. One scoring pass of the largest pool serves every τ.

A nested pool is a selection folder (method "nested_pool": index.npy + manifest), so a selection's `within`, a
scoring pass's `score.index` and a RHO-down run's `data.index` name it, and its id is known before it is drawn.

The prior trains on n sequences too; they come from outside the largest pool when the store holds at least τ_max·n
+ n sequences (`pools/prior`: every id the largest pool leaves out), so no candidate was prior training data; a
smaller store leaves the prior on the whole store, which the manifest records and the report's setup says.

Every target's steps and learning-rate schedule follow its own token budget (`fit_schedule`): n for the compared
runs, b·n for random's budget runs (`pipeline.random_budgets`, read between n and the curve run's 8n) and the curve
run, whatever the preset's nominal `target.train.max_steps` is.
"""
import pathlib

import numpy as np

from colorjax import errors
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.selection import artifact as selection_lib

PROTOCOLS = ("fixed_pool", "fixed_n")
METHOD = "nested_pool"
PRIOR_METHOD = "prior_data"  # pools/prior: the ids the prior trains on (outside the largest pool when it can)
PRIOR = "prior"


def fixed_n(cfg) -> int | None:
  """n in sequences (the prior's steps x batch) under pipeline.protocol=fixed_n, else None."""
  if cfg.pipeline.protocol != "fixed_n":
    return None
  return int(cfg.prior.train.max_steps) * int(cfg.prior.train.global_batch_size)


def sizes(cfg) -> dict:
  """τ -> the nested pool's sequences (τ·n), for every τ that draws from one: pipeline.taus and 1 (the random
  baseline on n sequences from the largest pool)."""
  n = fixed_n(cfg)
  return {float(tau): int(round(tau * n)) for tau in sorted(set(cfg.pipeline.taus) | {1.0})}


def largest(cfg) -> float:
  return max(sizes(cfg))


def folder(root: pathlib.Path, tau: float | str) -> pathlib.Path:
  """pools/tau<τ> (a nested pool), or pools/prior for PRIOR."""
  return root / "pools" / (tau if isinstance(tau, str) else f"tau{tau:g}")


def budget_sequences(cfg, budget: float) -> int:
  """Sequences of a random budget run: budget x n."""
  return int(round(budget * fixed_n(cfg)))


def check_budgets(cfg) -> None:
  """pipeline.random_budgets: multiples of n above 1 that the largest pool can hold (fixed n only)."""
  budgets = tuple(cfg.pipeline.random_budgets)
  if budgets and cfg.pipeline.protocol != "fixed_n":
    raise errors.ConfigError(f"pipeline.random_budgets={budgets}: random runs at multiples of n belong to "
                             "pipeline.protocol=fixed_n (the fixed pool protocol's random runs at each τ are its "
                             "budgets); set it to ()")
  for b in budgets:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 1 < b <= largest(cfg):
      raise errors.ConfigError(f"pipeline.random_budgets has {b!r}: each is a multiple of n in (1, {largest(cfg):g}] "
                               "(the largest pool holds that many n), e.g. (2, 4)")


def fit_schedule(train_cfg, sequences: int) -> None:
  """A fixed-n target's steps follow its own budget: `sequences` in one pass, the learning-rate schedule defined on
  those steps and the warmup scaled with it (the preset's warmup / max_steps share: 1000/24,000 for 150M targets,
  8,000/192,000 for 1.2B, the same 1/24), unless the recipe already anneals a single pass to its data."""
  t = train_cfg
  if t.single_pass and t.anneal_to_data:
    return
  steps = max(1, int(sequences) // int(t.global_batch_size))
  if t.max_steps > 0 and steps != t.max_steps:
    t.warmup_steps = max(1, int(round(t.warmup_steps * steps / t.max_steps)))
  t.max_steps = steps
  t.single_pass = True


def request(store_id: str, sequences: int, seed: int) -> dict:
  """What decides a nested pool: the store, its size and the permutation's seed (a smaller pool of the same seed is
  a prefix of the same permutation, so it lies inside the larger one)."""
  return {"method": METHOD, "store": store_id, "sequences": int(sequences), "seed": int(seed)}


def candidates_and_kept(cfg, r: dict, pool_sequences: int) -> tuple[int, int]:
  """(the sequences a target run's selection draws from, the sequences it keeps): the pool and 1/τ of it, or under
  the fixed-n protocol its nested pool and n (the curve run: 1/curve_tau of the largest pool)."""
  n = fixed_n(cfg)
  if n is None or r.get("pool_tau") is None:
    return pool_sequences, int(pool_sequences // r["tau"])
  candidates = sizes(cfg)[r["pool_tau"]]
  if r["role"] == "budget":
    return candidates, budget_sequences(cfg, r["budget"])
  return candidates, (int(candidates // r["tau"]) if r["role"] == "curve" else n)


def check_fits(cfg, pool_sequences: int) -> None:
  """The largest pool fits in the pool store (else a ConfigError naming the settings that size it)."""
  n, wanted = fixed_n(cfg), sizes(cfg)[largest(cfg)]
  if wanted > pool_sequences:
    raise errors.ConfigError(
        f"pipeline.protocol=fixed_n: the τ={largest(cfg):g} pool needs {wanted:,} sequences ({largest(cfg):g} x n = "
        f"{n:,}, the prior's prior.train.max_steps x global_batch_size), but the pool store holds {pool_sequences:,}; "
        "add pool text (pipeline.pool_files, pipeline.max_chars_per_file=0), lower the largest of pipeline.taus or "
        "the prior's steps")


def prior_outside(cfg, store_sequences: int) -> bool:
  """Whether the prior's n sequences can come from outside the largest pool (the store holds τ_max·n + n)."""
  return store_sequences >= sizes(cfg)[largest(cfg)] + fixed_n(cfg)


def prior_request(cfg, store_id: str, store_sequences: int) -> dict:
  """What decides the prior's ids: the store, and the largest pool they leave out (None: the whole store)."""
  largest_req = request(store_id, sizes(cfg)[largest(cfg)], cfg.pipeline.split_seed)
  outside = lineage.content_id(largest_req) if prior_outside(cfg, store_sequences) else None
  return {"method": PRIOR_METHOD, "store": store_id, "outside": outside}


def make(path: pathlib.Path, store: stores.TokenStore, sequences: int, seed: int) -> pathlib.Path:
  """Draws (or reuses) the nested pool of `sequences` ids of `store`: the first ones of a seeded permutation."""
  req = request(store.id, sequences, seed)
  if lineage.up_to_date(path, req, "another pool", "choose another --config.workdir"):
    return path
  lineage.check_new(path, "a nested pool", "choose another --config.workdir")
  ids = selection_lib.random_sample(store.num_sequences, sequences, seed, 1 << 20)
  _write(path, store, ids, req, {"seed": int(seed)})
  return path


def make_prior(cfg, root: pathlib.Path, store: stores.TokenStore) -> pathlib.Path:
  """pools/prior: every store id outside the largest pool (the prior's training ids), or every id when the store
  is too small for that (`prior_outside`)."""
  path = folder(root, PRIOR)
  req = prior_request(cfg, store.id, store.num_sequences)
  if lineage.up_to_date(path, req, "another prior pool", "choose another --config.workdir"):
    return path
  lineage.check_new(path, "the prior's pool", "choose another --config.workdir")
  ids = np.arange(store.num_sequences, dtype=np.int64)
  if req["outside"]:
    ids = np.setdiff1d(ids, stores.load_index(folder(root, largest(cfg)), store, "the largest nested pool"))
  _write(path, store, ids, req, {"outside_largest_pool": bool(req["outside"]),
                                 "largest_pool_sequences": sizes(cfg)[largest(cfg)]})
  return path


def _write(path: pathlib.Path, store: stores.TokenStore, ids: np.ndarray, req: dict, extra: dict) -> None:
  selection_lib.publish(path, ids, selection_lib.manifest(req, req["method"], ids, store.num_sequences, store, path,
                                                          **extra))
