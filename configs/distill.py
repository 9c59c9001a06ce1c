"""CoLoR at a fraction of the scoring cost: score a sample, distill a fast n-gram scorer, select by it. Arg: tau.

  python -m colorjax.main --config configs/distill.py:16 --config.distill.store=stores/pool \
      --config.distill.prior=runs/prior/params --config.distill.conditional=runs/cond/params \
      --config.workdir=selections/distilled-tau16
"""
from colorjax import config


def get_config(tau: str = "8"):
  c = config.get_config()
  c.stage = "distill"
  c.model = config.model_config("demo")  # compute settings; the architecture comes from the params' manifests
  c.distill.tau = float(tau)
  c.score.batch_size = 64
  c.score.loss_chunk = 8  # the fastest head chunk on CPU (docs/performance.md, CPU scoring)
  return c
