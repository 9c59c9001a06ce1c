"""OLMo's weight files and state dict <-> colorjax params.

OLMo's files are the generic formats of torch_files.py with OLMo's conventions on top: model.pt is a flat
state dict, train.pt the trainer state, and OLMo's model.safetensors names each tensor by a pickled key. The key map
is the one place that knows how OLMo's parameter names and layouts correspond to colorjax's.
"""
import base64
import pathlib
import pickle
import re

import jax
import numpy as np

from colorjax import errors
from colorjax.interop import torch_files
from colorjax.model import transformer

FLOAT_DTYPES = (np.dtype("<f4"), np.dtype("<f8"), np.dtype("<f2"), torch_files.BFLOAT16)


# ----------------------------------------------------------------------------------------------------------------
# OLMo's weight files


def read_model_pt(path) -> dict:
  """model.pt (`olmo.checkpoint.save_state_dict`): a flat {key: tensor} state dict."""
  state = torch_files.read_torch_file(path)
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
  state = torch_files.read_torch_file(path, torch_files.TRAIN_STATE_GLOBALS)
  if not isinstance(state, dict):
    raise errors.DataError(f"{path} holds a {type(state).__name__}, not OLMo's trainer state")
  number = lambda key: state[key] if isinstance(state.get(key), int) and not isinstance(state[key], bool) else None
  return {"steps": number("global_step"), "tokens": number("global_train_tokens_seen")}


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
  value = torch_files.safe_unpickle(raw, f"{where} (tensor name {name[:40]})", {})
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
  for name, array in torch_files.read_safetensors(path).items():
    key = state_key(name, path)
    if key in state:
      raise errors.DataError(f"{path} holds {key} twice")
    state[key] = array
  return state


def write_olmo_safetensors(path, state: dict) -> None:
  """A {state-dict key: array} dict as model.safetensors in OLMo's variant, tensors named as OLMo names them."""
  torch_files.write_safetensors(path, {olmo_name(k): v for k, v in state.items()})


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


def state_to_params(state: dict, spec: transformer.ModelSpec, where) -> dict:
  """colorjax params (fp32 numpy) of an OLMo state dict, every key checked present with its shape, none left over."""
  state, params = dict(state), {}
  abstract = transformer.abstract_params(spec)
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


def params_to_state(params: dict, spec: transformer.ModelSpec) -> dict:
  """OLMo's state dict (fp32, nn.Linear layout) of colorjax params, in OLMo's key order."""
  state = {}
  for key, path, transpose in key_map(spec.n_layers):
    value = np.asarray(jax.device_get(_get(params, path)), np.float32)
    state[key] = np.ascontiguousarray(value.T if transpose else value)
  return state
