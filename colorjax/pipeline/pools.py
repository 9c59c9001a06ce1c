"""The paper's fixed-n protocol (§5.1, Fig. 2): n, the prior's training sequences, is the size of every selection
and of every target's training; the candidates for τ are a pool of τ·n sequences, and the pools are nested (the
τ=4 pool inside the τ=8 pool), drawn once from the pool store by a seeded permutation, so results along τ differ
only by how many candidates each selection saw. One scoring pass of the largest pool serves every τ.

A nested pool is a selection folder (method "nested_pool": index.npy + manifest), so a selection's `within`, a
scoring pass's `score.index` and a RHO-down run's `data.index` name it, and its id is known before it is drawn.
"""
import hashlib
import pathlib
import shutil

from colorjax import errors
from colorjax import select
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores

PROTOCOLS = ("fixed_pool", "fixed_n")
METHOD = "nested_pool"


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


def folder(root: pathlib.Path, tau: float) -> pathlib.Path:
  return root / "pools" / f"tau{tau:g}"


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


def make(path: pathlib.Path, store: stores.TokenStore, sequences: int, seed: int) -> pathlib.Path:
  """Draws (or reuses) the nested pool of `sequences` ids of `store`: the first ones of a seeded permutation."""
  req = request(store.id, sequences, seed)
  if lineage.up_to_date(path, req, "another pool", "choose another --config.workdir"):
    return path
  lineage.check_new(path, "a nested pool", "choose another --config.workdir")
  ids = select.random_sample(store.num_sequences, sequences, seed, 1 << 20)
  data = select.npy_bytes(ids)
  manifest = {"format": formats.SELECTION.format, "id": lineage.content_id(req), "method": METHOD,
              "k": int(sequences), "num_sequences": store.num_sequences, "tau": store.num_sequences / sequences,
              "tokens": int(sequences) * store.seq_len, "store_id": store.id,
              "store_path": lineage.relative(store.path, path), "seed": int(seed),
              "index_sha256": hashlib.sha256(data).hexdigest(), "request": req}
  partial = path.with_name(path.name + ".partial")
  if partial.exists():
    shutil.rmtree(partial)
  partial.mkdir(parents=True)
  (partial / "index.npy").write_bytes(data)
  lineage.write_manifest(partial, manifest)
  lineage.publish(partial, path)
  return path
