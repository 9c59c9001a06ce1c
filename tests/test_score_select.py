"""Scoring (vmapped multi-model, sharded, resumable, shardable, multi-host), exact bounded top-k selection, export."""
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colorjax import errors
from colorjax import score as score_lib
from colorjax import select as select_lib
from colorjax.artifacts import formats
from colorjax.data import stores
from colorjax.model import losses
from colorjax.training import checkpoint
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib
from conftest import REPO, make_config, run_cli


@pytest.fixture(scope="module")
def conditional(synthetic_prior, tmp_path_factory):
  """A second params export: the prior with perturbed weights (a stand-in conditional with different scores)."""
  export, _ = synthetic_prior
  manifest = checkpoint.read_params_manifest(export)
  spec = checkpoint.spec_from_manifest(manifest, make_config("pretrain", "demo").model)
  params, _ = checkpoint.load_params(export, spec)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(np.float32), params)
  folder = tmp_path_factory.mktemp("cond") / "params"
  return checkpoint.export_params(folder, params, dict(manifest, id="perturbed"), export / "tokenizer.json")


def score_args(store, prior, conditional, workdir, **extra):
  base = {"score.store": store, "score.prior": prior, "score.conditionals": (str(conditional),),
          "workdir": workdir, "score.batch_size": 16, "score.chunk_rows": 64, "model.compute_dtype": "float32"}
  base.update(extra)
  return ["--config", "configs/score.py:demo"] + [
      f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in base.items()]


def read_bits(folder):
  scores = scores_lib.Scores(folder)
  return scores.read(0, scores.num_sequences).view(np.uint32)


def test_vmapped_scores_equal_separate_plain_forward_on_1_and_8_devices(synthetic_store, synthetic_prior,
                                                                        conditional, tmp_path):
  prior, _ = synthetic_prior
  outs = {}
  for devices in (1, 8):
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    tiled = ["--config.score.vocab_tile=64"] if devices == 8 else []  # the online-logsumexp head, same scores
    run_cli(score_args(str(synthetic_store), str(prior), conditional, str(tmp_path / f"d{devices}")) + tiled,
            env_extra=env)
    outs[devices] = scores_lib.Scores(tmp_path / f"d{devices}")
  store = stores.TokenStore(synthetic_store)
  n = store.num_sequences
  got = outs[1].read(0, n)
  assert got.shape == (n, 2) and got.dtype == np.float32 and outs[1].columns == ["prior", "conditional_0"]
  outs[1].check_complete()
  np.testing.assert_allclose(outs[8].read(0, n), got, rtol=2e-5)
  spec = checkpoint.spec_from_manifest(checkpoint.read_params_manifest(prior),
                                       make_config("score", "demo", model__compute_dtype="float32").model)
  tokens = jnp.asarray(store.read(np.arange(n)))  # rows in global-id order
  for column, folder in enumerate((prior, conditional)):
    params, _ = checkpoint.load_params(folder, spec)
    plain = jax.jit(lambda p, t: losses.sequence_nll(spec, p, t, None))
    want = np.concatenate([np.asarray(plain(params, tokens[i:i + 128])) for i in range(0, n, 128)])
    np.testing.assert_allclose(got[:, column], want, rtol=1e-5)
  assert np.abs(got[:, 0] - got[:, 1]).max() > 1e-3  # the two models really differ


def _done_count(folder):
  try:
    return int(scores_lib.Scores(folder).done().sum())
  except Exception:  # not created yet
    return 0


def test_killed_scoring_resumes_to_a_byte_identical_array(synthetic_store, synthetic_prior, conditional, tmp_path):
  prior, _ = synthetic_prior
  reference = tmp_path / "reference"
  run_cli(score_args(str(synthetic_store), str(prior), conditional, str(reference)))
  want = read_bits(reference)
  total = scores_lib.Scores(reference).done().size
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  for kill_after in (1, total // 2, total - 2):
    folder = tmp_path / f"killed{kill_after}"
    args = [sys.executable, "-m", "colorjax.main"] + score_args(str(synthetic_store), str(prior), conditional,
                                                                str(folder))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _done_count(folder) < kill_after and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _done_count(folder)
    assert 0 < partial < total, f"kill point {kill_after} missed: {partial} of {total} chunks done"
    resumed = run_cli(score_args(str(synthetic_store), str(prior), conditional, str(folder)))
    assert f"{partial} of {total} chunks already done" in resumed.stdout
    np.testing.assert_array_equal(read_bits(folder), want)


def test_independent_shards_fill_one_array(synthetic_store, synthetic_prior, conditional, tmp_path):
  prior, _ = synthetic_prior
  run_cli(score_args(str(synthetic_store), str(prior), conditional, str(tmp_path / "whole")))
  for shard in ("1/3", "0/3"):
    out = run_cli(score_args(str(synthetic_store), str(prior), conditional, str(tmp_path / "sharded"),
                             **{"score.shard": shard})).stdout
    assert "complete" not in out.splitlines()[-1] or shard == "0/3"
  with pytest.raises(errors.DataError, match="incomplete"):
    scores_lib.Scores(tmp_path / "sharded").check_complete()
  run_cli(score_args(str(synthetic_store), str(prior), conditional, str(tmp_path / "sharded"),
                     **{"score.shard": "2/3"}))
  np.testing.assert_array_equal(read_bits(tmp_path / "sharded"), read_bits(tmp_path / "whole"))
  same = run_cli(score_args(str(synthetic_store), str(prior), conditional, str(tmp_path / "whole"),
                            **{"score.chunk_rows": 128}))
  assert "nothing to do" in same.stdout  # finished scores of the same pool and models are reused
  clash = run_cli(score_args(str(synthetic_store), str(prior), prior, str(tmp_path / "whole")), check=False)
  assert clash.returncode != 0 and "holds scores of another job (differs in models" in clash.stderr


def test_two_hosts_write_their_own_rows(synthetic_store, synthetic_prior, conditional, tmp_path):
  prior, _ = synthetic_prior
  run_cli(score_args(str(synthetic_store), str(prior), conditional, str(tmp_path / "one")))
  env = dict(os.environ, HOSTS="2", DEVICES="2", PYTHON=sys.executable, PYTHONPATH=str(REPO))
  proc = subprocess.run(["bash", "launch/local_hosts.sh"] + score_args(
      str(synthetic_store), str(prior), conditional, str(tmp_path / "two")), cwd=REPO, env=env, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(scores_lib.Scores(tmp_path / "two").read(0, 10 ** 6),
                             scores_lib.Scores(tmp_path / "one").read(0, 10 ** 6), rtol=2e-5)


class ArrayStream:
  def __init__(self, values, block):
    self.values, self.block = values, block

  def __iter__(self):
    for start in range(0, self.values.size, self.block):
      yield start, self.values[start:start + self.block]


def reference_top_k(values, k):
  order = np.lexsort((np.arange(values.size), -values.astype(np.float64)))  # by score desc, then id asc
  return np.sort(order[:k])


@pytest.mark.parametrize("n,tau,distinct,block", [(10_007, 7, None, 1000), (5_000, 16, 13, 333),
                                                  (999, 64, 2, 100), (1_000, 1, None, 64), (64, 7, 1, 10)])
def test_top_k_equals_argsort_reference(n, tau, distinct, block):
  rng = np.random.default_rng(n)
  values = rng.standard_normal(n).astype(np.float32) * 3
  if distinct:
    values = rng.integers(-distinct // 2, distinct - distinct // 2, n).astype(np.float32) / 4  # many exact ties
  k = n // tau
  ids, threshold = selection_lib.top_k(ArrayStream(values, block), k)
  np.testing.assert_array_equal(ids, reference_top_k(values, k))
  assert ids.dtype == np.int64 and threshold == np.sort(values)[::-1][k - 1]


def test_sortable_keys_preserve_float_order():
  values = np.array([-np.inf, -1e30, -2.5, -1e-40, 0.0, 1e-40, 1.0, 3.5e20, np.inf], np.float32)
  keys = selection_lib.sortable_keys(values)
  assert np.all(np.diff(keys.astype(np.int64)) > 0)
  assert [selection_lib.key_to_float(k) for k in keys] == values.tolist()


def _fake_scores(folder, store, nll):
  """A finished score folder holding given NLLs (to test selection without a model)."""
  manifest = {"format": formats.SCORES.format, "num_sequences": len(nll), "columns": ["prior", "conditional_0"],
              "models": [{"name": "prior"}, {"name": "conditional_0"}], "chunk_rows": 64, "batch_size": 16,
              "store": {"path": str(store.path), "id": store.id, "seq_len": store.seq_len}}
  scores_lib.open_output(folder, manifest, -(-len(nll) // 64))
  scores = scores_lib.Scores(folder)
  scores.nll[:].write(nll).result()
  scores_lib.zarr(folder / "done.zarr")[:].write(np.ones(-(-len(nll) // 64), np.uint8)).result()
  return scores


def test_select_stage_methods_and_manifest(synthetic_store, tmp_path):
  store = stores.TokenStore(synthetic_store)
  n = store.num_sequences
  rng = np.random.default_rng(1)
  nll = np.stack([rng.uniform(2, 6, n), rng.uniform(2, 6, n)], 1).astype(np.float32)
  _fake_scores(tmp_path / "scores", store, nll)
  common = {"select__scores": str(tmp_path / "scores"), "select__block_rows": 100}
  color = select_lib.run(make_config("select", "color,7", workdir=str(tmp_path / "color"), **common))
  ids = np.load(color / "index.npy")
  manifest = json.loads((color / "manifest.json").read_text())
  k = n // 7
  assert manifest["k"] == k == ids.size and manifest["store_id"] == store.id
  np.testing.assert_array_equal(ids, reference_top_k(nll[:, 0] - nll[:, 1], k))
  assert manifest["threshold"] == pytest.approx(np.sort(nll[:, 0] - nll[:, 1])[::-1][k - 1])
  assert sum(r["pool"] for r in manifest["sources"].values()) == n
  assert sum(manifest["score_stats"]["hist_counts"]) == n
  cond_only = select_lib.run(make_config("select", "conditional_only,7", workdir=str(tmp_path / "c"), **common))
  np.testing.assert_array_equal(np.load(cond_only / "index.npy"), reference_top_k(-nll[:, 1], k))
  rand = [np.load(select_lib.run(make_config("select", "random,7", workdir=str(tmp_path / f"r{i}"), seed=s,
                                             **common)) / "index.npy") for i, s in enumerate((0, 0, 1))]
  assert rand[0].size == k and len(set(rand[0].tolist())) == k and np.all(np.diff(rand[0]) > 0)
  np.testing.assert_array_equal(rand[0], rand[1])
  assert not np.array_equal(rand[0], rand[2])
  by_tokens = select_lib.run(make_config("select", "color", workdir=str(tmp_path / "t"), select__tokens=100 * 64,
                                         **common))
  assert np.load(by_tokens / "index.npy").size == 100
  assert select_lib.run(make_config("select", "color,7", workdir=str(tmp_path / "color"), **common)) == color
  with pytest.raises(errors.DataError, match=r"holds another selection made from other inputs or settings \(differs "
                     r"in: tau\)"):
    select_lib.run(make_config("select", "color,8", workdir=str(tmp_path / "color"), **common))
  assert json.loads((color / "manifest.json").read_text())["scores"]["path"] == "../scores"  # relocatable
  bad = {"tau": (100000.0, "keeps 0 of the pool's 1,761"), "tau_nan": (float("nan"), "tau is a number >= 1"),
         "tokens": (-1000, "select.tokens=-1000")}
  for name, (value, message) in bad.items():
    field = {"select__tokens": value} if name == "tokens" else {"select__tau": value}
    with pytest.raises(errors.ConfigError, match=re.escape(message)):
      select_lib.run(make_config("select", "color", workdir=str(tmp_path / name), **common, **field))
    assert not (tmp_path / name).exists()
  (tmp_path / "by_hand").mkdir()
  with pytest.raises(errors.DataError, match="by_hand exists but is not a selection"):
    select_lib.run(make_config("select", "color,7", workdir=str(tmp_path / "by_hand"), **common))
  assert list((tmp_path / "by_hand").iterdir()) == []
  with pytest.raises(errors.ConfigError, match="set --config.select.scores"):
    select_lib.run(make_config("select", "color,7", workdir=str(tmp_path / "unset")))
  nll[5, 0] = np.nan
  scores_lib.Scores(tmp_path / "scores").nll[:].write(nll).result()
  with pytest.raises(errors.DataError, match="sequence 5 is NaN"):
    select_lib.run(make_config("select", "color,7", workdir=str(tmp_path / "nan"), **common))


def _selection_by_id(synthetic_store, tmp_path, tau: int):
  """A CoLoR selection whose score is the sequence id (prior NLL = id, conditional NLL = 0): the top ids."""
  store = stores.TokenStore(synthetic_store)
  nll = np.stack([np.arange(store.num_sequences), np.zeros(store.num_sequences)], 1).astype(np.float32)
  _fake_scores(tmp_path / "scores", store, nll)
  return store, select_lib.run(make_config("select", f"color,{tau}", workdir=str(tmp_path / "sel"),
                                           select__scores=str(tmp_path / "scores")))


def test_export_writes_the_selected_text(synthetic_store, tmp_path):
  store, selection = _selection_by_id(synthetic_store, tmp_path, 50)
  out = run_cli(["--config", "configs/export.py", f"--config.export.selection={selection}",
                 f"--config.workdir={tmp_path / 'export'}"]).stdout
  rows = [json.loads(line) for line in gzip.open(tmp_path / "export" / "selection.jsonl.gz", "rt")]
  ids = np.load(selection / "index.npy")
  assert [r["id"] for r in rows] == ids.tolist()
  assert [r["score"] for r in rows] == pytest.approx(ids.astype(float).tolist())  # prior NLL = id, cond = 0
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(store.tokenizer_path()))
  assert tok.encode(rows[0]["text"], add_special_tokens=False).ids[:20] == store.read([ids[0]])[0][:20].tolist()
  breakdown = json.loads((tmp_path / "export" / "breakdown.json").read_text())
  assert sum(r["selected"] for r in breakdown.values()) == ids.size
  assert {r["source"] for r in rows} <= set(store.labels()) and "selected" not in out


def test_two_hosts_export_their_shares_of_the_selection(synthetic_store, tmp_path):
  _, selection = _selection_by_id(synthetic_store, tmp_path, 20)
  args = ["--config", "configs/export.py", f"--config.export.selection={selection}"]
  run_cli(args + [f"--config.workdir={tmp_path / 'one'}"])
  env = dict(os.environ, HOSTS="2", DEVICES="1", PYTHON=sys.executable, PYTHONPATH=str(REPO))
  proc = subprocess.run(["bash", "launch/local_hosts.sh"] + args + [f"--config.workdir={tmp_path / 'two'}"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  parts = sorted((tmp_path / "two").glob("selection-*-of-00002.jsonl.gz"))
  assert [p.name for p in parts] == ["selection-00000-of-00002.jsonl.gz", "selection-00001-of-00002.jsonl.gz"]
  two = [line for p in parts for line in gzip.open(p, "rt")]
  assert all(len(list(gzip.open(p, "rt"))) > 0 for p in parts)
  assert two == list(gzip.open(tmp_path / "one" / "selection.jsonl.gz", "rt"))
  assert (tmp_path / "two" / "breakdown.json").read_text() == (tmp_path / "one" / "breakdown.json").read_text()


def test_index_from_another_store_is_refused(synthetic_store, tmp_path):
  store = stores.TokenStore(synthetic_store)
  folder = tmp_path / "sel"
  folder.mkdir()
  np.save(folder / "index.npy", np.arange(10))
  (folder / "manifest.json").write_text(json.dumps({"store_id": "somethingelse"}))
  with pytest.raises(errors.DataError, match="point --config.data.train_store"):
    stores.load_index(folder, store)


def test_sigterm_stops_scoring_after_the_finished_chunks(synthetic_store, synthetic_prior, conditional, tmp_path,
                                                         capsys):
  """Issue 12.3: SIGTERM ends a score job cleanly (exit 143) with every finished chunk written and flagged, nothing
  else flagged; the re-run scores the rest and ends with the bytes of an uninterrupted job."""
  prior, _ = synthetic_prior
  small = {"score.chunk_rows": 16}  # one step per chunk: ~110 chunks, so the job is still running when told
  config = lambda folder: make_config("score", "demo", score__store=str(synthetic_store), score__prior=str(prior),
                                      score__conditionals=(str(conditional),), workdir=str(folder),
                                      score__batch_size=16, score__chunk_rows=16, model__compute_dtype="float32")
  reference = tmp_path / "reference"
  score_lib.run(config(reference))
  want = read_bits(reference)
  folder = tmp_path / "stopped"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "colorjax.main"] + score_args(str(synthetic_store), str(prior), conditional,
                                                              str(folder), **small)
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while _done_count(folder) < 2 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  found = re.search(r"colorjax score: preempted after step \d+ of \d+: (\d+) of (\d+) row chunks are written", err)
  assert found, err[-3000:]
  partial, total = int(found.group(1)), int(found.group(2))
  done = scores_lib.Scores(folder).done()
  assert 2 <= partial < total == done.size and done.sum() == partial
  assert done[:partial].all()  # one host scores its chunks in order
  got = read_bits(folder)
  rows = partial * 16
  np.testing.assert_array_equal(got[:rows], want[:rows])
  assert np.isnan(scores_lib.Scores(folder).read(rows, 10 ** 6)).all()  # nothing past them was written

  capsys.readouterr()
  score_lib.run(config(folder))
  assert f"{partial} of {total} chunks already done" in capsys.readouterr().out
  np.testing.assert_array_equal(read_bits(folder), want)


def test_a_score_folder_whose_start_died_before_its_manifest(synthetic_store, tmp_path):
  """Arrays without a manifest (a killed start, or a shard job starting at the same moment) are reopened when they
  have the job's layout, and refused by name when they do not."""
  store = stores.TokenStore(synthetic_store)
  nll = np.ones((store.num_sequences, 2), np.float32)
  _fake_scores(tmp_path / "s", store, nll)
  (tmp_path / "s" / "manifest.json").unlink()
  np.testing.assert_array_equal(_fake_scores(tmp_path / "s", store, nll).read(0, 5), nll[:5])
  (tmp_path / "s" / "manifest.json").unlink()
  with pytest.raises(errors.DataError, match="nll.zarr exists with another shape or dtype"):
    _fake_scores(tmp_path / "s", store, nll[:-1])


def test_a_damaged_score_chunk_is_named_and_rescored_by_verify(synthetic_store, synthetic_prior, conditional,
                                                               tmp_path, capsys):
  """Issue 21.1: a chunk file overwritten after it was written: select names it and the fix; `score.verify`
  re-scores exactly the damaged chunks, to the bytes of the undamaged run (the other chunks are not recomputed)."""
  prior, _ = synthetic_prior
  config = lambda **kw: make_config("score", "demo", score__store=str(synthetic_store), score__prior=str(prior),
                                    score__conditionals=(str(conditional),), workdir=str(tmp_path / "scores"),
                                    score__batch_size=16, score__chunk_rows=512, model__compute_dtype="float32", **kw)
  score_lib.run(config())
  want = read_bits(tmp_path / "scores")
  chunk_file = tmp_path / "scores" / "nll.zarr" / "1.0"
  untouched = (tmp_path / "scores" / "nll.zarr" / "0.0").stat().st_mtime_ns
  chunk_file.write_bytes(np.random.default_rng(0).bytes(chunk_file.stat().st_size))
  with pytest.raises(errors.DataError, match=r"nll.zarr: rows .* are unreadable .*--config.score.verify=True"):
    select_lib.run(make_config("select", "color,4", workdir=str(tmp_path / "sel"),
                               select__scores=str(tmp_path / "scores")))
  assert not (tmp_path / "sel").exists()
  capsys.readouterr()
  score_lib.run(config())  # without verify: the done flags say complete
  assert "nothing to do" in capsys.readouterr().out
  score_lib.run(config(score__verify=True))
  out = capsys.readouterr().out
  assert "1 of 4 chunks" in out and "damaged (chunks [1])" in out and "3 of 4 chunks already done" in out
  np.testing.assert_array_equal(read_bits(tmp_path / "scores"), want)
  assert (tmp_path / "scores" / "nll.zarr" / "0.0").stat().st_mtime_ns == untouched
  score_lib.run(config(score__verify=True))
  assert "none damaged" in capsys.readouterr().out


def test_scores_in_another_precision_are_another_artifact(synthetic_store, synthetic_prior, conditional, tmp_path):
  """Issue 21.3: the compute dtype is in the scores' request, so fp32 scores never pass for bf16 ones (nor mix on a
  resume); the default (bf16) request is the one scores had before the field existed."""
  prior, _ = synthetic_prior
  config = lambda dtype: make_config("score", "demo", score__store=str(synthetic_store), score__prior=str(prior),
                                     score__conditionals=(str(conditional),), workdir=str(tmp_path / "scores"),
                                     score__batch_size=16, score__chunk_rows=512, model__compute_dtype=dtype)
  score_lib.run(config("bfloat16"))
  manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
  assert "numerics" not in manifest["request"] and set(manifest["request"]) == {"store", "models"}
  with pytest.raises(errors.DataError, match=r"holds scores of another job \(differs in numerics"):
    score_lib.run(config("float32"))


def test_fp8_scoring_is_an_opt_in_artifact_near_the_bf16_scores(synthetic_store, synthetic_prior, conditional, tmp_path,
                                                                capsys):
  """Issue 24.2: score.fp8 quantizes the trunk's matmuls (scores move, a little), says so, and its scores are
  another artifact: its request records fp8, and a bf16 score folder refuses to be resumed in fp8."""
  prior, _ = synthetic_prior
  config = lambda folder, fp8: make_config("score", "demo", score__store=str(synthetic_store), score__prior=str(prior),
                                           score__conditionals=(str(conditional),), workdir=str(tmp_path / folder),
                                           score__batch_size=16, score__chunk_rows=512, score__fp8=fp8)
  score_lib.run(config("bf16", False))
  assert "score: fp8" not in capsys.readouterr().out
  score_lib.run(config("fp8", True))
  assert "score: fp8 (score.fp8, opt-in)" in capsys.readouterr().out
  bf16, fp8 = scores_lib.Scores(tmp_path / "bf16"), scores_lib.Scores(tmp_path / "fp8")
  assert fp8.manifest["request"]["numerics"] == {"precision": "original", "fp8": True}
  assert fp8.id != bf16.id
  nll_bf16, nll_fp8 = bf16.read(0, bf16.num_sequences), fp8.read(0, fp8.num_sequences)
  gap = np.abs(nll_fp8 - nll_bf16)
  assert 0 < gap.max() < 0.1 and gap.mean() < 0.03, (gap.max(), gap.mean())
  with pytest.raises(errors.DataError, match=r"holds scores of another job \(differs in numerics"):
    score_lib.run(config("bf16", True))


def test_fp8_quantization_keeps_three_mantissa_bits_under_a_power_of_two_scale():
  """fp8_qdq: e4m3 values under a power-of-two scale come back exactly; anything else within e4m3's relative
  step (2^-4) once above the subnormal range; the largest magnitude lands in [224, 448] x scale."""
  from colorjax.model import transformer
  grid = np.asarray(jnp.arange(-448, 449, dtype=jnp.float32).astype(jnp.float8_e4m3fn).astype(jnp.float32))
  exact = grid * 2.0 ** -9
  np.testing.assert_array_equal(np.asarray(transformer.fp8_qdq(jnp.asarray(exact)), np.float32), exact)
  x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 3.0
  q = np.asarray(transformer.fp8_qdq(jnp.asarray(x)), np.float32)
  scale = 2.0 ** np.ceil(np.log2(np.abs(x).max() / 448.0))
  normal = np.abs(x) >= 2.0 ** -6 * scale
  assert np.all(np.abs(q - x)[normal] <= 2.0 ** -4 * np.abs(x)[normal])
  assert 224 <= np.abs(x).max() / scale <= 448


def test_a_token_id_outside_the_vocab_is_caught_when_the_store_is_read(synthetic_store, tmp_path):
  """Issue 21.7: a store row holding an id >= its vocab would score NaN; reading it names the store and the fix."""
  broken = tmp_path / "store"
  shutil.copytree(synthetic_store, broken)
  store = stores.TokenStore(broken)
  array = np.load(broken / store.files[0]["array"], mmap_mode="r+")
  array[3, 5] = store.vocab_size + 7
  array.flush()
  store = stores.TokenStore(broken)
  assert store.read([0, 1, 2]).shape == (3, store.seq_len)
  with pytest.raises(errors.DataError, match=rf"sequence 3 holds token id {store.vocab_size + 7}, outside its "
                     r"tokenizer's .* prepare \(or adopt\) the store again"):
    store.read([0, 3])


def test_a_token_budget_larger_than_the_pool_warns(synthetic_store, tmp_path, capsys):
  store = stores.TokenStore(synthetic_store)
  _fake_scores(tmp_path / "scores", store, np.ones((store.num_sequences, 2), np.float32))
  folder = select_lib.run(make_config("select", "color", workdir=str(tmp_path / "all"), select__scores=str(
      tmp_path / "scores"), select__tokens=10 * store.num_sequences * store.seq_len))
  assert np.load(folder / "index.npy").size == store.num_sequences
  assert "warning: select.tokens=" in capsys.readouterr().out


def test_progress_counts_pool_rows_not_padding():
  """Issue 21.7: 282 sequences in chunks of 64, batch 16 per host: the steps add up to 282, not the 288 rows of
  their batches."""
  per_host = [np.arange(5)]
  schedule = scores_lib.step_schedule(per_host, 282, 64, 16)
  rows = scores_lib.pool_rows_per_step(schedule, per_host, 282, 64, 16)
  assert len(schedule) * 16 == 288 and rows.sum() == 282 and rows[-1] == 282 - 256 - 16
  two_hosts = [np.array([0, 2, 4]), np.array([1, 3])]
  schedule = scores_lib.step_schedule(two_hosts, 282, 64, 16)
  assert scores_lib.pool_rows_per_step(schedule, two_hosts, 282, 64, 16).sum() == 282


def test_scoring_restricted_to_an_index(synthetic_store, synthetic_prior, conditional, tmp_path):
  """score.index scores only the index's sequences (rows in ascending id order, as the whole pool's scoring gives
  them); its request names the index, and select and export map its rows back to the pool's ids."""
  prior, _ = synthetic_prior
  store = stores.TokenStore(synthetic_store)
  config = lambda folder, **kw: make_config("score", "demo", score__store=str(synthetic_store),
                                            score__prior=str(prior), score__conditionals=(str(conditional),),
                                            workdir=str(folder), score__batch_size=16, score__chunk_rows=64,
                                            model__compute_dtype="float32", **kw)
  score_lib.run(config(tmp_path / "full"))
  ids = np.unique(np.random.default_rng(3).choice(store.num_sequences, 300, replace=False))
  np.save(tmp_path / "subset.npy", ids[::-1])  # any order, as a hand-made index may be
  score_lib.run(config(tmp_path / "part", score__index=str(tmp_path / "subset.npy")))
  full, part = scores_lib.Scores(tmp_path / "full"), scores_lib.Scores(tmp_path / "part")
  assert part.num_sequences == ids.size and part.manifest["request"]["index"] == stores.index_id(
      tmp_path / "subset.npy") and "index" not in full.manifest["request"]
  np.testing.assert_array_equal(part.read(0, ids.size).view(np.uint32), full.read_ids(ids).view(np.uint32))
  selection = select_lib.run(make_config("select", "color,4", workdir=str(tmp_path / "sel"),
                                         select__scores=str(tmp_path / "part")))
  chosen = np.load(selection / "index.npy")
  nll = full.read_ids(ids)
  np.testing.assert_array_equal(chosen, np.sort(ids[reference_top_k(nll[:, 0] - nll[:, 1], ids.size // 4)]))
  assert np.isin(chosen, ids).all()
  with pytest.raises(errors.DataError, match=r"not sequence \d+: the selection was not made from these scores"):
    part.read_ids(np.setdiff1d(np.arange(store.num_sequences), ids)[:3])


def test_fp8_scores_one_model_at_a_time_as_vmap_would():
  """score.over_models: with fp8 each model runs as its own pass (XLA turns only unbatched dots into fp8 GEMMs:
  vmapped, the fp8 step measured 0.86x of bf16 on an H200, per model 1.04x); the values are vmap's."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  stacked = {"w": jnp.arange(24.0).reshape(3, 2, 4), "b": jnp.arange(3.0)}
  fn = lambda p: (jnp.sum(p["w"], axis=0) + p["b"], p["b"] * 2)
  looped, vmapped = score_lib.over_models(fn, stacked, True), score_lib.over_models(fn, stacked, False)
  jax.tree.map(np.testing.assert_array_equal, looped, vmapped)
  assert looped[0].shape == (3, 4) and looped[1].shape == (3,)
