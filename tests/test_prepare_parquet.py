"""Parquet input to the prepare stage: rows tokenize like any other document, and a null text is refused (it
used to become an empty document, silently shifting every later sequence)."""
import numpy as np
import pytest
from tokenizers import Tokenizer

from colorjax import errors
from colorjax import prepare
from colorjax.data import stores
from conftest import make_config

pa = pytest.importorskip("pyarrow", reason="pyarrow is in requirements.txt; install it to read parquet")
pq = pytest.importorskip("pyarrow.parquet")

SEQ_LEN = 16
TEXTS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles, and by opposing end them.",
    "Naïve café déjà vu — unicode survives the round trip.",
]


def prepare_cfg(inputs, tokenizer, output):
  return make_config("prepare", prepare__inputs=tuple(str(i) for i in inputs), prepare__tokenizer=str(tokenizer),
                     prepare__output=str(output), prepare__seq_len=SEQ_LEN, prepare__workers=1)


def test_parquet_rows_tokenize_like_direct_tokenization(tmp_path, neox_tokenizer_path):
  path = tmp_path / "plays.parquet"
  pq.write_table(pa.table({"text": TEXTS, "source": ["hamlet", "hamlet", None, "other"]}), path)
  store = stores.TokenStore(prepare.run(prepare_cfg([path], neox_tokenizer_path, tmp_path / "store")))

  tok = Tokenizer.from_file(str(neox_tokenizer_path))
  stream = np.concatenate([tok.encode(t, add_special_tokens=False).ids + [store.eos_id] for t in TEXTS])
  (entry,) = store.files
  assert entry["documents"] == len(TEXTS) and entry["tokens"] == stream.size
  assert store.num_sequences == stream.size // SEQ_LEN > 1
  np.testing.assert_array_equal(store.read(np.arange(store.num_sequences)).reshape(-1),
                                stream[: store.num_sequences * SEQ_LEN])
  assert set(store.labels()) == {"hamlet", "plays", "other"}  # a null source falls back to the file's name


def test_parquet_null_text_is_rejected_naming_file_and_row(tmp_path, neox_tokenizer_path):
  path = tmp_path / "holes.parquet"
  pq.write_table(pa.table({"text": [TEXTS[0], TEXTS[1], None, TEXTS[2]]}), path)
  with pytest.raises(errors.DataError, match=r"holes\.parquet: row 2: 'text' is NoneType"):
    prepare.run(prepare_cfg([path], neox_tokenizer_path, tmp_path / "store"))
  assert not (tmp_path / "store").exists()
