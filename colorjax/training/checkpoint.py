"""Orbax checkpoints of the training state, and self-describing params-only exports for later stages.

Training checkpoints (`<workdir>/checkpoints/<step>/`) hold params, optimizer state and step plus a JSON item with
the config; they are written asynchronously and the last `keep` are kept. A params export (`<folder>/params/` +
`<folder>/manifest.json`) is what finetune, score and eval read: the manifest names the architecture, the
tokenizer and the data that made it, so a stage can refuse parameters that do not fit instead of trusting a path.
"""
import pathlib
import shutil
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from colorjax import console
from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import object_storage
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import transformer


class Checkpointer:
  """Async, keep-N checkpoints of {'state': train state, 'meta': JSON} under <workdir>/checkpoints."""

  def __init__(self, workdir, keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True, enable_async_checkpointing=True)
    self.directory = object_storage.orbax_path(pathlib.Path(workdir).resolve() / "checkpoints")
    remote = isinstance(self.directory, pathlib.Path) and object_storage.remote_of(self.directory)
    if remote and jax.process_count() > 1:
      raise errors.DataError(f"{object_storage.remote_of(self.directory)}: orbax cannot write s3:// checkpoints from "
                             f"{jax.process_count()} hosts; use a gs:// or shared-disk workdir for multi-host training")
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self):
    """The last finished checkpoint: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when
    complete (on GCS: a commit_success file), and lists only those, so a save cut short is never resumed from."""
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict):
    """Start an async save; with object storage, finish it and upload the run folder (a checkpoint that is only on
    this machine's disk would not survive losing it)."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if object_storage.active():
      self.manager.wait_until_finished()
      object_storage.sync()

  def restore(self, step: int, abstract_state):
    """State laid out as `abstract_state` (ShapeDtypeStructs carrying the target shardings), and its meta."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def export_params(folder, params, manifest: dict, tokenizer_path) -> pathlib.Path:
  """Write params, the tokenizer they were trained with, and (last, marking completion) manifest.json."""
  folder = pathlib.Path(folder).resolve()
  if (folder / formats.MANIFEST).exists():
    raise errors.DataError(f"{folder} already holds a params export; choose another folder or delete it first")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(object_storage.orbax_path(folder / "params"), params, force=True)
  checkpointer.wait_until_finished()
  manifest = dict(manifest, format=formats.PARAMS.format, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
  if console.is_main():
    shutil.copyfile(tokenizer_path, folder / tokenizer_lib.TOKENIZER)
    (folder / formats.MANIFEST).write_text(formats.json_text(manifest))
  multihost_utils.sync_global_devices(f"export {folder}")
  return folder


def read_params_manifest(folder) -> dict:
  return formats.open_manifest(folder, formats.PARAMS)


def check_architecture(manifest: dict, spec: transformer.ModelSpec, where) -> None:
  saved, wanted = manifest["model"], spec.architecture()
  diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
  if diff:
    detail = ", ".join(f"{k}: saved {a} vs config {b}" for k, (a, b) in diff.items())
    raise errors.DataError(f"params in {where} do not fit the configured model ({detail}); set --config.model.* to "
                           "match (or use the size config the params were trained with)")


def spec_from_manifest(manifest: dict, model_cfg) -> transformer.ModelSpec:
  """The architecture an export was trained with; how to compute (dtype, precision, attention kernel, remat) from
  config."""
  return transformer.ModelSpec(**manifest["model_spec"]).with_compute(model_cfg)


def load_params(folder, spec: transformer.ModelSpec, shardings=None):
  """Params of an export, checked against the model spec, placed with `shardings` (a tree of NamedShardings)."""
  folder = pathlib.Path(folder)
  manifest = read_params_manifest(folder)
  check_architecture(manifest, spec, folder)
  abstract = transformer.abstract_params(spec)
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  try:
    params = ocp.StandardCheckpointer().restore(object_storage.orbax_path(folder / "params"), abstract)
  except (ValueError, OSError) as e:  # tensorstore's NOT_FOUND / corrupt-data errors are ValueErrors
    detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise errors.DataError(f"params export {folder} is damaged: its arrays in {folder / 'params'} cannot be read "
                           f"({detail}); delete it and re-run the stage that made it, or copy the folder "
                           "again") from None
  return params, manifest
