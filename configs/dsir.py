"""DSIR: resample 1/tau of a pool toward a target store by hashed n-gram importance weights. Arg: tau.

  python -m colorjax.main --config configs/dsir.py:16 --config.dsir.store=stores/pool \
      --config.dsir.target=stores/target --config.workdir=selections/dsir-tau16
"""
from colorjax import config


def get_config(arg: str = "16"):
  c = config.get_config()
  c.stage = "dsir"
  c.dsir.tau = float(arg or 16)
  return c
