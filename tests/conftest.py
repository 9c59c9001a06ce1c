"""Shared fixtures: where the real data lives, and small helpers."""
import os
import pathlib

import pytest

# The suite runs on the CPU (CI's machines have no accelerator). Named before jax starts: with an accelerator
# plugin installed but no accelerator (the CUDA PJRT plugin for compiling for GPUs without one), jax's default
# platform search would otherwise fail and drop the plugin.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]


def find_data_dir():
  """The shared data folder: $COLORJAX_DATA, else ../shared/data beside the checkout."""
  candidates = [os.environ.get("COLORJAX_DATA"), REPO.parent / "shared" / "data"]
  for candidate in candidates:
    if candidate and (pathlib.Path(candidate) / "tokenizer").is_dir():
      return pathlib.Path(candidate)
  return None


@pytest.fixture(scope="session")
def data_dir():
  path = find_data_dir()
  if path is None:
    pytest.skip("shared data not found: set COLORJAX_DATA or place it at ../shared/data")
  return path


@pytest.fixture(scope="session")
def neox_tokenizer_path(data_dir):
  return data_dir / "tokenizer" / "gpt-neox-20b-pii-special.json"


def run_cli(args, env_extra=None, timeout=900, check=True):
  """Run `python -m colorjax.main ...` in a subprocess (fresh JAX, e.g. with simulated devices)."""
  import subprocess
  import sys
  env = dict(os.environ)
  env.update(env_extra or {})
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-m", "colorjax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"command failed ({proc.returncode}): {args}\nstdout:\n{proc.stdout[-4000:]}\n"
                         f"stderr:\n{proc.stderr[-4000:]}")
  return proc


def make_config(name: str, arg: str | None = None, **overrides):
  """A locked config from configs/<name>.py[:arg] with dotted overrides, as main would build it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"colorjax_test_config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  for dotted, value in overrides.items():
    node = cfg
    *parents, leaf = dotted.split("__")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  cfg.lock()
  return cfg


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
  """A small synthetic multi-domain token store (vocab 512, seq_len 64) and its tokenizer."""
  from colorjax import prepare
  from colorjax.data import synthetic
  root = tmp_path_factory.mktemp("synthetic")
  files = [synthetic.write_domain(root / "text" / f"{d}.jsonl.gz", d, 150, seed=1) for d in synthetic.DOMAINS]
  tokenizer = synthetic.train_tokenizer(files, root / "tokenizer.json", vocab_size=512)
  cfg = make_config("prepare", prepare__inputs=tuple(str(f) for f in files), prepare__tokenizer=str(tokenizer),
                    prepare__output=str(root / "store"), prepare__seq_len=64, prepare__workers=2)
  prepare.run(cfg)
  return root / "store"


def tiny_train_overrides(store, workdir, **extra):
  """Overrides for a seconds-long pretrain of the demo model on the synthetic store (fp32 for tight checks)."""
  base = dict(data__train_store=str(store), workdir=str(workdir), model__vocab_size=512, model__compute_dtype="float32",
              train__global_batch_size=16, train__max_steps=12, train__warmup_steps=3, train__log_every=1,
              train__eval_every=0, train__checkpoint_every=0, data__prefetch=2)
  base.update(extra)
  return base


@pytest.fixture(scope="session")
def synthetic_prior(synthetic_store, tmp_path_factory):
  """A demo-size model briefly pretrained on the synthetic store: (params export folder, its config)."""
  from colorjax import train
  workdir = tmp_path_factory.mktemp("prior") / "run"
  cfg = make_config("pretrain", "demo", **tiny_train_overrides(synthetic_store, workdir, train__max_steps=30,
                                                               model__max_seq_len=128))
  return train.run(cfg), cfg


SMALL_DEMO = dict(pipeline__synthetic_docs=250, prior__train__max_steps=40, target__train__eval_every=10,
                  pipeline__seq_len=64)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
  """A shrunken demo pipeline, run once per session: (work directory, seconds it took). Tests that change it work
  on a copy."""
  import time
  from colorjax.pipeline import runner
  root = tmp_path_factory.mktemp("demo") / "work"
  cfg = make_config("pipeline", "demo", workdir=str(root), **SMALL_DEMO)
  start = time.time()
  runner.run(cfg)
  return root, time.time() - start


class FakeWandbRun:
  """What a `wandb.init` run records: its init arguments, log calls, and whether it was finished."""

  def __init__(self, **kwargs):
    self.kwargs, self.logged, self.finished = kwargs, [], False

  def log(self, values, step):
    self.logged.append((step, dict(values)))

  def finish(self):
    self.finished = True

  def by_step(self) -> dict:
    out = {}
    for step, values in self.logged:
      out.setdefault(step, {}).update(values)
    return out


@pytest.fixture
def fake_wandb(monkeypatch):
  """A stand-in `wandb` module in sys.modules (the real one is an optional extra); yields the runs it started."""
  import sys
  import types
  runs = []
  module = types.ModuleType("wandb")
  module.init = lambda **kwargs: runs.append(FakeWandbRun(**kwargs)) or runs[-1]
  monkeypatch.setitem(sys.modules, "wandb", module)
  return runs


def jsonl_scalars(workdir) -> dict:
  """step -> {tag: value} of a run's metrics.jsonl scalars: what every metrics mirror (TensorBoard, W&B) must show."""
  from colorjax.training import metrics
  out = {}
  for record in metrics.read_metrics(workdir):
    for tag, value in metrics.scalars(record).items():
      out.setdefault(record["step"], {})[tag] = value
  return out
