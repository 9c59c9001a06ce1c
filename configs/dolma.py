"""The original CoLoR-Filter's (dolma/OLMo) files as colorjax artifacts and back. Arg: the action.

  # its token files as a store, in place (global ids = the original's)
  python -m colorjax.main --config configs/dolma.py:adopt --config.dolma.paths_from=<run>/config.yaml \
      --config.dolma.root=<run's working directory> --config.dolma.tokenizer=gpt-neox-20b-pii-special.json \
      --config.workdir=stores/pool
  # its score shards as colorjax scores (prior and each conditional: shards joined by +)
  python -m colorjax.main --config configs/dolma.py:import_scores --config.dolma.store=stores/pool \
      --config.dolma.prior=scores/prior-1+scores/prior-2 \
      --config.dolma.conditionals="('scores/cond-1+scores/cond-2',)" --config.workdir=scores/imported
  # its selected_indices.npy as a selection (train --config.data.index=selections/imported)
  python -m colorjax.main --config configs/dolma.py:import_selection --config.dolma.store=stores/pool \
      --config.dolma.selection=selection/selected_indices.npy --config.workdir=selections/imported
  # a selection as dolma/OLMo token files and Parquet, for other trainers
  python -m colorjax.main --config configs/dolma.py:export_selection --config.dolma.selection=selections/color-tau16 \
      --config.workdir=exports/color-tau16
"""
from colorjax import config

ACTIONS = ("adopt", "import_scores", "import_selection", "export_selection")


def get_config(action: str = "adopt"):
  if action not in ACTIONS:
    raise ValueError(f"unknown dolma action {action!r}; choose one of {', '.join(ACTIONS)}")
  c = config.get_config()
  c.stage = "dolma"
  c.dolma.action = action
  return c
