"""Checkpoint file formats read and written without torch: torch.save's zip of pickles, and safetensors.

Kept apart from OLMo's model knowledge (olmo_weights.py) because the safety argument lives here: every pickle goes
through `SafeUnpickler`, whose only globals are stand-ins that build numpy arrays, so a checkpoint cannot run code.
"""
import collections
import dataclasses
import io
import json
import math
import pathlib
import pickle
import struct
import zipfile
from typing import Callable

import jax.numpy as jnp
import numpy as np

from colorjax import errors

BFLOAT16 = np.dtype(jnp.bfloat16)


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


# ----------------------------------------------------------------------------------------------------------------
# safetensors


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


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
  """Write {name: array} as safetensors (with a `__metadata__` of strings when given: transformers expects
  {"format": "pt"}); the header is space-padded so the data starts 8-byte aligned, as the reference writer does."""
  header, offset, arrays = ({"__metadata__": dict(metadata)} if metadata else {}), 0, []
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
