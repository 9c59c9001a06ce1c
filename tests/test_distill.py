"""The distilled CoLoR scorer (issue 22): the fit recovers a known score, prediction streams in bounded blocks and
resumes to the same bytes, a scorer that does not fit the pool is refused by name, and the pipeline's
`color_distilled` method selects most of CoLoR's top 1/τ from a scored sample."""
import json
import shutil

import numpy as np
import pytest

from colorjax import distill
from colorjax import errors
from colorjax.data import stores
from colorjax.pipeline import runner
from conftest import SMALL_DEMO, make_config


def test_the_fit_recovers_a_known_linear_score():
  """Rows of hashed features whose score is the mean of known per-bucket weights: the fitted model ranks held-out
  rows as the true score does."""
  rng = np.random.default_rng(0)
  buckets, rows, width = 512, 3000, 40
  truth = rng.normal(size=buckets).astype(np.float32)
  features = rng.integers(0, buckets, size=(rows, width)).astype(np.int32)
  features[:, -5:] = buckets  # dropped n-grams count nowhere
  score = distill.predict(truth, 3.0, features)
  train, held = np.arange(2500), np.arange(2500, rows)
  weights, bias = distill.fit_linear(lambda r: features[train[r]], score[train], buckets, steps=1500, batch=128,
                                     lr=0.05, l2=0.0, seed=0)
  predicted = distill.predict(weights, bias, features[held])
  assert distill.spearman(predicted, score[held]) > 0.97
  assert abs(float(np.mean(predicted - score[held]))) < 0.05


@pytest.fixture()
def fitted(demo_run, tmp_path):
  """The demo's pool, prior and conditional, and a scorer fitted by the distill stage on a fifth of the pool."""
  root, _ = demo_run
  cfg = make_config("distill", "8", workdir=str(tmp_path / "sel"), distill__store=str(root / "stores" / "pool"),
                    distill__prior=str(root / "runs" / "prior" / "params"), distill__sample_fraction=0.2,
                    distill__conditional=str(root / "runs" / "conditional" / "params"), distill__steps=600)
  distill.run(cfg)
  return root, cfg


def test_prediction_streams_in_blocks_and_a_killed_run_resumes_identically(fitted, tmp_path, monkeypatch):
  root, cfg = fitted
  store = stores.TokenStore(root / "stores" / "pool")
  scorer = distill.open_scorer(tmp_path / "sel-parts" / "scorer", store)
  want = np.load(tmp_path / "sel-parts" / "predictions" / distill.PREDICTIONS)
  cfg.unlock()
  cfg.distill.block_rows = 500
  reads, real_read = [], stores.TokenStore.read

  def dies_after_three(self, ids):
    reads.append(len(ids))
    if len(reads) == 4:
      raise KeyboardInterrupt
    return real_read(self, ids)

  monkeypatch.setattr(stores.TokenStore, "read", dies_after_three)
  folder = tmp_path / "predictions"
  with pytest.raises(KeyboardInterrupt):
    distill.predict_pool(cfg, folder, store, scorer)
  assert max(reads) <= 500 and np.load(folder / "done.npy").sum() == 3
  monkeypatch.setattr(stores.TokenStore, "read", real_read)
  got = distill.predict_pool(cfg, folder, store, scorer)
  assert np.load(folder / "done.npy").all()
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))


def test_a_scorer_that_does_not_fit_the_pool_is_refused(fitted, synthetic_store, tmp_path):
  root, _ = fitted
  scorer_path = tmp_path / "sel-parts" / "scorer"
  with pytest.raises(errors.DataError, match=r"scorer .* tokenizer|tokenizer .* scorer"):
    distill.open_scorer(scorer_path, stores.TokenStore(synthetic_store))
  other = tmp_path / "other-features"
  shutil.copytree(scorer_path, other)
  manifest = json.loads((other / "manifest.json").read_text())
  manifest["features"]["name"] = "word-ngrams-v0"
  (other / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(errors.DataError, match=r"uses features 'word-ngrams-v0'.*fit the scorer again"):
    distill.open_scorer(other, stores.TokenStore(root / "stores" / "pool"))


def test_pipeline_color_distilled_keeps_most_of_colors_selection(demo_run, tmp_path):
  """The methods run in the pipeline from their registry entries and are up to date on a re-run; distilled CoLoR
  keeps most of CoLoR's top 1/τ from scoring a tenth of the pool, the cascade at least as much, its rescoring
  counted in its compute."""
  work = tmp_path / "work"
  shutil.copytree(demo_run[0], work, symlinks=True)
  cfg = make_config("pipeline", "demo", workdir=str(work),
                    pipeline__methods=("color", "random", "color_distilled", "color_cascade"), **SMALL_DEMO)
  runner.run(cfg)
  report = json.loads((work / "report.json").read_text())
  (row,) = [r for r in report["runs"] if r["method"] == "color_distilled"]
  assert row["finished"] and row["target_loss"] > 0
  color = np.load(work / "selections" / "color-tau8" / "index.npy")
  distilled = np.load(work / "selections" / "color_distilled-tau8" / "index.npy")
  assert distilled.size == color.size and np.isin(color, distilled).mean() > 0.7
  cascade = np.load(work / "selections" / "color_cascade-tau8" / "index.npy")
  assert np.isin(color, cascade).mean() >= np.isin(color, distilled).mean()
  rows = {r["method"]: r for r in report["runs"] if r["role"] == "compare"}
  assert 0 < rows["color_cascade"]["compute"]["selection_forward"] < rows["color"]["compute"]["shared"]
  scorer = json.loads((work / "distill" / "scorer" / "manifest.json").read_text())
  assert scorer["quality"]["spearman_heldout"] > 0.3  # a few dozen held-out sequences in this small demo
  quality = report["selections"]
  assert quality["color_distilled-tau8"]["recall"] == pytest.approx(np.isin(color, distilled).mean())
  assert quality["color_distilled-tau8"]["spearman"] == scorer["quality"]["spearman_heldout"]
  assert quality["color-tau8"]["recall"] == 1.0 and quality["color-tau8"]["scoring_share"] == pytest.approx(1.0)
  assert quality["random-tau8-s0"]["scoring_share"] == 0.0
  sampled = quality["color_distilled-tau8"]["scoring_share"]
  assert 0 < sampled < quality["color_cascade-tau8"]["scoring_share"] < 1
  markdown = (work / "report.md").read_text()
  assert "## Selections: scoring cost and agreement with CoLoR" in markdown
  assert (work / "plots" / "loss_vs_selection_compute.png").stat().st_size > 0
  stamp = (work / "selections" / "color_distilled-tau8" / "manifest.json").stat().st_mtime_ns
  runner.run(cfg)
  assert (work / "selections" / "color_distilled-tau8" / "manifest.json").stat().st_mtime_ns == stamp


def test_a_cascade_with_factor_tau_is_exactly_color(demo_run, tmp_path):
  """color_cascade rescores the top factor/τ by prediction with both models; at factor = τ that is the whole pool,
  and the selection is CoLoR's, id for id (the README's claim, and what makes the cascade a dial)."""
  root, _ = demo_run
  common = dict(distill__store=str(root / "stores" / "pool"), distill__prior=str(root / "runs" / "prior" / "params"),
                distill__conditional=str(root / "runs" / "conditional" / "params"), distill__sample_fraction=0.2,
                distill__steps=300, distill__method="color_cascade", distill__parts=str(tmp_path / "parts"))
  exact = distill.run(make_config("distill", "8", workdir=str(tmp_path / "exact"), distill__cascade_factor=8.0,
                                  **common))
  color = np.load(root / "selections" / "color-tau8" / "index.npy")
  np.testing.assert_array_equal(np.load(exact / "index.npy"), color)
  cheap = distill.run(make_config("distill", "8", workdir=str(tmp_path / "cheap"), distill__cascade_factor=2.0,
                                  **common))
  manifest = json.loads((cheap / "manifest.json").read_text())
  n = stores.TokenStore(root / "stores" / "pool").num_sequences
  assert manifest["cascade"]["rescored"] == -(-2 * n // 8) and manifest["method"] == "color_cascade"
  assert np.isin(color, np.load(cheap / "index.npy")).mean() > 0.8


def test_the_dry_run_prints_each_distilled_selections_scoring_cost():
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  out = run_cli(["--config", "configs/pipeline.py:demo", "--config.dry_run=True",
                 "--config.pipeline.methods=('color', 'random', 'color_distilled', 'color_cascade')"]).stdout
  assert "color_distilled-tau8: scores " in out and "(10.0% of scoring the pool)" in out
  # the default cascade_factor 1.5 rescores 1.5/8 of the pool on top of the 10% sample
  assert "color_cascade-tau8: scores " in out and "(28.8% of scoring the pool)" in out
