"""Tokenize text files into a token store.

  python -m colorjax.main --config configs/prepare.py \
      --config.prepare.inputs="('data/c4/*.json.gz',)" --config.prepare.tokenizer=tokenizer.json \
      --config.prepare.output=stores/c4
"""
from colorjax import config


def get_config():
  c = config.get_config()
  c.stage = "prepare"
  return c
