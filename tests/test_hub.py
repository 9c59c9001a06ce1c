"""The original's release on the Hugging Face hub, served by a fake hub on 127.0.0.1 (tests/fake_hub.py) from
../shared/fixtures/olmo-original laid out as the release: hf:// paths in any stage, the one-command imports of the
released models and selection (optim.pt never downloaded, whole files, the commit in every request), the id-order
check against the released prior scores, offline use of the cache, and one-commit pushes of a selection and a model.
"""
import json
import os
import pathlib
import re

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from colorjax import errors
from colorjax import select as select_lib
from colorjax.artifacts import formats
from colorjax.artifacts import hub_paths
from colorjax.artifacts import lineage
from colorjax.artifacts import object_storage
from colorjax.data import stores
from colorjax.interop import dolma
from colorjax.interop import hub
from colorjax.interop import hub_ids
from colorjax.training import checkpoint
from colorjax.artifacts import scores as scores_lib
from conftest import make_config, run_cli
from fake_hub import FakeHub
from test_olmo import FIXTURE, FP32, pool_rows, tokenizer_path  # pylint: disable=unused-import  # a fixture

RELEASE = hub_paths.RELEASE
SHUFFLED = "colorjax-test/shuffled-release"  # the release with token files whose name order is not the id order
POOL = ["part-000.npy", "part-001.npy", "part-002.npy"]
SHUFFLED_NAMES = {"part-002.npy": "c4-a.npy", "part-000.npy": "c4-b.npy", "part-001.npy": "c4-c.npy"}

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/olmo-original not found")


def release_files(token_names=None) -> dict:
  """{path: bytes} of a repo laid out as the release, from the fixture (score shards flat in their folders)."""
  read = lambda rel: (FIXTURE / rel).read_bytes()
  files = {
      "models/prior/config.yaml": read("models/prior/config.yaml"),
      "models/prior/model.pt": read("models/prior/model.pt"),
      "models/prior/optim.pt": b"AdamW moments: never downloaded unless asked" * 100,
      "models/conditional_all/config.yaml": read("models/conditional/config.yaml"),
      "models/conditional_all/model.safetensors": read("models/conditional/model.safetensors"),
      "models/conditional_all/optim.pt": b"AdamW moments" * 100,
      "indices/c4-all-tau=4/selected_indices.npy": read("selection/selected_indices.npy"),
      "README.md": b"# CoLoR-Filter release (test copy)\n",
  }
  for name in POOL:
    files[f"full_data/c4/{(token_names or {}).get(name, name)}"] = read(f"data/pool/{name}")
  for released, shard in (("pretrain", "prior"), ("all", "cond")):
    for i in (1, 2):
      for f in ("files.txt", "mmap_index.npy", "1.npy"):
        files[f"scores/{released}-{i}-seq/{f}"] = read(f"scores/{shard}-{i}/score/{f}")
  return files


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory, tokenizer_path):  # pylint: disable=redefined-outer-name
  """The fake hub serving the release, a shuffled copy and a tokenizer repo; HF_* point at it and a fresh cache."""
  home = tmp_path_factory.mktemp("hf")
  with FakeHub() as server, pytest.MonkeyPatch.context() as mp:
    server.add_repo(RELEASE, release_files())
    server.add_repo(SHUFFLED, release_files(SHUFFLED_NAMES))
    server.add_repo("colorjax-test/tokenizer", {"tokenizer.json": tokenizer_path.read_bytes()})
    mp.setenv("HF_ENDPOINT", server.endpoint)
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_HUB_CACHE", str(home / "hub"))
    mp.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    mp.delenv("HF_TOKEN", raising=False)
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    yield server


def hub_config(action, workdir, **overrides):
  return make_config("hub", action, workdir=str(workdir), **{**FP32, **overrides})


@pytest.fixture(scope="module")
def released_models(fake_hub, tmp_path_factory, tokenizer_path):  # pylint: disable=redefined-outer-name
  """One command: the released prior and conditional (named as the original's registry does: conditional_down)."""
  before = len(fake_hub.requests)
  root = tmp_path_factory.mktemp("released")
  out = hub.run(hub_config("models", root, hub__models=("prior", "conditional_down"),
                           hub__tokenizer=str(tokenizer_path)))
  return root, out, fake_hub.requests[before:]


def test_hf_urls_parse_and_the_release_names_map():
  p = hub_paths.parse("hf://datasets/davidbrandfonbrener/color-filtered-c4@refs%2Fpr%2F1/data/train")
  assert (p.repo_type, p.repo_id, p.revision, p.path) == ("dataset", "davidbrandfonbrener/color-filtered-c4",
                                                          "refs/pr/1", "data/train")
  assert hub_paths.parse("hf://org/name/x").revision == "main"
  for given, mapped in (("indices/c4-down-tau=64/selected_indices.npy", "indices/c4-all-tau=64/selected_indices.npy"),
                        ("models/conditional_down", "models/conditional_all"),
                        ("scores/down-3-seq", "scores/all-3-seq"),
                        ("models/down_tau=64_1b", "models/all_tau=64_1b"), ("downstream_data/books", None)):
    out, note = hub_paths.release_names(hub_paths.parse(f"hf://{RELEASE}/{given}"))
    assert out.path == (mapped or given) and (note is None) == (mapped is None)
    assert hub_paths.release_names(hub_paths.parse(f"hf://other/repo/{given}"))[0].path == given  # release only
  for bad in ("hf://onlyorg", "gs://b/x", "hf://org/name/../up"):
    with pytest.raises(errors.ConfigError):
      hub_paths.parse(bad)
  sha = "ab" * 20
  assert hub_paths.origin(f"/c/hub/datasets--o--n/snapshots/{sha}/data/x.parquet") == {
      "repo": "o/n", "type": "dataset", "commit": sha, "path": "data/x.parquet"}
  assert hub_paths.origin("/home/me/models/prior/model.pt") is None


def test_one_command_imports_the_released_prior_and_conditional(released_models, fake_hub):
  root, out, requests = released_models
  assert sorted(out) == ["conditional_all", "prior"]  # conditional_down is the release's conditional_all
  commit = fake_hub.repos[("model", RELEASE)].refs["main"]
  for name, weights in (("prior", "model.pt"), ("conditional_all", "model.safetensors")):
    manifest = checkpoint.read_params_manifest(root / name / "params")
    assert manifest["request"]["hub"] == [{"repo": RELEASE, "type": "model", "commit": commit}]
    assert manifest["id"] == lineage.content_id(manifest["request"])
    assert manifest["request"]["weights_sha256"] == lineage.fingerprint(
        FIXTURE / "models" / ("prior" if name == "prior" else "conditional") / weights)["sha256"]
  served = [p for m, p, _ in requests if "/resolve/" in p]
  assert not [p for p in served if p.endswith("optim.pt")]  # never, not even a HEAD
  assert not [h for _, _, h in requests if "Range" in h]  # whole files, no ranged reads
  assert sorted(p.rsplit("/", 1)[1] for m, p, _ in requests if m == "GET" and "/resolve/" in p) == [
      "config.yaml", "config.yaml", "model.pt", "model.safetensors"]  # each file once
  # one listing per repo revision, then a HEAD and a GET per file: 2 + 2 x 4 for two models
  assert len(requests) <= 2 * 2 + 2 * 4, requests
  assert not list(hub_paths.cache_dir().rglob("optim.pt"))
  asked = hub_paths.download(f"hf://{RELEASE}/models/prior/optim.pt")  # named: then it is downloaded
  assert asked.read_bytes() == release_files()["models/prior/optim.pt"]


def test_the_imported_prior_scores_the_pool_as_the_original(released_models):
  from colorjax.model import losses  # pylint: disable=import-outside-toplevel
  ref = json.loads((FIXTURE / "reference.json").read_text())
  export = released_models[0] / "prior" / "params"
  compute = make_config("score", "demo", **FP32).model
  spec = checkpoint.spec_from_manifest(checkpoint.read_params_manifest(export), compute)
  params, _ = checkpoint.load_params(export, spec)
  nll = np.asarray(jax.jit(lambda p, t: losses.sequence_nll(spec, p, t, None))(params, pool_rows()[:32]))
  assert np.abs(nll - np.asarray(ref["prior_nll"][:32], np.float32)).max() < 1e-5


def test_a_new_revision_is_another_artifact(released_models, fake_hub, tokenizer_path, tmp_path):
  root = released_models[0]
  repo = fake_hub.repos[("model", RELEASE)]
  old = repo.refs["main"]
  files = dict(repo.commits[old], **{"README.md": b"# a new revision: same weights\n"})
  new = repo.add_commit(files)
  try:
    with pytest.raises(errors.DataError, match=r"differs in: hub"):  # the same workdir refuses: nothing overwritten
      hub.run(hub_config("models", root, hub__models=("prior",), hub__tokenizer=str(tokenizer_path)))
    out = hub.run(hub_config("models", tmp_path, hub__models=("prior",), hub__tokenizer=str(tokenizer_path)))
    manifest = checkpoint.read_params_manifest(out["prior"])
    before = checkpoint.read_params_manifest(root / "prior" / "params")
    assert manifest["request"]["hub"][0]["commit"] == new != old == before["request"]["hub"][0]["commit"]
    assert manifest["id"] != before["id"]
    assert manifest["request"]["weights_sha256"] == before["request"]["weights_sha256"]
    pinned = hub.run(hub_config("models", tmp_path / "pinned", hub__models=("prior",), hub__revision=old,
                                hub__tokenizer=str(tokenizer_path)))  # a commit pins the revision: the first import
    assert checkpoint.read_params_manifest(pinned["prior"])["id"] == before["id"]
  finally:
    repo.refs["main"] = old


@pytest.fixture(scope="module")
def released_selection(fake_hub, tmp_path_factory, tokenizer_path):  # pylint: disable=redefined-outer-name
  root = tmp_path_factory.mktemp("selection")
  return root, hub.run(hub_config("selection", root, hub__tau=4, hub__tokenizer=str(tokenizer_path),
                                  hub__check_tolerance=1e-4))


def test_one_command_imports_the_released_selection_after_checking_the_ids(released_selection, fake_hub):
  root, selection = released_selection
  ref = json.loads((FIXTURE / "reference.json").read_text())
  report = json.loads((root / "id_check.json").read_text())
  print(f"id check on the fixture: {hub_ids.summary(report)}")
  assert report["matches"] and report["max_abs_diff"] < 1e-5 and report["rows_checked"] == 12
  assert [f["first_id"] for f in report["files"]] == [0, 100, 176] and report["released_ids"] == 256
  assert selection == root / "c4-all-tau=4"
  store = stores.TokenStore(root / "store")
  assert [e["name"] for e in store.files] == POOL and store.offsets.tolist() == [0, 100, 176, 256]
  ids = stores.load_index(selection, store)
  assert ids.tolist() == sorted(ref["selection"]["selected_indices"])
  np.testing.assert_array_equal(store.read(ids), pool_rows()[ids])  # the original's rows
  commit = fake_hub.repos[("model", RELEASE)].refs["main"]
  for artifact in (root / "store", selection, root / "prior" / "params"):
    assert formats.read_manifest(artifact)["request"]["hub"] == [{"repo": RELEASE, "type": "model", "commit": commit}]


def test_token_files_out_of_id_order_are_refused_with_the_order_that_matches(fake_hub, tokenizer_path, tmp_path):
  cfg = dict(hub__repo=SHUFFLED, hub__tau=4, hub__tokenizer=str(tokenizer_path), hub__check_tolerance=1e-4)
  with pytest.raises(errors.DataError) as refused:
    hub.run(hub_config("selection", tmp_path / "a", **cfg))
  message = str(refused.value)
  assert "ids do NOT follow the files' given order" in message
  assert "--config.hub.token_files=\"('c4-b.npy', 'c4-c.npy', 'c4-a.npy')\"" in message
  assert "the pool was not adopted" in message
  assert not (tmp_path / "a" / "store").exists() and json.loads((tmp_path / "a" / "id_check.json").read_text())[
      "matching_order"] == ["c4-b.npy", "c4-c.npy", "c4-a.npy"]
  defaults = make_config("hub", "selection,4", workdir=str(tmp_path / "d"), hub__repo=SHUFFLED,
                         hub__tokenizer=str(tokenizer_path))  # bf16 rescoring, tolerance 0.05: the same verdict
  with pytest.raises(errors.DataError, match=re.escape("('c4-b.npy', 'c4-c.npy', 'c4-a.npy')")):
    hub.run(defaults)
  selection = hub.run(hub_config("selection", tmp_path / "b", hub__token_files=("c4-b.npy", "c4-c.npy", "c4-a.npy"),
                                 **cfg))
  store = stores.TokenStore(tmp_path / "b" / "store")
  ids = stores.load_index(selection, store)
  np.testing.assert_array_equal(store.read(ids), pool_rows()[ids])  # in the matching order: the original's rows
  warned = hub.run(hub_config("selection", tmp_path / "c", hub__check_ids="warn", **cfg))
  assert warned.exists()  # warn adopts the name order anyway (and says so)


def test_the_walk_finds_the_order_or_says_why_not():
  column = np.arange(10, dtype=np.float32)
  sample = lambda name, n, first: hub_ids.FileSample(pathlib.Path(name), n, hub_ids.sample_rows(n, 3),
                                                     first + hub_ids.sample_rows(n, 3).astype(np.float32))
  files = [sample("x", 4, 6), sample("y", 6, 0), sample("empty", 0, 0)]
  report = hub_ids.check(files, column, 1e-3)
  assert not report["matches"] and report["matching_order"] == ["y", "x", "empty"]
  assert hub_ids.check([files[1], files[0]], column, 1e-3)["matches"]
  flat = np.zeros(10, np.float32)  # every row scores the same: no single order
  twins = [hub_ids.FileSample(pathlib.Path(n), 5, np.array([0, 4]), np.zeros(2, np.float32)) for n in "ab"]
  undecided = hub_ids.check(twins, flat, 1e-3)
  assert undecided["matches"] and undecided["matching_order"] is None  # the given order fits; nothing to search
  order, why = hub_ids.find_order(twins, flat, 1e-3)
  assert order is None and "2 files match at id 0" in why


def test_hf_paths_work_in_the_dolma_stage_and_record_the_commit(released_selection, fake_hub, tmp_path):
  root, _ = released_selection
  base = f"hf://{RELEASE}/scores"
  cfg = make_config("dolma", "import_scores", workdir=str(tmp_path / "scores"), dolma__store=str(root / "store"),
                    dolma__prior=f"{base}/pretrain-1-seq+{base}/pretrain-2-seq",
                    dolma__conditionals=(f"{base}/down-1-seq+{base}/down-2-seq",))  # registry names, mapped
  object_storage.mirror_config(cfg)
  assert cfg.dolma.prior.startswith(str(hub_paths.cache_dir())) and "+" in cfg.dolma.prior
  dolma.run(cfg)
  scores = scores_lib.Scores(tmp_path / "scores")
  ref = json.loads((FIXTURE / "reference.json").read_text())
  values = scores.read(0, scores.num_sequences)
  np.testing.assert_array_equal(values[:, 0], np.asarray(ref["prior_nll"], np.float32))
  assert scores.manifest["request"]["hub"] == [{"repo": RELEASE, "type": "model",
                                                "commit": fake_hub.repos[("model", RELEASE)].refs["main"]}]


def test_a_private_repo_needs_hf_token(fake_hub, tokenizer_path, tmp_path, monkeypatch):
  fake_hub.add_repo("colorjax-test/private", release_files(), private_token="s3cret")
  cfg = dict(hub__repo="colorjax-test/private", hub__models=("prior",), hub__tokenizer=str(tokenizer_path))
  with pytest.raises(errors.DataError, match=r"cannot download hf://colorjax-test/private.*HF_TOKEN"):
    hub.run(hub_config("models", tmp_path / "a", **cfg))
  monkeypatch.setenv("HF_TOKEN", "s3cret")
  assert hub.run(hub_config("models", tmp_path / "b", **cfg))["prior"].exists()


def test_offline_runs_read_the_cache_and_a_missing_file_is_one_line(released_models, fake_hub, tmp_path):
  """A new process with HF_HUB_OFFLINE=1 and no hub reachable imports from the pre-populated cache."""
  env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(hub_paths.cache_dir()),
         "HF_HOME": os.environ["HF_HOME"], "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
  tokenizer = "hf://colorjax-test/tokenizer/tokenizer.json"
  hub_paths.download(tokenizer)  # into the cache while online
  before = len(fake_hub.requests)
  run_cli(["--config", "configs/olmo.py:import", f"--config.olmo.weights=hf://{RELEASE}/models/prior",
           f"--config.olmo.tokenizer={tokenizer}", f"--config.workdir={tmp_path / 'offline'}",
           "--config.model.compute_dtype=float32"], env_extra=env, timeout=300)
  assert len(fake_hub.requests) == before  # nothing asked of the hub
  offline = checkpoint.read_params_manifest(tmp_path / "offline" / "params")
  online = checkpoint.read_params_manifest(released_models[0] / "prior" / "params")
  tokenizer_commit = fake_hub.repos[("model", "colorjax-test/tokenizer")].refs["main"]
  assert offline["request"]["hub"] == [{"repo": "colorjax-test/tokenizer", "type": "model", "commit": tokenizer_commit},
                                       *online["request"]["hub"]]  # the tokenizer came from the hub too
  assert offline["request"]["weights_sha256"] == online["request"]["weights_sha256"]
  for path, said in (("models/conditional_all/optim.pt", r"is not in the hub cache .*\(HF_HUB_OFFLINE=1\)"),
                     ("models/other", "has no models/other at revision main")):  # the cached listing knows
    proc = run_cli(["--config", "configs/olmo.py:import", f"--config.olmo.weights=hf://{RELEASE}/{path}",
                    f"--config.workdir={tmp_path / 'missing'}"], env_extra=env, timeout=300, check=False)
    assert proc.returncode == 2 and re.search(said, proc.stderr), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "missing").exists()


def test_push_selection_is_one_commit_of_text_ids_scores_and_manifest(released_selection, fake_hub, tmp_path):
  root, _ = released_selection
  base = f"hf://{RELEASE}/scores"
  scores_cfg = make_config("dolma", "import_scores", workdir=str(tmp_path / "scores"), dolma__store=str(root / "store"),
                           dolma__prior=f"{base}/pretrain-1-seq+{base}/pretrain-2-seq",
                           dolma__conditionals=(f"{base}/all-1-seq+{base}/all-2-seq",))
  object_storage.mirror_config(scores_cfg)
  dolma.run(scores_cfg)
  select_lib.run(make_config("select", "color,4", select__scores=str(tmp_path / "scores"),
                             workdir=str(tmp_path / "color")))
  commits = len(fake_hub.commits)
  cfg = make_config("hub", "push_selection", workdir=str(tmp_path / "push"), hub__selection=str(tmp_path / "color"),
                    hub__push_to="me/color-fixture-tau4")
  record = hub.run(cfg)
  (commit,) = fake_hub.commits[commits:]
  assert (commit["repo"], commit["type"]) == ("me/color-fixture-tau4", "dataset")
  assert sorted(commit["files"]) == ["README.md", "data/part-h000-00000.parquet", "manifest.json", "tokenizer.json"]
  assert record["commit"] == commit["sha"]
  assert fake_hub.repos[("dataset", "me/color-fixture-tau4")].visibility == "private"
  parquet = tmp_path / "pushed.parquet"
  parquet.write_bytes(commit["files"]["data/part-h000-00000.parquet"])
  table = pq.read_table(parquet).to_pydict()
  ref = json.loads((FIXTURE / "reference.json").read_text())
  assert table["id"] == sorted(ref["selection"]["selected_indices"])
  np.testing.assert_array_equal(np.asarray(table["score"], np.float32),
                                np.asarray(ref["score_prior_minus_cond"], np.float32)[table["id"]])
  assert table["input_ids"][0] == pool_rows()[table["id"][0]].tolist()
  assert table["text"][0].split()[:3] == [f"t{t}" if t > 1 else "<|endoftext|>" for t in table["input_ids"][0][:3]]
  manifest = json.loads(commit["files"]["manifest.json"])
  assert manifest["selection"]["id"] == formats.read_manifest(tmp_path / "color")["id"]
  assert manifest["selection"]["request"]["scores"] and manifest["num_sequences"] == 64
  assert "path: data/*.parquet" in commit["files"]["README.md"].decode()
  assert hub.run(cfg)["commit"] == commit["sha"] and len(fake_hub.commits) == commits + 1  # pushed once


def test_push_model_is_one_commit_readable_by_transformers_and_by_colorjax(released_models, fake_hub, tmp_path):
  params = released_models[0] / "prior" / "params"
  commits = len(fake_hub.commits)
  hub.run(make_config("hub", "push_model", workdir=str(tmp_path / "push"), hub__params=str(params),
                      hub__push_to="me/fixture-prior"))
  (commit,) = fake_hub.commits[commits:]
  names = sorted(commit["files"])
  assert {"config.json", "modeling_colorjax.py", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "README.md", "colorjax_manifest.json", "params/manifest.json", "params/tokenizer.json"} <= set(names)
  assert any(n.startswith("params/params/") for n in names) and commit["type"] == "model"
  back = hub_paths.download("hf://me/fixture-prior/params")  # the pushed params export, as any stage reads it
  spec = checkpoint.spec_from_manifest(checkpoint.read_params_manifest(back), make_config("score", "demo").model)
  pushed, _ = checkpoint.load_params(back, spec)
  original, _ = checkpoint.load_params(params, spec)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pushed), jax.tree.leaves(original)))


def test_adopt_and_import_selection_take_hf_paths_and_agree_with_the_hub_stage(released_selection, tokenizer_path,
                                                                               tmp_path):
  root, selection = released_selection
  adopt = make_config("dolma", "adopt", workdir=str(tmp_path / "store"), dolma__tokenizer=str(tokenizer_path),
                      dolma__paths=(f"hf://{RELEASE}/full_data/c4/*.npy",), dolma__dtype="uint16", dolma__seq_len=64,
                      dolma__eos_id=0, dolma__pad_id=1)
  object_storage.mirror_config(adopt)
  dolma.run(adopt)
  assert stores.TokenStore(tmp_path / "store").id == stores.TokenStore(root / "store").id  # same files, same commit
  imported = make_config("dolma", "import_selection", workdir=str(tmp_path / "sel"),
                         dolma__store=str(tmp_path / "store"),
                         dolma__selection=f"hf://{RELEASE}/indices/c4-down-tau=4/selected_indices.npy")
  object_storage.mirror_config(imported)
  dolma.run(imported)
  assert formats.read_manifest(tmp_path / "sel")["id"] == formats.read_manifest(selection)["id"]


def test_the_dry_run_lists_what_it_would_download_and_downloads_nothing(fake_hub, tmp_path, capsys):
  before = len(fake_hub.requests)
  hub.describe(hub_config("selection", tmp_path, hub__repo=SHUFFLED, hub__tau=4))
  out = capsys.readouterr().out
  assert f"hf://{SHUFFLED}@main/full_data/c4: 3 files" in out and "scores/pretrain-*-seq: 6 files" in out
  assert "models/prior: 2 files" in out  # config.yaml and model.pt: optim.pt is not counted
  assert not [p for _, p, _ in fake_hub.requests[before:] if "/resolve/" in p] and not (tmp_path / "store").exists()
  env = {k: os.environ[k] for k in ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE")}
  proc = run_cli(["--config", "configs/hub.py:models", "--config.dry_run=True", f"--config.workdir={tmp_path}"],
                 env_extra=env, timeout=300)  # the stage as main dispatches it
  assert f"hf://{RELEASE}@main/models/conditional_all: 2 files" in proc.stdout
  with pytest.raises(ValueError, match="choose one of models, selection"):
    make_config("hub", "select")


def test_the_filtered_text_dataset_prepares_from_an_hf_path(fake_hub, tokenizer_path, tmp_path):
  """A dataset repo (the released filtered text is one: datasets/davidbrandfonbrener/color-filtered-c4) as prepare's
  input: hf://datasets/... globs download the Parquet files and prepare tokenizes them."""
  texts = ["t5 t6 t7 t8 t9", "t10 t11 t12 t13 t14 t15 t16", "t20 t21 t22"]
  buffer = tmp_path / "part.parquet"
  pq.write_table(pa.table({"text": texts}), buffer)
  fake_hub.add_repo("colorjax-test/filtered-c4", {"data/train-00000.parquet": buffer.read_bytes()}, "dataset")
  cfg = make_config("prepare", prepare__inputs=("hf://datasets/colorjax-test/filtered-c4/data/*.parquet",),
                    prepare__tokenizer=str(tokenizer_path), prepare__output=str(tmp_path / "store"), prepare__seq_len=4,
                    prepare__workers=1)
  object_storage.mirror_config(cfg)
  from colorjax import prepare  # pylint: disable=import-outside-toplevel
  store = stores.TokenStore(prepare.run(cfg))
  stream = [5, 6, 7, 8, 9, 0, 10, 11, 12, 13, 14, 15, 16, 0, 20, 21, 22, 0]
  np.testing.assert_array_equal(store.read(np.arange(store.num_sequences)).reshape(-1), stream[:16])
  assert [pathlib.Path(f["path"]).name for f in store.files] == ["train-00000.parquet"]
  commit = fake_hub.repos[("dataset", "colorjax-test/filtered-c4")].refs["main"]
  assert store.manifest["request"]["hub"] == [{"repo": "colorjax-test/filtered-c4", "type": "dataset",
                                               "commit": commit}]
