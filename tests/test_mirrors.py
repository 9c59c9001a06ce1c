"""Issue 12.4: metrics.jsonl's scalars mirrored to TensorBoard and W&B (optional extras), from process 0.

The fake-module tests always run; the real packages' tests skip unless `pip install 'colorjax[tensorboard,wandb]'`.
"""
import struct
import sys

import numpy as np
import pytest

from colorjax import errors
from colorjax import train
from colorjax.training import metrics
from conftest import jsonl_scalars
from conftest import make_config
from conftest import run_cli
from conftest import tiny_train_overrides
from test_train import cli_args


def short_run(store, workdir, **extra):
  """Four steps with an eval every two: train and eval records at steps 0-4."""
  return tiny_train_overrides(store, workdir, train__max_steps=4, train__eval_every=2, train__eval_batches=1,
                              data__eval_stores=(f"synthetic={store}",), **extra)


def test_wandb_mirror_keeps_its_run_id_for_a_resumed_run(fake_wandb, tmp_path):
  """(A whole run's W&B records are checked in test_train's test_pretrain_learns_writes_metrics_and_exports.)"""
  first = metrics.WandbMirror("colorjax-test", tmp_path, "run", "pretrain", {"seed": 0})
  first.write({"event": "start", "step": 0, "stage": "pretrain"})  # not scalars: nothing is logged
  first.write({"event": "train", "step": 3, "loss": 2.5, "mfu": None, "lr": 1e-3})
  first.write({"event": "eval", "step": 3, "eval/synthetic_loss": 2.75})
  first.close()
  metrics.WandbMirror("colorjax-test", tmp_path, "run", "pretrain", {"seed": 0})  # as a resumed run opens it
  assert fake_wandb[0].logged == [(3, {"train/loss": 2.5, "train/lr": 1e-3}), (3, {"eval/synthetic_loss": 2.75})]
  assert fake_wandb[0].finished and fake_wandb[0].kwargs["resume"] == "allow"
  assert fake_wandb[1].kwargs["id"] == fake_wandb[0].kwargs["id"] == (tmp_path / "wandb" / "run_id").read_text()


def test_a_mirror_without_its_package_is_a_config_error(synthetic_store, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # imports as if not installed
  with pytest.raises(errors.ConfigError, match=r"train.tensorboard needs .* pip install 'colorjax\[tensorboard\]'"):
    train.run(make_config("pretrain", "demo", **short_run(synthetic_store, tmp_path / "run", train__tensorboard=True)))
  assert not (tmp_path / "run").exists()


def test_a_failing_mirror_is_switched_off_with_a_warning(tmp_path):
  class Broken(metrics.MetricsMirror):
    def log(self, values, step):
      raise OSError("disk full")

  writer = metrics.MetricsWriter(tmp_path, mirrors=[Broken()])
  with pytest.warns(UserWarning, match="Broken failed .*disk full"):
    writer.write({"event": "train", "step": 1, "loss": 1.0})
  writer.write({"event": "train", "step": 2, "loss": 0.5})
  writer.close()
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2] and not writer.mirrors


def tensorboard_scalars(folder) -> dict:
  """step -> {tag: value} from TF event files (TFRecord framing: length, its CRC, an Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = {}
  for path in sorted(folder.glob("events.out.tfevents.*")):
    raw, pos = path.read_bytes(), 0
    while pos < len(raw):
      (length,) = struct.unpack("<Q", raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(event.step, {})[value.tag] = value.simple_value
  return out


def test_tensorboard_mirror_writes_the_scalars(synthetic_store, tmp_path):
  pytest.importorskip("tensorboardX")
  workdir = tmp_path / "run"
  train.run(make_config("pretrain", "demo", **short_run(synthetic_store, workdir, train__tensorboard=True)))
  got, want = tensorboard_scalars(workdir / "tensorboard"), jsonl_scalars(workdir)
  assert got.keys() == want.keys() and all(got[s].keys() == want[s].keys() for s in want)
  for step, values in want.items():
    np.testing.assert_allclose([got[step][k] for k in values], list(values.values()), rtol=1e-6)


def wandb_history(workdir) -> dict:
  """step -> {key: value} from an offline run's .wandb file (leveldb-style log: 7-byte header, 32 KiB blocks of
  records with a 7-byte header each: CRC, length, type; a Record proto split over FIRST/MIDDLE/LAST pieces)."""
  import json  # pylint: disable=import-outside-toplevel
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  [path] = (workdir / "wandb").glob("offline-run-*/run-*.wandb")
  raw, pos, pieces, out = path.read_bytes(), 7, b"", {}
  while pos + 7 <= len(raw):
    if 32768 - pos % 32768 < 7:
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
    pieces += raw[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST
      record = wandb_internal_pb2.Record.FromString(pieces)
      pieces = b""
      if record.WhichOneof("record_type") == "history":
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        out.setdefault(items.pop("_step"), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
  return out


def test_wandb_offline_run_holds_the_scalars(synthetic_store, tmp_path):
  pytest.importorskip("wandb")
  workdir = tmp_path / "run"
  run_cli(cli_args(short_run(synthetic_store, workdir, train__wandb_project="colorjax-test")),
          env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
  got, want = wandb_history(workdir), jsonl_scalars(workdir)
  assert got.keys() == want.keys()
  for step, values in want.items():
    assert got[step].keys() == values.keys()
    np.testing.assert_allclose([got[step][k] for k in values], list(values.values()), rtol=1e-6)
