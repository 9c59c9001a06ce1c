"""OLMo checkpoints in and out of colorjax (the `olmo` stage): the original CoLoR-Filter code's models can be scored,
finetuned and evaluated here, and colorjax's models loaded there.

  import  an OLMo checkpoint (model.safetensors in OLMo's variant, or model.pt as torch.save writes it) and its
          config.yaml -> a colorjax params export at <workdir>/params, read by score, finetune, eval and target runs
          exactly like one that train.py wrote.
  export  a colorjax params export -> <workdir>/model.safetensors + config.yaml (+ tokenizer.json), which the
          original's `olmo.checkpoint.load_state_dict` and `ModelConfig.load(..., key="model")` read.

torch is never imported. Every pickle (model.pt's data.pkl, OLMo's safetensors tensor names, train.pt) goes through
`SafeUnpickler`, whose only globals are stand-ins that build numpy arrays: a checkpoint cannot run code. config.yaml
is read with yaml.safe_load, and every OLMo architecture option colorjax cannot run exactly is refused by name.
"""
import base64
import collections
import dataclasses
import io
import json
import math
import pathlib
import pickle
import re
import struct
import tempfile
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from colorjax import artifacts
from colorjax import checkpoint
from colorjax import data
from colorjax import errors
from colorjax import model

SAFETENSORS = "model.safetensors"
TORCH_WEIGHTS = "model.pt"
CONFIG = "config.yaml"
NEOX_TOKENIZER = "gpt-neox-20b-pii-special"  # the original's tokenizer (SPEC §2), in ../shared/data/tokenizer
BFLOAT16 = np.dtype(jnp.bfloat16)
FLOAT_DTYPES = (np.dtype("<f4"), np.dtype("<f8"), np.dtype("<f2"), BFLOAT16)


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling: allow-listed globals map to numpy-building stand-ins, everything else is refused.


def _refuse_setstate(self, state):
  """A pickle's BUILD on a stand-in would change it for this and every later load (dataclasses' own __setstate__
  writes frozen fields), so each stand-in class sets this in its body, where dataclass keeps it."""
  del state
  raise ValueError(f"the pickle tries to modify {type(self).__name__}")


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  """Stand-in for torch.<Kind>Storage: it only names the dtype of the storage's bytes."""
  name: str
  dtype: np.dtype
  __setstate__ = _refuse_setstate


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
  """A storage's elements; only `persistent_load` makes these, so a tensor cannot point at anything else."""
  array: np.ndarray
  __setstate__ = _refuse_setstate


@dataclasses.dataclass(frozen=True, slots=True)
class _TensorType:
  """Stand-in for torch.Tensor / torch.nn.Parameter where a pickle passes the type as an argument."""
  name: str
  __setstate__ = _refuse_setstate


@dataclasses.dataclass(frozen=True, slots=True)
class _StandIn:
  """An allow-listed callable, immutable to pickles."""
  name: str
  fn: Callable
  __setstate__ = _refuse_setstate

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


class _Opaque:
  """A value colorjax does not need (numpy RNG states in train.pt): absorbs its arguments and state."""
  __slots__ = ()

  def __setstate__(self, state):
    del state


def _opaque(*args, **kwargs) -> _Opaque:
  del args, kwargs
  return _Opaque()


def _tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
            metadata=None) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied into its own C-ordered array."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise ValueError(f"a tensor refers to {type(storage).__name__}, not a storage")
  flat, offset = storage.array, int(storage_offset)
  size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise ValueError(f"bad tensor layout: offset {offset}, size {size}, stride {stride}")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise ValueError(f"tensor of size {size} at offset {offset} runs past its storage of {flat.size} elements")
  view = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(s * flat.itemsize for s in stride),
                                         writeable=False)
  return np.array(view)


def _parameter(data_, requires_grad=False, backward_hooks=None, state=None) -> np.ndarray:
  """torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
  del requires_grad, backward_hooks, state
  if not isinstance(data_, np.ndarray):
    raise ValueError(f"a parameter wraps {type(data_).__name__}, not a tensor")
  return data_


def _latin1(text, encoding="latin1") -> bytes:
  """_codecs.encode as protocol 2 uses it to pickle bytes (torch.save's protocol): latin-1 only."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise ValueError(f"_codecs.encode with {type(text).__name__}, {encoding!r}: only latin-1 text makes bytes")
  return text.encode("latin-1")


REBUILD_TENSOR = _StandIn("_rebuild_tensor_v2", _tensor)
REBUILD_PARAMETER = _StandIn("_rebuild_parameter", _parameter)


def _from_type(func, new_type, args, state) -> np.ndarray:
  """torch._tensor._rebuild_from_type_v2: FSDP's full state dict wraps every tensor in it (state
  {"_has_been_cloned": True}, meaningless here). Only the allow-listed rebuilders may be called."""
  del state
  if func not in (REBUILD_TENSOR, REBUILD_PARAMETER) or not isinstance(new_type, _TensorType):
    raise ValueError("_rebuild_from_type_v2 called with something other than a tensor rebuilder")
  return func(*args)


_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": BFLOAT16,
                   "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
                   "ByteStorage": "u1", "BoolStorage": "?"}

TORCH_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _StandIn("encode", _latin1),
    ("torch._utils", "_rebuild_tensor_v2"): REBUILD_TENSOR,
    ("torch._tensor", "_rebuild_from_type_v2"): _StandIn("_rebuild_from_type_v2", _from_type),
    ("torch._utils", "_rebuild_parameter"): REBUILD_PARAMETER,
    ("torch._utils", "_rebuild_parameter_with_state"): REBUILD_PARAMETER,
    ("torch", "Tensor"): _TensorType("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
    **{("torch", name): _StorageType(name, np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}
# train.pt also pickles numpy RNG states; they are read as opaque values, never rebuilt.
_OPAQUE = _StandIn("opaque", _opaque)
TRAIN_STATE_GLOBALS = {
    **TORCH_GLOBALS,
    **{(module, name): _OPAQUE for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): _OPAQUE,
    ("numpy", "dtype"): _OPAQUE,
}


class SafeUnpickler(pickle.Unpickler):
  """Unpickles plain data and the allow-listed globals only: every other global (os.system, builtins.eval, ...) is
  refused when the pickle names it, before anything could call it."""

  def __init__(self, file, where, allowed: dict, storages=None):
    super().__init__(file)
    self.where, self.allowed, self.storages = where, allowed, storages

  def find_class(self, module, name):
    found = self.allowed.get((module, name))
    if found is None:
      raise errors.DataError(f"{self.where}: refused to unpickle {module}.{name}: colorjax reads only tensors and "
                             "plain values from checkpoint pickles and never runs their code; if this file is yours, "
                             "save the model's state dict of tensors (or model.safetensors) instead")
    return found

  def persistent_load(self, pid):
    if self.storages is None:
      raise errors.DataError(f"{self.where}: unexpected persistent id in a pickle that holds no tensors")
    return self.storages(pid)


def safe_unpickle(raw: bytes, where, allowed: dict, storages=None):
  """Unpickle `raw` with `SafeUnpickler`; a malformed pickle is a DataError naming `where`."""
  try:
    return SafeUnpickler(io.BytesIO(raw), where, allowed, storages).load()
  except errors.DataError:
    raise
  except Exception as e:  # a corrupt or hostile pickle fails in many ways; all are the file's fault
    raise errors.DataError(f"{where} is not a readable checkpoint pickle ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------------------------
# torch.save's zip format


def _zip_bytes(path: pathlib.Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
  """A zip entry's bytes as uint8: memory-mapped when stored uncompressed (torch.save's way), else read."""
  try:
    info = archive.getinfo(name)
  except KeyError as e:
    raise errors.DataError(f"{path} has no entry {name}; the file is truncated or not a torch checkpoint") from e
  if info.compress_type != zipfile.ZIP_STORED or info.file_size == 0:
    return np.frombuffer(archive.read(name), np.uint8)
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    head = f.read(30)
  if len(head) < 30 or head[:4] != b"PK\x03\x04":
    raise errors.DataError(f"{path}: entry {name} has no valid zip header; the file is corrupt")
  name_len, extra_len = struct.unpack("<HH", head[26:30])
  offset = info.header_offset + 30 + name_len + extra_len
  return np.memmap(path, np.uint8, "r", offset, (info.file_size,))


def _storage_loader(path: pathlib.Path, archive: zipfile.ZipFile, prefix: str):
  """persistent_load for torch's zip format: ("storage", kind, key, location, numel) -> the entry <prefix>data/<key>."""
  cache = {}

  def load(pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
      raise errors.DataError(f"{path}: unexpected persistent id {str(pid)[:80]}; not a torch tensor storage")
    _, kind, key, _, numel = pid
    if key not in cache:
      raw = _zip_bytes(path, archive, f"{prefix}data/{key}")
      if raw.size < numel * kind.dtype.itemsize:
        raise errors.DataError(f"{path}: storage {key} holds {raw.size} bytes, {numel} x {kind.name} need more")
      cache[key] = _Storage(raw[:numel * kind.dtype.itemsize].view(kind.dtype))
    return cache[key]

  return load


def read_torch_file(path, allowed: dict = TORCH_GLOBALS):
  """The object a `torch.save` zip holds, tensors as numpy arrays, without torch and without running its code."""
  path = pathlib.Path(path)
  if not zipfile.is_zipfile(path):
    raise errors.DataError(f"{path} is not a torch zip file (legacy torch.save format, or not a checkpoint); "
                           "re-save it with torch.save's default format, or as model.safetensors")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise errors.DataError(f"{path} holds {len(pickles)} <name>/data.pkl entries, a torch checkpoint has one")
    prefix = pickles[0][:-len("data.pkl")]
    if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder").strip() != b"little":
      raise errors.DataError(f"{path} was saved big-endian; re-save it on a little-endian machine")
    return safe_unpickle(archive.read(pickles[0]), path, allowed, _storage_loader(path, archive, prefix))


def read_model_pt(path) -> dict:
  """model.pt (`olmo.checkpoint.save_state_dict`): a flat {key: tensor} state dict."""
  state = read_torch_file(path)
  if not isinstance(state, dict):
    raise errors.DataError(f"{path} holds a {type(state).__name__}, not a model state dict")
  for key, value in state.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise errors.DataError(f"{path}: entry {str(key)[:80]} is a {type(value).__name__}, not a tensor; pass the "
                             "model's state dict (model.pt of an unsharded OLMo checkpoint)")
  return dict(state)


def read_train_state(path) -> dict:
  """Steps and tokens a checkpoint had trained, from its train.pt (trainer state), when there is one."""
  path = pathlib.Path(path)
  if not path.exists():
    return {"steps": None, "tokens": None}
  state = read_torch_file(path, TRAIN_STATE_GLOBALS)
  if not isinstance(state, dict):
    raise errors.DataError(f"{path} holds a {type(state).__name__}, not OLMo's trainer state")
  number = lambda key: state[key] if isinstance(state.get(key), int) and not isinstance(state[key], bool) else None
  return {"steps": number("global_step"), "tokens": number("global_train_tokens_seen")}


# ----------------------------------------------------------------------------------------------------------------
# safetensors, and OLMo's names in it


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": BFLOAT16, "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?"}
_ST_CODES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors reference limit


def read_safetensors(path) -> dict:
  """{name: array} of a safetensors file (8-byte little-endian header size, JSON header, raw little-endian data)."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n <= min(size - 8, _MAX_HEADER):
      raise errors.DataError(f"{path} is not a safetensors file (header size {n}, file size {size})")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise errors.DataError(f"{path} has a corrupt safetensors header ({e})") from e
  if not isinstance(header, dict):
    raise errors.DataError(f"{path} has a safetensors header that is not a JSON object")
  body = np.memmap(path, np.uint8, "r", 8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise errors.DataError(f"{path}: tensor {name[:80]} has a bad header entry {str(entry)[:120]}") from e
    fits = 0 <= begin <= end <= body.size and min(shape, default=0) >= 0
    if not fits or end - begin != math.prod(shape) * dtype.itemsize:
      raise errors.DataError(f"{path}: tensor {name[:80]} ({entry['dtype']}{list(shape)}) has data offsets "
                             f"[{begin}, {end}) that do not fit its size or the file; the file is corrupt")
    tensors[name] = np.array(body[begin:end].view(dtype).reshape(shape))
  return tensors


def write_safetensors(path, tensors: dict) -> None:
  """Write {name: array} as safetensors; the header is space-padded so the data starts 8-byte aligned, as the
  reference writer does."""
  header, offset, arrays = {}, 0, []
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array
    header[name] = {"dtype": _ST_CODES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for array in arrays:
      f.write(array.tobytes())


_B64 = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")


def olmo_name(key: str) -> str:
  """OLMo's safetensors name of a state-dict key: urlsafe base64 of pickle.dumps(((key,), False)) (protocol 4, the
  default of the Python that wrote the fixture; any protocol reads back)."""
  return base64.urlsafe_b64encode(pickle.dumps(((key,), False), protocol=4)).decode("ascii")


def state_key(name: str, where) -> str:
  """The state-dict key of a safetensors tensor name: OLMo's pickled (keys, is_pickled) names are unpickled (no
  globals allowed), nested keys joined with "."; a plain name is its own key."""
  raw = base64.urlsafe_b64decode(name) if _B64.match(name) and len(name) % 4 == 0 else b""
  if not raw.startswith(b"\x80"):
    return name
  value = safe_unpickle(raw, f"{where} (tensor name {name[:40]})", {})
  if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple) and value[0]
          and all(isinstance(k, str) for k in value[0]) and isinstance(value[1], bool)):
    raise errors.DataError(f"{where}: tensor name {name[:40]} decodes to {str(value)[:80]}, not OLMo's "
                           "(keys, is_pickled)")
  keys, is_pickled = value
  if is_pickled:
    raise errors.DataError(f"{where}: {'.'.join(keys)} holds a pickled non-tensor value; model weights are tensors")
  return ".".join(keys)


def read_olmo_safetensors(path) -> dict:
  """model.safetensors in OLMo's variant (olmo/safetensors_util.py) as a {state-dict key: array} dict."""
  state = {}
  for name, array in read_safetensors(path).items():
    key = state_key(name, path)
    if key in state:
      raise errors.DataError(f"{path} holds {key} twice")
    state[key] = array
  return state


def read_weights(path) -> tuple[dict, str]:
  """(state dict, format) of model.safetensors or model.pt; the format is told by the first bytes, not the name."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PK\x03\x04":
    return read_model_pt(path), "torch-zip"
  if magic[:1] == b"\x80":
    raise errors.DataError(f"{path} is in torch's legacy (pre-1.6) format; re-save it with torch.save's default "
                           "format, or as model.safetensors")
  return read_olmo_safetensors(path), "olmo-safetensors"


def locate(weights: str, config: str) -> tuple[pathlib.Path, pathlib.Path]:
  """The weights file and config.yaml: a folder means its model.safetensors, else its model.pt (the original
  loader's order); config.yaml defaults to the one beside the weights."""
  if not weights:
    raise errors.ConfigError("set --config.olmo.weights to an OLMo checkpoint's model.safetensors or model.pt (or "
                             "its folder)")
  path = pathlib.Path(weights)
  if path.is_dir():
    found = [path / n for n in (SAFETENSORS, TORCH_WEIGHTS) if (path / n).is_file()]
    if not found:
      raise errors.DataError(f"{path} holds neither {SAFETENSORS} nor {TORCH_WEIGHTS}; pass an unsharded OLMo "
                             "checkpoint folder (a sharded one must be unsharded with the original code first)")
    path = found[0]
  if not path.is_file():
    raise errors.DataError(f"OLMo weights {path} do not exist")
  config_path = pathlib.Path(config) if config else path.parent / CONFIG
  if not config_path.is_file():
    raise errors.DataError(f"{config_path} does not exist; set --config.olmo.config to the checkpoint's config.yaml")
  return path.resolve(), config_path.resolve()


# ----------------------------------------------------------------------------------------------------------------
# config.yaml <-> ModelSpec


# The original's ModelConfig defaults (color-filter-olmo olmo/config.py), in its field order: a field config.yaml
# omits takes these values there, so it takes them here.
OLMO_MODEL_DEFAULTS = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "clip_qkv": None, "n_layers": 12, "mlp_ratio": 4,
    "mlp_hidden_size": None, "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1,
    "alibi": False, "alibi_bias_max": 8.0, "rope": False, "rope_full_precision": True, "flash_attention": False,
    "attention_dropout": 0.1, "multi_query_attention": None, "attention_layer_norm": False, "residual_dropout": 0.1,
    "embedding_dropout": 0.1, "layer_norm_type": "default", "layer_norm_with_affine": True,
    "attention_layer_norm_with_affine": True, "max_sequence_length": 1024, "include_bias": True,
    "bias_for_layer_norm": None, "scale_logits": False, "vocab_size": 50257, "embedding_size": 50304,
    "weight_tying": True, "eos_token_id": 50256, "pad_token_id": 50256, "init_device": None, "init_fn": "normal",
    "init_std": 0.02, "init_cutoff_factor": None, "precision": None,
}
# Fields of later OLMo versions that colorjax can honour (the original fork has none of them: export omits them).
LATER_OLMO_DEFAULTS = {"rope_theta": 10000, "layer_norm_eps": None, "norm_after": False, "emb_init_std": None,
                       "scale_emb_init": False}
# What an exported config.yaml's model section holds besides the architecture: configs/base.yaml's values.
EXPORT_MODEL_DEFAULTS = dict(OLMO_MODEL_DEFAULTS, activation_type="gelu", rope=True, attention_dropout=0.0,
                             attention_layer_norm=True, residual_dropout=0.0, embedding_dropout=0.0,
                             include_bias=False, bias_for_layer_norm=False, weight_tying=False, init_device="meta",
                             init_fn="mitchell", precision="amp_bf16")

# (field, test, why): options whose math colorjax's model (SPEC §2) does not have.
_RUNNABLE = (
    ("activation_type", lambda v, m: v == "gelu", "colorjax's MLP is exact GELU (no SwiGLU or ReLU)"),
    ("block_type", lambda v, m: v == "sequential", "colorjax runs OLMo's sequential pre-norm block only"),
    ("layer_norm_type", lambda v, m: v == "default", "colorjax's LayerNorm is OLMo's default (fp32, gain, no bias)"),
    ("layer_norm_with_affine", lambda v, m: v is True, "colorjax's LayerNorms have a gain"),
    ("attention_layer_norm", lambda v, m: v is True, "colorjax always applies QK-norm"),
    ("attention_layer_norm_with_affine", lambda v, m: v is True, "colorjax's QK-norms have a gain"),
    ("include_bias", lambda v, m: v is False, "colorjax's linear layers have no bias"),
    ("bias_for_layer_norm", lambda v, m: v is False or (v is None and m["include_bias"] is False),
     "colorjax's LayerNorms have no bias"),
    ("weight_tying", lambda v, m: v is False, "colorjax's output head is untied from the embedding"),
    ("scale_logits", lambda v, m: v is False, "colorjax does not scale logits"),
    ("rope", lambda v, m: v is True, "colorjax's positions are RoPE"),
    ("alibi", lambda v, m: v is False, "colorjax has no ALiBi"),
    ("rope_full_precision", lambda v, m: v is True, "colorjax applies RoPE in fp32"),
    ("n_kv_heads", lambda v, m: v is None or v == m["n_heads"], "colorjax has no grouped-query attention"),
    ("multi_query_attention", lambda v, m: not v, "colorjax has no multi-query attention"),
    ("clip_qkv", lambda v, m: v is None, "colorjax does not clip qkv"),
    ("attention_dropout", lambda v, m: v == 0, "colorjax trains without dropout"),
    ("residual_dropout", lambda v, m: v == 0, "colorjax trains without dropout"),
    ("embedding_dropout", lambda v, m: v == 0, "colorjax trains without dropout"),
    ("norm_after", lambda v, m: v is False, "colorjax's blocks are pre-norm"),
)
_POSITIVE_INTS = ("d_model", "n_heads", "n_layers", "max_sequence_length", "vocab_size", "block_group_size")


def read_config_yaml(path) -> dict:
  """A checkpoint's config.yaml (OmegaConf YAML) as plain data, via yaml.safe_load (no tags, no code)."""
  path = pathlib.Path(path)
  try:
    raw = yaml.safe_load(path.read_text())
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path} is not readable YAML ({e})") from e
  if not isinstance(raw, dict):
    raise errors.DataError(f"{path} is not an OLMo config (a YAML mapping with a model: section)")
  return raw


def model_section(raw: dict, where) -> dict:
  """The `model:` section (a bare ModelConfig is accepted too) over the original's defaults; a field colorjax does
  not know could change the math, so it is refused."""
  section = raw.get("model", raw if "d_model" in raw else None)
  if not isinstance(section, dict):
    raise errors.DataError(f"{where} has no model: section; pass the config.yaml of an OLMo checkpoint")
  known = {**OLMO_MODEL_DEFAULTS, **LATER_OLMO_DEFAULTS}
  unknown = [k for k in section if k not in known]
  if unknown:
    raise errors.DataError(f"{where}: model.{unknown[0]}={section[unknown[0]]!r} is an OLMo option colorjax does not "
                           "know; it may change the model's math, so the checkpoint is refused (remove it from the "
                           "config.yaml only if it is at its no-op default)")
  return {**known, **section}


def check_runnable(m: dict, where) -> None:
  """Refuse, naming the config.yaml field, every architecture colorjax cannot run exactly."""
  for field in _POSITIVE_INTS:
    if not isinstance(m[field], int) or isinstance(m[field], bool) or m[field] <= 0:
      raise errors.DataError(f"{where}: model.{field}={m[field]!r} must be a positive integer")
  for field in ("mlp_hidden_size", "embedding_size"):
    if m[field] is not None and (not isinstance(m[field], int) or isinstance(m[field], bool) or m[field] <= 0):
      raise errors.DataError(f"{where}: model.{field}={m[field]!r} must be a positive integer or null")
  for field in ("rope_theta", "layer_norm_eps"):
    value = m[field]
    if not (value is None and field == "layer_norm_eps") and (
        not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
      raise errors.DataError(f"{where}: model.{field}={value!r} must be a positive number")
  for field, ok, why in _RUNNABLE:
    if not ok(m[field], m):
      raise errors.DataError(f"{where}: model.{field}={m[field]!r} is not supported: {why}; colorjax runs only the "
                             "OLMo architecture of SPEC §2 and refuses one it would compute differently")
  if m["d_model"] % m["n_heads"]:
    raise errors.DataError(f"{where}: model.d_model={m['d_model']} is not divisible by model.n_heads={m['n_heads']}")
  if m["n_layers"] % m["block_group_size"]:
    raise errors.DataError(f"{where}: model.block_group_size={m['block_group_size']} does not divide "
                           f"model.n_layers={m['n_layers']}")
  if m["embedding_size"] is not None and m["embedding_size"] < m["vocab_size"]:
    raise errors.DataError(f"{where}: model.embedding_size={m['embedding_size']} < model.vocab_size="
                           f"{m['vocab_size']}; the original refuses this too")


def spec_from_olmo(m: dict, model_cfg, where) -> model.ModelSpec:
  """colorjax's ModelSpec of an OLMo model section (defaults applied); compute settings come from `model_cfg`.
  vocab_size is OLMo's embedding_size: the padding rows are in the softmax."""
  check_runnable(m, where)
  eps = m["layer_norm_eps"] if m["layer_norm_eps"] is not None else 1e-5
  return model.ModelSpec(
      d_model=m["d_model"], n_layers=m["n_layers"], n_heads=m["n_heads"],
      mlp_hidden=m["mlp_hidden_size"] if m["mlp_hidden_size"] is not None else m["mlp_ratio"] * m["d_model"],
      vocab_size=m["embedding_size"] or m["vocab_size"], max_seq_len=m["max_sequence_length"],
      rope_theta=float(m["rope_theta"]), norm_eps=float(eps), compute_dtype=model_cfg.compute_dtype,
      attention=model_cfg.attention, remat=model_cfg.remat, precision=model_cfg.precision)


def olmo_model_config(spec: model.ModelSpec, vocab_size: int, eos_id: int, pad_id: int, base: dict | None) -> dict:
  """The `model:` section the original loads for this architecture: `base` (the imported checkpoint's section, for
  its init and precision fields) or configs/base.yaml's values, with the architecture from `spec`."""
  if spec.rope_theta != 10000.0 or spec.norm_eps != 1e-5:
    raise errors.DataError(f"the original OLMo code fixes RoPE base 10000 and LayerNorm eps 1e-5; these params have "
                           f"rope_theta={spec.rope_theta}, norm_eps={spec.norm_eps} and cannot be exported")
  if vocab_size > spec.vocab_size:
    raise errors.DataError(f"the tokenizer's {vocab_size} tokens exceed the model's {spec.vocab_size} embedding rows")
  section = {k: (base or {}).get(k, v) for k, v in EXPORT_MODEL_DEFAULTS.items()}
  section.update(d_model=spec.d_model, n_heads=spec.n_heads, n_kv_heads=None, n_layers=spec.n_layers,
                 mlp_ratio=int(section["mlp_ratio"]), mlp_hidden_size=spec.mlp_hidden, block_group_size=1,
                 max_sequence_length=spec.max_seq_len, vocab_size=int(vocab_size), embedding_size=spec.vocab_size,
                 eos_token_id=int(eos_id), pad_token_id=int(pad_id))
  return section


# ----------------------------------------------------------------------------------------------------------------
# state dict <-> params


def key_map(n_layers: int) -> list[tuple[str, tuple, bool]]:
  """(OLMo state-dict key, colorjax params path, transposed) in OLMo's state-dict order. OLMo's matrices are
  nn.Linear (out, in); colorjax's kernels are (in, out). att_proj's rows are q|k|v, as colorjax's qkv columns."""
  entries = [("transformer.wte.weight", ("embed",), False), ("transformer.ln_f.weight", ("final_norm", "scale"), False)]
  for i in range(n_layers):
    b, blk = f"transformer.blocks.{i}.", f"block_{i}"
    entries += [
        (b + "k_norm.weight", (blk, "attn", "k_norm", "scale"), False),
        (b + "q_norm.weight", (blk, "attn", "q_norm", "scale"), False),
        (b + "attn_out.weight", (blk, "attn", "out", "kernel"), True),
        (b + "ff_out.weight", (blk, "mlp", "down", "kernel"), True),
        (b + "attn_norm.weight", (blk, "attn_norm", "scale"), False),
        (b + "ff_norm.weight", (blk, "mlp_norm", "scale"), False),
        (b + "att_proj.weight", (blk, "attn", "qkv", "kernel"), True),
        (b + "ff_proj.weight", (blk, "mlp", "up", "kernel"), True),
    ]
  return entries + [("transformer.ff_out_last.weight", ("head",), True)]


_GROUPED = re.compile(r"^transformer\.block_groups\.(\d+)\.(\d+)\.")


def normalized_keys(state: dict, group_size: int, where) -> dict:
  """Keys as `OLMo._make_state_dict_compatible` sees them: no FSDP prefix, block groups flattened; the output layer
  of later OLMo versions (transformer.ff_out) under this fork's name (ff_out_last)."""
  out = {}
  for key, value in state.items():
    new = key.replace("_fsdp_wrapped_module.", "")
    match = _GROUPED.match(new)
    if match:
      layer = int(match.group(1)) * group_size + int(match.group(2))
      new = f"transformer.blocks.{layer}." + new[match.end():]
    if new == "transformer.ff_out.weight":
      new = "transformer.ff_out_last.weight"
    if new in out:
      raise errors.DataError(f"{where} holds {new} twice (as {key} and another key)")
    out[new] = value
  return out


def _get(tree: dict, path: tuple):
  for part in path:
    tree = tree[part]
  return tree


def _put(tree: dict, path: tuple, value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def state_to_params(state: dict, spec: model.ModelSpec, where) -> dict:
  """colorjax params (fp32 numpy) of an OLMo state dict, every key checked present with its shape, none left over."""
  state, params = dict(state), {}
  abstract = model.abstract_params(spec)
  for key, path, transpose in key_map(spec.n_layers):
    if key not in state:
      raise errors.DataError(f"{where} has no {key}; it does not hold this architecture's weights (check config.yaml)")
    array = state.pop(key)
    want = tuple(_get(abstract, path).shape)
    want = want[::-1] if transpose else want
    if array.shape != want:
      raise errors.DataError(f"{where}: {key} has shape {list(array.shape)}, config.yaml's architecture needs "
                             f"{list(want)}")
    if array.dtype not in FLOAT_DTYPES:
      raise errors.DataError(f"{where}: {key} is {array.dtype}, not a floating-point tensor")
    value = array.astype(np.float32)
    _put(params, path, np.ascontiguousarray(value.T if transpose else value))
  if state:
    extra = sorted(state)
    raise errors.DataError(f"{where} holds {len(extra)} key(s) colorjax's model has no place for, e.g. {extra[0]} "
                           "(biases, position embeddings or another architecture?); the import would drop them")
  return params


def params_to_state(params: dict, spec: model.ModelSpec) -> dict:
  """OLMo's state dict (fp32, nn.Linear layout) of colorjax params, in OLMo's key order."""
  state = {}
  for key, path, transpose in key_map(spec.n_layers):
    value = np.asarray(jax.device_get(_get(params, path)), np.float32)
    state[key] = np.ascontiguousarray(value.T if transpose else value)
  return state


# ----------------------------------------------------------------------------------------------------------------
# The stage


def resolve_tokenizer(given: str, raw: dict, config_path) -> str:
  """The tokenizer.json to record: the one given, else the shared copy of the original's GPT-NeoX pii-special when
  config.yaml names it."""
  if given:
    return given
  identifier = str((raw.get("tokenizer") or {}).get("identifier") or "")
  shared = data.shared_dir("tokenizer")
  if NEOX_TOKENIZER in identifier and shared and (pathlib.Path(shared) / f"{NEOX_TOKENIZER}.json").is_file():
    return str(pathlib.Path(shared) / f"{NEOX_TOKENIZER}.json")
  raise errors.ConfigError(f"set --config.olmo.tokenizer to the tokenizer.json the model was trained with "
                           f"({config_path} names tokenizer.identifier={identifier or None!r})")


def checked_tokenizer(path: str, spec: model.ModelSpec, m: dict, config_path):
  """(tokenizer, its manifest info) with EOS/PAD from config.yaml; its ids must all have embedding rows."""
  tokenizer = data.load_tokenizer(path)
  vocab = tokenizer.get_vocab_size(with_added_tokens=True)
  if vocab > spec.vocab_size:
    raise errors.DataError(f"tokenizer {path} has {vocab} tokens but the model has only {spec.vocab_size} embedding "
                           f"rows ({config_path}: model.embedding_size); pass the tokenizer the model was trained "
                           "with as --config.olmo.tokenizer")
  for field in ("eos_token_id", "pad_token_id"):
    if not isinstance(m[field], int) or not 0 <= m[field] < vocab:
      raise errors.DataError(f"{config_path}: model.{field}={m[field]!r} is not a token of {path} ({vocab} tokens)")
  return tokenizer, data.tokenizer_info(tokenizer, path, m["eos_token_id"], m["pad_token_id"])


@dataclasses.dataclass(frozen=True)
class ImportPlan:
  """What an import reads and the request that names its result, all known before the weights are read."""
  weights: pathlib.Path
  config_path: pathlib.Path
  raw: dict
  section: dict
  spec: model.ModelSpec
  tokenizer_path: str
  tokenizer: object  # a tokenizers.Tokenizer
  tok_info: dict
  request: dict


def plan_import(cfg) -> ImportPlan:
  """Resolve and check everything an import needs (the dry run stops here); the weights are only hashed."""
  weights, config_path = locate(cfg.olmo.weights, cfg.olmo.config)
  raw = read_config_yaml(config_path)
  section = model_section(raw, config_path)
  spec = spec_from_olmo(section, cfg.model, config_path)
  tokenizer_path = resolve_tokenizer(cfg.olmo.tokenizer, raw, config_path)
  tokenizer, tok_info = checked_tokenizer(tokenizer_path, spec, section, config_path)
  request = {"kind": "olmo_import", "weights_sha256": artifacts.fingerprint(weights)["sha256"],
             "architecture": spec.architecture(), "tokenizer": tok_info["sha256"]}
  return ImportPlan(weights, config_path, raw, section, spec, tokenizer_path, tokenizer, tok_info, request)


def import_checkpoint(cfg) -> pathlib.Path:
  """OLMo checkpoint -> <workdir>/params, a colorjax params export (reused when it holds this import already)."""
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the folder the params export goes to (<workdir>/params)")
  out = pathlib.Path(cfg.workdir).resolve() / "params"
  plan = plan_import(cfg)
  if artifacts.up_to_date(out, plan.request, "a params export", "choose another --config.workdir"):
    print(f"olmo import: {out} already holds this import; nothing to do")
    return out
  state, fmt = read_weights(plan.weights)
  state = normalized_keys(state, plan.section["block_group_size"], plan.weights)
  dtypes = sorted({str(a.dtype) for a in state.values()})
  params = state_to_params(state, plan.spec, plan.weights)
  progress = read_train_state(plan.weights.parent / "train.pt")
  manifest = {
      "stage": "olmo_import", "model": plan.spec.architecture(), "model_spec": plan.spec.to_dict(),
      "tokenizer": plan.tok_info, "id": artifacts.content_id(plan.request), "request": plan.request,
      "steps": progress["steps"], "tokens": progress["tokens"],
      "source": {"weights": str(plan.weights), "config": str(plan.config_path), "format": fmt, "dtypes": dtypes,
                 "olmo_model": plan.section, "olmo_tokenizer": plan.raw.get("tokenizer"),
                 "run_name": plan.raw.get("run_name")},
  }
  with artifacts.Lock(out), tempfile.TemporaryDirectory() as tmp:
    tok_file = pathlib.Path(tmp) / data.TOKENIZER
    tok_file.write_text(plan.tokenizer.to_str())  # the bytes whose hash tokenizer_info recorded
    checkpoint.export_params(out, params, manifest, tok_file)
  counts = model.param_counts(plan.spec)
  print(f"olmo import: {plan.weights} ({fmt}, {counts['total']:,} params, d_model {plan.spec.d_model}, "
        f"{plan.spec.n_layers} layers, vocab {plan.spec.vocab_size}) -> {out} (id {manifest['id']})")
  return out


def export_checkpoint(cfg) -> pathlib.Path:
  """colorjax params export -> <workdir>/model.safetensors + config.yaml + tokenizer.json in OLMo's format, read back
  and checked bitwise before config.yaml (the original's marker of a checkpoint) is written."""
  if not cfg.olmo.params or not cfg.workdir:
    raise errors.ConfigError("set --config.olmo.params to a params export (<run>/params) and --config.workdir to the "
                             "OLMo checkpoint folder to write")
  folder = pathlib.Path(cfg.olmo.params)
  manifest = checkpoint.read_params_manifest(folder)
  spec = checkpoint.spec_from_manifest(manifest, cfg.model)
  tok = manifest["tokenizer"]
  source = manifest.get("source") or {}
  base = source.get("olmo_model")
  vocab = base["vocab_size"] if base else tok["vocab_size"]
  section = olmo_model_config(spec, vocab, tok["eos_id"], tok["pad_id"], base)
  out = pathlib.Path(cfg.workdir).resolve()
  weights_path = out / SAFETENSORS
  if weights_path.exists() or (out / CONFIG).exists():
    raise errors.DataError(f"{out} already holds an OLMo checkpoint; choose another --config.workdir (nothing was "
                           "overwritten)")
  tok_path = data.checked_tokenizer_path(folder, tok)
  params, _ = checkpoint.load_params(folder, spec)
  state = params_to_state(params, spec)
  with artifacts.Lock(out):
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (SAFETENSORS + ".tmp")
    write_safetensors(tmp, {olmo_name(k): v for k, v in state.items()})
    back = read_olmo_safetensors(tmp)
    if list(back) != list(state) or any(back[k].dtype != v.dtype or not np.array_equal(back[k], v)
                                        for k, v in state.items()):
      raise RuntimeError(f"{tmp} does not read back as written")
    tmp.rename(weights_path)
    (out / data.TOKENIZER).write_bytes(tok_path.read_bytes())
    tokenizer_section = source.get("olmo_tokenizer") or {"identifier": tok["name"], "truncate_direction": "right"}
    config = {"run_name": source.get("run_name") or f"colorjax-{manifest.get('id')}", "model": section,
              "tokenizer": tokenizer_section}
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    (out / CONFIG).write_text(f"# colorjax params {manifest.get('id')} ({folder.resolve()}) in OLMo's format\n{text}")
  print(f"olmo export: {folder} -> {weights_path} + {CONFIG} ({len(state)} tensors, d_model {spec.d_model}, "
        f"{spec.n_layers} layers, vocab {spec.vocab_size})")
  return out


def run(cfg) -> pathlib.Path:
  if cfg.olmo.mode == "import":
    return import_checkpoint(cfg)
  if cfg.olmo.mode == "export":
    return export_checkpoint(cfg)
  raise errors.ConfigError(f"olmo.mode={cfg.olmo.mode!r}; choose import or export")


def describe(cfg) -> None:
  """Dry run: the architecture an import would produce (weights untouched), or what an export would write."""
  if cfg.olmo.mode == "import":
    plan = plan_import(cfg)
    counts = model.param_counts(plan.spec)
    print(f"olmo import (dry run): {plan.weights} with {plan.config_path}: {counts['total']:,} params, "
          f"architecture {plan.spec.architecture()}, tokenizer {plan.tokenizer_path}, id "
          f"{artifacts.content_id(plan.request)} -> {pathlib.Path(cfg.workdir or '<workdir>') / 'params'}")
  elif cfg.olmo.mode == "export":
    manifest = checkpoint.read_params_manifest(cfg.olmo.params)
    print(f"olmo export (dry run): {cfg.olmo.params} (architecture {manifest['model']}) -> "
          f"{pathlib.Path(cfg.workdir or '<workdir>') / SAFETENSORS} + {CONFIG}")
  else:
    run(cfg)
