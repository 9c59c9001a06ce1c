"""The `dolma` stage on the original CoLoR-Filter's files (../shared/fixtures/olmo-original): adopting its token files
in place, importing its score shards and selection, reproducing its selection, and exporting a selection back."""
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from colorjax import errors
from colorjax import score as score_lib
from colorjax import select as select_lib
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.interop import dolma
from colorjax.interop import dolma_export
from colorjax.interop import dolma_scores
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib
from conftest import REPO, make_config, run_cli, tiny_train_overrides

POOL_FILES = ["data/pool/part-000.npy", "data/pool/part-001.npy", "data/pool/part-002.npy"]
PRIOR = ("scores/prior-1", "scores/prior-2")
COND = ("scores/cond-1", "scores/cond-2")


def find_fixture():
  """The original's parity fixture: $COLORJAX_FIXTURES/olmo-original, else ../shared/fixtures beside the checkout."""
  for root in (os.environ.get("COLORJAX_FIXTURES"), REPO.parent / "shared" / "fixtures"):
    if root and (pathlib.Path(root) / "olmo-original" / "reference.json").is_file():
      return pathlib.Path(root) / "olmo-original"
  return None


@pytest.fixture(scope="module")
def fixture():
  path = find_fixture()
  if path is None:
    pytest.skip("olmo-original fixture not found: set COLORJAX_FIXTURES or place it at ../shared/fixtures")
  return path


@pytest.fixture(scope="module")
def reference(fixture):
  return json.loads((fixture / "reference.json").read_text())


def joined(fixture, shards) -> str:
  return "+".join(str(fixture / s) for s in shards)


def adopt(workdir, tokenizer, **overrides) -> stores.TokenStore:
  dolma.run(make_config("dolma", "adopt", workdir=str(workdir), dolma__tokenizer=str(tokenizer), **overrides))
  return stores.TokenStore(workdir)


def import_scores(workdir, store, prior, conditionals, **overrides) -> scores_lib.Scores:
  dolma.run(make_config("dolma", "import_scores", workdir=str(workdir), dolma__store=str(store), dolma__prior=prior,
                        dolma__conditionals=tuple(conditionals), **overrides))
  return scores_lib.Scores(workdir)


@pytest.fixture(scope="module")
def pool(fixture, neox_tokenizer_path, tmp_path_factory):
  """The fixture's pool adopted from its scoring run's own file list (config.yaml data.paths)."""
  return adopt(tmp_path_factory.mktemp("dolma") / "pool", neox_tokenizer_path,
               dolma__paths_from=str(fixture / "scores/prior-1/config.yaml"), dolma__root=str(fixture))


@pytest.fixture(scope="module")
def scores(fixture, pool, tmp_path_factory):
  return import_scores(tmp_path_factory.mktemp("dolma") / "scores", pool.path, joined(fixture, PRIOR),
                       [joined(fixture, COND)])


@pytest.fixture(scope="module")
def color_selection(scores, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dolma") / "color-tau4"
  select_lib.run(make_config("select", "color,4", select__scores=str(scores.path), workdir=str(workdir)))
  return workdir


def test_adopted_store_has_the_originals_ids_and_rows_without_a_copy(fixture, pool, reference):
  assert pool.offsets.tolist() == [0, 100, 176, 256] == [0] + [r[1] for r in reference["pool"]["offsets"]]
  assert (pool.seq_len, pool.dtype, pool.eos_id, pool.pad_id) == (64, np.uint16, 0, 1)
  for i, name in enumerate(POOL_FILES):
    raw = np.fromfile(fixture / name, dtype=np.uint16)
    start, stop = pool.offsets[i], pool.offsets[i + 1]
    assert np.array_equal(pool.read(np.arange(start, stop)), raw[: (stop - start) * 64].reshape(-1, 64))
    entry = pool.files[i]
    assert entry["dropped_tokens"] == [37, 0, 21][i] and entry["format"] == "raw"
    assert pathlib.Path(entry["path"]) == (fixture / name).resolve()
  ids = np.array([255, 0, 99, 100, 175, 176])  # any order, across file boundaries
  rows = pool.read(ids)
  for row, g in zip(rows, ids):
    i = int(np.searchsorted(pool.offsets, g, side="right") - 1)
    raw = np.fromfile(fixture / POOL_FILES[i], dtype=np.uint16)
    assert np.array_equal(row, raw[64 * (g - pool.offsets[i]): 64 * (g - pool.offsets[i] + 1)])
  assert sorted(p.name for p in pool.path.iterdir()) == ["manifest.json", "tokenizer.json"]
  pool.tokenizer_path()  # the carried tokenizer matches the recorded hash
  assert pool.labels() == ["part-000", "part-001", "part-002"]
  assert pool.label_ids(np.array([0, 100, 255])).tolist() == [0, 1, 2]
  assert pool.manifest["request"]["kind"] == "dolma"
  assert pool.id == lineage.content_id(pool.manifest["request"])


def test_a_list_or_a_glob_gives_the_same_store_and_a_glob_is_warned_about(fixture, pool, neox_tokenizer_path,
                                                                          tmp_path, capsys):
  listed = adopt(tmp_path / "listed", neox_tokenizer_path, dolma__paths=tuple(POOL_FILES), dolma__root=str(fixture),
                 dolma__dtype="uint16", dolma__seq_len=64, dolma__eos_id=0, dolma__pad_id=1)
  assert listed.id == pool.id and "warning" not in capsys.readouterr().out
  globbed = adopt(tmp_path / "globbed", neox_tokenizer_path, dolma__paths=(str(fixture / "data/pool/*.npy"),),
                  dolma__dtype="uint16", dolma__seq_len=64, dolma__eos_id=0, dolma__pad_id=1)
  out = capsys.readouterr().out
  assert globbed.id == pool.id and "sorted order" in out and "paths_from" in out
  adopt(tmp_path / "listed", neox_tokenizer_path, dolma__paths=tuple(POOL_FILES), dolma__root=str(fixture),
        dolma__dtype="uint16", dolma__seq_len=64, dolma__eos_id=0, dolma__pad_id=1)
  assert "up to date" in capsys.readouterr().out
  other = adopt(tmp_path / "reordered", neox_tokenizer_path, dolma__paths=tuple(reversed(POOL_FILES)),
                dolma__root=str(fixture), dolma__dtype="uint16", dolma__seq_len=64, dolma__eos_id=0, dolma__pad_id=1)
  assert other.id != pool.id  # the order decides the ids, so it is part of the content id


def test_imported_scores_are_the_originals_floats_at_every_id(scores, pool, reference):
  nll = scores.read(0, scores.num_sequences)
  assert nll.dtype == np.float32 and nll.shape == (256, 2)
  assert np.array_equal(nll[:, scores.column("prior")], np.asarray(reference["prior_nll"], np.float32))
  assert np.array_equal(nll[:, scores.column("conditional_0")], np.asarray(reference["cond_nll"], np.float32))
  scores.check_complete()
  m = scores.manifest
  assert m["store"]["id"] == pool.id and scores.store_path() == pool.path.resolve()
  assert m["request"] == lineage.normalized(score_lib.scores_request(pool.id, m["models"]))
  assert scores.id == m["id"] == lineage.content_id(m["request"])
  assert [x["name"] for x in m["models"]] == ["prior", "conditional_0"] and all(x["id"] for x in m["models"])
  assert m["imported"]["same_row_order_as_prior"] == {"conditional_0": True}
  again = make_config("dolma", "import_scores", workdir=str(scores.path), dolma__store=str(pool.path),
                      dolma__prior="+".join(s["path"] for s in m["imported"]["shards"]["prior"]),
                      dolma__conditionals=("+".join(s["path"] for s in m["imported"]["shards"]["conditional_0"]),))
  assert dolma.run(again) == scores.path.resolve()  # the same request: reused, nothing rewritten
  assert scores_lib.Scores(scores.path).manifest["time"] == m["time"]


def test_model_ids_can_name_params_exports_or_ids(fixture, pool, tmp_path):
  given = ("0123456789abcdef", "fedcba9876543210")
  scores = import_scores(tmp_path / "s", pool.path, joined(fixture, PRIOR), [joined(fixture, COND)],
                         dolma__models=given)
  assert [m["id"] for m in scores.manifest["models"]] == list(given)
  with pytest.raises(errors.ConfigError, match="neither a params export folder nor"):
    import_scores(tmp_path / "t", pool.path, joined(fixture, PRIOR), [joined(fixture, COND)],
                  dolma__models=("prior", "cond"))


def test_dry_runs_describe_every_action_and_write_nothing(fixture, pool, scores, color_selection,
                                                          neox_tokenizer_path, tmp_path, capsys):
  common = dict(workdir=str(tmp_path / "out"))
  dolma.describe(make_config("dolma", "adopt", dolma__tokenizer=str(neox_tokenizer_path), dolma__root=str(fixture),
                             dolma__paths_from=str(fixture / "scores/prior-1/config.yaml"), **common))
  dolma.describe(make_config("dolma", "import_scores", dolma__store=str(pool.path), dolma__prior=joined(fixture, PRIOR),
                             dolma__conditionals=(joined(fixture, COND),), **common))
  dolma.describe(make_config("dolma", "export_selection", dolma__selection=str(color_selection),
                             dolma__max_tokens_per_file=640, dolma__rows_per_file=30, **common))
  out = capsys.readouterr().out
  assert f"256 sequences of 64 uint16 tokens, tokenizer {neox_tokenizer_path}, store id {pool.id}" in out
  assert "prior: 2 shards, 256 rows" in out and f"id {scores.id}" in out
  assert "64 sequences of 64 tokens -> 7 token files, 3 Parquet files" in out
  assert not (tmp_path / "out").exists()


def test_select_on_imported_scores_reproduces_the_originals_selection(color_selection, reference, scores):
  ids = stores.load_index(color_selection)
  assert set(ids.tolist()) == set(reference["selection"]["selected_indices"]) and ids.size == 64
  manifest = formats.read_manifest(color_selection)
  assert manifest["threshold"] == pytest.approx(reference["selection"]["kth_largest_score"], abs=0)
  assert manifest["scores"]["id"] == scores.id


def test_imported_selection_is_the_originals_and_trains(fixture, pool, reference, tmp_path):
  from colorjax import train  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "imported"
  dolma.run(make_config("dolma", "import_selection", workdir=str(workdir), dolma__store=str(pool.path),
                        dolma__selection=str(fixture / "selection/selected_indices.npy")))
  ids = stores.load_index(workdir, pool)
  assert ids.dtype == np.int64 and ids.tolist() == sorted(reference["selection"]["selected_indices"])
  m = formats.read_manifest(workdir)
  assert (m["method"], m["k"], m["tau"], m["store_id"], m["scores"]) == ("imported", 64, 4.0, pool.id, None)
  assert selection_lib.store_of(workdir, m) == pool.path.resolve()
  assert stores.index_id(workdir) == m["id"] == lineage.content_id(m["request"])
  run = tmp_path / "run"
  cfg = make_config("pretrain", "demo", **tiny_train_overrides(pool.path, run, data__index=str(workdir),
                                                               model__vocab_size=50304, model__max_seq_len=64,
                                                               train__global_batch_size=8, train__max_steps=2,
                                                               train__warmup_steps=1))
  train.run(cfg)
  assert (run / "params" / "manifest.json").exists()


def _copy_shard(src: pathlib.Path, dst: pathlib.Path, order=None, split=None, listed="/gpfs/ckpt/{job}/score/{n}"):
  """A copy of an original score folder: rows reordered, float rows split over files, files.txt with the paths
  of a machine that is not this one."""
  ids = np.fromfile(src / "mmap_index.npy", dtype=np.int64)
  values = np.fromfile(src / "1.npy", dtype=np.float32)
  order = np.arange(ids.size) if order is None else order
  dst.mkdir(parents=True)
  ids[order].tofile(dst / "mmap_index.npy")
  parts = np.split(values[order], split or [])
  for n, part in enumerate(parts, 1):
    part.tofile(dst / f"{n}.npy")
  (dst / "files.txt").write_text("".join(listed.format(job=src.parent.name, n=f"{n}.npy") + "\n"
                                         for n in range(1, len(parts) + 1)))
  return dst


def test_a_shard_ending_in_id_0_keeps_it_and_rows_align_by_id(fixture, pool, reference, tmp_path):
  ids = np.fromfile(fixture / "scores/prior-2/score/mmap_index.npy", dtype=np.int64)
  last_is_zero = np.concatenate([np.flatnonzero(ids != 0), np.flatnonzero(ids == 0)])  # id 0 written last
  prior2 = _copy_shard(fixture / "scores/prior-2/score", tmp_path / "prior-2/score", order=last_is_zero,
                       split=[100])  # 1.npy full (100 rows), 2.npy cut to the 28 written rows
  cond2 = _copy_shard(fixture / "scores/cond-2/score", tmp_path / "cond-2/score")  # the original row order
  shard = dolma_scores.read_shard(prior2)
  assert shard["rows"] == 128 and shard["ids"][-1] == 0 and "cut" in shard["rule"]
  scores = import_scores(tmp_path / "scores", pool.path, f"{fixture / PRIOR[0]}+{prior2}",
                         [f"{fixture / COND[0]}+{cond2.parent}"])
  nll = scores.read(0, 256)
  assert np.array_equal(nll[:, 0], np.asarray(reference["prior_nll"], np.float32))
  assert np.array_equal(nll[:, 1], np.asarray(reference["cond_nll"], np.float32))
  assert scores.manifest["imported"]["same_row_order_as_prior"] == {"conditional_0": False}


def _presized_shard(folder: pathlib.Path, ids, values, index_entries: int = 1000) -> pathlib.Path:
  """A shard as the original writer leaves it: index and float file pre-sized with zeros after the written rows."""
  folder.mkdir(parents=True)
  index = np.zeros(index_entries, np.int64)
  index[: len(ids)] = ids
  index.tofile(folder / "mmap_index.npy")
  floats = np.zeros(dolma_scores.PRESIZED_ROWS, np.float32)
  floats[: len(values)] = values
  floats.tofile(folder / "1.npy")
  (folder / "files.txt").write_text(f"/somewhere/else/{folder.name}/1.npy\n")
  return folder


def test_row_count_rule_of_pre_sized_shards(tmp_path):
  written = _presized_shard(tmp_path / "written", [5, 3, 0], [1.5, 2.5, 3.5])
  assert dolma_scores.read_shard(written)["ids"].tolist() == [5, 3, 0]  # the original's reader drops the 0
  unwritten = _presized_shard(tmp_path / "unwritten", [5, 3], [1.5, 2.5])
  assert dolma_scores.read_shard(unwritten)["ids"].tolist() == [5, 3]
  assert dolma_scores.read_shard(unwritten, rows=3)["ids"].tolist() == [5, 3, 0]  # the user says 3 rows were written
  # a short last shard: rows does not apply
  assert dolma_scores.read_shard(unwritten, rows=8)["ids"].tolist() == [5, 3]
  assert dolma_scores.written_rows(4, 4, None, 0, 0.0) == (4, "no room after the last nonzero id")
  assert dolma_scores.written_rows(3, 9, 4, 0, 0.0)[0] == 4
  assert dolma_scores.written_rows(3, 9, None, 4, 0.0) == (4, "dolma.rows")
  assert dolma_scores.written_rows(3, 9, None, 0, 0.7)[0] == 4
  assert dolma_scores.written_rows(3, 9, None, 0, 0.0)[0] == 3
  cut = tmp_path / "cut"
  cut.mkdir()
  np.array([5, 3, 0, 0], np.int64).tofile(cut / "mmap_index.npy")
  np.array([1.5, 2.5, 3.5, 4.5], np.float32).tofile(cut / "1.npy")
  (cut / "files.txt").write_text("1.npy\n")
  with pytest.raises(errors.DataError, match="do not belong together"):
    dolma_scores.read_shard(cut)  # 4 float rows but at most 3 ids


def test_export_round_trips_to_token_files_and_parquet(color_selection, pool, reference, neox_tokenizer_path,
                                                       tmp_path):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  ids = stores.load_index(color_selection)
  out = tmp_path / "export"
  dolma.run(make_config("dolma", "export_selection", workdir=str(out), dolma__selection=str(color_selection),
                        dolma__max_tokens_per_file=20 * 64 + 10, dolma__rows_per_file=25))
  sidecar = json.loads((out / "tokens" / "tokens.json").read_text())
  assert [f["sequences"] for f in sidecar["files"]] == [20, 20, 20, 4]
  assert (sidecar["dtype"], sidecar["seq_len"]) == ("uint16", 64)
  assert np.array_equal(np.load(out / "tokens" / "ids.npy"), ids)
  readopted = adopt(tmp_path / "readopted", neox_tokenizer_path, dolma__paths=(str(out / "tokens" / "part-*.npy"),),
                    dolma__dtype="uint16", dolma__seq_len=64, dolma__eos_id=0, dolma__pad_id=1)
  assert readopted.num_sequences == 64
  assert np.array_equal(readopted.read(np.arange(64)), pool.read(ids))
  files = sorted((out / "parquet").glob("*.parquet"))
  assert [f.name for f in files] == [f"part-h000-{j:05d}.parquet" for j in range(3)]
  table = pq.read_table(files)
  assert [pq.read_metadata(f).num_rows for f in files] == [25, 25, 14]
  assert str(table.schema.field("input_ids").type) == "list<element: int32>"
  assert np.array_equal(table.column("id").to_numpy(), ids)
  assert np.array_equal(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)), pool.read(ids))
  expected = np.asarray(reference["score_prior_minus_cond"], np.float32)[ids]
  assert np.array_equal(table.column("score").to_numpy(), expected)
  assert table.column("source").to_pylist() == [pool.labels()[i] for i in pool.label_ids(ids)]
  assert formats.read_manifest(out)["format"] == dolma_export.EXPORT_FORMAT
  assert not (out / formats.REQUEST).exists()


def test_parquet_parts_of_two_hosts_cover_the_selection_once(color_selection, pool, tmp_path):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  ids = stores.load_index(color_selection)
  for host in (0, 1):
    dolma_export.write_parquet_part(tmp_path, pool, ids, lambda block: None, pool.labels(), 20, host, 2)
  names = sorted(p.name for p in tmp_path.glob("*.parquet"))
  assert names == [n for n, _, _ in dolma_export.parquet_names(64, 2, 20)]
  assert names == ["part-h000-00000.parquet", "part-h000-00001.parquet", "part-h001-00000.parquet",
                   "part-h001-00001.parquet"]
  table = pq.read_table(sorted(tmp_path.glob("*.parquet")))
  assert np.array_equal(table.column("id").to_numpy(), ids)
  assert table.column("score").null_count == 64


def test_bad_inputs_name_the_file_and_the_fix(fixture, pool, neox_tokenizer_path, tmp_path):
  settings = dict(dolma__dtype="uint16", dolma__seq_len=64, dolma__eos_id=0, dolma__pad_id=1)
  with pytest.raises(errors.DataError, match=r"part-009\.npy.*dolma\.paths"):
    adopt(tmp_path / "a", neox_tokenizer_path, dolma__paths=("data/pool/part-009.npy",), dolma__root=str(fixture),
          **settings)
  with pytest.raises(errors.DataError, match=r"part-000\.npy has 12,874 bytes, not a multiple of 4.*dolma\.dtype"):
    adopt(tmp_path / "b", neox_tokenizer_path, dolma__paths=(str(fixture / POOL_FILES[0]),),
          **dict(settings, dolma__dtype="uint32"))
  with pytest.raises(errors.DataError, match=r"prior .*missing ids: 0, 2, .*joined by \+"):
    import_scores(tmp_path / "c", pool.path, str(fixture / PRIOR[0]), [joined(fixture, COND)])
  with pytest.raises(errors.DataError, match="more than once"):
    import_scores(tmp_path / "d", pool.path, joined(fixture, PRIOR + PRIOR[:1]), [joined(fixture, COND)])
  target = adopt(tmp_path / "target", neox_tokenizer_path, dolma__paths=(str(fixture / "data/target/part-000.npy"),),
                 **settings)
  with pytest.raises(errors.DataError, match=r"config\.yaml scored data\.paths.*paths_from"):
    import_scores(tmp_path / "e", target.path, joined(fixture, PRIOR), [joined(fixture, COND)])
  with pytest.raises(errors.DataError, match=r"selected_indices\.npy selects ids .* outside the store's 64"):
    dolma.run(make_config("dolma", "import_selection", workdir=str(tmp_path / "f"), dolma__store=str(target.path),
                          dolma__selection=str(fixture / "selection")))
  (tmp_path / "huge").mkdir()
  np.array([3, 2**32 - 1], np.uint32).tofile(tmp_path / "huge" / "selected_indices.npy")
  with pytest.raises(errors.DataError, match=r"selects ids 4294967295 outside"):  # refused before any histogram
    dolma.run(make_config("dolma", "import_selection", workdir=str(tmp_path / "g"), dolma__store=str(target.path),
                          dolma__selection=str(tmp_path / "huge")))
  broken = _copy_shard(fixture / "scores/prior-1/score", tmp_path / "prior-1/score")
  (broken / "1.npy").unlink()
  with pytest.raises(errors.DataError, match=r"files\.txt:1 names /gpfs/ckpt/prior-1/score/1\.npy.*copy that file"):
    dolma_scores.read_shard(broken)
  assert not any((tmp_path / name).exists() for name in "abcdefg")


def test_a_changed_token_file_is_refused_on_read(fixture, neox_tokenizer_path, tmp_path):
  copy = tmp_path / "part-000.npy"
  shutil.copy(fixture / POOL_FILES[0], copy)
  copy.chmod(0o644)
  store = adopt(tmp_path / "store", neox_tokenizer_path, dolma__paths=(str(copy),), dolma__dtype="uint16",
                dolma__seq_len=64, dolma__eos_id=0, dolma__pad_id=1)
  with open(copy, "r+b") as f:
    f.truncate(64 * 2 * 50)
  with pytest.raises(errors.DataError, match=r"part-000\.npy has 6,400 bytes, 12,874 when .*adopt the files again"):
    stores.TokenStore(store.path).read([0])


def test_cli_dry_run_then_import_selection(fixture, pool, tmp_path):
  args = ["--config", "configs/dolma.py:import_selection", f"--config.dolma.store={pool.path}",
          f"--config.dolma.selection={fixture / 'selection/selected_indices.npy'}",
          f"--config.workdir={tmp_path / 's'}"]
  proc = run_cli(args + ["--config.dry_run=True"])
  assert "64 of 256 ids (tau 4.00)" in proc.stdout and not (tmp_path / "s").exists()
  proc = run_cli(args)
  assert (tmp_path / "s" / "index.npy").exists() and "--config.data.index" in proc.stdout
  proc = run_cli(["--config", "configs/dolma.py:nosuch"], check=False)
  assert proc.returncode == 2 and "unknown dolma action" in proc.stderr
