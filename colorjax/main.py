"""Command line: `python -m colorjax.main --config configs/<stage>.py[:arg] [--config.key=value ...]`.

Parses the (locked) config and dispatches `config.stage`; every stage lives in its own module. A user error (a
`colorjax.errors.ColorjaxError`, a bad flag or config override) prints one `colorjax <stage>: error: ...` block
to stderr and exits with status 2; anything else is a bug and keeps its traceback. A stage stopped by SIGTERM (a
preemption) prints how to resume and exits with status 143.
"""
import difflib
import errno
import importlib
import importlib.util
import os
import re
import sys

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from colorjax import errors
from colorjax import sharding
from colorjax.aot import targets
from colorjax.artifacts import object_storage

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/<file>.py[:arg]; override fields with --config.<field>=<value>", lock_config=True)

# stage -> module with run(cfg) and describe(cfg) (the dry run)
STAGES = {
    "prepare": "colorjax.prepare",
    "pretrain": "colorjax.train",
    "finetune": "colorjax.train",
    "eval": "colorjax.evaluate",
    "score": "colorjax.score",
    "select": "colorjax.select",
    "export": "colorjax.export",
    "olmo": "colorjax.interop.olmo",
    "pipeline": "colorjax.pipeline.runner",
    "report": "colorjax.report.results",
    "dolma": "colorjax.interop.dolma",
    "dsir": "colorjax.dsir",
    "distill": "colorjax.distill.stage",
    "hub": "colorjax.interop.hub",
}

USAGE_EXIT = 2
# A stage stopped cleanly by SIGTERM (errors.Preempted; Ctrl-C gives 130 = 128 + SIGINT the same way). 143 = 128 +
# SIGTERM is what a shell reports for a process
# SIGTERM ended, so schedulers treat the job as terminated by its signal either way (SLURM requeues a preempted job
# whatever the status; a Kubernetes Job's podFailurePolicy can match 143 to restart without counting a failure).
# Not 0: that would tell the scheduler, or a `train && score` script, that an unfinished stage succeeded.
PREEMPTED_EXIT = 128 + 15
INTERRUPTED_EXIT = 128 + 2
DISK_FULL_EXIT = 1
_CONFIG_ARG = re.compile(r"^--?(?:no)?(config(?:\.[^=]+)?)(?:=(.*))?$")


def _fail(where: str, message) -> None:
  sys.stderr.write(f"colorjax{' ' + where if where else ''}: error: {object_storage.as_urls(str(message))}\n")
  sys.exit(USAGE_EXIT)


def _config_args(argv) -> list[tuple[str, str | None, list[int]]]:
  """(name, value, argv positions) of every --config / --config.<field> argument; value None when the flag is a bare
  boolean. Stops at `--`, as absl does."""
  found = []
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    match = _CONFIG_ARG.match(arg)
    if match:
      value, positions = match.group(2), [i]
      if value is None and match.group(1) == "config" and i + 1 < len(argv):
        value, positions = argv[i + 1], [i, i + 1]
      found.append((match.group(1), value, positions))
  return found


def _last_wins(argv, config_args) -> list[str]:
  """argv with every --config / --config.<field> given more than once reduced to its last occurrence, as absl treats
  a repeated flag (a wrapper script's default, then the user's). ml_collections itself would append a repeated tuple
  override to the first ((8.0,) then (8.0, 4.0) gives (8.0, 8.0, 4.0)): here the last tuple replaces it."""
  last = {name: positions for name, _, positions in config_args}
  dropped = {i for name, _, positions in config_args if positions is not last[name] for i in positions}
  return [arg for i, arg in enumerate(argv) if i not in dropped]


def _unknown_override(config_args) -> str | None:
  """The message for the first --config.<field> that names no field, or None when every field exists (the error
  being explained is then a bug). Reloads the config file: this only runs after absl failed on one."""
  paths = [value for name, value, *_ in config_args if name == "config"]
  if not paths or paths[0] is None:
    return None
  path, *arg = paths[0].split(":", 1)
  spec = importlib.util.spec_from_file_location("colorjax_config_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(*arg)
  if not isinstance(cfg, ml_collections.ConfigDict):
    return None
  for name, *_ in config_args:
    parts, node = name.split(".")[1:], cfg
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        break
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = f"; did you mean --config.{'.'.join(parts[:depth] + close)}?" if close else ""
        return f"--{name}: config has no field {'.'.join(parts[:depth + 1])!r}{hint}"
      node = node[part]
  return None


def parse_flags(argv):
  """absl's flag parsing, with a user's mistake in the flags (unknown or repeated override, value of the wrong
  type, a config file's own ValueError such as an unknown preset) as one `colorjax: error:` line, exit 2."""
  config_args = []
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    argv = _last_wins(argv, _config_args(argv))
    config_args = _config_args(argv)
    files = [value.split(":", 1)[0] for name, value, _ in config_args if name == "config" and value]
    if files and not os.path.isfile(files[0]):
      _fail("", f"--config {files[0]}: no such file (a relative path is taken from {os.getcwd()})")
    return flags.FLAGS(argv)
  except flags.Error as e:
    root, seen = e, {id(e)}
    while root.__context__ is not None and id(root.__context__) not in seen:
      root = root.__context__
      seen.add(id(root))
    head, _, detail = str(e).partition(": ")
    if detail.startswith("Error whilst parsing config file") and isinstance(root, ValueError):
      _fail("", f"{head}: {root}")  # ml_collections puts the traceback of a config file's error in the message
    _fail("", e)
  except (AttributeError, KeyError):  # ml_collections' report of an override naming a missing field
    message = _unknown_override(config_args)
    if message is None:
      raise
    _fail("", message)


# Errors of the machine, not of colorjax: a path that is a file where a folder must be, a folder one cannot write.
PATH_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS}


def _os_error(where: str, e: OSError) -> None:
  """A path error as one line naming the path and the fix; a full disk as one line saying what a re-run keeps;
  anything else is a bug and keeps its traceback."""
  path = object_storage.as_urls(str(e.filename)) if e.filename else "a file"
  if e.errno in PATH_ERRNOS:
    _fail(where, f"{path}: {e.strerror}; every output (--config.workdir and the paths a stage writes) must be a "
                 "folder this user can create and write, and every input a file it can read: fix the path or its "
                 "permissions")
  if e.errno == errno.ENOSPC:
    sys.stderr.write(f"colorjax{' ' + where if where else ''}: error: no space left on the device while writing "
                     f"{path}. What the stage finished is kept (artifacts with a manifest, checkpoints, scored "
                     "chunks, prepared parts); a half-written file is redone: free space and re-run the same "
                     "command to resume\n")
    sys.exit(DISK_FULL_EXIT)
  raise e


def main(argv):
  where = ""
  try:
    if len(argv) > 1:
      raise errors.ConfigError(f"unexpected arguments {argv[1:]}; every setting is a --config.<field>=<value> flag")
    cfg = _CONFIG.value
    if cfg is None:
      raise errors.ConfigError("pass --config configs/<stage>.py[:arg]")
    try:
      stage_name = cfg.stage
    except OSError as e:  # ml_collections defers a config file it could not read to the first access
      raise errors.ConfigError(str(e.__cause__ or e)) from e
    if stage_name not in STAGES:
      raise errors.ConfigError(f"config.stage={stage_name!r} is not a stage; choose one of {', '.join(STAGES)}")
    where = stage_name
    if cfg.compile_load and stage_name not in ("pretrain", "finetune", "score"):
      raise errors.ConfigError(f"compile_load applies to pretrain, finetune and score runs, not {stage_name} (a "
                               "pipeline compiles its own steps; its stages can be run alone with compile_load)")
    logging.set_verbosity(logging.WARNING)  # orbax reports every save at INFO
    sharding.add_xla_flags(cfg.mesh.xla_flags)  # before anything initializes a backend
    if targets.is_slice(cfg.compile_for):
      targets.quiet_environment(cfg.compile_for)  # a TPU slice's compiler on any machine: no backend, no cluster
    else:
      sharding.maybe_initialize_distributed(cfg.mesh.distributed)
    stage = importlib.import_module(STAGES[stage_name])
    # compile_for reads no data: remote stores and work directories stay unread (nominal shapes)
    if not cfg.compile_for and object_storage.mirror_config(cfg):
      sys.stdout, sys.stderr = object_storage.UrlStream(sys.stdout), object_storage.UrlStream(sys.stderr)
    if cfg.compile_for and stage_name != "pipeline":  # the pipeline compiles its stages' steps itself
      importlib.import_module("colorjax.aot.steps").compile_stage(cfg)
    elif cfg.dry_run:
      stage.describe(cfg)
    else:
      stage.run(cfg)
      object_storage.sync()
      object_storage.clean()
  except errors.ColorjaxError as e:  # every process of a multi-host run prints its own
    _fail(where, e)
  except errors.Preempted as e:
    object_storage.sync()
    sys.stderr.write(f"colorjax{' ' + where if where else ''}: {object_storage.as_urls(str(e))}\n")
    sys.exit(128 + e.signum)
  except OSError as e:
    _os_error(where, e)
  except KeyboardInterrupt:  # a Ctrl-C outside a stage's step loop (loading, a second Ctrl-C): nothing half-written
    sys.stderr.write(f"colorjax{' ' + where if where else ''}: interrupted; finished artifacts and checkpoints are "
                     "kept, re-run the same command to resume\n")
    sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
