"""Score a pool with the prior and one or more conditional models (one vmapped pass). Arg: size (demo|tiny|150m|1.2b).

  python -m colorjax.main --config configs/score.py:150m --config.score.store=stores/c4 \
      --config.score.prior=runs/prior/params --config.score.conditionals="('runs/cond-books/params',)" \
      --config.workdir=scores/c4-books
"""
from colorjax import config


def get_config(size: str = "150m"):
  c = config.get_config()
  c.stage = "score"
  c.model = config.model_config(size)  # compute settings; the architecture comes from the params' manifests
  if size in ("tiny", "demo"):
    c.score.batch_size = 32
    c.score.loss_chunk = 8  # the fastest head chunk on CPU (docs/performance.md, CPU scoring)
  return c
