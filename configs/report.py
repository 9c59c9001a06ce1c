"""Regenerate report.md / report.json / plots of a pipeline work directory.

  python -m colorjax.main --config configs/report.py --config.workdir=runs/books
"""
from colorjax import config


def get_config():
  c = config.get_config()
  c.stage = "report"
  return c
