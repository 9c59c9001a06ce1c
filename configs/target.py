"""Train a target model on a selection: shuffled, single pass. Arg: "<size>[,anneal]" (size 150m|1.2b|tiny).

The schedule follows the nominal max_steps like the original (so small selections stop un-annealed) unless
",anneal" (or --config.train.anneal_to_data=True) fits it to the data.

  python -m colorjax.main --config configs/target.py:1.2b --config.data.train_store=stores/c4 \
      --config.data.index=selections/color-tau16 --config.workdir=runs/target-1.2b-color-tau16
"""
from colorjax import config


def get_config(arg: str = "150m"):
  size, _, anneal = arg.partition(",")
  if anneal not in ("", "anneal"):
    raise ValueError(f"target config arg {arg!r}: the only option after the size is ',anneal'")
  c = config.pretrain_config(size)
  c.stage = "pretrain"
  c.train.single_pass = True
  c.train.anneal_to_data = anneal == "anneal"
  return c
