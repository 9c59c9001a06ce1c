"""The distilled CoLoR scorer (issue 22): the fit recovers a known score, prediction streams in bounded blocks and
resumes to the same bytes, a scorer that does not fit the pool is refused by name, and the pipeline's
`color_distilled` method selects most of CoLoR's top 1/τ from a scored sample."""
import json
import shutil

import numpy as np
import pytest

from colorjax.distill import cascade as distill_cascade
from colorjax.distill import parts as distill_parts
from colorjax.distill import stage as distill
from colorjax import errors
from colorjax import score
from colorjax.data import stores
from colorjax.pipeline import plan
from colorjax.pipeline import runner
from colorjax.training import ngram_scorer as scorer_lib
from conftest import SMALL_DEMO, make_config


@pytest.mark.parametrize("objective", ["mse", "ordinal"])
def test_the_fit_recovers_a_known_linear_score(objective):
  """Rows of hashed features whose score is the mean of known per-bucket weights: the fitted model ranks held-out
  rows as the true score does (either objective), and the cross-fit's out-of-fold predictions measure it."""
  rng = np.random.default_rng(0)
  buckets, rows, width = 512, 3000, 40
  truth = rng.normal(size=buckets).astype(np.float32)
  features = rng.integers(0, buckets, size=(rows, width)).astype(np.int32)
  features[:, -5:] = buckets  # dropped n-grams count nowhere
  score = scorer_lib.predict(truth, 3.0, features)
  train, held = np.arange(2500), np.arange(2500, rows)
  fit = scorer_lib.fit_linear(lambda r: features[train[r]], score[train], buckets, steps=1500, batch=128, lr=0.05,
                              l2=0.0, seed=0, objective=objective)
  predicted = scorer_lib.predict(fit.weights, fit.bias, features[held])
  # ordinal spends the model on the top of the distribution: less rank agreement over the bulk, the top kept
  assert scorer_lib.spearman(predicted, score[held]) > (0.97 if objective == "mse" else 0.93)
  assert scorer_lib.top_recall(score[held], predicted, 62, 125) > 0.9  # the top 1/8, within the predicted top 1/4
  if objective == "mse":  # in score units (ordinal: a least-squares line maps its score to them)
    assert abs(float(np.mean(predicted - score[held]))) < 0.05
  fit, oof, steps = scorer_lib.cross_fit(lambda r: features[train[r]], score[train], buckets, 5, 0, steps=600,
                                         batch=128, lr=0.05, l2=0.0, objective=objective, eval_every=50)
  assert len(steps) == 5 and 0 < min(steps) and scorer_lib.spearman(oof, score[train]) > 0.9
  curve = scorer_lib.recall_curve(score[train], oof)
  assert curve["8"]["1"] < curve["8"]["2"] <= curve["8"]["4"] <= 1.0 and curve["8"]["8"] == 1.0


def test_early_stopping_keeps_the_best_held_out_model():
  """On noise the held-out loss only rises: the fit stops early and keeps an early model."""
  rng = np.random.default_rng(1)
  features = rng.integers(0, 256, size=(400, 20)).astype(np.int32)
  y = rng.normal(size=400).astype(np.float32)
  fit = scorer_lib.fit_linear(lambda r: features[r], y[:300], 256, steps=3000,
                              batch=64, lr=0.05, l2=0.0, seed=0, held=(lambda r: features[300 + r], y[300:]),
                              eval_every=20)
  assert fit.best_step <= 200


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
  scorer = distill_parts.open_scorer(tmp_path / "sel-parts" / "scorer", store)
  want = np.load(tmp_path / "sel-parts" / "predictions" / distill_parts.PREDICTIONS)
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
    distill_parts.predict_pool(cfg, folder, store, scorer)
  assert max(reads) <= 500 and np.load(folder / "done.npy").sum() == 3
  monkeypatch.setattr(stores.TokenStore, "read", real_read)
  got = distill_parts.predict_pool(cfg, folder, store, scorer)
  assert np.load(folder / "done.npy").all()
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))


def test_a_scorer_that_does_not_fit_the_pool_is_refused(fitted, synthetic_store, tmp_path):
  root, _ = fitted
  scorer_path = tmp_path / "sel-parts" / "scorer"
  with pytest.raises(errors.DataError, match=r"scorer .* tokenizer|tokenizer .* scorer"):
    distill_parts.open_scorer(scorer_path, stores.TokenStore(synthetic_store))
  other = tmp_path / "other-features"
  shutil.copytree(scorer_path, other)
  manifest = json.loads((other / "manifest.json").read_text())
  manifest["features"]["name"] = "word-ngrams-v0"
  (other / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(errors.DataError, match=r"uses features 'word-ngrams-v0'.*fit the scorer again"):
    distill_parts.open_scorer(other, stores.TokenStore(root / "stores" / "pool"))


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
  assert "| color_distilled-tau8 | color_distilled | 8 | " in markdown  # the τ asked for, not pool / k
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
                distill__steps=300, distill__method="color_cascade", distill__parts=str(tmp_path / "parts"),
                distill__target_recall=0.0)  # a fixed factor
  exact = distill.run(make_config("distill", "8", workdir=str(tmp_path / "exact"), distill__cascade_factor=8.0,
                                  **common))
  color = np.load(root / "selections" / "color-tau8" / "index.npy")
  np.testing.assert_array_equal(np.load(exact / "index.npy"), color)
  cheap = distill.run(make_config("distill", "8", workdir=str(tmp_path / "cheap"), distill__cascade_factor=2.0,
                                  **common))
  manifest = json.loads((cheap / "manifest.json").read_text())
  n = stores.TokenStore(root / "stores" / "pool").num_sequences
  sampled = round(0.2 * n)  # the sample keeps its true scores and is never rescored
  assert manifest["cascade"]["reused_sample"] == sampled and manifest["method"] == "color_cascade"
  assert manifest["cascade"]["rescored"] == distill_cascade.rescore_count(2.0, n - sampled, n / (n // 8))
  assert np.isin(color, np.load(cheap / "index.npy")).mean() > 0.8


def test_the_dry_run_prints_each_distilled_selections_scoring_cost():
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  out = run_cli(["--config", "configs/pipeline.py:demo", "--config.dry_run=True",
                 "--config.pipeline.methods=('color', 'random', 'color_distilled', 'color_cascade')"]).stdout
  assert "color_distilled-tau8: scores " in out and "charged 10.0% of scoring its" in out
  # the default cascade_factor 1.5 rescores 1.5/8 of the unsampled 90% on top of the 10% sample: 26.9%
  assert "color_cascade-tau8: scores " in out and "charged 26.9% of scoring its" in out


def test_the_fixed_n_dry_run_counts_each_distilled_selection_once():
  """Issue 29.8: the τ=1 random run's group no longer matches `tau16` selections by substring, so each distill
  selection is priced once, in its own τ's group, and the sample once for all of them."""
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  out = run_cli(["--config", "configs/pipeline.py:books-fixed-n", "--config.dry_run=True",
                 "--config.pipeline.methods=('color', 'random', 'color_distilled', 'color_cascade')"]).stdout
  for tau in (2, 4, 8, 16):
    assert out.count(f"color_distilled-tau{tau}: scores ") == 1 and out.count(f"color_cascade-tau{tau}: scores ") == 1
  tau1 = out[out.index("select tau=1:"):].split("\n\n")[0]
  assert "color_" not in tau1
  # the sample (10% of the largest pool) is charged in proportion to each τ's pool: 10% of scoring it
  assert out.count("charged 10.0% of scoring its") == 4


def test_the_standalone_cascade_dry_run_counts_its_rescoring(demo_run):
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  root, _ = demo_run
  out = run_cli(["--config", "configs/distill.py:8", "--config.dry_run=True", "--config.workdir=/tmp/unused",
                 f"--config.distill.store={root / 'stores' / 'pool'}", "--config.distill.method=color_cascade",
                 f"--config.distill.prior={root / 'runs' / 'prior' / 'params'}",
                 f"--config.distill.conditional={root / 'runs' / 'conditional' / 'params'}"]).stdout
  n = stores.TokenStore(root / "stores" / "pool").num_sequences
  sampled = round(0.1 * n)
  rescored = distill_cascade.rescore_count(1.5, n - sampled, n / (n // 8))
  assert f"the cascade rescores the top {rescored:,} unsampled by prediction" in out
  assert f"2 models x {round(0.1 * n) + rescored:,} sequences" in out


# ----------------------------------------------------------------------------------------------------------------
# Issue 29: damaged files, lineage and late checks


def _common(root, tmp_path, **extra):
  base = dict(distill__store=str(root / "stores" / "pool"), distill__prior=str(root / "runs" / "prior" / "params"),
              distill__conditional=str(root / "runs" / "conditional" / "params"), distill__sample_fraction=0.2,
              distill__steps=200, distill__parts=str(tmp_path / "parts"))
  return dict(base, **extra)


def test_damaged_predictions_and_scorer_weights_are_never_used(fitted, tmp_path, capsys):
  """Issue 29.11-12: a truncated predictions.npy is refused (never zero-filled), an altered block is predicted again
  (the selection is unchanged), damaged or missing scorer weights and done flags are named with the fix."""
  _, cfg = fitted
  parts = tmp_path / "sel-parts"
  want = np.load(tmp_path / "sel" / "index.npy")
  shutil.rmtree(tmp_path / "sel")
  predictions = parts / "predictions" / distill_parts.PREDICTIONS
  data = predictions.read_bytes()
  predictions.write_bytes(data[:-4000])
  with pytest.raises(errors.DataError, match=r"predictions.npy holds .*\(truncated or replaced\); delete .* re-run"):
    distill.run(cfg)
  assert predictions.stat().st_size == len(data) - 4000 and not (tmp_path / "sel").exists()
  values = np.frombuffer(data, np.uint8).copy()
  values[-400:] = 0xFF  # a block of NaNs where predictions were
  predictions.write_bytes(values.tobytes())
  distill.run(cfg)
  assert "no longer match their CRC-32" in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(tmp_path / "sel" / "index.npy"), want)
  assert predictions.read_bytes() == data

  weights = parts / "scorer" / "weights.npy"
  good = weights.read_bytes()
  bad = bytearray(good)
  bad[-8:] = bytes(b ^ 0x40 for b in bad[-8:])  # two weights changed
  weights.write_bytes(bytes(bad))
  store = stores.TokenStore(cfg.distill.store)
  with pytest.raises(errors.DataError, match=r"weights.npy does not match the sha256 .* delete .* fit it again"):
    distill_parts.open_scorer(parts / "scorer", store)
  weights.write_bytes(good[:100])
  with pytest.raises(errors.DataError, match="weights.npy does not match the sha256"):
    distill_parts.open_scorer(parts / "scorer", store)
  weights.unlink()
  with pytest.raises(errors.DataError, match="weights.npy is missing; delete"):
    distill_parts.open_scorer(parts / "scorer", store)
  weights.write_bytes(good)
  done = parts / "predictions" / "done.npy"
  done.write_bytes(done.read_bytes()[:70])
  with pytest.raises(errors.DataError, match=r"done.npy (is not a readable|holds)"):
    distill_parts.open_predictions(parts / "predictions", store.num_sequences)
  done.unlink()
  with pytest.raises(errors.DataError, match=r"done.npy is missing; delete"):
    distill_parts.open_predictions(parts / "predictions", store.num_sequences)


def test_the_output_folder_and_shared_parts_are_checked_before_any_work(demo_run, tmp_path):
  """Issue 29.18: a folder in the way fails before sampling; a second job on the same parts waits for nothing
  half-made; a cascade reusing a scorer names distill.prior; a sample too small to fit is refused up front."""
  root, _ = demo_run
  (tmp_path / "sel").mkdir()
  (tmp_path / "sel" / "notes.txt").write_text("mine")
  cfg = make_config("distill", "8", workdir=str(tmp_path / "sel"), **_common(root, tmp_path))
  with pytest.raises(errors.DataError, match=r"sel exists but is not a distilled selection"):
    distill.run(cfg)
  assert not (tmp_path / "parts").exists()
  from colorjax.artifacts import lineage  # pylint: disable=import-outside-toplevel
  with lineage.Lock(tmp_path / "parts"):
    with pytest.raises(errors.LockedError, match="is being written by"):
      distill.run(make_config("distill", "8", workdir=str(tmp_path / "sel2"), **_common(root, tmp_path)))
  with pytest.raises(errors.ConfigError, match=r"color_cascade rescores .* set --config.distill.prior"):
    distill.run(make_config("distill", "8", workdir=str(tmp_path / "c"), distill__store=str(root / "stores" / "pool"),
                            distill__scorer=str(tmp_path / "parts" / "scorer"), distill__method="color_cascade"))
  with pytest.raises(errors.ConfigError, match=r"samples 2 of .* too few to fit and measure a scorer"):
    distill.run(make_config("distill", "8", workdir=str(tmp_path / "s"),
                            **_common(root, tmp_path, distill__sample_fraction=1e-4)))
  assert not (tmp_path / "parts" / "sample").exists()


def test_a_signal_during_the_fit_or_the_prediction_ends_with_the_preemption_line(demo_run, tmp_path, monkeypatch):
  """Issue 29.18: SIGTERM in the fit or in the pool's prediction stops at a step boundary with errors.Preempted (main
  prints the resume line and exits 143), and the re-run finishes to the same selection."""
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  root, _ = demo_run
  cfg = make_config("distill", "8", workdir=str(tmp_path / "sel"), **_common(root, tmp_path, distill__block_rows=256))
  calls = []

  def signalled(real, at):
    def call(*args, **kwargs):
      calls.append(1)
      if len(calls) == at:
        os.kill(os.getpid(), signal.SIGTERM)
      return real(*args, **kwargs)
    return call

  real_batches, real_predict = scorer_lib.SampleFeatures.__call__, distill_parts.predict
  monkeypatch.setattr(scorer_lib.SampleFeatures, "__call__", signalled(real_batches, 5))  # the fit's 5th batch
  with pytest.raises(errors.Preempted, match="during the scorer's fit at step 5"):
    distill.run(cfg)
  assert not (tmp_path / "parts" / "scorer").exists()
  calls.clear()
  monkeypatch.setattr(scorer_lib.SampleFeatures, "__call__", real_batches)
  monkeypatch.setattr(distill_parts, "predict", signalled(real_predict, 2))  # the pool's second block
  with pytest.raises(errors.Preempted, match=r"during the pool's prediction: 2 of \d+ chunks"):
    distill.run(cfg)
  monkeypatch.setattr(distill_parts, "predict", real_predict)
  selected = np.load(distill.run(cfg) / "index.npy")
  fresh = make_config("distill", "8", workdir=str(tmp_path / "fresh"),
                      **_common(root, tmp_path / "other", distill__block_rows=256))
  np.testing.assert_array_equal(np.load(distill.run(fresh) / "index.npy"), selected)


def test_json_never_holds_nan(tmp_path):
  from colorjax.artifacts import formats, lineage  # pylint: disable=import-outside-toplevel
  lineage.write_manifest(tmp_path, {"rho": float("nan"), "nested": [1.0, float("inf")]})
  assert json.loads((tmp_path / "manifest.json").read_text()) == {"rho": None, "nested": [1.0, None]}
  assert "NaN" not in formats.json_text({"x": float("nan")}) and distill_parts.spearman(np.ones(1), np.ones(1)) is None


def test_the_preflight_asks_the_distill_stage_for_its_requests(demo_run, tmp_path):
  """Issue 29.13-15: with score.fp8 the distill parts' requests carry fp8 (bf16 parts are stale, the pipeline's own
  fp8 parts are not); a reused scorer and the order of the seeds leave a pipeline's distill parts up to date."""
  from colorjax.pipeline import preflight  # pylint: disable=import-outside-toplevel
  work = tmp_path / "work"
  shutil.copytree(demo_run[0], work, symlinks=True)
  methods = ("color", "random", "color_distilled", "color_cascade")
  settings = dict(SMALL_DEMO, pipeline__methods=methods, distill__sample_fraction=0.2, distill__steps=200)
  cfg = make_config("pipeline", "demo", workdir=str(work), **settings)
  runner.run(cfg)

  def stale(**extra):
    c = make_config("pipeline", "demo", workdir=str(work), **dict(settings, **extra))
    return {e.label for e, _ in preflight.stale(preflight.lineage(c, work, plan.stage_configs(c, work)), work)}

  assert stale() == set()
  assert stale(pipeline__seeds=(1, 0)) == set()  # the sample's seed is distill.seed, not the first target seed
  labels = stale(score__fp8=True)
  assert {"distill sample_scores", "distill scorer", "distill predictions"} <= labels and "distill sample" not in labels
  fp8 = make_config("pipeline", "demo", workdir=str(work), **dict(settings, score__fp8=True))
  sel = plan.stage_configs(fp8, work).selections["color_distilled-tau8"]
  models = [{"name": "prior", "id": "p"}, {"name": "conditional_0", "id": "c"}]
  requests = distill_cascade.expected_requests(sel, stores.TokenStore(work / "stores" / "pool"), models)
  # what the score stage itself records for an fp8 job: a fresh fp8 pipeline's parts are up to date on its re-run
  assert requests["sample_scores"]["numerics"] == {"precision": "original", "fp8": True}
  assert requests["sample_scores"]["numerics"] == score.numerics_of(distill_parts.score_config(sel))
  scorer = tmp_path / "scorer"
  shutil.copytree(work / "distill" / "scorer", scorer)
  reuse = dict(settings, distill__scorer=str(scorer), pipeline__methods=("color", "random", "color_distilled"))
  c = make_config("pipeline", "demo", workdir=str(tmp_path / "reuse"), **reuse)
  shutil.copytree(demo_run[0], tmp_path / "reuse", symlinks=True)
  runner.run(c)
  assert not (tmp_path / "reuse" / "distill" / "sample").exists()
  assert {e.label for e, _ in preflight.stale(preflight.lineage(c, tmp_path / "reuse", plan.stage_configs(
      c, tmp_path / "reuse")), tmp_path / "reuse")} == set()


def test_a_bad_distill_value_fails_the_pipeline_before_any_work(tmp_path):
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  for flag in ("--config.dry_run=True", f"--config.workdir={tmp_path / 'w'}"):
    proc = run_cli(["--config", "configs/pipeline.py:demo", flag, "--config.distill.lr=-1",
                    "--config.pipeline.methods=('color', 'color_distilled')"], check=False)
    assert proc.returncode == 2 and "distill.lr > 0" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


def test_an_index_is_identified_by_its_own_bytes_and_named_by_its_setting(demo_run, tmp_path):
  """Issue 29.17-18: two id files in one selection folder are two indexes (not the manifest's); an error names the
  setting the index came from."""
  from colorjax import score  # pylint: disable=import-outside-toplevel
  root, _ = demo_run
  folder = tmp_path / "two"
  shutil.copytree(root / "selections" / "color-tau8", folder)
  np.save(folder / "a.npy", np.arange(10))
  np.save(folder / "b.npy", np.arange(10, 20))
  ids = {name: stores.index_id(folder / name) for name in ("a.npy", "b.npy", "index.npy")}
  assert len(set(ids.values())) == 3 and ids["index.npy"] == json.loads((folder / "manifest.json").read_text())["id"]
  cfg = make_config("score", "tiny", workdir=str(tmp_path / "scores"), score__store=str(root / "stores" / "pool"),
                    score__prior=str(root / "runs" / "prior" / "params"), score__index=str(folder / "missing.npy"),
                    score__conditionals=(str(root / "runs" / "conditional" / "params"),))
  with pytest.raises(errors.DataError, match=r"missing.npy does not exist; .* fix --config.score.index"):
    score.run(cfg)
