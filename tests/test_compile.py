"""compile_for (issue 30): the stages' jitted steps compiled ahead of time for a TPU slice (libtpu's compile-only
devices) or this machine, the per-chip report, the fit check and its "would fit" line, and executables that a run
loads only when devices, software, code and settings match.

The TPU tests need libtpu. CI installs requirements.txt alone, which leaves it out (on a CPU-only machine libtpu
prints warnings at every jax start and takes a lock concurrent jax processes wait on), so there they skip; run them
with `pip install -e '.[tpu]' && python -m pytest -q tests/test_compile.py` (about 3 minutes on 2 cores). The
CPU tests (topology names, manifests, a save/load round trip through real train and score runs) always run.
"""
import importlib.util
import json
import pathlib
import re
import tomllib

import numpy as np
import pytest

from colorjax import errors
from colorjax import score
from colorjax import train
from colorjax.aot import compiler
from colorjax.aot import steps as aot_steps
from colorjax.aot import gpus
from colorjax.aot import targets
from colorjax.artifacts import scores as scores_lib
from conftest import REPO, make_config, run_cli, tiny_train_overrides

LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not LIBTPU, reason="libtpu is not installed (requirements.txt leaves it out); run: pip install -e '.[tpu]' && "
    "python -m pytest -q tests/test_compile.py")


@pytest.fixture(scope="module", autouse=True)
def quiet_libtpu():
  if LIBTPU:
    targets.quiet_environment("v5e:2x2")  # as main does for compile_for: libtpu's env, before its first lookup


# --- names, manifests: no libtpu needed ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,chip,name", [
    ("v5p:2x2x2", "v5p", "v5p:2x2x2"), ("v5e:4x4", "v5e", "v5e:4x4"), ("v4-16", "v4", "v4:2x2x2"),
    ("v5p-64", "v5p", "v5p:2x4x4"), ("v5litepod-16", "v5e", "v5e:4x4"), ("v6e-8", "v6e", "v6e:2x4"),
    (" V6E:8x8 ", "v6e", "v6e:8x8")])
def test_slice_names_and_accelerator_types(text, chip, name):
  found_chip, found_name = targets.parse(text)
  assert (found_chip.name, found_name) == (chip, name)


@pytest.mark.parametrize("text,message", [
    ("v5p:2x2", "a v5p slice has 3 dimensions"), ("v5e:2x2x2", "a v5e slice has 2 dimensions"),
    ("v5p-6", "no default shape for 3 v5p chips"), ("v7:2x2", "write a TPU slice as <chip>:<shape>"),
    ("h200:8", "write a GPU as h100, h200, with a count (h200x8) or hosts x GPUs (h100:2x8)"),
    ("a100x8", "on another GPU machine use --config.compile_for=local")])
def test_bad_slice_names_are_one_line_with_the_fix(text, message):
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    targets.parse(text)


def test_chip_table_is_googles():
  """Peak bf16 FLOP/s and HBM per chip as cloud.google.com/tpu/docs gives them; usable HBM below nominal."""
  assert {n: (c.peak_flops / 1e12, c.hbm_gib) for n, c in targets.CHIPS.items()} == {
      "v4": (275, 32), "v5e": (197, 16), "v5p": (459, 95), "v6e": (918, 32)}
  assert all(0.95 * c.hbm_gib <= c.usable_gib <= c.hbm_gib * 1.01 for c in targets.CHIPS.values())


def test_per_chip_defaults_are_the_largest_micro_batch_that_fits_in_the_compiled_table():
  """TRAIN_DEFAULTS against docs/tpu.md's table: for each chip and size, the chosen micro-batch compiled and fit
  without remat, and every larger one compiled did not (or none larger was compiled: 32 per chip is one pass)."""
  rows = re.findall(r"^\| TPU [^|]+ \| (v\w+):[^|]+ \| (150m|1\.2b) \| train \| (\d+) \| (on|off) \| ([^|]+) \|",
                    (REPO / "docs" / "tpu.md").read_text(), re.M)
  assert len(rows) >= 20
  for (chip, size), (per_chip, remat) in targets.TRAIN_DEFAULTS.items():
    fits = {int(m): "does not fit" not in cell for c, s, m, r, cell in rows if (c, s, r) == (chip, size, "off")}
    assert not remat and fits.get(per_chip), (chip, size, fits)
    assert not any(ok for m, ok in fits.items() if m > per_chip), (chip, size, fits)


@pytest.mark.parametrize("name,arg,chips", [("pretrain", "150m,v5p-64", 32), ("pretrain", "1.2b,v5e:2x4", 8),
                                             ("target", "1.2b,anneal,v6e-8", 8), ("finetune", "tasks,150m,v4-16", 8),
                                             ("pretrain", "1.2b,v5e:16x16", 256)])
def test_slice_presets_take_the_compiled_per_chip_defaults(name, arg, chips):
  """configs/<stage>.py:<size>,<slice>: the per-chip micro-batch and remat of docs/tpu.md's table, times the chips,
  at most the global batch (one pass)."""
  cfg = make_config(name, arg)
  size = arg.split(",")[1] if name == "finetune" else arg.split(",")[0]
  chip = targets.parse(arg.split(",")[-1])[0].name
  per_chip, remat = targets.TRAIN_DEFAULTS[(chip, size)]
  assert cfg.train.micro_batch_size == min(256, per_chip * chips) and cfg.model.remat == remat
  assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
  with pytest.raises(ValueError, match=r"^the config's TPU slice='v9:2x2': write a TPU slice as"):
    make_config(name, arg.replace(arg.split(",")[-1], "v9:2x2"))


def test_without_libtpu_one_line_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(errors.ConfigError, match=re.escape("pip install -e '.[tpu]'")) as caught:
    targets.target("v5e:2x2")
  assert "\n" not in str(caught.value)


def test_tpu_extra_pins_the_required_jax():
  pinned = re.search(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert extras["tpu"] == [f"jax[tpu]=={pinned}"] and extras["gpu-aot"] == [f"jax-cuda12-pjrt=={pinned}"]
  assert "libtpu" not in (REPO / "requirements.txt").read_text()


class FakeDevice:
  def __init__(self, kind, coords, process, platform="tpu"):
    self.platform, self.device_kind, self.coords, self.process_index = platform, kind, coords, process


def slice_devices(kind, shape, chips_per_host):
  coords = [list(c) for c in np.ndindex(*shape)]
  return [FakeDevice(kind, c, i // chips_per_host) for i, c in enumerate(coords)]


def test_manifest_mismatch_names_what_differs(monkeypatch):
  v5e = slice_devices("TPU v5 lite", (2, 2, 1), 4)
  v4 = slice_devices("TPU v4", (2, 2, 2), 4)
  key = {"step": "train", "micro_batch": 64, "model": {"d_model": 1024}}
  saved = compiler.manifest("train_step", "v5e:2x2", v5e, key)
  assert targets.signature(v5e) == {"platform": "tpu", "device_kind": "TPU v5 lite", "devices": 4, "hosts": 1,
                                    "shape": "2x2x1"}
  assert compiler.mismatch(saved, compiler.manifest("train_step", "run", v5e, key)) == ""
  assert compiler.mismatch(saved, compiler.manifest("train_step", "run", v4, key)) == (
      "it was compiled for v5e:2x2: 4 TPU v5 lite device(s) on 1 host(s) (2x2x1); this run has 8 TPU v4 device(s) "
      "on 2 host(s) (2x2x2)")
  other = compiler.manifest("train_step", "run", v5e, key | {"micro_batch": 32, "model": {"d_model": 2048}})
  assert compiler.mismatch(saved, other) == ("its step differs from this run's in micro_batch (64 there, 32 here), "
                                             "model.d_model (1024 there, 2048 here)")
  newer = dict(saved, versions=dict(saved["versions"], jax="0.11.2"))
  assert compiler.mismatch(newer, other).startswith("it was compiled with other software: jax 0.11.2 there")
  edited = dict(saved, code=dict(saved["code"], **{"model/losses.py": "0" * 16}))
  assert compiler.mismatch(edited, compiler.manifest("train_step", "run", v5e, key)) == (
      "colorjax's step code changed since it was compiled (colorjax/model/losses.py)")


def test_compile_load_outside_train_and_score_runs_is_one_line():
  proc = run_cli(["--config", "configs/pipeline.py:demo", "--config.compile_load=/nonexistent"], check=False)
  assert proc.returncode == 2 and proc.stderr == (
      "colorjax pipeline: error: compile_load applies to pretrain, finetune and score runs, not pipeline (a pipeline "
      "compiles its own steps; its stages can be run alone with compile_load)\n")


def test_eval_compiles_its_held_out_and_multiple_choice_steps(capsys):
  reports = aot_steps.compile_stage(make_config("eval", "tiny", compile_for="local", compile_estimate=False,
                                                eval__batch_size=8, model__max_seq_len=128))
  assert [(r.built.kind, r.built.args[1].shape) for r in reports] == [("heldout_step", (8, 128)),
                                                                       ("choice_step", (128, 128))]
  assert all(r.fits and r.result.memory["argument"] > 0 for r in reports)
  assert "| eval choice_step | 128 x 128 tokens per step, 64 continuation tokens (nominal) |" in capsys.readouterr().out


def test_compile_for_a_stage_without_a_step_is_refused():
  with pytest.raises(errors.ConfigError, match="stage 'select' has no jitted step"):
    aot_steps.compile_stage(make_config("select", compile_for="local"))


# --- save and load on this machine (CPU): the real train and score runs ------------------------------------------


def _losses(workdir):
  return [r["loss"] for r in map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
          if "loss" in r]


def test_local_executable_round_trip_through_a_train_run(synthetic_store, tmp_path, capsys):
  """compile_for=local + compile_save, then a run with compile_load: it takes the saved step (its line says so)
  and trains exactly as the run that compiles its own; a run with another micro-batch is refused by name."""
  folder = tmp_path / "exe"
  settings = lambda run, **kw: tiny_train_overrides(synthetic_store, tmp_path / run, train__micro_batch_size=8, **kw)
  aot_steps.compile_stage(make_config("pretrain", "demo", compile_for="local", compile_save=str(folder),
                                      **settings("unused")))
  saved = sorted(p.name for p in folder.iterdir())
  assert len(saved) == 2 and saved[0].startswith("train_step-") and saved[0].endswith(".json")
  record = json.loads((folder / saved[0]).read_text())
  assert record["target"] == "local" and record["key"]["micro_batch"] == 8 and record["devices"]["platform"] == "cpu"
  train.run(make_config("pretrain", "demo", **settings("plain")))
  capsys.readouterr()
  train.run(make_config("pretrain", "demo", compile_load=str(folder), **settings("loaded")))
  assert f"train step loaded from {folder} (compiled ahead of time)" in capsys.readouterr().out
  assert _losses(tmp_path / "loaded") == _losses(tmp_path / "plain") and len(_losses(tmp_path / "plain")) == 12
  with pytest.raises(errors.ConfigError, match=r"refused train_step: its step differs from this run's in "
                                               r"global_batch \(16 there, 8 here\)"):
    train.run(make_config("pretrain", "demo", compile_load=str(folder),
                          **settings("other", train__global_batch_size=8)))
  assert not (tmp_path / "other").exists()  # refused before its first step: no run folder left


def test_local_executable_round_trip_through_a_score_run(synthetic_store, synthetic_prior, tmp_path):
  prior, prior_cfg = synthetic_prior
  common = dict(score__store=str(synthetic_store), score__prior=str(prior), score__conditionals=(str(prior),),
                score__batch_size=16, model__compute_dtype="float32")
  folder = tmp_path / "exe"
  aot_steps.compile_stage(make_config("score", "demo", compile_for="local", compile_save=str(folder), **common))
  assert [p.stem.split("-")[0] for p in folder.glob("*.xla")] == ["score_step"]
  plain = score.run(make_config("score", "demo", workdir=str(tmp_path / "plain"), **common))
  loaded = score.run(make_config("score", "demo", workdir=str(tmp_path / "loaded"), compile_load=str(folder),
                                 **common))
  assert np.array_equal(scores_lib.Scores(plain).read(0, 10 ** 9), scores_lib.Scores(loaded).read(0, 10 ** 9))
  with pytest.raises(errors.ConfigError, match=r"score_step: its step differs from this run's in batch \(16 there, "
                                               r"32 here\)"):
    score.run(make_config("score", "demo", workdir=str(tmp_path / "other"), compile_load=str(folder),
                          **(common | {"score__batch_size": 32})))


def test_a_dry_run_on_this_machines_accelerators_shows_the_compiled_memory_too(monkeypatch, capsys):
  """Item 2: where the dry run plans for this machine's accelerators a compiler for the target is at hand, so the
  hand estimate is followed by XLA's figure, which says it is the one to plan with (a CPU's dry run plans for
  other machines and keeps the estimate alone)."""
  assert not targets.local_compiler(make_config("pretrain", "demo"))
  monkeypatch.setattr(targets, "local_compiler", lambda cfg: True)  # as on a GPU or TPU machine
  train.describe(make_config("pretrain", "demo"))
  score.describe_nominal(make_config("score", "demo"), 64, 128, models=2)
  lines = capsys.readouterr().out.splitlines()
  compiled = [i for i, line in enumerate(lines) if line.startswith("memory/device (compiled by XLA for local; the "
                                                                   "figure to plan with, the estimate above is "
                                                                   "hand-computed)")]
  estimated = [i for i, line in enumerate(lines) if line.startswith("memory/device (estimate)")]
  assert len(compiled) == 2 and len(estimated) == 2 and all(e < c for e, c in zip(estimated, compiled))
  assert all(re.search(r"peak [\d.]+ (GiB|MiB)", lines[i]) for i in compiled)


# --- TPU slices (libtpu) ---------------------------------------------------------------------------------------------


def _compile(stage, arg, topology, **overrides):
  return aot_steps.compile_stage(make_config(stage, arg, compile_for=topology, compile_estimate=False, **overrides))


@needs_libtpu
@pytest.mark.parametrize("topology,devices,hosts", [("v5e:2x2", 4, 1), ("v4:2x2x2", 8, 2)])
def test_tiny_train_and_score_steps_compile_for_single_and_multi_host_slices(topology, devices, hosts):
  target = targets.target(topology)
  assert (len(target.devices), target.hosts) == (devices, hosts)
  (trained,) = _compile("pretrain", "tiny", topology)
  (scored,) = _compile("score", "tiny", topology)
  for report, kind in ((trained, "train_step"), (scored, "score_step")):
    assert report.built.kind == kind and report.fits and not report.result.error
    assert 0 < report.result.needed < target.usable_bytes
    assert report.result.memory["argument"] > 0 and report.result.executable is not None
  # the tiny model's params and Adam state are split over every chip: about 13.3M x 12 bytes / devices
  assert trained.result.memory["argument"] == pytest.approx(13.27e6 * 12 / devices, rel=0.1)
  assert capsys.readouterr().out.count("attention is XLA's") == 2  # the GPU's cuDNN kernel cannot compile here


SHORT = dict(model__max_seq_len=128)  # the tiny model on 128-token sequences: quicker compiles


@needs_libtpu
def test_per_chip_memory_grows_with_the_micro_batch():
  small, large = [_compile("pretrain", "tiny", "v5e:2x2", train__global_batch_size=64, train__micro_batch_size=micro,
                           **SHORT)[0].result for micro in (8, 64)]
  assert small.memory["argument"] == large.memory["argument"]  # the same state; only the activations grow
  assert 2 * small.memory["temp"] < large.memory["temp"] and small.needed < large.needed


@needs_libtpu
def test_a_micro_batch_too_large_for_the_chip_is_refused_with_the_one_that_fits(capsys):
  with pytest.raises(errors.ConfigError) as caught:
    _compile("pretrain", "tiny", "v5e:2x2", train__global_batch_size=4096, train__micro_batch_size=4096, **SHORT)
  message = str(caught.value)
  assert "\n" not in message and message.startswith("pretrain train_step (4096 x 128 tokens per step, micro-batch "
                                                    "4096 (1024 per data-parallel device) x 1, remat off) does not "
                                                    "fit a v5e:2x2 chip; would fit with "
                                                    "--config.train.micro_batch_size=")
  assert "RESOURCE_EXHAUSTED: Ran out of memory on HBM" in capsys.readouterr().out  # the compiler's own refusal
  fitting, peak = re.search(r"micro_batch_size=(\d+) \(peak ([\d.]+) GiB per chip\)$", message).groups()
  assert int(fitting) in (2048, 1024, 512) and 15.75 / 4 < float(peak) <= 15.75


@needs_libtpu
def test_a_saved_executable_is_refused_for_another_topology(tmp_path):
  folder = tmp_path / "exe"
  (report,) = _compile("pretrain", "tiny", "v5e:2x2", compile_save=str(folder))
  (record,) = [json.loads(p.read_text()) for p in folder.glob("train_step-*.json")]
  assert record["target"] == "v5e:2x2" and record["versions"]["libtpu"] and record["devices"]["hosts"] == 1
  assert record["memory"]["temp"] == report.result.memory["temp"]
  with pytest.raises(errors.ConfigError, match=r"refused train_step: it was compiled for v5e:2x2: 4 TPU v5 lite "
                                               r"device\(s\) on 1 host\(s\) \(2x2x1\); this run has 8 TPU v4"):
    compiler.load(folder, "train_step", targets.target("v4:2x2x2").devices, report.built.key)
  import jax
  with pytest.raises(errors.ConfigError, match="this run has 1 cpu device"):
    compiler.load(folder, "train_step", jax.devices()[:1], report.built.key)


@needs_libtpu
def test_the_estimate_counts_every_micro_batch_and_head_chunk():
  """XLA counts a loop body once; the loop-free twin (x micro-batches) matches 6N+12LdT within a few percent."""
  (report,) = aot_steps.compile_stage(make_config("pretrain", "tiny", compile_for="v5p:2x2x1",
                                                  train__global_batch_size=32, train__micro_batch_size=16,
                                                  train__loss_chunk=32, **SHORT))
  per_chip = report.built.model_flops / 4
  assert report.flops_per_chip == pytest.approx(per_chip, rel=0.1)
  assert report.result.flops < 0.6 * per_chip  # the step itself: one micro-batch, one head chunk counted
  assert report.seconds > 0 and report.source.startswith("XLA TPU cost-model estimate")


@needs_libtpu
def test_cli_reports_the_compiled_step_quietly():
  proc = run_cli(["--config", "configs/pretrain.py:tiny", "--config.compile_for=v5e:2x2",
                  "--config.compile_estimate=False"], env_extra={"JAX_PLATFORMS": ""})
  out = proc.stdout
  assert out.startswith("compile_for v5e:2x2: 4 TPU v5 lite device(s) on 1 host(s), 15.75 GiB HBM usable per chip, "
                        "197 TFLOP/s bf16 peak; mesh data=1 fsdp=4 tensor=1 (4 devices)\n")
  assert "memory/device (estimate)" in out  # the dry run's hand estimate, beside the compiler's
  assert re.search(r"pretrain \(train_step\): 16 x 512 tokens per step, micro-batch 16 \(4 per data-parallel "
                   r"device\) x 1, remat off\n  memory/chip: arguments .* of 15\.75 GiB usable \(\d+%\): fits; "
                   r"compiled in [\d.]+ s\n", out)
  assert "TPU_WORKER_HOSTNAMES" not in proc.stderr and "E0000" not in proc.stderr, proc.stderr


# --- NVIDIA GPUs without one: the CUDA PJRT plugin's compile-only devices ------------------------------------------

CUDA_PJRT = gpus.cuda_plugin_installed()
needs_cuda_pjrt = pytest.mark.skipif(
    not CUDA_PJRT, reason="the CUDA PJRT plugin is not installed (458 MB; requirements.txt leaves it out); run: "
    "pip install -e '.[gpu-aot]' && python -m pytest -q tests/test_compile.py -k gpu")


@pytest.mark.parametrize("text,name,hosts,per_host", [("h100", "h100", 1, 1), ("H200x8", "h200x8", 1, 8),
                                                      ("h100:2x8", "h100:2x8", 2, 8), ("h200:1x4", "h200x4", 1, 4)])
def test_gpu_names(text, name, hosts, per_host):
  gpu, found_hosts, found_per_host, canonical = gpus.parse(text)
  assert (gpu.name, found_hosts, found_per_host, canonical) == (name.split(":")[0].split("x")[0], hosts, per_host, name)
  assert gpus.parse("v5p:2x2x2") is None


def test_gpu_target_descriptions_are_the_chips():
  """The bundled GpuTargetConfigProtos: Hopper (sm 9.0), the H100's and H200's memory and bandwidth."""
  for gpu in gpus.GPUS.values():
    text = gpus.target_config(gpu)
    assert "major: 9" in text and f"device_memory_size: {gpu.hbm_bytes}" in text
    bandwidth = float(re.search(r"memory_bandwidth: (\d+)", text).group(1))
    assert bandwidth == pytest.approx(gpu.hbm_bandwidth, rel=0.01)


def test_without_the_cuda_plugin_one_line_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name.startswith("jax_plugins.xla_cuda") else real(name, *a))
  with pytest.raises(errors.ConfigError, match=re.escape("pip install -e '.[gpu-aot]'")) as caught:
    targets.target("h200x8")
  assert "\n" not in str(caught.value)


@needs_cuda_pjrt
@pytest.mark.parametrize("text,devices,hosts", [("h100", 1, 1), ("h200:2x4", 8, 2)])
def test_tiny_train_and_score_steps_compile_for_gpus_without_one(text, devices, hosts, capsys):
  target = targets.target(text)
  assert (len(target.devices), target.hosts, target.devices[0].platform) == (devices, hosts, "gpu")
  (trained,) = _compile("pretrain", "tiny", text)
  (scored,) = _compile("score", "tiny", text)
  for report, kind in ((trained, "train_step"), (scored, "score_step")):
    assert report.built.kind == kind and report.fits and report.result.executable is not None
    assert 0 < report.result.needed < target.usable_bytes
  assert trained.result.memory["argument"] == pytest.approx(13.27e6 * 12 / devices, rel=0.1)


@needs_cuda_pjrt
def test_a_micro_batch_too_large_for_the_gpu_is_refused_with_the_one_that_fits(monkeypatch):
  """With jax's share of the H100 cut to 1 GiB (XLA_PYTHON_CLIENT_MEM_FRACTION), micro 512 does not fit; the line
  names a micro-batch the compiler fits, and the temporaries grow with the micro-batch."""
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", str(gpus.GIB / gpus.GPUS["h100"].hbm_bytes))
  with pytest.raises(errors.ConfigError) as caught:
    _compile("pretrain", "tiny", "h100", train__global_batch_size=512, train__micro_batch_size=512, **SHORT)
  message = str(caught.value)
  assert "\n" not in message and "does not fit a h100 chip; would fit with --config.train.micro_batch_size=" in message
  fitting = int(re.search(r"micro_batch_size=(\d+)", message).group(1))
  assert fitting < 512
