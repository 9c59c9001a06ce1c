"""OLMo checkpoints in and out of colorjax (the `olmo` stage): the original CoLoR-Filter code's models can be scored,
finetuned and evaluated here, and colorjax's models loaded there.

  import  an OLMo checkpoint (model.safetensors in OLMo's variant, or model.pt as torch.save writes it) and its
          config.yaml -> a colorjax params export at <workdir>/params, read by score, finetune, eval and target runs
          exactly like one that train.py wrote.
  export  a colorjax params export -> <workdir>/model.safetensors + config.yaml (+ tokenizer.json), which the
          original's `olmo.checkpoint.load_state_dict` and `ModelConfig.load(..., key="model")` read.

torch is never imported and a checkpoint cannot run code: every pickle goes through torch_files.py's
`SafeUnpickler`. config.yaml <-> ModelSpec is olmo_config.py (options colorjax cannot run exactly are refused by
name); OLMo's weight files and their keys <-> colorjax params are olmo_weights.py. This module is the stage.
"""
import dataclasses
import os
import pathlib
import tempfile

import numpy as np
import yaml

from colorjax import errors
from colorjax.artifacts import hub_paths
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.interop import olmo_config
from colorjax.interop import olmo_weights
from colorjax.model import transformer
from colorjax.training import checkpoint

SAFETENSORS = "model.safetensors"
TORCH_WEIGHTS = "model.pt"
CONFIG = "config.yaml"
NEOX_TOKENIZER = "gpt-neox-20b-pii-special"  # the original's tokenizer (docs/definitions.md#model)


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
  # absolute, symlinks kept: in the hub cache each file is a link to a blob named by its hash, and train.pt is
  # found beside the link
  return pathlib.Path(os.path.abspath(path)), pathlib.Path(os.path.abspath(config_path))


def resolve_tokenizer(given: str, raw: dict, config_path) -> str:
  """The tokenizer.json to record: the one given, else the shared copy of the original's GPT-NeoX pii-special when
  config.yaml names it."""
  if given:
    return given
  identifier = str((raw.get("tokenizer") or {}).get("identifier") or "")
  shared = stores.shared_dir("tokenizer")
  if NEOX_TOKENIZER in identifier and shared and (pathlib.Path(shared) / f"{NEOX_TOKENIZER}.json").is_file():
    return str(pathlib.Path(shared) / f"{NEOX_TOKENIZER}.json")
  raise errors.ConfigError(f"set --config.olmo.tokenizer to the tokenizer.json the model was trained with "
                           f"({config_path} names tokenizer.identifier={identifier or None!r})")


def checked_tokenizer(path: str, spec: transformer.ModelSpec, m: dict, config_path):
  """(tokenizer, its manifest info) with EOS/PAD from config.yaml; its ids must all have embedding rows."""
  tokenizer = tokenizer_lib.load_tokenizer(path)
  vocab = tokenizer.get_vocab_size(with_added_tokens=True)
  if vocab > spec.vocab_size:
    raise errors.DataError(f"tokenizer {path} has {vocab} tokens but the model has only {spec.vocab_size} embedding "
                           f"rows ({config_path}: model.embedding_size); pass the tokenizer the model was trained "
                           "with as --config.olmo.tokenizer")
  for field in ("eos_token_id", "pad_token_id"):
    if not isinstance(m[field], int) or not 0 <= m[field] < vocab:
      raise errors.DataError(f"{config_path}: model.{field}={m[field]!r} is not a token of {path} ({vocab} tokens)")
  return tokenizer, tokenizer_lib.tokenizer_info(tokenizer, path, m["eos_token_id"], m["pad_token_id"])


@dataclasses.dataclass(frozen=True)
class ImportInputs:
  """What an import reads and the request that names its result, all known before the weights are read."""
  weights: pathlib.Path
  config_path: pathlib.Path
  raw: dict
  section: dict
  spec: transformer.ModelSpec
  tokenizer_path: str
  tokenizer: object  # a tokenizers.Tokenizer
  tok_info: dict
  request: dict


def import_inputs(cfg) -> ImportInputs:
  """Resolve and check everything an import needs (the dry run stops here); the weights are only hashed."""
  weights, config_path = locate(cfg.olmo.weights, cfg.olmo.config)
  raw = olmo_config.read_config_yaml(config_path)
  section = olmo_config.model_section(raw, config_path)
  spec = olmo_config.spec_from_olmo(section, cfg.model, config_path)
  tokenizer_path = resolve_tokenizer(cfg.olmo.tokenizer, raw, config_path)
  tokenizer, tok_info = checked_tokenizer(tokenizer_path, spec, section, config_path)
  request = hub_paths.with_origins({"kind": "olmo_import", "weights_sha256": lineage.fingerprint(weights)["sha256"],
                                    "architecture": spec.architecture(), "tokenizer": tok_info["sha256"]},
                                   [weights, config_path, tokenizer_path])
  return ImportInputs(weights, config_path, raw, section, spec, tokenizer_path, tokenizer, tok_info, request)


def import_checkpoint(cfg) -> pathlib.Path:
  """OLMo checkpoint -> <workdir>/params, a colorjax params export (reused when it holds this import already)."""
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the folder the params export goes to (<workdir>/params)")
  out = pathlib.Path(cfg.workdir).resolve() / "params"
  inputs = import_inputs(cfg)
  if lineage.up_to_date(out, inputs.request, "a params export", "choose another --config.workdir"):
    print(f"olmo import: {out} already holds this import; nothing to do")
    return out
  state, fmt = olmo_weights.read_weights(inputs.weights)
  state = olmo_weights.normalized_keys(state, inputs.section["block_group_size"], inputs.weights)
  dtypes = sorted({str(a.dtype) for a in state.values()})
  params = olmo_weights.state_to_params(state, inputs.spec, inputs.weights)
  progress = olmo_weights.read_train_state(inputs.weights.parent / "train.pt")
  manifest = {
      "stage": "olmo_import", "model": inputs.spec.architecture(), "model_spec": inputs.spec.to_dict(),
      "tokenizer": inputs.tok_info, "id": lineage.content_id(inputs.request), "request": inputs.request,
      "steps": progress["steps"], "tokens": progress["tokens"],
      "source": {"weights": str(inputs.weights), "config": str(inputs.config_path), "format": fmt, "dtypes": dtypes,
                 "olmo_model": inputs.section, "olmo_tokenizer": inputs.raw.get("tokenizer"),
                 "run_name": inputs.raw.get("run_name")},
  }
  with lineage.Lock(out), tempfile.TemporaryDirectory() as tmp:
    tok_file = pathlib.Path(tmp) / tokenizer_lib.TOKENIZER
    tok_file.write_text(inputs.tokenizer.to_str())  # the bytes whose hash tokenizer_info recorded
    checkpoint.export_params(out, params, manifest, tok_file)
  counts = transformer.param_counts(inputs.spec)
  print(f"olmo import: {inputs.weights} ({fmt}, {counts['total']:,} params, d_model {inputs.spec.d_model}, "
        f"{inputs.spec.n_layers} layers, vocab {inputs.spec.vocab_size}) -> {out} (id {manifest['id']})")
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
  section = olmo_config.olmo_model_config(spec, vocab, tok["eos_id"], tok["pad_id"], base)
  out = pathlib.Path(cfg.workdir).resolve()
  weights_path = out / SAFETENSORS
  if weights_path.exists() or (out / CONFIG).exists():
    raise errors.DataError(f"{out} already holds an OLMo checkpoint; choose another --config.workdir (nothing was "
                           "overwritten)")
  tok_path = tokenizer_lib.checked_tokenizer_path(folder, tok)
  params, _ = checkpoint.load_params(folder, spec)
  state = olmo_weights.params_to_state(params, spec)
  with lineage.Lock(out):
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (SAFETENSORS + ".tmp")
    olmo_weights.write_olmo_safetensors(tmp, state)
    back = olmo_weights.read_olmo_safetensors(tmp)
    if list(back) != list(state) or any(back[k].dtype != v.dtype or not np.array_equal(back[k], v)
                                        for k, v in state.items()):
      raise RuntimeError(f"{tmp} does not read back as written")
    tmp.rename(weights_path)
    (out / tokenizer_lib.TOKENIZER).write_bytes(tok_path.read_bytes())
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
    inputs = import_inputs(cfg)
    counts = transformer.param_counts(inputs.spec)
    print(f"olmo import (dry run): {inputs.weights} with {inputs.config_path}: {counts['total']:,} params, "
          f"architecture {inputs.spec.architecture()}, tokenizer {inputs.tokenizer_path}, id "
          f"{lineage.content_id(inputs.request)} -> {pathlib.Path(cfg.workdir or '<workdir>') / 'params'}")
  elif cfg.olmo.mode == "export":
    manifest = checkpoint.read_params_manifest(cfg.olmo.params)
    print(f"olmo export (dry run): {cfg.olmo.params} (architecture {manifest['model']}) -> "
          f"{pathlib.Path(cfg.workdir or '<workdir>') / SAFETENSORS} + {CONFIG}")
  else:
    run(cfg)
