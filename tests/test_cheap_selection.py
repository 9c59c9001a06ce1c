"""Cheap selection, round 2 (issue 31): a pipeline of cheap methods scores no whole pool, the cascade reuses its
sample's true scores and sizes itself by a target recall, the sample is a count, prefix NLLs come free with the
scores, and the report draws the exact cost/quality curves from a pool's exact scores."""
import json
import shutil

import jax
import numpy as np
import pytest

from colorjax.distill import parts as distill_parts
from colorjax.distill import stage as distill
from colorjax.data import stores
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.pipeline import runner
from colorjax.training import ngram_scorer as scorer_lib
from colorjax.artifacts import scores as scores_lib
from conftest import SMALL_DEMO, make_config, run_cli

# a fixed cascade factor: the dry run's plan is then exact (with distill.target_recall the factor is chosen after
# the fit, printed with its cost by the stage)
CHEAP = dict(SMALL_DEMO, pipeline__methods=("color_cascade", "random"), distill__sample_fraction=0.2,
             distill__steps=300, distill__target_recall=0.0)


@pytest.fixture(scope="module")
def cheap_run(demo_run, tmp_path_factory):
  """The demo's stores, prior and conditional; a pipeline asking only for the cascade and random."""
  work = tmp_path_factory.mktemp("cheap") / "work"
  shutil.copytree(demo_run[0], work, symlinks=True)
  for name in ("scores", "selections", "report.md", "report.json", "pipeline.json", "plots"):
    path = work / name
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
  for run in work.glob("runs/target-*"):
    shutil.rmtree(run)
  runner.run(make_config("pipeline", "demo", workdir=str(work), **CHEAP))
  return work


def test_a_pipeline_of_cheap_methods_scores_no_whole_pool(cheap_run):
  """Issue 31.1: no scores/ folder; the report's counters say what was scored, within the share the dry run
  printed."""
  work = cheap_run
  assert not (work / "scores").exists()
  report = json.loads((work / "report.json").read_text())
  done = report["scoring_done"]
  assert set(done["folders"]) == {"distill/sample_scores"} | {f for f in done["folders"] if "rescored-" in f}
  pool = stores.TokenStore(work / "stores" / "pool").num_sequences
  cascade = json.loads((work / "selections" / "color_cascade-tau8" / "manifest.json").read_text())["cascade"]
  assert done["model_sequences"] == 2 * (cascade["rescored"] + round(0.2 * pool))
  args = [f"--config.{k.replace('__', '.')}={v!r}" if isinstance(v, tuple) else f"--config.{k.replace('__', '.')}={v}"
          for k, v in CHEAP.items()]
  out = run_cli(["--config", "configs/pipeline.py:demo", "--config.dry_run=True", f"--config.workdir={work}",
                 *args]).stdout
  printed = float(out.split("color_cascade-tau8: scores ")[1].split("charged ")[1].split("%")[0]) / 100
  assert "the pool is not scored" in out or "are not scored" in out
  assert done["share_of_pool"] <= printed + 1e-3
  assert "## Scoring done" in (work / "report.md").read_text()
  assert next(r for r in report["runs"] if r["method"] == "random")["finished"]


def test_the_cascade_reuses_the_samples_true_scores(cheap_run):
  """Issue 31.2: sampled sequences are never rescored, and they compete with the rescored ones by true score."""
  work = cheap_run
  sample = np.load(work / "distill" / "sample" / "index.npy")
  (candidates,) = list((work / "distill").glob("candidates-*"))
  assert not np.isin(np.load(candidates / "index.npy"), sample).any()
  (rescored,) = list((work / "distill").glob("rescored-*"))
  union = []
  for folder in (work / "distill" / "sample_scores", rescored):
    s = scores_lib.Scores(folder)
    nll = s.read(0, s.num_sequences)
    union.append((s.global_ids(np.arange(s.num_sequences)), losses.color_score(nll[:, 0], nll[:, 1])))
  ids, values = np.concatenate([u[0] for u in union]), np.concatenate([u[1] for u in union])
  selected = np.load(work / "selections" / "color_cascade-tau8" / "index.npy")
  k = selected.size
  np.testing.assert_array_equal(selected, np.sort(ids[np.argsort(-values, kind="stable")[:k]]))
  assert np.isin(selected, sample).any()  # some of the kept were only ever scored as part of the sample


def test_a_target_recall_sizes_the_cascade_from_its_estimate(demo_run, tmp_path, capsys):
  """Issue 31.5: the factor is the smallest whose out-of-fold estimate reaches the target; printed with its cost."""
  root, _ = demo_run
  cfg = make_config("distill", "8", workdir=str(tmp_path / "sel"), distill__store=str(root / "stores" / "pool"),
                    distill__prior=str(root / "runs" / "prior" / "params"), distill__sample_fraction=0.2,
                    distill__conditional=str(root / "runs" / "conditional" / "params"), distill__steps=300,
                    distill__method="color_cascade", distill__target_recall=0.95)
  distill.run(cfg)
  manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
  scorer = json.loads((tmp_path / "sel-parts" / "scorer" / "manifest.json").read_text())
  n = stores.TokenStore(root / "stores" / "pool").num_sequences
  factor, estimate = scorer_lib.factor_for(scorer["quality"]["recall_estimate"], 8.0, 0.95, round(0.2 * n) / n)
  assert manifest["cascade"]["factor"] == (factor if factor is not None and factor < 8 else 8.0)
  assert manifest["cascade"]["target_recall"] == 0.95
  assert manifest["cascade"]["estimated_recall"] == pytest.approx(estimate if factor is not None else 1.0)
  out = capsys.readouterr().out
  assert f"cascade factor {manifest['cascade']['factor']:g} (distill.target_recall 0.95: estimated recall" in out


def test_the_sample_is_a_count_at_most_a_share():
  """Issue 31.4: distill_parts.sample_size sequences, capped by distill.sample_fraction of what it is drawn from."""
  cfg = make_config("distill", "8", distill__sample_size=100, distill__sample_fraction=0.1)
  assert [distill_parts.sample_size(cfg, n) for n in (5000, 500, 10)] == [100, 50, 2]
  assert distill_parts.sample_size(make_config("distill", "8", distill__sample_size=0), 5000) == 500
  assert distill_parts.sample_size(make_config("distill", "8"), 342_000_000) == 200_000  # C4: the default count


def test_prefix_nlls_equal_scoring_the_prefix_alone():
  """Issue 31.6: causal attention makes the first k tokens' NLL from the whole pass equal to scoring them alone."""
  spec = transformer.ModelSpec.from_config(make_config("pretrain", "tiny", model__compute_dtype="float32").model)
  params = transformer.init_params(spec, jax.random.PRNGKey(0))
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (3, 64), 2, 500), np.int32)
  full, prefixes = losses.sequence_nll_and_prefixes(spec, params, tokens, None, (16, 32))
  np.testing.assert_allclose(full, losses.sequence_nll(spec, params, tokens, None), rtol=1e-6)
  for j, k in enumerate((16, 32)):
    np.testing.assert_allclose(prefixes[:, j], losses.sequence_nll(spec, params, tokens[:, :k], None), atol=2e-5)


def test_the_score_stage_records_prefix_nlls_beside_the_scores(demo_run):
  root, _ = demo_run
  scores = scores_lib.Scores(root / "scores")
  assert scores.prefixes == (16, 32)  # score.prefix_fractions (0.25, 0.5) of 64 tokens
  prefix = scores.read_prefixes(0, scores.num_sequences)
  assert prefix.shape == (scores.num_sequences, 2, 2) and np.isfinite(prefix).all()
  assert "prefixes" not in scores.manifest["request"]  # diagnostics: the scores' id does not change with them


def test_the_exact_curves_follow_the_pool(demo_run, tmp_path):
  """Issue 31.7: from the pool's exact scores, per sample share the cascade's recall grows with its factor and its
  share of the scoring, and the report shows the table, the prefix agreement and the plot."""
  from colorjax.report import cheap  # pylint: disable=import-outside-toplevel
  work = tmp_path / "work"
  shutil.copytree(demo_run[0], work, symlinks=True)
  cfg = make_config("pipeline", "demo", workdir=str(work), **dict(
      SMALL_DEMO, pipeline__methods=("color", "random", "color_distilled"), distill__steps=300))
  runner.run(cfg)
  result = json.loads((work / "report.json").read_text())["cheap"]
  shares = result["curves"]["shares"]
  assert shares and all(0 < float(s) <= 0.1 for s in shares)
  for entry in shares.values():
    cascade = entry["taus"]["8"]["cascade"]
    recalls, costs = [c["recall"] for c in cascade], [c["share"] for c in cascade]
    assert recalls == sorted(recalls) and costs == sorted(costs) and 0 < recalls[-1] <= 1
  pool_scores = scores_lib.Scores(work / "scores")
  true = cheap._true_scores(pool_scores, np.arange(pool_scores.num_sequences))  # pylint: disable=protected-access
  everything = cheap.cascade_point(true, np.zeros_like(true), np.arange(0), 8.0, 8.0)
  assert everything["recall"] == 1.0 and everything["share"] == 1.0  # rescoring all is exactly CoLoR
  assert set(result["prefix_agreement"]) == {"16", "32"}
  report = (work / "report.md").read_text()
  assert "## Cheap selection against exact CoLoR" in report and "## Prefix agreement" in report
  assert (work / "plots" / "cheap_selection.png").stat().st_size > 0
  stamp = (work / "cheap" / "curves.json").stat().st_mtime_ns
  runner.run(cfg)  # a re-run reuses the cached curves
  assert (work / "cheap" / "curves.json").stat().st_mtime_ns == stamp
