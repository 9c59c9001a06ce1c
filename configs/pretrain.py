"""Pretrain a model (the prior, or any LM) on a token store. Arg: model size (tiny | 150m | 1.2b).

  python -m colorjax.main --config configs/pretrain.py:150m \
      --config.data.train_store=stores/c4 --config.workdir=runs/prior-150m
"""
from colorjax import config


def get_config(size: str = "150m"):
  return config.pretrain_config(size)
