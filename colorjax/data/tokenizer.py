"""Tokenizers: loading one, what an artifact records of it (name, content hash, size, special ids), and the checks
that two artifacts were made with the same one. Every store and params export carries its tokenizer.json, so a
later stage tokenizes (and decodes) exactly as the tokens were made.
"""
import hashlib
import pathlib

from colorjax import errors
from colorjax.artifacts import formats

TOKENIZER = "tokenizer.json"  # every store and params export carries the tokenizer that made its tokens


# The .json files of a Hugging Face model snapshot that are not a tokenizer.
NOT_TOKENIZERS = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                  "added_tokens.json", "preprocessor_config.json")


def _tokenizer_file(folder: pathlib.Path) -> pathlib.Path:
  """The tokenizer of a folder: its tokenizer.json, else its only .json that is not a snapshot's other metadata."""
  if (folder / TOKENIZER).is_file():
    return folder / TOKENIZER
  candidates = sorted(p for p in folder.glob("*.json") if p.name not in NOT_TOKENIZERS)
  if len(candidates) != 1:
    found = ", ".join(p.name for p in candidates) or "no tokenizer .json file"
    raise errors.DataError(f"tokenizer folder {folder} holds {found}; pass the tokenizer file's path itself")
  return candidates[0]


def load_tokenizer(name_or_path: str):
  """A HF `tokenizers.Tokenizer` from a tokenizer.json path (or a folder holding one) or a hub name."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  if not name_or_path:
    raise errors.DataError("no tokenizer given: set --config.prepare.tokenizer to a tokenizer.json path or a hub "
                           "name")
  path = pathlib.Path(name_or_path)
  if path.is_dir():
    path = _tokenizer_file(path)
  if path.suffix == ".json" or path.exists():
    if not path.exists():
      raise errors.DataError(f"tokenizer file {path} does not exist; pass the path of a tokenizer.json")
    try:
      return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions
      raise errors.DataError(f"tokenizer file {path} could not be read ({e}); is it a HF tokenizers JSON "
                             "file?") from e
  try:
    return Tokenizer.from_pretrained(name_or_path)
  except Exception as e:
    raise errors.DataError(f"tokenizer {name_or_path!r} is not a local file and could not be fetched ({e}); pass "
                           "the path of a tokenizer.json instead") from e


EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
PAD_NAMES = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")


def _special_id(tokenizer, names, given: int, what: str, field: str, where: str) -> int:
  vocab = tokenizer.get_vocab_size(with_added_tokens=True)
  if given >= 0:
    if given >= vocab:
      raise errors.DataError(f"{field}={given} is outside the vocabulary of {where} ({vocab} tokens)")
    return int(given)
  for name in names:
    found = tokenizer.token_to_id(name)
    if found is not None:
      return int(found)
  raise errors.DataError(f"tokenizer {where} has no known {what} token ({', '.join(names)}); set --config.{field} to "
                         f"the id to use")


def content_sha256(tokenizer) -> str:
  """The tokenizer's identity: a hash of its canonical serialization (not of a file's bytes or name)."""
  return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def tokenizer_info(tokenizer, name: str, eos_id: int = -1, pad_id: int = -1) -> dict:
  """What a store records of its tokenizer: a name, a content hash, its size and special ids (EOS ends every
  document; PAD fills SFT rows). Ids come from the tokenizer's known special tokens unless given (>= 0); a
  tokenizer with none must be given them, never a silent fallback."""
  return {
      "name": str(name),
      "sha256": content_sha256(tokenizer),
      "vocab_size": int(tokenizer.get_vocab_size(with_added_tokens=True)),
      "eos_id": _special_id(tokenizer, EOS_NAMES, eos_id, "end-of-document", "prepare.eos_id", name),
      "pad_id": _special_id(tokenizer, PAD_NAMES, pad_id, "padding", "prepare.pad_id", name),
  }


def check_same_tokenizer(a: dict, a_what: str, b: dict, b_what: str) -> None:
  """Two artifacts' tokenizer records (`tokenizer_info`) must name the same tokenizer, by content hash."""
  if a["sha256"] != b["sha256"]:
    raise errors.DataError(f"{a_what} uses tokenizer {a['name']}, {b_what} uses {b['name']} (another tokenizer by "
                           "content); build both with one tokenizer")


def check_tokenizer_file(path, tok_info: dict, setting: str, against: str) -> None:
  """A tokenizer file given by `setting` must be the tokenizer `against` was made with (by content)."""
  if content_sha256(load_tokenizer(str(path))) != tok_info["sha256"]:
    raise errors.DataError(f"{setting}={path} is another tokenizer than {against} was made with ({tok_info['name']}, "
                           f"by content); leave {setting} empty to use the tokenizer it carries")


def checked_tokenizer_path(folder, tok_info: dict) -> pathlib.Path:
  """The tokenizer.json an artifact carries, checked against the hash its manifest records."""
  path = pathlib.Path(folder) / TOKENIZER
  if not path.exists():
    raise errors.DataError(f"{path} is missing; re-run the stage that made {folder} (its tokenizer travels with "
                           "it)")
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != tok_info["sha256"]:
    raise errors.DataError(f"{path} does not match the tokenizer hash in {pathlib.Path(folder) / formats.MANIFEST}; "
                           "the artifact was modified, re-run the stage that made it")
  return path
