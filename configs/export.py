"""Write a selection back out as text (jsonl.gz with id, score, source, text) plus a per-source breakdown.

  python -m colorjax.main --config configs/export.py --config.export.selection=sel/color-16 --config.workdir=sel/color-16-text
"""
from colorjax import config


def get_config():
  c = config.get_config()
  c.stage = "export"
  return c
