"""Train a target model on a selection: shuffled, single pass. Arg: "<size>[,anneal][,<slice>]" (size
150m|1.2b|tiny; a TPU slice such as v5p-64 sets the micro-batch and remat chosen for it, docs/tpu.md).

The schedule follows the nominal max_steps like the original (so small selections stop un-annealed) unless
",anneal" (or --config.train.anneal_to_data=True) fits it to the data.

  python -m colorjax.main --config configs/target.py:1.2b --config.data.train_store=stores/c4 \
      --config.data.index=selections/color-tau16 --config.workdir=runs/target-1.2b-color-tau16
"""
import re

from colorjax import config
from colorjax.aot import targets


def get_config(arg: str = "150m"):
  size, *options = arg.split(",")
  anneal = "anneal" in options
  slices = [o for o in options if o != "anneal"]
  if len(slices) > 1 or (slices and not re.match(r"^v\d", slices[0])):
    raise ValueError(f"target config arg {arg!r}: after the size come ',anneal' and a TPU slice (v5p-64, v5e:4x4); "
                     f"{slices[-1]!r} is neither")
  c = config.pretrain_config(size)
  c.stage = "pretrain"
  c.train.single_pass = True
  c.train.anneal_to_data = anneal
  if slices:
    c.train.micro_batch_size, c.model.remat = targets.train_defaults(size, slices[0], c.train.global_batch_size)
  return c
