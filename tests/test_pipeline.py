"""The pipeline: a shrunken demo end to end (report, skip-when-done, re-running one branch), the books split on the
real corpus, and the paper presets' dry runs."""
import gzip
import json
import shutil
import time

import pytest

from colorjax.data import corpus
from colorjax.pipeline import runner
from conftest import SMALL_DEMO, make_config, run_cli

def test_demo_pipeline_reports_every_run(demo_run):
  root, _ = demo_run
  report = json.loads((root / "report.json").read_text())
  names = {r["name"] for r in report["runs"]}
  assert names == {"target-color-tau8-s0", "target-random-tau8-s0", "target-random-tau2-s0"}
  for r in report["runs"]:
    assert {"name", "method", "tau", "seed", "train_tokens", "target_loss", "tasks", "tasks_mean"} <= set(r)
    assert r["finished"] and r["target_loss"] > 0 and r["train_tokens"] > 0
  summary = {(s["method"], s["tau"]): s for s in report["summary"]}
  assert summary[("color", 8.0)]["target_loss_mean"] < summary[("random", 8.0)]["target_loss_mean"]
  assert "tau8" in report["data_efficiency"] and report["data_efficiency"]["tau8"]["ratio"] > 1
  color = report["selections"]["color-tau8"]["sources"]
  assert color["stories"]["rate"] > 5 * max(r["rate"] for name, r in color.items() if name != "stories")
  assert report["examples"]["top"][0]["score"] > report["examples"]["bottom"][0]["score"]
  assert (root / "plots" / "learning_curves.png").stat().st_size > 10_000
  assert (root / "plots" / "score_hist.png").stat().st_size > 10_000
  md = (root / "report.md").read_text()
  assert "## Data efficiency" in md and "| color | 8 |" in md
  split = json.loads((root / "data" / "split.json").read_text())
  assert split["documents"]["target_train"] == 75 and split["documents"]["target_eval"] == 50


def test_rerun_does_nothing_and_one_deleted_branch_reruns_alone(demo_run, capsys):
  root, first_seconds = demo_run
  manifests = {p.parent.parent.name: p.stat().st_mtime_ns for p in (root / "runs").glob("*/params/manifest.json")}
  cfg = make_config("pipeline", "demo", workdir=str(root), **SMALL_DEMO)
  start = time.time()
  runner.run(cfg)
  rerun_seconds = time.time() - start
  out = capsys.readouterr().out
  assert rerun_seconds < min(30, first_seconds / 3), (rerun_seconds, first_seconds)
  assert "params: total" not in out  # no training step started
  assert out.count("nothing to do") + out.count("up to date") >= 10
  shutil.rmtree(root / "selections" / "random-tau8-s0")
  shutil.rmtree(root / "runs" / "target-random-tau8-s0")
  runner.run(cfg)
  out = capsys.readouterr().out
  assert out.count("params: total") == 1 and "select: random k=" in out
  after = {p.parent.parent.name: p.stat().st_mtime_ns for p in (root / "runs").glob("*/params/manifest.json")}
  changed = {name for name in manifests if manifests[name] != after[name]}
  assert changed == {"target-random-tau8-s0"}


def test_report_stage_regenerates_from_the_work_directory(demo_run):
  root, _ = demo_run
  (root / "report.md").unlink()
  out = run_cli(["--config", "configs/report.py", f"--config.workdir={root}"]).stdout
  assert "report:" in out and (root / "report.md").exists()
  fail = run_cli(["--config", "configs/report.py", f"--config.workdir={root / 'nope'}"], check=False)
  assert fail.returncode == 2 and "nope does not exist; give --config.workdir the pipeline's work" in fail.stderr


def test_books_split_keeps_plays_whole_and_parts_disjoint(data_dir, tmp_path):
  cfg = make_config("pipeline", "books", workdir=str(tmp_path), pipeline__max_chars_per_file=200_000,
                    pipeline__data_dir=str(data_dir / "corpus"))
  parts = corpus.split_data(cfg, tmp_path, str(data_dir / "corpus"))
  read = lambda p: [json.loads(line)["text"] for line in gzip.open(p, "rt")]
  finetune, held_out = read(parts["target_train"][0]), read(parts["target_eval"][0])
  pool = [t for p in parts["pool"] for t in read(p)]
  assert finetune and held_out and pool
  assert not set(finetune) & set(held_out) and not (set(finetune) | set(held_out)) & set(pool)
  starts = lambda texts: sum("\n\nby William Shakespeare" in t[:2000] for t in texts)
  shakespeare_pool = read(tmp_path / "data" / "pool" / "shakespeare.jsonl.gz")
  # every part begins with a work's first document: no play is cut across parts
  for part in (finetune, held_out):
    assert "\n\nby William Shakespeare" in part[0][:2000]
  assert starts(finetune) > starts(held_out) > 0
  for name in ("kjv", "linux_doc", "perl_doc"):
    chars = sum(map(len, read(tmp_path / "data" / "pool" / f"{name}.jsonl.gz")))
    assert 200_000 <= chars < 300_000  # whole documents up to the budget
  assert 0 < sum(map(len, shakespeare_pool)) < 300_000
  summary = json.loads((tmp_path / "data" / "split.json").read_text())
  assert summary["documents"]["target_train"] == len(finetune)
  assert corpus.split_data(cfg, tmp_path, str(data_dir / "corpus")) == parts  # done: reused
  other = make_config("pipeline", "books", workdir=str(tmp_path), pipeline__max_chars_per_file=100_000)
  with pytest.raises(Exception, match="max_chars_per_file"):
    corpus.split_data(other, tmp_path, str(data_dir / "corpus"))


@pytest.mark.parametrize("preset,target_steps", [("paper-150m", "24,000 x 256 x 512"),
                                                 ("paper-1.2b", "190,848 x 256 x 512")])
def test_paper_presets_dry_run(preset, target_steps):
  out = run_cli(["--config", f"configs/pipeline.py:{preset}", "--config.dry_run=True",
                 "--config.dry_run_devices=8"]).stdout
  assert "24,000 x 256 x 512 = 3,145,728,000 tokens" in out  # the prior (docs/definitions.md#pipeline)
  assert "params: total=254,067,712 non_embedding=151,045,120" in out
  assert target_steps in out  # tau=7: 342M/7 sequences, single pass (1.2B: 192k-step schedule)
  assert out.count("memory/device (estimate)") >= 6 and "pipeline total:" in out
  if preset == "paper-1.2b":
    assert "params: total=1,414,203,392 non_embedding=1,208,158,208" in out
    assert "20,874 x 256 x 512" in out  # tau=64: 2.7B tokens, stops before the 192k-step schedule ends


def test_two_input_files_with_one_source_label_are_refused(tmp_path):
  """Each file becomes the pool part <label>.jsonl.gz: same-named files in two folders would overwrite each other."""
  from colorjax import errors
  for folder in ("d1", "d2", "t"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / ("news.jsonl" if folder != "t" else "target.jsonl")).write_text('{"text": "x"}\n')
  cfg = make_config("pipeline", "books", pipeline__data_dir=str(tmp_path), pipeline__target_files=("t/*.jsonl",),
                    pipeline__pool_files=("d1/*.jsonl", "d2/*.jsonl"))
  with pytest.raises(errors.ConfigError, match="same source label 'news'") as info:
    corpus.input_files(cfg, str(tmp_path))
  assert all(str(tmp_path / d / "news.jsonl") in str(info.value) for d in ("d1", "d2"))
