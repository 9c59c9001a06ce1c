"""What the `dolma` stage's actions share: where their output goes and how it is published, and how the original's
headerless files and config.yaml are read. A module of its own so that the action modules (dolma_scores.py,
dolma_export.py) need not import the stage, dolma.py, which imports them.
"""
import os
import pathlib

from colorjax import console
from colorjax import errors
from colorjax.artifacts import lineage


def print_main(message: str) -> None:
  """Print on the main process only."""
  if console.is_main():
    print(message, flush=True)


def workdir(cfg) -> pathlib.Path:
  """The folder the action's output goes to (--config.workdir, required)."""
  if not cfg.workdir:
    raise errors.ConfigError(f"set --config.workdir to the folder the dolma {cfg.dolma.action} output goes to")
  return pathlib.Path(cfg.workdir).resolve()


def absolute(path) -> pathlib.Path:
  """An input file's absolute path with its symlinks kept: in the hub cache each file is a link to a blob named by
  its hash, and the link's name (part-000.npy) and place (.../snapshots/<commit>/) are what an artifact records."""
  return pathlib.Path(os.path.abspath(path))


def as_list(value) -> list[str]:
  """A config tuple (or one string given for it) as a list of strings."""
  return [value] if isinstance(value, str) else [str(v) for v in value]


def byte_rows(path: pathlib.Path, itemsize: int, what: str, fix: str) -> int:
  """Rows of `itemsize` bytes in a headerless file, refusing a size that is not a multiple of it."""
  size = path.stat().st_size
  if size % itemsize:
    raise errors.DataError(f"{path} has {size:,} bytes, not a multiple of {itemsize}: not a headerless {what} file "
                           f"(or cut mid-value); {fix}")
  return size // itemsize


def publish(output: pathlib.Path, write) -> pathlib.Path:
  """Build an artifact with `write(folder)` (manifest last) through lineage.building: under the output's lock, in
  `<output>.partial`, moved into place."""
  with lineage.building(output, "an artifact of this stage", "choose another --config.workdir") as partial:
    write(partial)
  return output


def read_yaml(path) -> dict:
  """An original run's config.yaml (OmegaConf writes plain YAML; PyYAML comes with ml_collections)."""
  import yaml  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.ConfigError(f"{path} is not a file; pass the config.yaml of an original run (its save_folder or "
                             "checkpoint folder holds one)")
  try:
    loaded = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise errors.DataError(f"{path} is not readable YAML ({e}); pass the config.yaml of an original run") from e
  if not isinstance(loaded, dict):
    raise errors.DataError(f"{path} is not a TrainConfig (a YAML mapping); pass the config.yaml of an original run")
  return loaded
