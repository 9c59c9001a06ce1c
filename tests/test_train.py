"""Training: schedule and optimizer, real loss decrease, accumulation, 1 vs 8 devices, kill-and-resume, CLI."""
import itertools
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
from colorjax import train
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import metrics
from conftest import REPO, jsonl_scalars, make_config, run_cli, tiny_train_overrides


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if r.get("event") == "train"}


def cli_args(overrides: dict, size="demo"):
  return ["--config", f"configs/pretrain.py:{size}"] + [
      f"--config.{k.replace('__', '.')}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]


def test_lr_schedule_matches_olmo():
  lr, warm, total = 1e-3, 10, 110
  at = lambda s: float(train.lr_at(s, lr, warm, total, 0.1))
  assert at(1) == pytest.approx(1e-4 + 9e-4 * 0.1)
  assert at(5) == pytest.approx(1e-4 + 9e-4 * 0.5)
  assert at(10) == pytest.approx(lr)
  assert at(60) == pytest.approx(1e-4 + 9e-4 * 0.5)  # half-way down the cosine
  assert at(110) == pytest.approx(1e-4)
  assert at(500) == pytest.approx(1e-4)


def test_optimizer_is_clipped_adamw_with_tiny_eps():
  cfg = make_config("pretrain", "demo")
  tx, schedule = train.make_optimizer(cfg.train, 100)
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.array([30.0, -40.0, 1e-3, 0.0])}  # norm 50: clipped to 1 before Adam
  updates, _ = tx.update(grads, tx.init(params), params)
  lr1 = float(schedule(0))
  assert lr1 == pytest.approx(cfg.train.lr * (0.1 + 0.9 / cfg.train.warmup_steps))
  # First Adam step: m/(sqrt(v)+eps) = sign(g) because eps = 1e-15 is negligible even for tiny gradients.
  np.testing.assert_allclose(np.asarray(updates["w"]), [-lr1, lr1, -lr1, 0.0], rtol=1e-5)
  assert (cfg.train.b1, cfg.train.b2, cfg.train.eps, cfg.train.weight_decay) == (0.9, 0.95, 1e-15, 0.0)


def test_pretrain_learns_writes_metrics_and_exports(synthetic_store, tmp_path, fake_wandb):
  workdir = tmp_path / "run"
  eval_set = f"synthetic={synthetic_store}"
  cfg = make_config("pretrain", "demo", **tiny_train_overrides(
      synthetic_store, workdir, train__max_steps=40, train__eval_every=20, data__eval_stores=(eval_set,),
      train__eval_batches=2, train__checkpoint_every=20, train__wandb_project="colorjax-test"))
  export = train.run(cfg)
  [run] = fake_wandb  # the W&B mirror (a stand-in module) got metrics.jsonl's scalars, step by step
  assert run.by_step() == jsonl_scalars(workdir) and run.finished
  assert {"train/loss", "train/z_loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
          "eval/synthetic_loss"} <= set(run.by_step()[40]) and "train/mfu" not in run.by_step()[40]  # None on CPU
  assert (run.kwargs["project"], run.kwargs["dir"], run.kwargs["job_type"]) == ("colorjax-test", str(workdir),
                                                                                "pretrain")
  assert run.kwargs["config"]["train"]["max_steps"] == 40
  records = metrics.read_metrics(workdir)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 41))
  assert losses[40] < losses[1] - 1.5
  evals = [r["eval/synthetic_loss"] for r in records if r.get("event") == "eval"]
  assert len(evals) == 3 and evals[-1] < evals[0] - 1.5
  start = records[0]
  assert start["params_total"] == transformer.param_counts(transformer.ModelSpec.from_config(cfg.model))["total"]
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"):
    assert key in records[-2]
  manifest = checkpoint.read_params_manifest(export)
  assert manifest["steps"] == 40 and manifest["tokens"] == 40 * 16 * 64
  assert manifest["train_store"]["id"] == stores.TokenStore(synthetic_store).id
  assert manifest["model"]["d_model"] == cfg.model.d_model
  assert json.loads((workdir / "config.json").read_text())["train"]["max_steps"] == 40
  params, _ = checkpoint.load_params(export, transformer.ModelSpec.from_config(cfg.model))
  assert params["embed"].shape == (512, cfg.model.d_model)

  with pytest.raises(errors.DataError, match="holds this finished run already"):
    train.run(cfg)
  assert manifest["id"] == lineage.content_id(manifest["request"])  # known before training: lineage by content
  changed = make_config("pretrain", "demo", **tiny_train_overrides(
      synthetic_store, workdir, train__max_steps=40, train__eval_every=20, data__eval_stores=(eval_set,),
      train__eval_batches=2, train__checkpoint_every=20, train__resume=True, train__lr=0.5))
  with pytest.raises(errors.DataError, match=r"holds a finished run made from other inputs or settings \(differs in: "
                     r"train.lr\)"):
    train.run(changed)
  wrong = make_config("pretrain", "tiny", **tiny_train_overrides(synthetic_store, tmp_path / "other"))
  with pytest.raises(errors.DataError, match="d_model: saved"):
    checkpoint.load_params(export, transformer.ModelSpec.from_config(wrong.model))


def test_gradient_accumulation_equals_the_full_batch(synthetic_store, tmp_path):
  full = make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, tmp_path / "full", train__max_steps=5))
  micro = make_config("pretrain", "demo", **tiny_train_overrides(
      synthetic_store, tmp_path / "micro", train__max_steps=5, train__micro_batch_size=4))
  train.run(full)
  train.run(micro)
  a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "micro")
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=2e-5)


def test_eight_devices_fsdp_match_one_device(synthetic_store, tmp_path):
  runs = {}
  for devices in (1, 8):
    workdir = tmp_path / f"d{devices}"
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    run_cli(cli_args(tiny_train_overrides(synthetic_store, workdir, train__max_steps=8)), env_extra=env)
    runs[devices] = workdir
  one, eight = train_losses(runs[1]), train_losses(runs[8])
  np.testing.assert_allclose([eight[s] for s in sorted(eight)], [one[s] for s in sorted(one)], rtol=1e-4)
  start1, start8 = (metrics.read_metrics(runs[d])[0] for d in (1, 8))
  assert start8["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert start8["param_bytes_per_device"] < start1["param_bytes_per_device"] / 7  # FSDP: ~1/8 of the params each


def _wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-3000:]}")
    if max(train_losses(workdir), default=0) >= step:
      return
    time.sleep(0.2)
  raise AssertionError(f"run did not reach step {step}")


def test_killed_run_resumes_with_identical_losses(synthetic_store, tmp_path):
  common = dict(train__max_steps=16, train__checkpoint_every=4)
  reference = tmp_path / "reference"
  train.run(make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, reference, **common)))

  killed = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "colorjax.main"] + cli_args(tiny_train_overrides(synthetic_store, killed, **common))
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(killed, 10, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "params").exists()

  with pytest.raises(AssertionError, match="already holds a run"):
    run_cli(cli_args(tiny_train_overrides(synthetic_store, killed, **common)))
  with pytest.raises(AssertionError, match=r"differ \(train.lr\)"):
    run_cli(cli_args(tiny_train_overrides(synthetic_store, killed, train__resume=True, train__lr=0.5, **common)))
  with pytest.raises(AssertionError, match=r"differ \(compute_dtype\)"):  # the fp32 run must not go on in bf16
    run_cli(cli_args(tiny_train_overrides(synthetic_store, killed, train__resume=True, model__compute_dtype="bfloat16",
                                          **common)))
  resumed = run_cli(cli_args(tiny_train_overrides(synthetic_store, killed, train__resume=True, **common)))
  assert "resumed" in resumed.stdout
  ref, got = train_losses(reference), train_losses(killed)
  assert sorted(got) == list(range(1, 17))
  np.testing.assert_allclose([got[s] for s in range(1, 17)], [ref[s] for s in range(1, 17)], rtol=1e-6)
  finished = run_cli(cli_args(tiny_train_overrides(synthetic_store, killed, train__resume=True, **common)))
  assert "nothing to do" in finished.stdout


def test_a_kill_during_the_eval_at_a_checkpoint_step_is_evaluated_again_on_resume(synthetic_store, tmp_path,
                                                                                  monkeypatch):
  """The eval at step 4 follows the checkpoint at 4; a run killed during it resumes at 4 and evaluates there again,
  so metrics.jsonl ends as the uninterrupted run's: one eval record per eval step, same values."""
  common = dict(train__max_steps=8, train__checkpoint_every=4, train__eval_every=4, train__eval_batches=1,
                data__eval_stores=(f"synthetic={synthetic_store}",))
  evals = lambda workdir: [(r["step"], r["eval/synthetic_loss"]) for r in metrics.read_metrics(workdir)
                           if r.get("event") == "eval"]
  train.run(make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, tmp_path / "whole", **common)))
  killed = tmp_path / "killed"
  write_eval = metrics.TrainLog.eval

  def dies_at_step_4(self, step, results):
    if step == 4:
      for _ in range(600):
        if (killed / "checkpoints" / "4").exists():
          raise SystemExit("killed during the eval at step 4")
        time.sleep(0.1)
    write_eval(self, step, results)
  monkeypatch.setattr(metrics.TrainLog, "eval", dies_at_step_4)
  with pytest.raises(SystemExit):
    train.run(make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, killed, **common)))
  monkeypatch.undo()
  train.run(make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, killed, train__resume=True,
                                                                   **common)))
  assert [s for s, _ in evals(killed)] == [0, 4, 8]
  np.testing.assert_allclose([v for _, v in evals(killed)], [v for _, v in evals(tmp_path / "whole")], rtol=1e-6)


def test_resume_truncates_metrics_after_the_step_and_the_eval_at_it(tmp_path):
  records = [{"event": "train", "step": 3}, {"event": "train", "step": 4}, {"event": "eval", "step": 4},
             {"event": "train", "step": 5}, {"event": "eval", "step": 2}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
  metrics.MetricsWriter(tmp_path, truncate_after_step=4).close()
  assert metrics.read_metrics(tmp_path) == [records[0], records[1], records[4]]


def test_single_pass_over_an_index_stops_when_exhausted(synthetic_store, tmp_path):
  np.save(tmp_path / "index.npy", np.arange(0, 100, 2))
  for anneal, schedule in ((False, "nominal"), (True, "data")):
    workdir = tmp_path / f"sel-{anneal}"
    cfg = make_config("pretrain", "demo", **tiny_train_overrides(
        synthetic_store, workdir, data__index=str(tmp_path / "index.npy"), train__single_pass=True,
        train__anneal_to_data=anneal, train__max_steps=100))
    manifest = checkpoint.read_params_manifest(train.run(cfg))
    assert manifest["steps"] == 3 and manifest["schedule"] == schedule  # 50 ids // 16 per batch
    assert manifest["schedule_steps"] == (3 if anneal else 100)


def test_cli_dry_run_prints_exact_sizes_and_memory():
  out = run_cli(["--config", "configs/pretrain.py:150m", "--config.dry_run=True"]).stdout
  assert "params: total=254,067,712 non_embedding=151,045,120" in out
  assert "24,000 x 256 x 512 = 3,145,728,000 tokens" in out
  out = run_cli(["--config", "configs/pretrain.py:1.2b", "--config.dry_run=True", "--config.dry_run_devices=8"]).stdout
  assert "params: total=1,414,203,392 non_embedding=1,208,158,208" in out
  assert "fsdp=8" in out and "memory/device (estimate)" in out
  assert "192,000 x 256 x 512" in out


def test_cli_rejects_config_typos():
  proc = run_cli(["--config", "configs/pretrain.py:tiny", "--config.train.lrr=1", "--config.dry_run=True"], check=False)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr


def test_shardings_follow_logical_rules():
  from colorjax import sharding
  spec = transformer.ModelSpec.from_config(make_config("pretrain", "tiny").model)
  mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)
  axes = transformer.param_axes(spec)
  assert sharding.fit_spec(sharding.logical_to_spec(axes["embed"]), (50304, 128), mesh) == jax.P("tensor", "fsdp")
  qkv = axes["block_0"]["attn"]["qkv"]["kernel"]
  assert sharding.fit_spec(sharding.logical_to_spec(qkv), (128, 384), mesh) == jax.P("fsdp", "tensor")
  assert sharding.fit_spec(sharding.logical_to_spec(("norm",)), (128,), mesh) == jax.P(None)
  assert sharding.fit_spec(sharding.logical_to_spec(("embed",)), (6,), mesh) == jax.P(None)  # 6 % 4: replicate
  assert sharding.logical_to_spec(("batch", "seq")) == jax.P(("data", "fsdp"), None)


def test_two_hosts_match_one_host(synthetic_store, tmp_path):
  """Two processes x two CPU devices (gloo): per-host loading, orbax multi-host saves, process-0 metrics."""
  overrides = tiny_train_overrides(synthetic_store, tmp_path / "hosts", train__max_steps=6, train__checkpoint_every=3)
  env = dict(os.environ, HOSTS="2", DEVICES="2", PYTHON=sys.executable, PYTHONPATH=str(REPO))
  proc = subprocess.run(["bash", "launch/local_hosts.sh"] + cli_args(overrides), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  single = tiny_train_overrides(synthetic_store, tmp_path / "single", train__max_steps=6, train__checkpoint_every=3)
  train.run(make_config("pretrain", "demo", **single))
  two, one = train_losses(tmp_path / "hosts"), train_losses(tmp_path / "single")
  np.testing.assert_allclose([two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)], rtol=1e-4)
  assert metrics.read_metrics(tmp_path / "hosts")[0]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert (tmp_path / "hosts" / "params" / "manifest.json").exists()


def test_a_run_that_fails_before_its_first_step_leaves_nothing(synthetic_store, synthetic_prior, tmp_path):
  """Issue 8.7: failed checks (mismatched prior, a truncated store) leave no run folder to delete by hand."""
  prior, _ = synthetic_prior
  wrong = make_config("finetune", "books,tiny", **tiny_train_overrides(synthetic_store, tmp_path / "cond",
                                                                       train__init_from=str(prior)))
  with pytest.raises(errors.DataError, match="do not fit the configured model"):
    train.run(wrong)
  assert not (tmp_path / "cond").exists()
  broken = tmp_path / "broken"
  shutil.copytree(synthetic_store, broken)
  array = broken / stores.TokenStore(broken).files[0]["array"]
  array.write_bytes(array.read_bytes()[:1000])
  with pytest.raises(errors.DataError, match="not a readable .npy file|holds"):
    train.run(make_config("pretrain", "demo", **tiny_train_overrides(broken, tmp_path / "run", train__max_steps=3)))
  assert not (tmp_path / "run").exists()


def _popen(args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.Popen([sys.executable, "-m", "colorjax.main"] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _stopped_at(proc, where):
  """The step a SIGTERM'd run reports stopping at, after checking it exited cleanly with status 143."""
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, f"{where}: exit {proc.returncode}\n{err[-3000:]}"
  found = re.search(r"preempted at step (\d+) of \d+: checkpoint saved in (\S+); resume with "
                    r"--config.train.resume=True", err)
  assert found and "Traceback" not in err, err[-3000:]
  return int(found.group(1)), found.group(2)


def _checkpoint_steps(workdir):
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    return ckpt.manager.all_steps()
  finally:
    ckpt.close()


def test_sigterm_checkpoints_the_step_and_the_resumed_run_is_identical(synthetic_store, tmp_path, capsys,
                                                                       monkeypatch):
  """Issue 12.3: SIGTERM saves a checkpoint at the next step boundary and exits 143 with a resume hint; resuming
  (past an unfinished checkpoint, which is never picked) reproduces the uninterrupted run's losses and params. The
  uninterrupted run checkpoints on train.checkpoint_minutes' timer, on a clock that ticks a minute per reading."""
  from colorjax.training import preemption
  common = dict(train__max_steps=64, train__checkpoint_every=0)
  reference = tmp_path / "reference"
  handler = signal.getsignal(signal.SIGTERM)
  ticks = itertools.count()
  monkeypatch.setattr(preemption, "monotonic", lambda: 60.0 * next(ticks))
  train.run(make_config("pretrain", "demo", **tiny_train_overrides(
      synthetic_store, reference, train__checkpoint_minutes=3.5, train__keep_checkpoints=100, **common)))
  monkeypatch.undo()
  assert signal.getsignal(signal.SIGTERM) is handler  # the run put the previous handler back
  # read at the start, at each step and at each save: 4 minutes after a save at step 4, 8, ... (64: the final save)
  assert _checkpoint_steps(reference) == list(range(4, 65, 4))

  stopped = tmp_path / "stopped"
  proc = _popen(cli_args(tiny_train_overrides(synthetic_store, stopped, **common)))
  _wait_for_step(stopped, 3, proc)
  proc.send_signal(signal.SIGTERM)
  step, saved = _stopped_at(proc, "SIGTERM")
  assert 3 <= step < 64 and saved == str(stopped / "checkpoints" / str(step))
  assert _checkpoint_steps(stopped) == [step]
  assert max(train_losses(stopped)) == step and not (stopped / "params").exists()
  # what an async save cut short leaves behind: orbax lists finished steps only, so resume takes `step`
  shutil.copytree(stopped / "checkpoints" / str(step), stopped / "checkpoints" / f"{step + 9}.orbax-checkpoint-tmp-7")

  capsys.readouterr()
  train.run(make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, stopped, train__resume=True,
                                                                   **common)))
  assert f"resumed {stopped} at step {step}" in capsys.readouterr().out
  ref, got = train_losses(reference), train_losses(stopped)
  assert sorted(got) == list(range(1, 65))
  np.testing.assert_allclose([got[s] for s in range(1, 65)], [ref[s] for s in range(1, 65)], rtol=1e-6)
  cfg = make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, ""))
  spec = transformer.ModelSpec.from_config(cfg.model)
  want, _ = checkpoint.load_params(reference / "params", spec)
  have, _ = checkpoint.load_params(stopped / "params", spec)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
               have, want)
  for bad, message in ((dict(train__checkpoint_minutes=-1.0), "checkpoint_minutes"),
                       (dict(train__log_every=0), "train.log_every=0"), (dict(seed=-1), "seed=-1")):
    with pytest.raises(errors.ConfigError, match=message):
      train.run(make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, tmp_path / "bad", **bad)))
    assert not (tmp_path / "bad").exists()


def test_a_sigterm_to_one_host_stops_every_host_at_the_same_step(synthetic_store, tmp_path):
  """Two processes (gloo, JAX's preemption service): the host that is not told agrees on the step to save at."""
  workdir = tmp_path / "hosts"
  args = cli_args(tiny_train_overrides(synthetic_store, workdir, train__max_steps=400))
  port = str(20000 + os.getpid() % 10000)
  procs = [_popen(args, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_NUM_PROCESSES": "2",
                         "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_PROCESS_ID": str(i)})
           for i in range(2)]
  try:
    _wait_for_step(workdir, 2, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    steps = [_stopped_at(proc, f"host {i}")[0] for i, proc in enumerate(procs)]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert steps[0] == steps[1] < 400
  assert _checkpoint_steps(workdir) == [steps[0]] and max(train_losses(workdir)) == steps[0]


def test_hosts_without_jax_preemption_service_agree_every_few_checks(monkeypatch):
  """The fallback (jax_enable_preemption_service off): each host's SIGTERM flag and process 0's timer travel in an
  all-gather every AGREE_EVERY checks, so every host stops, or saves, after the same step. Here: host 0 of two."""
  from colorjax.training import preemption
  host1 = {"due": 1, "sigterm": 0}
  gathers = []

  def allgather(local):
    gathers.append(local.tolist())
    return np.stack([local, np.array([host1["due"], host1["sigterm"]], np.int32)])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", allgather)
  every = preemption.AGREE_EVERY
  with preemption.Watch(checkpoint_minutes=1e-9) as watch:
    checks = [watch.check() for _ in range(every)]
    assert [c[1] for c in checks].count(True) == 1 == len(gathers)  # the timer: only when the hosts agree
    assert not any(c[0] for c in checks)
    os.kill(os.getpid(), signal.SIGTERM)  # this host's handler only sets a flag
    checks = [watch.check() for _ in range(every)]
  stops = [c[0] for c in checks]
  assert stops == [False] * stops.index(True) + [True] * (every - stops.index(True))  # from the next all-gather on
  assert gathers[-1] == [1, 1]
  host1.update(due=0)
  with preemption.Watch(checkpoint_minutes=0) as watch:
    host1.update(sigterm=1)  # the other host got the signal
    assert any(watch.check()[0] for _ in range(every)) and not watch.requested


def test_ctrl_c_saves_a_checkpoint_and_exits_130(synthetic_store, tmp_path):
  """Issue 21.4: SIGINT (Ctrl-C) is a SIGTERM: a checkpoint at the next step boundary, one line, exit 130."""
  stopped = tmp_path / "stopped"
  proc = _popen(cli_args(tiny_train_overrides(synthetic_store, stopped, train__max_steps=64,
                                              train__checkpoint_every=0)))
  _wait_for_step(stopped, 3, proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  found = re.search(r"interrupted \(Ctrl-C\) at step (\d+) of 64: checkpoint saved in (\S+);", err)
  assert found and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  step = int(found.group(1))
  assert _checkpoint_steps(stopped) == [step] and max(train_losses(stopped)) == step


def test_a_params_export_missing_its_arrays_is_one_clear_error(synthetic_prior, tmp_path):
  """Issue 21.1: a params export whose array files are gone is named, with the fix (no tensorstore traceback)."""
  export, cfg = synthetic_prior
  damaged = tmp_path / "params"
  shutil.copytree(export, damaged)
  for folder in [p for p in (damaged / "params").iterdir() if p.is_dir() and p.name.startswith(("d", "ocdbt"))]:
    shutil.rmtree(folder)
  spec = checkpoint.spec_from_manifest(checkpoint.read_params_manifest(damaged), cfg.model)
  with pytest.raises(errors.DataError, match=r"params export .* is damaged: its arrays .* cannot be read"):
    checkpoint.load_params(damaged, spec)
