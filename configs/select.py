"""Select the top 1/tau of a scored pool. Arg: "<method>[,<tau>]", method color|conditional_only|random.

  python -m colorjax.main --config configs/select.py:color,16 --config.select.scores=scores/c4-books \
      --config.workdir=selections/color-tau16
"""
from colorjax import config


def get_config(arg: str = "color,16"):
  method, _, tau = arg.partition(",")
  c = config.get_config()
  c.stage = "select"
  c.select.method = method
  c.select.tau = float(tau or 16)
  return c
