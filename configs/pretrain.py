"""Pretrain a model (the prior, or any LM) on a token store. Arg: "<size>[,<slice>]", size tiny | 150m | 1.2b; a TPU
slice (v5p-64, v5e:4x4, ...) sets the micro-batch and remat chosen for it by compiling (docs/tpu.md).

  python -m colorjax.main --config configs/pretrain.py:150m \
      --config.data.train_store=stores/c4 --config.workdir=runs/prior-150m
"""
from colorjax import config
from colorjax.aot import targets


def get_config(arg: str = "150m"):
  size, _, tpu_slice = arg.partition(",")
  c = config.pretrain_config(size)
  if tpu_slice:
    c.train.micro_batch_size, c.model.remat = targets.train_defaults(size, tpu_slice, c.train.global_batch_size)
  return c
