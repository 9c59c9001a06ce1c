"""Token stores: prepare on real text, the on-disk format, errors, the deterministic order, the loader."""
import gzip
import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer

from colorjax import errors
from colorjax import prepare
from colorjax.artifacts import formats
from colorjax.data import stores as stores_lib
from colorjax.data import tokenizer as tokenizer_lib
from conftest import make_config

SMALL_SOURCES = ("news", "milton", "fortunes")


def prepare_cfg(inputs, tokenizer, output, seq_len=512, **kw):
  return make_config("prepare", prepare__inputs=tuple(str(i) for i in inputs), prepare__tokenizer=str(tokenizer),
                     prepare__output=str(output), prepare__seq_len=seq_len, **{f"prepare__{k}": v for k, v in kw.items()})


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, data_dir, neox_tokenizer_path):
  out = tmp_path_factory.mktemp("real") / "store"
  inputs = [data_dir / "corpus" / f"{s}.jsonl.gz" for s in SMALL_SOURCES]
  prepare.run(prepare_cfg(inputs, neox_tokenizer_path, out))
  return out


def _docs(path):
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_prepare_matches_direct_tokenization(real_store, data_dir, neox_tokenizer_path):
  tok = Tokenizer.from_file(str(neox_tokenizer_path))
  store = stores_lib.TokenStore(real_store)
  assert store.dtype == np.uint16 and store.seq_len == 512 and store.eos_id == 0 and store.pad_id == 1
  assert store.manifest["tokenizer"]["vocab_size"] == 50280
  assert store.manifest["tokenizer"]["sha256"] == tokenizer_lib.tokenizer_info(tok, "x")["sha256"]
  first_id = 0
  for entry, source in zip(store.files, SMALL_SOURCES):
    docs = _docs(data_dir / "corpus" / f"{source}.jsonl.gz")
    stream = np.concatenate([np.asarray(tok.encode(d["text"], add_special_tokens=False).ids + [0]) for d in docs])
    assert entry["documents"] == len(docs)
    assert entry["tokens"] == stream.size  # every document's tokens plus one EOS each
    assert entry["sequences"] == stream.size // 512
    assert entry["dropped_tokens"] == stream.size % 512
    assert entry["first_id"] == first_id
    assert store.labels()[entry["label"]] == source
    ids = np.arange(first_id, first_id + entry["sequences"])
    np.testing.assert_array_equal(store.read(ids).reshape(-1), stream[: entry["sequences"] * 512])
    first_id += entry["sequences"]
  assert store.num_sequences == first_id
  raw = np.load(real_store / store.files[0]["array"])  # real .npy files with headers
  assert raw.dtype == np.uint16 and raw.shape == (store.files[0]["sequences"], 512)


def test_store_reads_across_files_in_any_order(real_store):
  store = stores_lib.TokenStore(real_store)
  ids = np.array([store.num_sequences - 1, 0, int(store.offsets[1]), 5, int(store.offsets[1]) - 1, 5])
  rows = store.read(ids)
  for i, sid in enumerate(ids):
    np.testing.assert_array_equal(rows[i], store.read([sid])[0])
  assert list(store.label_ids(ids)) == [2, 0, 1, 0, 0, 0]
  with pytest.raises(errors.DataError, match="out of range"):
    store.read([store.num_sequences])


def test_prepare_is_idempotent_and_never_overwrites(real_store, data_dir, neox_tokenizer_path, capsys):
  inputs = [data_dir / "corpus" / f"{s}.jsonl.gz" for s in SMALL_SOURCES]
  before = {p.name: p.stat().st_mtime_ns for p in real_store.iterdir()}
  prepare.run(prepare_cfg(inputs, neox_tokenizer_path, real_store))
  assert "up to date" in capsys.readouterr().out
  with pytest.raises(errors.DataError, match=r"other settings \(settings differ: seq_len\)"):
    prepare.run(prepare_cfg(inputs, neox_tokenizer_path, real_store, seq_len=256))
  assert {p.name: p.stat().st_mtime_ns for p in real_store.iterdir()} == before


def test_prepare_notices_changed_input_content(tmp_path, neox_tokenizer_path):
  """Issue 8.2: a store is checked against its inputs' content (size + mtime first, then the hash)."""
  text = tmp_path / "a.jsonl"
  text.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(20)))
  cfg = prepare_cfg([text], neox_tokenizer_path, tmp_path / "store", seq_len=32, workers=1)
  prepare.run(cfg)
  manifest = formats.read_manifest(tmp_path / "store")
  assert manifest["files"][0]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
  assert manifest["id"] == stores_lib.TokenStore(tmp_path / "store").id
  stat = text.stat()
  text.write_text(text.read_text().replace("document 3 ", "document 9 "))  # same size, new content
  os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  with pytest.raises(errors.DataError, match=r"is stale: content of a.jsonl changed"):
    prepare.run(cfg)
  os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: trusted without hashing
  prepare.run(cfg)


def test_prepare_rejects_bad_documents_and_empty_stores(tmp_path, neox_tokenizer_path):
  """Issue 8.6: non-text "text" fields name file:line; a store with no full sequence is an error, not exit 0."""
  for value in (None, 12345):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine " * 50}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(errors.DataError, match=r"bad.jsonl:2: 'text' is (NoneType|int), not text"):
      prepare.run(prepare_cfg([bad], neox_tokenizer_path, tmp_path / "bad_store", seq_len=32, workers=1))
  short = tmp_path / "short.jsonl"
  short.write_text(json.dumps({"text": "too short"}) + "\n")
  with pytest.raises(errors.DataError, match="no input holds one full sequence of 512 tokens"):
    prepare.run(prepare_cfg([short], neox_tokenizer_path, tmp_path / "empty", seq_len=512, workers=1))
  assert not (tmp_path / "empty").exists() and not (tmp_path / "empty.partial").exists()


def test_tokenizer_without_known_specials_needs_explicit_ids(tmp_path):
  """Issue 8.6: no silent <unk>/<s> fallback for EOS and PAD."""
  from tokenizers import models
  tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
  with pytest.raises(errors.DataError, match="no known end-of-document token.*prepare.eos_id"):
    tokenizer_lib.tokenizer_info(tok, "plain")
  with pytest.raises(errors.DataError, match="no known padding token.*prepare.pad_id"):
    tokenizer_lib.tokenizer_info(tok, "plain", eos_id=3)
  info = tokenizer_lib.tokenizer_info(tok, "plain", eos_id=3, pad_id=1)
  assert (info["eos_id"], info["pad_id"]) == (3, 1)
  with pytest.raises(errors.DataError, match="outside the vocabulary"):
    tokenizer_lib.tokenizer_info(tok, "plain", eos_id=99, pad_id=1)


def test_mixed_source_file_gets_per_sequence_labels(tmp_path, neox_tokenizer_path):
  path = tmp_path / "mixed.jsonl"
  docs = [{"text": "alpha " * 300, "source": "a"}, {"text": "beta " * 300, "source": "b"},
          {"text": "gamma " * 40}]
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  prepare.run(prepare_cfg([path], neox_tokenizer_path, tmp_path / "store", seq_len=64, workers=1))
  store = stores_lib.TokenStore(tmp_path / "store")
  labels = [store.labels()[i] for i in store.label_ids(np.arange(store.num_sequences))]
  assert labels[0] == "a" and labels[-1] in ("b", "mixed")
  assert set(labels) <= {"a", "b", "mixed"} and "b" in labels
  assert store.labels() == ["a", "b", "mixed"]


def test_a_kill_after_the_label_remap_resumes_to_the_same_labels(tmp_path, neox_tokenizer_path, monkeypatch):
  """The second file's sources appear as (b, a), the store's as (a, b): its labels are remapped, and a resume after
  a kill during that remap must not remap them twice."""
  for name, order in (("m1.jsonl", "ab"), ("m2.jsonl", "ba")):
    docs = [{"text": f"{s}word " * 200, "source": s} for s in order]
    (tmp_path / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
  cfg = lambda out: prepare_cfg([tmp_path / "m*.jsonl"], neox_tokenizer_path, tmp_path / out, seq_len=64, workers=1)
  prepare.run(cfg("whole"))
  remap = prepare._finalize_labels

  def killed(*args):
    remap(*args)
    raise SystemExit("killed after the remap")
  monkeypatch.setattr(prepare, "_finalize_labels", killed)
  with pytest.raises(SystemExit):
    prepare.run(cfg("resumed"))
  monkeypatch.setattr(prepare, "_finalize_labels", remap)
  prepare.run(cfg("resumed"))
  stores = [stores_lib.TokenStore(tmp_path / name) for name in ("whole", "resumed")]
  labels = [[s.labels()[i] for i in s.label_ids(np.arange(s.num_sequences))] for s in stores]
  assert labels[0] == labels[1] and stores[0].labels() == ["a", "b"]
  assert labels[0][-1] == "a" and "b" in labels[0][len(labels[0]) // 2:]
  assert sorted(f.name for f in (tmp_path / "resumed").glob("labels-*")) == [
      "labels-00000.global.npy", "labels-00001.global.npy"]


def test_plain_text_files_are_one_document_each(tmp_path, neox_tokenizer_path):
  for name in ("x.txt", "y.txt"):
    (tmp_path / name).write_text("The quick brown fox. " * 100)
  prepare.run(prepare_cfg([tmp_path / "*.txt"], neox_tokenizer_path, tmp_path / "store", seq_len=32))
  store = stores_lib.TokenStore(tmp_path / "store")
  assert [f["documents"] for f in store.files] == [1, 1]
  assert [pathlib.Path(f["path"]).name for f in store.files] == ["x.txt", "y.txt"]


def test_prepare_errors_name_the_file_and_resume_keeps_finished_files(tmp_path, neox_tokenizer_path):
  good, bad = tmp_path / "a_good.jsonl", tmp_path / "b_bad.jsonl"
  good.write_text(json.dumps({"text": "hello world " * 200}) + "\n")
  bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
  out = tmp_path / "store"
  cfg = prepare_cfg([good, bad], neox_tokenizer_path, out, seq_len=32, workers=1)
  with pytest.raises(errors.DataError, match=r"b_bad.jsonl:2: invalid JSON"):
    prepare.run(cfg)
  assert not out.exists()  # a failed prepare leaves no store that looks finished
  partial = tmp_path / "store.partial"
  finished = partial / "seqs-00000.npy"
  assert finished.exists()
  stamp = finished.stat().st_mtime_ns
  bad.write_text(json.dumps({"text": "fixed " * 100}) + "\n")
  prepare.run(cfg)
  assert (out / "seqs-00000.npy").stat().st_mtime_ns == stamp  # the good file was not tokenized again
  assert stores_lib.TokenStore(out).num_sequences > 0 and not partial.exists()

  with pytest.raises(errors.DataError, match="matches no file"):
    prepare.run(prepare_cfg([tmp_path / "nothing*.jsonl"], neox_tokenizer_path, tmp_path / "s2"))
  nofield = tmp_path / "nofield.jsonl"
  nofield.write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(errors.DataError, match=r"nofield.jsonl:1: no 'text' field"):
    prepare.run(prepare_cfg([nofield], neox_tokenizer_path, tmp_path / "s3", workers=1))
  with pytest.raises(errors.DataError, match="does not exist"):
    prepare.run(prepare_cfg([good], tmp_path / "missing.json", tmp_path / "s4"))


def test_corrupt_stores_fail_with_the_file_named(tmp_path, real_store):
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(real_store, copy)
  with pytest.raises(errors.DataError, match="manifest.json is missing"):
    stores_lib.TokenStore(tmp_path)
  array = copy / "seqs-00001.npy"
  np.save(array, np.zeros((3, 512), np.uint16))
  store = stores_lib.TokenStore(copy)
  with pytest.raises(errors.DataError, match="seqs-00001.npy holds uint16\\[3, 512\\]"):
    store.read([int(store.offsets[1])])
  (copy / "manifest.json").write_text("{broken")
  with pytest.raises(errors.DataError, match="not valid JSON"):
    stores_lib.TokenStore(copy)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
  perm = stores_lib.Permutation(n, seed=3)
  out = perm(np.arange(n))
  assert sorted(out.tolist()) == list(range(n))
  np.testing.assert_array_equal(out, stores_lib.Permutation(n, seed=3)(np.arange(n)))
  if n >= 64:
    assert not np.array_equal(out, np.arange(n))
    assert not np.array_equal(out, stores_lib.Permutation(n, seed=4)(np.arange(n)))


def test_step_ids_cover_each_epoch_once_and_depend_only_on_seed_and_step():
  n, batch = 96, 16
  epoch0 = np.concatenate([stores_lib.step_ids(s, batch, n, seed=0) for s in range(6)])
  epoch1 = np.concatenate([stores_lib.step_ids(s, batch, n, seed=0) for s in range(6, 12)])
  assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
  assert not np.array_equal(epoch0, epoch1)  # a fresh order each epoch
  np.testing.assert_array_equal(stores_lib.step_ids(4, batch, n, seed=0), epoch0[64:80])
  index = np.arange(1000, 1096)
  assert set(stores_lib.step_ids(2, batch, n, seed=0, index=index)) <= set(index.tolist())
  straddle = stores_lib.step_ids(5, 20, n, seed=0)  # positions 100..119 wrap into epoch 1
  assert len(set(straddle.tolist())) == 20


def test_prefetcher_keeps_order_and_reraises():
  got = list(stores_lib.Prefetcher(lambda s: s * s, range(3, 9), depth=2))
  assert got == [(s, s * s) for s in range(3, 9)]

  def boom(step):
    if step == 2:
      raise RuntimeError("disk on fire")
    return step

  with pytest.raises(RuntimeError, match="disk on fire"):
    list(stores_lib.Prefetcher(boom, range(5)))


def test_load_index_checks_shape_range_and_store(tmp_path, real_store):
  store = stores_lib.TokenStore(real_store)
  np.save(tmp_path / "ok.npy", np.array([0, 3, 9]))
  np.testing.assert_array_equal(stores_lib.load_index(tmp_path / "ok.npy", store), [0, 3, 9])
  np.save(tmp_path / "bad.npy", np.zeros((2, 2), np.int64))
  with pytest.raises(errors.DataError, match="1-D integer"):
    stores_lib.load_index(tmp_path / "bad.npy", store)
  np.save(tmp_path / "far.npy", np.array([store.num_sequences]))
  with pytest.raises(errors.DataError, match="outside"):
    stores_lib.load_index(tmp_path / "far.npy", store)
  with pytest.raises(errors.DataError, match="does not exist"):
    stores_lib.load_index(tmp_path / "none.npy", store)
  assert os.path.exists(tmp_path / "ok.npy")


def test_a_tokenizer_folder_means_its_tokenizer_json(neox_tokenizer_path, tmp_path):
  """Issue 21.7: a Hugging Face snapshot folder (config.json sorts first) loads tokenizer.json; a folder with two
  candidate files is refused naming them."""
  snapshot = tmp_path / "snapshot"
  snapshot.mkdir()
  (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
  (snapshot / "tokenizer_config.json").write_text("{}")
  (snapshot / "tokenizer.json").write_bytes(neox_tokenizer_path.read_bytes())
  assert tokenizer_lib.load_tokenizer(str(snapshot)).get_vocab_size() > 50000
  (snapshot / "tokenizer.json").rename(snapshot / "neox.json")
  assert tokenizer_lib.load_tokenizer(str(snapshot)).get_vocab_size() > 50000  # the only candidate
  (snapshot / "other.json").write_text("{}")
  with pytest.raises(errors.DataError, match=r"holds neox.json, other.json; pass the tokenizer file's path"):
    tokenizer_lib.load_tokenizer(str(snapshot))
