"""Object storage against real servers on 127.0.0.1: moto's S3 server and a local GCS emulator.

prepare -> pretrain (with a checkpoint) -> score -> select -> target runs with every path on s3:// (and gs://), each
stage in a fresh process with an empty cache (a new machine), and must give what the same stages give on local disk.
"""
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from colorjax.artifacts import formats
from colorjax.artifacts import object_storage
from colorjax.artifacts import scores as scores_lib
from conftest import run_cli

BUCKET = "colorjax-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve(command, port):
  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(300):
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      return proc
    except OSError:
      if proc.poll() is not None:
        break
      time.sleep(0.1)
  proc.kill()
  pytest.fail(f"local object server did not start: {command}")


@pytest.fixture(scope="module")
def s3_env():
  port = _free_port()
  proc = _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port)
  env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
  import boto3
  boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing",
               aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
  yield env
  proc.kill()


@pytest.fixture(scope="module")
def gcs_env():
  port = _free_port()
  proc = _serve([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                 "--in-memory", "--default-bucket", BUCKET], port)
  url = f"http://127.0.0.1:{port}"
  # The emulator's object generations are not what tensorstore's OCDBT expects ("Malformed StorageGeneration"), so
  # orbax writes through the mirror here (COLORJAX_ORBAX_DIRECT=0); on real GCS it writes to the bucket itself.
  yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test",
         "COLORJAX_ORBAX_DIRECT": "0"}
  proc.kill()


@pytest.fixture
def in_process(monkeypatch, tmp_path):
  """Point this process at a server (env) with an empty cache; forget the mirrors afterwards."""
  def use(env):
    for key, value in env.items():
      monkeypatch.setenv(key, value)
    monkeypatch.setenv("COLORJAX_CACHE", str(tmp_path / "cache"))
  yield use
  object_storage.forget()


def _put(url: str, local) -> None:
  fs, path = object_storage._fs(url)  # pylint: disable=protected-access
  fs.put_file(str(local), path)


def _stages(root: str, inputs: list[str], tokenizer: str, env: dict, cache) -> None:
  """The method's stages on `root` (a folder or a bucket prefix), each in a new process with a new cache."""
  tiny = ["--config.model.vocab_size=512", "--config.model.compute_dtype=float32", "--config.model.max_seq_len=64",
          "--config.train.global_batch_size=16", "--config.train.warmup_steps=2", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.data.prefetch=2"]
  runs = [
      ["--config", "configs/prepare.py", f"--config.prepare.inputs={tuple(inputs)!r}",
       f"--config.prepare.tokenizer={tokenizer}", f"--config.prepare.output={root}/store",
       "--config.prepare.seq_len=64", "--config.prepare.workers=1"],
      ["--config", "configs/pretrain.py:demo", f"--config.data.train_store={root}/store",
       f"--config.workdir={root}/prior", "--config.train.max_steps=8", "--config.train.checkpoint_every=4", *tiny],
      ["--config", "configs/pretrain.py:demo", f"--config.data.train_store={root}/store",
       f"--config.workdir={root}/cond", "--config.train.max_steps=5", "--config.seed=1", *tiny],
      ["--config", "configs/score.py:demo", f"--config.score.store={root}/store",
       f"--config.score.prior={root}/prior/params", f"--config.score.conditionals=('{root}/cond/params',)",
       f"--config.workdir={root}/scores", "--config.score.batch_size=16", "--config.score.chunk_rows=64",
       "--config.model.compute_dtype=float32"],
      ["--config", "configs/select.py:color,4", f"--config.select.scores={root}/scores",
       f"--config.workdir={root}/selection"],
      ["--config", "configs/pretrain.py:demo", f"--config.data.train_store={root}/store",
       f"--config.data.index={root}/selection", f"--config.workdir={root}/target", "--config.train.max_steps=4",
       *tiny],
  ]
  for i, args in enumerate(runs):
    run_cli(args, env_extra=dict(env, COLORJAX_CACHE=str(cache / str(i))), timeout=600)


def _results(root) -> dict:
  """What the stages produced, read from a local folder or a fresh mirror of a bucket prefix."""
  from colorjax.training import checkpoint  # pylint: disable=import-outside-toplevel
  if object_storage.is_remote(root):
    root = object_storage.mirror(root)
  losses = {name: [r["loss"] for r in map(json.loads, (root / name / "metrics.jsonl").read_text().splitlines())
                   if "loss" in r] for name in ("prior", "cond", "target")}
  target = checkpoint.read_params_manifest(root / "target" / "params")
  scores = scores_lib.Scores(root / "scores")
  return {"store_id": json.loads((root / "store" / "manifest.json").read_text())["id"], "losses": losses,
          "nll_bits": scores.read(0, scores.num_sequences).view(np.uint32).tolist(),
          "index": np.load(root / "selection" / "index.npy").tolist(), "target_id": target["id"]}


@pytest.fixture(scope="module")
def local_run(synthetic_store, tmp_path_factory):
  """The stages on local disk: the reference the object-storage runs must equal."""
  root = tmp_path_factory.mktemp("local")
  text = sorted((synthetic_store.parent / "text").glob("*.jsonl.gz"))[:2]
  _stages(str(root), [str(p) for p in text], str(synthetic_store.parent / "tokenizer.json"), {}, root / "cache")
  return root, text


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_pipeline_on_object_storage_equals_local_disk(scheme, local_run, synthetic_store, s3_env, gcs_env, in_process,
                                                      tmp_path):
  env = s3_env if scheme == "s3" else gcs_env
  in_process(env)
  local_root, text = local_run
  root = f"{scheme}://{BUCKET}/{tmp_path.name}"
  for path in text:
    _put(f"{root}/input/{path.name}", path)
  _put(f"{root}/input/tokenizer.json", synthetic_store.parent / "tokenizer.json")
  _stages(root, [f"{root}/input/{p.name}" for p in text], f"{root}/input/tokenizer.json", env, tmp_path / "cache")
  fs, prefix = object_storage._fs(root)  # pylint: disable=protected-access
  names = {p[len(prefix) + 1:] for p in fs.find(prefix)}
  assert {"store/manifest.json", "prior/params/manifest.json", "scores/manifest.json",
          "selection/manifest.json", "target/metrics.jsonl"} <= names
  assert any(n.startswith("prior/checkpoints/") for n in names)  # the checkpoint reached the bucket
  assert not any(".partial" in n or n.endswith(".lock") for n in names)
  remote, local = _results(root), _results(local_root)
  assert remote == local


def test_store_rows_are_ranged_reads(synthetic_store, s3_env, in_process, monkeypatch):
  in_process(s3_env)
  from colorjax.data import stores  # pylint: disable=import-outside-toplevel
  url = f"s3://{BUCKET}/ranged/store"
  fs, prefix = object_storage._fs(url)  # pylint: disable=protected-access
  fs.put(str(synthetic_store), prefix, recursive=True)
  local = stores.TokenStore(synthetic_store)
  array_file = synthetic_store / local.files[0]["array"]
  requests = []
  real = fs.cat_ranges
  monkeypatch.setattr(fs, "cat_ranges", lambda paths, starts, ends, **kw: (
      requests.extend(zip(starts, ends)) or real(paths, starts, ends, **kw)))
  store = stores.TokenStore(object_storage.mirror(url))
  assert not (store.path / local.files[0]["array"]).exists()  # the token array was not downloaded
  ids = np.array([7, 3, 4, 5, 40, 3])
  np.testing.assert_array_equal(store.read(ids), local.read(ids))
  row = local.seq_len * local.dtype.itemsize
  assert sum(end - start for start, end in requests) == 5 * row  # rows 3-5 (once), 7 and 40: three ranged GETs
  assert len(requests) == 3 and array_file.stat().st_size > 40 * row


def test_sync_uploads_changes_manifest_last_and_deletions(s3_env, in_process, monkeypatch):
  in_process(s3_env)
  url = f"s3://{BUCKET}/sync/run"
  local = object_storage.mirror(url)
  (local / "sub").mkdir(parents=True)
  (local / "sub" / "a.bin").write_bytes(b"a")
  (local / formats.MANIFEST).write_text("{}")
  (local / ".run.lock").write_text("pid")
  (local / "x.partial").mkdir()
  (local / "x.partial" / "b").write_bytes(b"b")
  order = []
  fs, prefix = object_storage._fs(url)  # pylint: disable=protected-access
  real = fs.put_file
  monkeypatch.setattr(fs, "put_file", lambda lpath, rpath, **kw: order.append(rpath[len(prefix) + 1:]) or real(
      lpath, rpath, **kw))
  assert object_storage.sync() == 2 and order == ["sub/a.bin", formats.MANIFEST]
  assert object_storage.sync() == 0  # nothing changed
  (local / "sub" / "a.bin").unlink()
  object_storage.sync()
  assert {p[len(prefix) + 1:] for p in fs.find(prefix)} == {formats.MANIFEST}


def test_unreachable_paths_fail_before_work(tmp_path):
  proc = run_cli(["--config", "configs/select.py:color,4", "--config.select.scores=s3://no-such-bucket-xyz/scores",
                  f"--config.workdir={tmp_path / 'sel'}"],
                 env_extra={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                            "AWS_SECRET_ACCESS_KEY": "x", "COLORJAX_CACHE": str(tmp_path / "cache"),
                            "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"},
                 check=False, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "s3://no-such-bucket-xyz/scores" in proc.stderr and not (tmp_path / "sel").exists()


def test_gcs_params_go_to_the_bucket_and_patterns_mirror_each_match(gcs_env, in_process, monkeypatch, tmp_path):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  in_process(gcs_env)
  monkeypatch.setenv("COLORJAX_ORBAX_DIRECT", "1")
  folder = object_storage.mirror(f"gs://{BUCKET}/direct/run") / "params"
  target = object_storage.orbax_path(folder)
  assert str(target) == f"gs://{BUCKET}/direct/run/params"  # orbax writes to the bucket, not the mirror
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, {"w": jnp.arange(4.0)})
  checkpointer.wait_until_finished()
  assert not folder.exists()
  np.testing.assert_array_equal(ocp.StandardCheckpointer().restore(target)["w"], np.arange(4.0))
  assert object_storage.orbax_path(tmp_path / "local") == tmp_path / "local"
  for name in ("a.jsonl", "b.jsonl", "c.txt"):
    (tmp_path / name).write_text(name)
    _put(f"gs://{BUCKET}/texts/{name}", tmp_path / name)
  pattern = object_storage.mirror(f"gs://{BUCKET}/texts/*.jsonl")
  assert sorted(p.name for p in pattern.parent.glob(pattern.name)) == ["a.jsonl", "b.jsonl"]
  assert not (pattern.parent / "c.txt").exists()


def test_s3_requests_are_signed_for_aws_region(monkeypatch):
  """Issue 21.6: AWS_REGION alone (the README's variable) decides the region requests are signed for."""
  import http.server  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  seen = []

  class Recorder(http.server.BaseHTTPRequestHandler):
    def _answer(self):
      seen.append(self.headers.get("Authorization", ""))
      self.send_response(404)
      self.send_header("Content-Length", "0")
      self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    for key in ("AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE"):
      monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fs, path = object_storage._fs("s3://region-bucket/some/key")  # pylint: disable=protected-access
    assert not fs.exists(path)
  finally:
    server.shutdown()
  assert seen and all("/eu-west-2/s3/aws4_request" in header for header in seen), seen


def test_messages_name_the_url_and_a_finished_stage_cleans_its_mirrors(s3_env, in_process, tmp_path, capsys,
                                                                        monkeypatch):
  """Issue 21.6: what a stage prints names the s3:// path, not the cache; after the final sync the stage's mirrors
  leave the cache (COLORJAX_KEEP_CACHE=1 keeps them)."""
  import sys as system  # pylint: disable=import-outside-toplevel
  in_process(s3_env)
  url = f"s3://{BUCKET}/messages/run"
  local = object_storage.mirror(url)
  stream = object_storage.UrlStream(system.stdout)
  stream.write(f"wrote {local / 'params'}\n")
  assert capsys.readouterr().out == f"wrote {url}/params\n"
  local.mkdir(parents=True, exist_ok=True)
  (local / "a.bin").write_bytes(b"x" * 1000)
  object_storage.sync()
  monkeypatch.setenv("COLORJAX_KEEP_CACHE", "1")
  assert object_storage.clean() == 0 and (local / "a.bin").exists()
  monkeypatch.delenv("COLORJAX_KEEP_CACHE")
  assert object_storage.clean() == 1000 and not local.exists()
  assert not object_storage.active()
  fs, path = object_storage._fs(url + "/a.bin")  # pylint: disable=protected-access
  assert fs.cat_file(path) == b"x" * 1000
