"""Command line: `python -m colorjax.main --config configs/<stage>.py[:arg] [--config.key=value ...]`.

Parses the (locked) config and dispatches `config.stage`; every stage lives in its own module.
"""
import importlib

from absl import app
from absl import logging
from ml_collections import config_flags

from colorjax import sharding

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
    "pipeline": "colorjax.pipeline",
    "report": "colorjax.report",
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.<field>=<value> flag")
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("pass --config configs/<stage>.py[:arg]")
  if cfg.stage not in STAGES:
    raise app.UsageError(f"config.stage={cfg.stage!r} is not a stage; choose one of {', '.join(STAGES)}")
  logging.set_verbosity(logging.WARNING)  # orbax reports every save at INFO
  sharding.add_xla_flags(cfg.mesh.xla_flags)  # before anything initializes a backend
  sharding.maybe_initialize_distributed(cfg.mesh.distributed)
  stage = importlib.import_module(STAGES[cfg.stage])
  if cfg.dry_run:
    stage.describe(cfg)
  else:
    stage.run(cfg)


if __name__ == "__main__":
  app.run(main)
