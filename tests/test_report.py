"""The report: data-efficiency arithmetic, seed summaries, and report.md/json from a fake work directory (no
training: every input is a small JSON file written here)."""
import json

import pytest

from colorjax import errors
from colorjax.model import transformer
from colorjax.report import markdown
from colorjax.report import results
from colorjax.report import setup as setup_lib

SPEC = {"d_model": 64, "n_layers": 2, "n_heads": 2, "mlp_hidden": 256, "vocab_size": 1024, "max_seq_len": 64}
TARGET_SPEC = {**SPEC, "d_model": 128, "n_layers": 3}


def _row(method, tau, seed, tokens, loss, role="compare", curve=()):
  return {"name": f"target-{method}-tau{tau:g}-s{seed}", "method": method, "tau": tau, "seed": seed, "role": role,
          "train_tokens": tokens, "finished": True, "target_loss": loss, "loss_name": "target_loss", "tasks": {},
          "tasks_mean": None, "curve": [list(p) for p in curve], "schedule": "data"}


def test_tokens_to_reach_interpolates_and_handles_the_ends():
  curve = [[0, 6.0], [100, 4.0], [200, 3.0]]
  assert results.tokens_to_reach(curve, 3.5) == pytest.approx(150.0)
  assert results.tokens_to_reach(curve, 4.0) == pytest.approx(100.0)
  assert results.tokens_to_reach(curve, 7.0) == 0  # already reached at the first point
  assert results.tokens_to_reach([[50, 2.0]], 2.5) == 50
  assert results.tokens_to_reach(curve, 2.0) is None  # never reached
  assert results.tokens_to_reach([], 2.0) is None


def test_random_tokens_to_match_is_log_linear_with_bounds():
  points = [[100, 3.0], [400, 2.0]]
  tokens, bound, bracket = results.random_tokens_to_match(points, 2.5)
  assert tokens == pytest.approx(200.0) and bound is None  # halfway in log(tokens): sqrt(100 * 400)
  assert bracket == [[100, 3.0], [400, 2.0]]
  assert results.random_tokens_to_match(points, 3.0) == (100, None, [[100, 3.0]])
  assert results.random_tokens_to_match(points, 2.0)[0] == pytest.approx(400.0)
  assert results.random_tokens_to_match(points, 1.5) == (400, "lower", [[400, 2.0]])
  assert results.random_tokens_to_match(points, 3.5) == (100, "upper", [[100, 3.0]])
  assert results.random_tokens_to_match([], 2.5) == (None, None, None)
  # unsorted noise: the first budget that reaches the loss counts, read between its two neighbours
  tokens, bound, bracket = results.random_tokens_to_match([[100, 3.0], [200, 2.8], [400, 2.4], [800, 2.6]], 2.5)
  assert bound is None and 200 < tokens < 400 and bracket == [[200, 2.8], [400, 2.4]]


def test_every_ratio_is_read_between_neighbouring_budgets():
  """Issue 29.3: with random at n, 2n, 4n and 8n, CoLoR's match is interpolated between the two budgets around it,
  and the report names them."""
  rows = [_row("color", 8.0, 0, 100, 2.55), _row("random", 8.0, 0, 100, 3.0), _row("random", 2.0, 0, 200, 2.7),
          _row("random", 2.0, 0, 400, 2.5), _row("random", 2.0, 0, 800, 2.3)]
  rows[2]["role"] = rows[3]["role"] = "budget"
  eff = results.data_efficiency(rows, results.summarize(rows))["tau8"]
  assert eff["bracket"] == [[200, 2.7], [400, 2.5]]
  assert eff["random_tokens_to_match"] == pytest.approx(200 * 2 ** 0.75) and eff["ratio"] == pytest.approx(
      2 * 2 ** 0.75)
  text = "\n".join(markdown._md_efficiency({"tau8": eff}, "m"))  # pylint: disable=protected-access
  assert "read between random at" in text and "| 200 (2.7000) and 400 (2.5000) |" in text


def test_gain_is_the_share_of_colors_gain_over_random():
  """Issue 29.9: report.json and report.md carry each method's share of CoLoR's loss gain over random."""
  rows = [_row("color", 8.0, 0, 100, 2.5), _row("random", 8.0, 0, 100, 3.0), _row("dsir", 8.0, 0, 100, 2.6),
          _row("color", 16.0, 0, 50, 3.0), _row("random", 16.0, 0, 50, 3.0), _row("dsir", 16.0, 0, 50, 2.9)]
  gains = {(g["method"], g["tau"]): g["gain"] for g in results.gains(results.summarize(rows))}
  assert gains[("color", 8.0)] == pytest.approx(1.0) and gains[("dsir", 8.0)] == pytest.approx(0.8)
  assert gains[("dsir", 16.0)] is None  # CoLoR gains nothing over random there: no share to take
  assert ("random", 8.0) not in gains
  summary = results.summarize(rows)
  md = "\n".join(markdown._md_summary(summary, results.gains(summary)))  # pylint: disable=protected-access
  assert "| dsir | 8 | 1 | 100 | 2.6000 | 80.0% |" in md


def test_data_efficiency_from_finished_random_runs():
  rows = [_row("color", 8.0, 0, 50, 2.5), _row("random", 8.0, 0, 100, 3.1), _row("random", 8.0, 1, 100, 2.9),
          _row("random", 2.0, 0, 400, 2.0, role="curve", curve=[(0, 6.0), (200, 3.0), (400, 2.0)])]
  eff = results.data_efficiency(rows, results.summarize(rows))["tau8"]
  assert eff["random_points"] == [[100, pytest.approx(3.0)], [400, 2.0]]
  assert eff["random_tokens_to_match"] == pytest.approx(200.0) and eff["bound"] is None
  assert eff["ratio"] == pytest.approx(4.0)
  assert eff["curve_tokens_to_match"] == pytest.approx(300.0) and eff["curve_ratio"] == pytest.approx(6.0)
  assert eff["curve_lower_bound"] is False


@pytest.mark.parametrize("loss,bound,ratio", [(1.5, "lower", 8.0), (3.5, "upper", 2.0)])
def test_data_efficiency_bounds(loss, bound, ratio):
  rows = [_row("color", 8.0, 0, 50, loss), _row("random", 8.0, 0, 100, 3.0), _row("random", 2.0, 0, 400, 2.0)]
  eff = results.data_efficiency(rows, results.summarize(rows))["tau8"]
  assert eff["bound"] == bound and eff["ratio"] == pytest.approx(ratio)
  assert eff["curve_ratio"] is None and eff["curve_lower_bound"] is None  # no curve run
  cell = markdown._bounded(eff["ratio"], eff["bound"], "x")  # pylint: disable=protected-access
  assert cell == {"lower": ">", "upper": "<"}[bound] + f"{ratio:.1f}x"


def test_unfinished_random_runs_give_no_point():
  rows = [_row("color", 8.0, 0, 50, 2.5), _row("random", 8.0, 0, 100, 3.0), _row("random", 2.0, 0, None, 2.0)]
  rows[2]["finished"] = False
  assert results.random_points(rows) == [[100, 3.0]]


def test_summarize_one_seed_has_no_spread():
  rows = [_row("color", 4.0, 0, 100, 2.5), _row("random", 4.0, 0, 100, 3.0), _row("random", 4.0, 1, 100, 3.2)]
  summary = {s["method"]: s for s in results.summarize(rows)}
  assert summary["color"]["seeds"] == 1 and summary["color"]["target_loss_std"] is None
  assert summary["random"]["target_loss_mean"] == pytest.approx(3.1)
  assert summary["random"]["target_loss_std"] == pytest.approx(0.1414, abs=1e-4)  # sample std over seeds
  gains = results.gains(results.summarize(rows))
  md = "\n".join(markdown._md_summary(results.summarize(rows), gains))  # pylint: disable=protected-access
  assert "| color | 4 | 1 | 100 | 2.5000 | 100.0% | - |" in md and "3.1000 ± 0.1414" in md
  one_seed = "\n".join(markdown._md_summary(results.summarize(rows[:2]), []))  # pylint: disable=protected-access
  assert "±" not in one_seed and "(1 seed)" in one_seed


# ----------------------------------------------------------------------------------------------------------------
# A fake work directory


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj) if not isinstance(obj, list) else "".join(json.dumps(r) + "\n" for r in obj))


def _store(root, name, files, seq_len=64):
  """A token store manifest: files = [(path, label, documents, sequences)]."""
  labels = list(dict.fromkeys(label for _, label, _, _ in files))
  entries = [{"path": str(path), "documents": docs, "sequences": seqs, "label": labels.index(label)}
             for path, label, docs, seqs in files]
  total = sum(seqs for *_, seqs in files)
  _write(root / "stores" / name / "manifest.json", {
      "format": "colorjax.token_store", "version": 1, "seq_len": seq_len, "num_sequences": total,
      "num_tokens": total * seq_len, "num_documents": sum(e["documents"] for e in entries), "labels": labels,
      "files": entries, "tokenizer": {"name": str(root / "data" / "tokenizer.json"), "vocab_size": 1024}})


def _run(root, name, tokens, losses, spec=TARGET_SPEC):
  steps = 10
  records = [{"event": "start", "step": 0, "total_steps": steps, "tokens_planned": tokens}]
  records += [{"event": "eval", "step": i * steps // (len(losses) - 1), "eval/target_loss": loss}
              for i, loss in enumerate(losses)]
  _write(root / "runs" / name / "metrics.jsonl", records)
  _write(root / "runs" / name / "params" / "manifest.json",
         {"model_spec": spec, "tokens": tokens, "steps": steps, "schedule": "data",
          "config": {"train": {"eval_batches": 0}, "eval": {}, "sft": {}}})


def _plan_run(method, tau, seed, role="compare"):
  name = f"target-{method}-tau{tau:g}-s{seed}"
  selection = f"{method}-tau{tau:g}" + (f"-s{seed}" if method == "random" else "")
  return {"name": name, "method": method, "tau": tau, "seed": seed, "role": role, "selection": selection,
          "workdir": f"runs/{name}", "selection_dir": f"selections/{selection}"}


@pytest.fixture
def work(tmp_path):
  """A finished pipeline's work directory, minus the token arrays, scores and selections."""
  root = tmp_path / "work"
  data_dir = tmp_path / "corpus"
  _write(root / "pipeline.json", {
      "preset": "fake", "target": "text",
      "runs": [_plan_run("color", 4.0, 0), _plan_run("random", 4.0, 0), _plan_run("random", 2.0, 0, role="curve")],
      "scores": "scores", "stores": {k: f"stores/{k}" for k in ("pool", "target_train", "target_eval")},
      "prior": "runs/prior/params", "conditional": "runs/conditional/params", "split": "data/split.json",
      "config": {"pipeline": {"target_files": ["bard.jsonl.gz"], "data_dir": str(data_dir), "taus": [4.0],
                              "seeds": [0], "curve_tau": 2.0, "target_split": [0.4, 0.2]},
                 "prior": {"model": SPEC}, "target": {"model": TARGET_SPEC}}})
  _write(root / "data" / "split.json", {
      "request": {"target_files": [["bard.jsonl.gz", "0" * 64]], "pool_files": [["almanac.jsonl.gz", "1" * 64]],
                  "fractions": [0.4, 0.2, 0.3], "group_field": "", "group_regex": "^THE END",
                  "max_chars_per_file": 0, "split_seed": 0},
      "documents": {"target_train": 12, "target_eval": 6, "pool": {"bard": 9, "almanac": 40}},
      "pool_duplicates_dropped": 2,
      "works": {"target_train": ["bard.jsonl.gz: Hamlet", "bard.jsonl.gz: Macbeth"],
                "target_eval": ["bard.jsonl.gz: The Tempest", "bard.jsonl.gz: Cymbeline"],
                "pool": ["bard.jsonl.gz: Othello", "bard.jsonl.gz: Lear"], "unused": ["bard.jsonl.gz: Pericles"]}})
  _store(root, "pool", [(root / "data/pool/bard.jsonl.gz", "bard", 9, 30),
                        (root / "data/pool/almanac.jsonl.gz", "almanac", 40, 70)])
  _store(root, "target_train", [(root / "data/target_train.jsonl.gz", "bard", 12, 20)])
  _store(root, "target_eval", [(root / "data/target_eval.jsonl.gz", "bard", 6, 11)])
  _run(root, "prior", 6400, [7.0, 5.0], spec=SPEC)
  _run(root, "conditional", 1280, [5.0, 4.5], spec=SPEC)
  _run(root, "target-color-tau4-s0", 1600, [7.0, 3.0, 2.5])
  _run(root, "target-random-tau4-s0", 1600, [7.0, 3.5, 3.0])
  _run(root, "target-random-tau2-s0", 6400, [7.0, 3.0, 2.0])
  return root


def test_write_describes_the_setup_and_the_efficiency(work, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # relative paths in pipeline.json are relative to the work dir, not the cwd
  path = results.write(work)
  md = path.read_text()
  result = json.loads((work / "report.json").read_text())
  assert f"`bard.jsonl.gz` (in `{tmp_path / 'corpus'}`)" in md and "Held-out works: The Tempest; Cymbeline." in md
  assert "40% finetune the conditional, 20% are held out to evaluate the targets, 30% join the pool" in md
  assert "| unused | 1 |" in md
  assert "| held-out (target_loss) | 2 | 6 | 11 | 704 |" in md
  assert "| finetune (conditional) | 2 | 12 | 20 | 1,280 |" in md
  assert "| almanac | 40 | 70 | 4,480 | 70.0% |" in md and "| bard | 9 | 30 | 1,920 | 30.0% |" in md
  assert "2 pool documents identical to a target document were dropped" in md
  prior, target = (transformer.param_counts(transformer.ModelSpec(**s))["total"] for s in (SPEC, TARGET_SPEC))
  assert f"| prior | 64 | 2 | 2 | 256 | 1,024 | {prior:,} |" in md
  assert f"| target | 128 | 3 | 2 | 256 | 1,024 | {target:,} |" in md
  assert "`stores/target_eval`: 11 sequences of 64 tokens" in md and "fp32" in md
  assert "±" not in md and "(1 seed)" in md
  assert "from the curve (mid-schedule, understates)" in md and "log(tokens)" in md
  eff = result["data_efficiency"]["tau4"]
  assert eff["random_points"] == [[1600, 3.0], [6400, 2.0]]
  assert eff["random_tokens_to_match"] == pytest.approx(3200.0) and eff["ratio"] == pytest.approx(2.0)
  assert eff["bound"] is None and eff["curve_ratio"] is not None
  assert "| 4 | 1,600 | 2.5000 | 3,200 | 1,600 (3.0000) and 6,400 (2.0000) | 2.0x |" in md
  setup = result["setup"]
  assert setup["target"]["parts"]["target_eval"] == {"works": 2, "documents": 6, "sequences": 11, "tokens": 704}
  assert setup["target"]["parts"]["pool"]["documents"] == 9 and setup["target"]["parts"]["pool"]["works"] == 2
  assert setup["models"]["prior"]["params_total"] == prior and setup["models"]["prior"]["tokens"] == 6400
  assert set(setup["stores"]["pool"]["sources"]) == {"bard", "almanac"}
  assert result["examples"] == {}  # no scores folder: skipped


def test_write_moved_work_dir_and_older_inputs(work, tmp_path):
  moved = tmp_path / "moved"
  work.rename(moved)
  for missing in ("data/split.json", "stores/pool/manifest.json", "runs/prior/params/manifest.json"):
    (moved / missing).unlink()
  plan = json.loads((moved / "pipeline.json").read_text())
  del plan["config"]
  (moved / "pipeline.json").write_text(json.dumps(plan))
  md = results.write(moved).read_text()
  result = json.loads((moved / "report.json").read_text())
  assert result["data_efficiency"]["tau4"]["ratio"] == pytest.approx(2.0)
  assert "prior" not in result["setup"]["models"] and "conditional" in result["setup"]["models"]
  assert "## Target runs" in md and "target-random-tau2-s0" in md


def test_target_summary_reads_older_and_larger_splits(tmp_path):
  split = {"request": {"target_files": [[str(tmp_path / "plays.jsonl.gz"), "0" * 64]],
                       "pool_files": [str(tmp_path / "news.jsonl.gz")], "fractions": [0.3, 0.2], "group_regex": ""},
           "documents": {"target_train": 30, "target_eval": 20, "pool": {"plays": 50, "news": 10}}}
  target = setup_lib.target_summary({"target": "text"}, tmp_path, {}, split, {})
  assert target["files"] == ["plays.jsonl.gz"] and target["heldout_works"] is None
  assert [target["parts"][p]["works"] for p in ("target_train", "target_eval", "pool")] == [30, 20, 50]
  assert setup_lib.pool_summary(tmp_path, {}, split)["files"] == ["plays.jsonl.gz", "news.jsonl.gz"]
  md = "\n".join(markdown._md_target(target, {}))  # pylint: disable=protected-access
  assert "each document is one work" in md and "20% are held out to evaluate the targets, the rest join" in md
  split["works"] = {"target_train": 12_000, "target_eval": ["a", "b"], "pool": 40_000}  # too many names: counts
  target = setup_lib.target_summary({"target": "text"}, tmp_path, {}, split, {})
  assert [target["parts"][p]["works"] for p in ("target_train", "target_eval", "pool")] == [12_000, 2, 40_000]
  md = "\n".join(markdown._md_target(target, {}))  # pylint: disable=protected-access
  assert "Held-out works" not in md  # one work per document: their names would only repeat the documents


def test_write_needs_pipeline_json(tmp_path):
  with pytest.raises(errors.DataError, match="pipeline.json is missing and .* holds none of a pipeline's folders"):
    results.write(tmp_path)


def test_report_on_an_unfinished_pipeline_says_what_is_missing(tmp_path):
  """Issue 29.18: not "not a pipeline work directory" for a pipeline that has simply not finished."""
  (tmp_path / "stores" / "pool").mkdir(parents=True)
  (tmp_path / "runs" / "prior" / "params").mkdir(parents=True)
  (tmp_path / "runs" / "prior" / "params" / "manifest.json").write_text("{}")
  (tmp_path / "runs" / "conditional").mkdir()
  with pytest.raises(errors.DataError) as e:
    results.write(tmp_path)
  message = str(e.value)
  assert "has not finished" in message and "stores, runs/ so far" in message and "finished runs: prior." in message
  assert "not a pipeline work directory" not in message and "Re-run the same pipeline command" in message
