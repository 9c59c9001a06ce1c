"""Evaluation: the multiple-choice scorer against an independent computation, accuracy on a task with a known
answer pattern, PAD masking, finetuning (books-like and task SFT) and the eval stage."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

from colorjax import errors
from colorjax import evaluate
from colorjax import prepare
from colorjax import sharding
from colorjax import train
from colorjax.data import sft_rows
from colorjax.data import stores
from colorjax.data import tasks
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import metrics
from conftest import make_config, run_cli, tiny_train_overrides
from reference import reference_logits


def _setup(prior, max_seq_len=None):
  export, cfg = prior
  manifest = checkpoint.read_params_manifest(export)
  mcfg = make_config("pretrain", "demo").model
  mcfg.unlock()
  mcfg.compute_dtype = "float32"
  spec = checkpoint.spec_from_manifest(manifest, mcfg)
  if max_seq_len:
    spec = transformer.ModelSpec(**dict(spec.to_dict(), max_seq_len=max_seq_len))
  mesh = sharding.make_mesh(make_config("pretrain", "demo").mesh)
  param_sh = sharding.tree_shardings(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  params, _ = checkpoint.load_params(export, spec, param_sh)
  return spec, mesh, param_sh, params, export / "tokenizer.json"


def _reference_logprob(spec, params, tokenizer, context, continuation):
  """Unpadded, unbucketed: the float64 numpy forward and log-softmax over one full sequence."""
  ctx = tokenizer.encode(context, add_special_tokens=False).ids
  cont = tokenizer.encode(continuation, add_special_tokens=False).ids
  full = (ctx + cont)[-(spec.max_seq_len + 1):]
  logits = reference_logits(spec, params, [full[:-1]])[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  n = min(len(cont), len(full) - 1)
  positions = np.arange(len(full) - 1 - n, len(full) - 1)
  return float(sum(logp[p, full[p + 1]] for p in positions))


def test_choice_logprobs_equal_an_independent_full_sequence_log_softmax(synthetic_prior, data_dir):
  spec, mesh, param_sh, params, tok_path = _setup(synthetic_prior, max_seq_len=96)  # 96: long contexts truncate
  examples = evaluate.load_task_examples(("winogrande", "hellaswag", "boolq", "arc_easy"), data_dir / "tasks",
                                         limit=4)
  evaluator = evaluate.MultipleChoiceEvaluator(spec, mesh, param_sh, tok_path, examples, batch_tokens=256)
  assert len(evaluator.buckets) >= 2
  got = evaluator.logprobs(params)
  tokenizer = Tokenizer.from_file(str(tok_path))
  want = [_reference_logprob(spec, params, tokenizer, ctx, cont)
          for _, exs in examples.values() for e in exs for ctx, cont in zip(e.contexts, e.continuations)]
  assert got.shape == (len(want),)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
  boolq_lengths = [len(tokenizer.encode(e.contexts[0]).ids) for e in examples["boolq"][1]]
  assert max(boolq_lengths) > 96  # the check above covered left-truncated contexts


def test_accuracy_on_a_constructed_task_with_a_known_answer(synthetic_prior):
  """A model with zero final-norm gain predicts the uniform distribution, so every token costs log V: "acc" picks
  the choice with fewer tokens, "len_norm" the one with fewer tokens per character."""
  spec, mesh, param_sh, params, tok_path = _setup(synthetic_prior)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "final_norm" in jax.tree_util.keystr(p) else x, params)
  tokenizer = Tokenizer.from_file(str(tok_path))
  short, long = " yes", " yes yes yes yes"
  assert len(tokenizer.encode(short).ids) < len(tokenizer.encode(long).ids)
  golds = [0, 1, 0, 0, 1, 0, 1, 0, 0, 0]  # the short choice is gold in 7 of 10
  acc_examples = [tasks.MCExample("boolq", i, ("Q",) * 2, (short, long), g) for i, g in enumerate(golds)]
  dense = " Once upon a time"  # frequent in the synthetic text: few tokens per character
  sparse = " qzx"  # rare: about a token per character
  per_char = lambda s: len(tokenizer.encode(s).ids) / (len(s) - 1)
  assert per_char(dense) < per_char(sparse)
  norm_examples = [tasks.MCExample("piqa", i, ("Q",) * 2, (sparse, dense), g) for i, g in enumerate(golds)]
  evaluator = evaluate.MultipleChoiceEvaluator(
      spec, mesh, param_sh, tok_path, {"boolq": ("x", acc_examples), "piqa": ("x", norm_examples)})
  results = evaluator(params)
  assert results["mc/boolq"] == pytest.approx(0.7)  # always picks the short choice
  assert results["mc/piqa"] == pytest.approx(0.3)  # always picks `dense` (index 1)
  assert results["mc/mean"] == pytest.approx(0.5)


def test_buckets_have_fixed_shapes_and_cover_every_request():
  rng = np.random.default_rng(0)
  requests = []
  for _ in range(50):
    n = int(rng.integers(2, 130))
    cont = int(rng.integers(1, n))
    seq = rng.integers(0, 100, n + 1)
    requests.append((seq[:-1].astype(np.int32), seq[1:].astype(np.int32), cont))
  buckets = evaluate.make_buckets(requests, max_len=128, batch_tokens=512, data_parallel=2, pad_id=1)
  assert [b.length for b in buckets] == [32, 64, 128]
  seen = np.concatenate([b.request_ids for b in buckets])
  assert sorted(seen.tolist()) == list(range(50))
  for b in buckets:
    assert b.batch % 2 == 0 and b.batch == max(2, 512 // b.length // 2 * 2)
    for row, r in enumerate(b.request_ids):
      x, _, n = requests[r]
      assert len(x) <= b.length and (b.length == 32 or len(x) > b.length // 2)
      x_full, y_full, _ = requests[r]
      assert b.mask[row].sum() == n and b.mask[row, :n].all()
      assert (b.positions[row, :n] == np.arange(len(x) - n, len(x))).all()
      assert (b.targets[row, :n] == y_full[len(x) - n:]).all()
      assert (b.inputs[row, :len(x)] == x_full).all()
    assert b.positions.shape[1] == max(requests[r][2] for r in b.request_ids)


def test_pad_masking_makes_the_loss_independent_of_padding(synthetic_prior, data_dir, tmp_path):
  spec, _, _, params, tok_path = _setup(synthetic_prior)
  rows = {}
  for seq_len in (256, 512):
    tok_info = tokenizer_lib.tokenizer_info(tokenizer_lib.load_tokenizer(str(tok_path)), str(tok_path))
    store = sft_rows.build_sft_store(("arc_easy",), data_dir / "tasks", "train", tok_path, tok_info, seq_len,
                                     tmp_path / f"sft{seq_len}", limit=8)
    s = stores.TokenStore(store)
    assert s.padded and s.manifest["files"][0]["truncated_rows"] == 0
    rows[seq_len] = s.read(np.arange(8))
  (tmp_path / "by_hand").mkdir()
  with pytest.raises(errors.DataError, match="by_hand exists but is not a token store of SFT rows"):
    sft_rows.build_sft_store(("arc_easy",), data_dir / "tasks", "train", tok_path, tok_info, 256,
                             tmp_path / "by_hand", limit=8)
  spec = transformer.ModelSpec(**dict(spec.to_dict(), max_seq_len=512))
  loss = jax.jit(lambda t, pad: losses.batch_loss(spec, params, t, pad, 0.0)[1], static_argnums=1)
  masked = [(lambda r: float(r[0] / r[2]))(loss(jnp.asarray(rows[n]), 1)) for n in (256, 512)]
  unmasked = [(lambda r: float(r[0] / r[2]))(loss(jnp.asarray(rows[n]), None)) for n in (256, 512)]
  assert masked[0] == pytest.approx(masked[1], rel=1e-5)
  assert abs(unmasked[0] - unmasked[1]) > 0.05
  assert abs(masked[0] - unmasked[0]) > 0.05


def test_finetuning_on_a_domain_lowers_its_heldout_loss(synthetic_prior, synthetic_store, tmp_path):
  export, _ = synthetic_prior
  base_store = stores.TokenStore(synthetic_store)
  tokenizer = base_store.tokenizer_path()
  stories = [f for f in base_store.manifest["files"] if "stories" in f["path"]][0]["path"]
  target = prepare.run(make_config("prepare", prepare__inputs=(stories,), prepare__tokenizer=str(tokenizer),
                                   prepare__output=str(tmp_path / "stories"), prepare__seq_len=64))
  overrides = tiny_train_overrides(target, tmp_path / "cond", train__init_from=str(export), model__max_seq_len=128,
                                   data__eval_stores=(f"stories={target}",), train__eval_batches=0,
                                   train__max_steps=0, train__warmup_steps=2)
  cfg = make_config("finetune", "books,demo", **overrides)
  train.run(cfg)
  evals = [r["eval/stories_loss"] for r in metrics.read_metrics(tmp_path / "cond") if r.get("event") == "eval"]
  assert evals[-1] < evals[0] - 0.3
  manifest = checkpoint.read_params_manifest(tmp_path / "cond" / "params")
  assert manifest["schedule"] == "data" and manifest["steps"] == stores.TokenStore(target).num_sequences // 16
  assert (tmp_path / "cond" / "params" / manifest["init_from"]).resolve() == export.resolve()  # relative: relocatable
  assert manifest["init_from_id"] == checkpoint.read_params_manifest(export)["id"] == manifest["request"]["init_from"]


def test_task_finetuning_lowers_heldout_task_loss(synthetic_prior, data_dir, tmp_path):
  export, _ = synthetic_prior
  overrides = tiny_train_overrides("", tmp_path / "cond", train__init_from=str(export), model__max_seq_len=128,
                                   sft__data_dir=str(data_dir / "tasks"), sft__limit=64,
                                   sft__tasks=("piqa", "arc_easy", "winogrande"), train__max_steps=0,
                                   train__warmup_steps=2, train__eval_batches=0)
  cfg = make_config("finetune", "tasks,demo", **overrides)
  train.run(cfg)
  evals = [r["eval/tasks_validation_loss"] for r in metrics.read_metrics(tmp_path / "cond")
           if r.get("event") == "eval"]
  assert evals[-1] < evals[0] - 0.3
  store = stores.TokenStore(tmp_path / "cond" / "sft_train")
  assert store.num_sequences == 3 * 64 and store.labels() == ["piqa", "arc_easy", "winogrande"]
  with pytest.raises(ValueError, match="init_from"):
    train.run(make_config("finetune", "tasks,demo", **dict(overrides, train__init_from="",
                                                           workdir=str(tmp_path / "x"))))


def test_eval_stage_reports_all_eight_tasks(synthetic_prior, synthetic_store, data_dir, tmp_path):
  export, _ = synthetic_prior
  out = run_cli(["--config", "configs/eval.py:tiny", f"--config.eval.params={export}",
                 f"--config.eval.tasks_dir={data_dir / 'tasks'}", "--config.eval.limit=12",
                 f"--config.data.eval_stores=('synthetic={synthetic_store}',)", f"--config.workdir={tmp_path}/ev"])
  results = json.loads((tmp_path / "ev" / "eval.json").read_text())["results"]
  assert set(results) == {f"mc/{t}" for t in tasks.TASK_NAMES} | {"mc/mean", "synthetic_loss"}
  assert all(0.0 <= results[f"mc/{t}"] <= 1.0 for t in tasks.TASK_NAMES)
  assert results["mc/mean"] == pytest.approx(np.mean([results[f"mc/{t}"] for t in tasks.TASK_NAMES]))
  assert "arc_challenge" in out.stdout and "mean (8-task)" in out.stdout
  assert "choices (100%" in out.stderr  # the progress bar of a standalone eval
  again = run_cli(["--config", "configs/eval.py:tiny", f"--config.eval.params={export}",
                   f"--config.workdir={tmp_path}/ev", f"--config.eval.tasks_dir={data_dir / 'tasks'}"], check=False)
  assert again.returncode != 0 and "already exists" in again.stderr


# Held-out sample (eval.shuffle) and the task folder fallback.


def test_heldout_ids_are_a_fixed_sorted_sample():
  ordered = evaluate.heldout_ids(1000, 96, shuffle=False)
  sample = evaluate.heldout_ids(1000, 96, shuffle=True)
  np.testing.assert_array_equal(ordered, np.arange(96))
  assert sample.size == 96 and np.unique(sample).size == 96 and (np.diff(sample) > 0).all()
  assert 0 <= sample.min() and sample.max() < 1000 and sample.max() > 500  # spread over the store, not its head
  np.testing.assert_array_equal(sample, evaluate.heldout_ids(1000, 96, shuffle=True))
  for count in (0, 1000, 5000):  # the whole store: nothing to sample
    np.testing.assert_array_equal(evaluate.heldout_ids(1000, count, shuffle=True), np.arange(1000))


def test_shuffled_heldout_loss_reads_exactly_its_sample(synthetic_prior, synthetic_store):
  spec, mesh, param_sh, params, _ = _setup(synthetic_prior)
  store = stores.TokenStore(synthetic_store)
  reads = []
  read = store.read
  store.read = lambda ids: (reads.append(np.asarray(ids)), read(ids))[1]

  def evaluator(shuffle):
    cfg = make_config("pretrain", "demo", eval__batch_size=8, eval__shuffle=shuffle, train__eval_batches=3)
    return evaluate.HeldoutEvaluator(spec, mesh, param_sh, {"s": store}, cfg)

  shuffled, ordered = evaluator(True), evaluator(False)
  count = 3 * shuffled.batch
  ids = shuffled.sample_ids(store)
  assert store.num_sequences > 4 * count and ids.size == count and not (ids == np.arange(count)).all()
  got = shuffled.store_loss(params, store)
  np.testing.assert_array_equal(np.concatenate(reads), ids)
  direct = losses.sequence_nll(spec, params, jnp.asarray(read(ids)), None, 0)
  assert got == pytest.approx(float(jnp.mean(direct)), rel=1e-5)
  reads.clear()
  assert evaluator(True).store_loss(params, store) == pytest.approx(got, rel=1e-6)  # the same sample again
  np.testing.assert_array_equal(np.concatenate(reads), ids)
  in_order = ordered.store_loss(params, store)
  head = losses.sequence_nll(spec, params, jnp.asarray(read(np.arange(count))), None, 0)
  assert in_order == pytest.approx(float(jnp.mean(head)), rel=1e-5)
  assert abs(in_order - got) > 1e-3


def test_default_task_dir_prefers_colorjax_data_then_shared(tmp_path, monkeypatch):
  (tmp_path / "env" / "tasks").mkdir(parents=True)
  (tmp_path / "root" / "shared" / "data" / "tasks").mkdir(parents=True)
  (tmp_path / "root" / "work").mkdir()
  monkeypatch.chdir(tmp_path / "root" / "work")
  monkeypatch.setenv("COLORJAX_DATA", str(tmp_path / "env"))
  assert tasks.default_dir() == str((tmp_path / "env" / "tasks").resolve())
  monkeypatch.setenv("COLORJAX_DATA", str(tmp_path / "no-tasks-here"))
  assert tasks.default_dir() == str((tmp_path / "root" / "shared" / "data" / "tasks").resolve())
  monkeypatch.delenv("COLORJAX_DATA")
  monkeypatch.chdir(tmp_path)
  assert tasks.default_dir() is None


def test_eval_stage_falls_back_to_the_default_task_dir(synthetic_prior, data_dir, tmp_path, monkeypatch):
  export, _ = synthetic_prior
  task_file = data_dir / "tasks" / "arc_easy" / "test.jsonl.gz"
  (tmp_path / "data" / "tasks" / "arc_easy").mkdir(parents=True)
  (tmp_path / "data" / "tasks" / "arc_easy" / "test.jsonl.gz").write_bytes(task_file.read_bytes())
  monkeypatch.setenv("COLORJAX_DATA", str(tmp_path / "data"))
  cfg = make_config("eval", "tiny", eval__params=str(export), eval__tasks=("arc_easy",), eval__limit=4,
                    workdir=str(tmp_path / "ev"))
  assert cfg.eval.tasks_dir == ""
  results = evaluate.run(cfg)
  assert set(results) == {"mc/arc_easy", "mc/mean"}
  record = json.loads((tmp_path / "ev" / "eval.json").read_text())
  assert record["tasks_dir"] == str((tmp_path / "data" / "tasks").resolve())
  cfg = make_config("eval", "tiny", eval__params=str(export), eval__tasks=("piqa",), workdir=str(tmp_path / "ev2"))
  with pytest.raises(errors.DataError, match="no 'validation' split for task 'piqa'") as info:
    evaluate.run(cfg)  # the fallback folder has no piqa: the error names the flag to set
  assert "--config.eval.tasks_dir" in str(info.value) and "data_dir" not in str(info.value)


def test_missing_task_data_errors_name_the_config_fields(tmp_path):
  with pytest.raises(errors.DataError) as info:
    evaluate.load_task_examples(("boolq",), tmp_path)
  assert isinstance(info.value, FileNotFoundError) and "--config.eval.tasks_dir" in str(info.value)
  with pytest.raises(errors.DataError) as info:
    tasks.load_docs("boolq", "train", tmp_path)  # the SFT path (sft_rows.build_sft_store) names both flags
  assert "--config.sft.data_dir" in str(info.value) and "--config.eval.tasks_dir" in str(info.value)


def test_eval_refuses_a_longer_store_and_another_tokenizer_before_any_work(synthetic_prior, synthetic_store,
                                                                           neox_tokenizer_path, tmp_path):
  store = stores.TokenStore(synthetic_store)
  spec = transformer.ModelSpec(d_model=64, n_layers=1, n_heads=2, mlp_hidden=128, vocab_size=512, max_seq_len=32)
  with pytest.raises(errors.DataError, match="seq_len 64 > model.max_seq_len=32") as info:
    stores.eval_stores((f"s={synthetic_store}",), store.manifest["tokenizer"], "the params", spec)
  assert str(synthetic_store) in str(info.value) and "--config.prepare.seq_len=32" in str(info.value)
  export, _ = synthetic_prior
  cfg = make_config("eval", "tiny", eval__params=str(export), eval__tokenizer=str(neox_tokenizer_path),
                    data__eval_stores=(f"s={synthetic_store}",), workdir=str(tmp_path / "ev"))
  with pytest.raises(errors.DataError, match="--config.eval.tokenizer=.* is another tokenizer than the params"):
    evaluate.run(cfg)
  assert not (tmp_path / "ev").exists()


def test_the_table_counts_the_tasks_it_averages():
  table = evaluate.format_table({"books_loss": 3.0, "heldout_loss": 3.2, **{f"mc/t{i}": 0.5 for i in range(6)},
                                 "mc/mean": 0.5})
  assert "mean (6-task)" in table and "8-task" not in table
