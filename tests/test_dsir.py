"""DSIR: the hashed n-gram weights against a direct computation, streaming, Gumbel top-k, domain enrichment on the
synthetic store, the selection format (train takes it), and bad inputs refused before any work."""
import json

import numpy as np
import pytest

from colorjax import dsir
from colorjax import errors
from colorjax import prepare
from colorjax import train
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import synthetic
from conftest import make_config
from conftest import run_cli
from conftest import tiny_train_overrides

MASK = (1 << 64) - 1


def _mix_int(x: int, key: int) -> int:
  """The splitmix64 finalizer on Python ints: an independent statement of the feature hash."""
  z = (x ^ key) & MASK
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
  return z ^ (z >> 31)


def direct_counts(rows, buckets: int, order: int, skip) -> np.ndarray:
  """[B, buckets] counts by a loop over every n-gram of every row."""
  out = np.zeros((len(rows), buckets), np.int64)
  for b, row in enumerate(rows):
    row = [int(t) for t in row]
    for m in range(1, order + 1):
      for p in range(len(row) - m + 1):
        gram = row[p:p + m]
        if any(t in skip for t in gram):
          continue
        h = (0x9E3779B97F4A7C15 * m) & MASK
        for t in gram:
          h = _mix_int(t, h)
        out[b, h % buckets] += 1
  return out


@pytest.fixture(scope="module")
def target_store(synthetic_store, tmp_path_factory):
  """Recipes only, fresh documents (another seed), tokenized with the synthetic store's tokenizer."""
  root = tmp_path_factory.mktemp("dsir-target")
  text = synthetic.write_domain(root / "text" / "recipes.jsonl.gz", "recipes", 40, seed=2)
  prepare.run(make_config("prepare", prepare__inputs=(str(text),), prepare__tokenizer=str(
      synthetic_store.parent / "tokenizer.json"), prepare__output=str(root / "store"), prepare__seq_len=64,
                          prepare__workers=1))
  return root / "store"


def dsir_config(pool, target, workdir, arg="6", **overrides):
  return make_config("dsir", arg, dsir__store=str(pool), dsir__target=str(target), workdir=str(workdir), **overrides)


def test_weights_equal_a_direct_computation(synthetic_store, target_store):
  pool, target = stores.TokenStore(synthetic_store), stores.TokenStore(target_store)
  rows, target_rows = pool.read(np.arange(0, 1200, 40)), target.read(np.arange(12))
  rows[3, 10] = pool.eos_id  # a boundary in the middle: its unigram and both bigrams are dropped
  skip, buckets = {pool.eos_id, pool.pad_id}, 997
  counts = direct_counts(rows, buckets, 2, skip)
  np.testing.assert_array_equal(dsir.ngram_counts(rows, buckets, 2, sorted(skip)), counts)
  assert counts.sum() == dsir.total_counts([rows], buckets, 2, sorted(skip)).sum() < rows.size * 2 - rows.shape[0]
  target_counts = direct_counts(target_rows, buckets, 2, skip).sum(0)
  p_target, p_raw = target_counts / target_counts.sum(), counts.sum(0) / counts.sum()
  ratio = np.log(p_target + 1e-8) - np.log(p_raw + 1e-8)
  fitted = dsir.fit(dsir.total_counts([target_rows], buckets, 2, sorted(skip)), counts.sum(0))
  np.testing.assert_allclose(fitted, ratio, rtol=1e-12, atol=0)
  np.testing.assert_allclose(dsir.log_weights(rows, fitted, 2, sorted(skip)), counts @ ratio, rtol=1e-9, atol=1e-9)


def test_orders_hash_apart_and_unigrams_only_is_order_1():
  tokens = np.array([[5, 6, 5, 6]], np.uint16)
  assert dsir.ngram_counts(tokens, 10_000, 1).sum() == 4
  assert dsir.ngram_counts(tokens, 10_000, 2).sum() == 7
  assert dsir.ngram_counts(tokens, 10_000, 3).sum() == 9
  np.testing.assert_array_equal(dsir.ngram_counts(tokens, 50, 3), direct_counts(tokens, 50, 3, set()))


def test_blockwise_streaming_equals_one_block(synthetic_store, target_store, tmp_path):
  pool = stores.TokenStore(synthetic_store)
  rows = pool.read(np.arange(pool.num_sequences))
  whole = dsir.total_counts([rows], 1000, 2, [0, 1])
  assert np.array_equal(whole, dsir.total_counts((rows[i:i + 7] for i in range(0, len(rows), 7)), 1000, 2, [0, 1]))
  ratio = np.random.default_rng(0).normal(size=1000)
  one = dsir.log_weights(rows, ratio, 2, [0, 1])
  assert np.array_equal(one, np.concatenate([dsir.log_weights(rows[i:i + 13], ratio, 2, [0, 1])
                                             for i in range(0, len(rows), 13)]))
  small = dsir.run(dsir_config(synthetic_store, target_store, tmp_path / "small", dsir__block_rows=37))
  big = dsir.run(dsir_config(synthetic_store, target_store, tmp_path / "big", dsir__block_rows=1 << 20))
  assert np.array_equal(np.load(small / "log_weights.npy"), np.load(big / "log_weights.npy"))
  assert np.array_equal(np.load(small / "index.npy"), np.load(big / "index.npy"))


def test_gumbel_top_k_draws_k_distinct_ids_deterministically():
  weights = np.random.default_rng(0).normal(size=5000).astype(np.float32)
  ids, _ = dsir.gumbel_top_k(weights, 700, seed=3, block_rows=999)
  assert ids.dtype == np.int64 and ids.size == 700 and np.all(np.diff(ids) > 0)
  assert np.array_equal(ids, dsir.gumbel_top_k(weights, 700, seed=3, block_rows=5000)[0])
  assert not np.array_equal(ids, dsir.gumbel_top_k(weights, 700, seed=4)[0])
  gap = np.zeros(5000, np.float32)
  top = np.random.default_rng(1).choice(5000, 50, replace=False)
  gap[top] = 1000.0
  assert np.array_equal(dsir.gumbel_top_k(gap, 50, seed=3)[0], np.sort(top))


def test_gumbel_top_1_samples_in_proportion_to_the_weights():
  weights = np.log(np.array([1.0, 2.0, 7.0], np.float32))
  picks = np.array([dsir.gumbel_top_k(weights, 1, seed=s)[0][0] for s in range(1500)])
  np.testing.assert_allclose(np.bincount(picks, minlength=3) / picks.size, [0.1, 0.2, 0.7], atol=0.035)


def test_dsir_enriches_the_target_domain_and_train_takes_it(synthetic_store, target_store, tmp_path):
  workdir = tmp_path / "dsir"
  args = ["--config", "configs/dsir.py:6", f"--config.dsir.store={synthetic_store}",
          f"--config.dsir.target={target_store}", f"--config.workdir={workdir}", "--config.dsir.seed=5"]
  proc = run_cli(args)
  assert "recipes" in proc.stdout
  manifest = json.loads((workdir / "manifest.json").read_text())
  store = stores.TokenStore(synthetic_store)
  ids = stores.load_index(workdir, store)
  k = store.num_sequences // 6
  assert manifest["format"] == "colorjax.selection" and manifest["method"] == "dsir" and manifest["k"] == k
  assert ids.size == k and np.all(np.diff(ids) > 0) and np.load(workdir / "index.npy").dtype == np.int64
  assert manifest["id"] == lineage.content_id(manifest["request"]) == stores.index_id(workdir)
  assert manifest["request"]["target"] == stores.TokenStore(target_store).id and manifest["seed"] == 5
  assert manifest["store_path"] == lineage.relative(synthetic_store, workdir)
  rates = {name: r["rate"] for name, r in manifest["sources"].items()}
  assert rates["recipes"] > 0.6 and max(r for name, r in rates.items() if name != "recipes") < 0.05
  assert manifest["score_stats"]["count"] == store.num_sequences
  assert "up to date" in run_cli(args).stdout
  with pytest.raises(errors.DataError, match="tau"):
    dsir.run(dsir_config(synthetic_store, target_store, workdir, "8"))
  run = train.run(make_config("pretrain", "demo", **tiny_train_overrides(
      synthetic_store, tmp_path / "train", data__index=str(workdir), train__max_steps=3)))
  params = json.loads((run / "manifest.json").read_text())
  assert params["steps"] == 3 and params["index_id"] == manifest["id"]


def test_raw_sample_is_a_seeded_subset(synthetic_store, target_store, tmp_path):
  cfg = dsir_config(synthetic_store, target_store, tmp_path / "s", dsir__raw_tokens=64 * 300, dsir__seed=1)
  sample = dsir.raw_ids(cfg, stores.TokenStore(synthetic_store))
  assert sample.size == 300 and np.all(np.diff(sample) > 0)
  whole = dsir_config(synthetic_store, target_store, tmp_path / "s")
  assert dsir.raw_ids(whole, stores.TokenStore(synthetic_store)) is None
  manifest = json.loads((dsir.run(cfg) / "manifest.json").read_text())
  assert manifest["raw"]["sequences"] == 300 and manifest["request"]["raw_tokens"] == 64 * 300


@pytest.mark.parametrize("arg,overrides,error,match", [
    ("0.5", {}, errors.ConfigError, "tau"),
    ("nan", {}, errors.ConfigError, "tau"),
    ("100000", {}, errors.ConfigError, "keeps 0"),
    ("6", {"dsir__tokens": 10}, errors.ConfigError, "keeps 0"),
    ("6", {"dsir__buckets": 0}, errors.ConfigError, "buckets"),
    ("6", {"dsir__smoothing": 0.0}, errors.ConfigError, "smoothing"),
    ("6", {"dsir__target": ""}, errors.ConfigError, "dsir.target"),
    ("6", {"dsir__target": "/nonexistent"}, errors.DataError, "does not exist"),
    ("6", {"workdir": ""}, errors.ConfigError, "workdir"),
])
def test_bad_inputs_fail_before_any_work(synthetic_store, target_store, tmp_path, arg, overrides, error, match):
  overrides = {"workdir": str(tmp_path / "sel"), "dsir__store": str(synthetic_store),
               "dsir__target": str(target_store), **overrides}
  cfg = make_config("dsir", arg, **overrides)
  with pytest.raises(error, match=match):
    dsir.run(cfg)
  assert not list(tmp_path.iterdir())


def test_a_target_with_another_tokenizer_is_refused(synthetic_store, neox_tokenizer_path, tmp_path):
  text = synthetic.write_domain(tmp_path / "text" / "recipes.jsonl.gz", "recipes", 5, seed=2)
  other = tmp_path / "neox"
  prepare.run(make_config("prepare", prepare__inputs=(str(text),), prepare__tokenizer=str(neox_tokenizer_path),
                          prepare__output=str(other), prepare__seq_len=64, prepare__workers=1))
  with pytest.raises(errors.DataError, match="tokenizer"):
    dsir.run(dsir_config(synthetic_store, other, tmp_path / "sel"))
  assert not (tmp_path / "sel").exists()


def test_a_folder_that_is_not_a_selection_is_refused_before_any_work(synthetic_store, target_store, tmp_path):
  (tmp_path / "sel").mkdir()
  with pytest.raises(errors.DataError, match="sel exists but is not a selection"):
    dsir.run(dsir_config(synthetic_store, target_store, tmp_path / "sel"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["sel"] and not list((tmp_path / "sel").iterdir())
