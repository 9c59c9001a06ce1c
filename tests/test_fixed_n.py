"""The paper's fixed-n protocol (issue 23): nested pools of τ·n, every selection n sequences from its own pool, one
scoring pass of the largest pool, RHO-down over its pool, random at τ=1, the Figure-2 report; and every method on a
tasks target, whose rendered train examples are DSIR's and RHO-down's target text."""
import json

import numpy as np
import pytest

from colorjax import errors
from colorjax.data import stores
from colorjax.model import losses
from colorjax.pipeline import plan
from colorjax.pipeline import runner
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib
from conftest import SMALL_DEMO, make_config

ALL_METHODS = ("color", "conditional_only", "random", "dsir", "rho_down", "rho_down_prior")
CHEAP = ("color_distilled", "color_cascade")
FIXED_N = dict(SMALL_DEMO, pipeline__protocol="fixed_n", pipeline__taus=(2.0, 4.0), pipeline__methods=ALL_METHODS,
               prior__train__max_steps=20, prior__train__global_batch_size=8, reference__train__max_steps=20,
               target__train__global_batch_size=8, pipeline__curve_tau=2.0)
# the module's run: every method, the cheap ones too, and random at 3n besides n and the curve run's 2n
FIXED_N_RUN = dict(FIXED_N, pipeline__methods=ALL_METHODS + CHEAP, pipeline__random_budgets=(3.0,),
                   distill__sample_fraction=0.2, distill__steps=200)
N = 20 * 8  # the prior's sequences


def _ids(path):
  return np.load(path / "index.npy")


@pytest.fixture(scope="module")
def fixed_n_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("fixed_n") / "work"
  runner.run(make_config("pipeline", "demo", workdir=str(root), **FIXED_N_RUN))
  return root


def test_pools_are_nested_and_every_selection_keeps_n_of_its_own(fixed_n_run):
  root = fixed_n_run
  pools = {tau: _ids(root / "pools" / f"tau{tau:g}") for tau in (1, 2, 4)}
  assert [pools[t].size for t in (1, 2, 4)] == [N, 2 * N, 4 * N]
  assert np.isin(pools[1], pools[2]).all() and np.isin(pools[2], pools[4]).all()
  scores = scores_lib.Scores(root / "scores")  # one pass over the largest pool
  np.testing.assert_array_equal(scores.ids, pools[4])
  for tau in (2, 4):
    rows = scores.read_ids(pools[tau])
    color = losses.color_score(rows[:, 0], rows[:, 1])
    expected = np.sort(pools[tau][np.argsort(-color, kind="stable")[:N]])
    np.testing.assert_array_equal(_ids(root / "selections" / f"color-tau{tau:g}"), expected)
    for name in ("conditional_only", "random", "dsir"):
      folder = next((root / "selections").glob(f"{name}-tau{tau:g}*"))
      ids = _ids(folder)
      assert ids.size == N and np.isin(ids, pools[tau]).all(), folder
      manifest = json.loads((folder / "manifest.json").read_text())
      assert manifest["within"]["sequences"] == tau * N and manifest["request"]["within"]
  assert _ids(next((root / "selections").glob("random-tau1-*"))).size == N
  assert _ids(root / "selections" / "random-tau2-s0").size == N
  curve = _ids(root / "selections" / "random-curve-tau2-s0")  # 1/curve_tau of the largest pool, not the τ=2 run's
  assert curve.size == 2 * N and np.isin(curve, pools[4]).all()
  manifest = json.loads((root / "runs" / "target-random-curve-tau2-s0" / "params" / "manifest.json").read_text())
  assert manifest["tokens"] == 2 * N * 64


def test_every_target_trains_on_n_tokens_and_rho_down_draws_from_its_pool(fixed_n_run):
  root = fixed_n_run
  record = json.loads((root / "pipeline.json").read_text())
  compare = [r for r in record["runs"] if r["role"] == "compare"]
  assert {(r["method"], r["tau"]) for r in compare} >= {(m, t) for m in ALL_METHODS + CHEAP for t in (2.0, 4.0)}
  assert {("random", 1.0)} <= {(r["method"], r["tau"]) for r in compare}
  for r in compare:
    manifest = json.loads((root / r["workdir"] / "params" / "manifest.json").read_text())
    assert manifest["tokens"] == N * 64, r["name"]
    if r["method"].startswith("rho_down"):
      assert manifest["config"]["data"]["index"].endswith(f"pools/tau{r['tau']:g}")
      assert manifest["config"]["train"]["rho_tau"] == r["tau"]


def test_the_report_plots_each_method_against_tau(fixed_n_run):
  root = fixed_n_run
  report = (root / "report.md").read_text()
  assert "## Methods against τ (the paper's Figure 2 in miniature)" in report
  for method in ALL_METHODS:
    assert f"\n| {method} | " in report
  assert "- τ=4, by loss: " in report and "RHO-down + prior second" in report
  assert (root / "plots" / "methods_vs_tau.png").stat().st_size > 0
  summary = json.loads((root / "report.json").read_text())["summary"]
  assert {(s["method"], s["tau"]) for s in summary} >= {("random", 1.0), ("color", 4.0), ("rho_down_prior", 2.0)}


def test_a_pool_store_too_small_for_the_largest_pool_is_refused_before_training(tmp_path):
  cfg = make_config("pipeline", "demo", workdir=str(tmp_path / "w"), **dict(FIXED_N, pipeline__taus=(2.0, 400.0)))
  with pytest.raises(errors.ConfigError, match=r"τ=400 pool needs 64,000 sequences .* prior.train.max_steps"):
    runner.run(cfg)
  assert not (tmp_path / "w" / "runs").exists()


def test_every_method_runs_on_the_tasks_target(tmp_path):
  """target=tasks: DSIR and RHO-down's reference read the tasks' rendered train examples (prompt + gold answer)."""
  root = tmp_path / "work"
  settings = dict(FIXED_N, pipeline__protocol="fixed_pool", pipeline__curve_tau=0.0, pipeline__taus=(4.0,))
  cfg = make_config("pipeline", "demo", workdir=str(root), pipeline__target="tasks", pipeline__tasks=("piqa",),
                    sft__limit=60, eval__tasks=("piqa",), eval__limit=16, **settings)
  runner.run(cfg)
  text = stores.TokenStore(root / "stores" / "target_train")
  assert text.manifest["num_documents"] == 60 and text.manifest["request"]["inputs"][0][0] == "tasks_train.jsonl"
  lines = (root / "data" / "tasks_train.jsonl").read_text().splitlines()
  assert len(lines) == 60 and json.loads(lines[0])["source"] == "piqa"
  dsir = json.loads((next((root / "selections").glob("dsir-tau4-*")) / "manifest.json").read_text())
  assert dsir["target"]["id"] == text.id
  reference = json.loads((root / "runs" / "reference" / "params" / "manifest.json").read_text())
  assert reference["request"]["store"] == text.id
  report = json.loads((root / "report.json").read_text())
  rows = {r["method"]: r for r in report["runs"] if r["role"] == "compare"}
  assert set(rows) == set(ALL_METHODS)
  assert all(r["finished"] and "piqa" in r["tasks"] for r in rows.values())


@pytest.mark.parametrize("preset", ["books-fixed-n", "tasks-fixed-n"])
def test_the_150m_fixed_n_presets_plan_every_stage_on_32_devices(preset):
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  out = run_cli(["--config", f"configs/pipeline.py:{preset},150m", "--config.dry_run=True",
                 "--config.dry_run_devices=32"]).stdout
  assert "fixed n: n = 6,144,000 sequences (3,145,728,000 tokens, the prior's)" in out
  assert "score (dry run): 2 models x 98,304,000 sequences x 512 tokens" in out
  for tau, pool in ((2, "12,288,000"), (4, "24,576,000"), (8, "49,152,000"), (16, "98,304,000")):
    assert f"select tau={tau}: 6,144,000 of a pool of {pool} sequences" in out
    assert f"RHO-down tau={tau}: 2 target runs selecting online from a pool of {pool}" in out
  assert "select tau=1: 6,144,000 of a pool of 6,144,000 sequences" in out
  assert "mesh: data=1 fsdp=32 tensor=1 (32 devices)" in out and "pipeline total: " in out


@pytest.mark.parametrize("arg,message", [("books-fixed-n,huge", "unknown model size 'huge'; choose one of demo"),
                                         ("books,tiny", "only the fixed-n presets take a model size")])
def test_a_bad_preset_size_is_named(arg, message):
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  proc = run_cli(["--config", f"configs/pipeline.py:{arg}", "--config.dry_run=True"], check=False)
  assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_the_prior_trains_outside_the_largest_pool(fixed_n_run):
  """Issue 29.4: no candidate of any τ was prior training data when the store holds τ_max·n + n sequences."""
  root = fixed_n_run
  largest, prior = _ids(root / "pools" / "tau4"), _ids(root / "pools" / "prior")
  pool = stores.TokenStore(root / "stores" / "pool")
  assert not np.isin(prior, largest).any() and prior.size == pool.num_sequences - largest.size
  manifest = json.loads((root / "runs" / "prior" / "params" / "manifest.json").read_text())
  assert manifest["config"]["data"]["index"].endswith("pools/prior")
  assert "outside the largest nested pool" in (root / "report.md").read_text()


def test_a_store_too_small_keeps_the_prior_on_it_all_and_says_so(demo_run, tmp_path):
  from colorjax.pipeline import pools  # pylint: disable=import-outside-toplevel
  from colorjax.report import markdown  # pylint: disable=import-outside-toplevel
  store = stores.TokenStore(demo_run[0] / "stores" / "pool")
  cfg = make_config("pipeline", "demo", workdir=str(tmp_path), **dict(FIXED_N, pipeline__taus=(2.0, 9.0)))
  assert 9 * N <= store.num_sequences < 10 * N  # the τ=9 pool fits, but not the prior's n beside it
  pools.make(pools.folder(tmp_path, 9.0), store, 9 * N, 0)
  manifest = json.loads((pools.make_prior(cfg, tmp_path, store) / "manifest.json").read_text())
  assert manifest["outside_largest_pool"] is False and manifest["k"] == store.num_sequences
  text = "\n".join(markdown._md_prior_data(manifest))  # pylint: disable=protected-access
  assert "too small to keep the prior's sequences outside the largest nested pool" in text


def test_the_random_budgets_bracket_each_data_efficiency_ratio(fixed_n_run):
  """Issue 29.3: random at n, 2n (the curve run) and 3n (pipeline.random_budgets), each trained on its own budget,
  and the report names the two budgets that each ratio is read between."""
  root = fixed_n_run
  ids = _ids(root / "selections" / "random-3n-s0")
  assert ids.size == 3 * N and np.isin(ids, _ids(root / "pools" / "tau4")).all()
  manifest = json.loads((root / "runs" / "target-random-3n-s0" / "params" / "manifest.json").read_text())
  assert manifest["tokens"] == 3 * N * 64 and manifest["schedule_steps"] == 3 * N // 8
  report = json.loads((root / "report.json").read_text())
  points = next(iter(report["data_efficiency"].values()))["random_points"]
  assert [p[0] for p in points] == [N * 64, 2 * N * 64, 3 * N * 64]
  for e in report["data_efficiency"].values():
    assert e["bracket"] and all(list(p) in [list(q) for q in points] for p in e["bracket"])
  assert "read between random at" in (root / "report.md").read_text()


def test_recall_compute_and_gain_follow_each_selections_own_pool(fixed_n_run):
  """Issues 29.5, 29.6, 29.9: each CoLoR selection has 100% recall against itself (recall is keyed by candidates
  and size); CoLoR at τ=2 is charged the scoring of the τ=2 pool (half the largest), and every selection's scoring
  share is of its own pool; gain is in report.json and report.md."""
  root = fixed_n_run
  report = json.loads((root / "report.json").read_text())
  sel = report["selections"]
  assert sel["color-tau2"]["recall"] == 1.0 and sel["color-tau4"]["recall"] == 1.0
  color2, cond2 = _ids(root / "selections" / "color-tau2"), _ids(root / "selections" / "conditional_only-tau2")
  assert sel["conditional_only-tau2"]["recall"] == pytest.approx(np.isin(color2, cond2).mean())
  assert sel["color-tau2"]["scoring_share"] == pytest.approx(1.0) == sel["color-tau4"]["scoring_share"]
  assert sel["color_distilled-tau2"]["scoring_share"] == pytest.approx(0.2, abs=0.01)  # its 20% sample, in proportion
  rows = {(r["method"], r["tau"]): r for r in report["runs"] if r["role"] == "compare"}
  scoring = report["compute"]["scoring"]
  shared = lambda m, t: rows[(m, t)]["compute"]["shared"]
  assert shared("color", 4.0) - shared("color", 2.0) == pytest.approx(scoring / 2, rel=1e-6)
  gains = {(g["method"], g["tau"]): g["gain"] for g in report["gain"]}
  assert gains[("color", 2.0)] == pytest.approx(1.0) and ("dsir", 4.0) in gains
  assert "| gain |" in (root / "report.md").read_text()


def test_the_distill_sample_is_drawn_once_from_the_largest_pool_by_its_own_stream(fixed_n_run):
  """Issue 29.7: not the nested pools' permutation (the first 10% of the store in pool order), but a draw of its own
  from the largest pool, shared by every τ."""
  root = fixed_n_run
  largest, sample = _ids(root / "pools" / "tau4"), _ids(root / "distill" / "sample")
  assert sample.size == round(0.2 * largest.size) and np.isin(sample, largest).all()
  assert not np.isin(sample, _ids(root / "pools" / "tau2")).all()
  pool = stores.TokenStore(root / "stores" / "pool")
  assert not np.array_equal(sample, np.sort(selection_lib.random_sample(pool.num_sequences, sample.size, 0, 1 << 20)))
  manifest = json.loads((root / "distill" / "sample" / "manifest.json").read_text())
  assert manifest["within"]["sequences"] == largest.size and manifest["request"]["stream"] == 13


@pytest.mark.parametrize("preset,size", [("books-fixed-n", "150m"), ("tasks-fixed-n", "1.2b")])
def test_every_paper_scale_target_trains_and_anneals_on_its_own_budget(preset, size):
  """Issue 29.1-2: the curve run trains 8n tokens on a 192,000-step schedule (warmup 8,000), the budget runs 2n and
  4n, and every n-token target 24,000 steps on a schedule of 24,000 (warmup 1,000), for 150M and 1.2B targets."""
  from conftest import run_cli  # pylint: disable=import-outside-toplevel
  out = run_cli(["--config", f"configs/pipeline.py:{preset},{size}", "--config.dry_run=True",
                 "--config.dry_run_devices=64"]).stdout
  curve = out[out.index("select tau=2 (random curve): 49,152,000 of a pool of 98,304,000"):]
  assert "each target: 25,165,824,000 tokens (192,000 steps x 256 x 512), schedule 192,000 steps, warmup 8,000" in (
      curve.split("\n\n")[0])
  for budget, tokens, steps in ((2, "6,291,456,000", "48,000"), (4, "12,582,912,000", "96,000")):
    block = out[out.index(f"select random at {budget}n:"):].split("\n\n")[0]
    assert f"each target: {tokens} tokens ({steps} steps x 256 x 512), schedule {steps} steps" in block
  for tau in (1, 2, 16):
    block = out[out.index(f"select tau={tau}: 6,144,000"):].split("\n\n")[0]
    assert ("each target: 3,145,728,000 tokens (24,000 steps x 256 x 512), schedule 24,000 steps, warmup 1,000"
            in block), tau
  assert "the prior's n come from outside the largest pool" in out


def test_tau_values_whose_names_collide_are_refused():
  """Issue 29.16: 8 and 8.000001 both name runs tau8 and would share each other's runs."""
  cfg = make_config("pipeline", "demo", **dict(FIXED_N, pipeline__taus=(8.0, 8.000001)))
  with pytest.raises(errors.ConfigError, match=r"8\.0 and 8\.000001 are both named '8'"):
    plan.check_settings(cfg)
  with pytest.raises(errors.ConfigError, match=r"random_budgets has 9\.0: each is a multiple of n in \(1, 4\]"):
    plan.check_settings(make_config("pipeline", "demo", **dict(FIXED_N, pipeline__random_budgets=(9.0,))))
