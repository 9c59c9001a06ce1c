"""Pretrain a model (the prior, or any LM) on a token store. Arg: model size (tiny | 150m | 1.2b).

  python -m colorjax.main --config configs/pretrain.py:150m \
      --config.data.train_store=stores/c4 --config.workdir=runs/prior-150m
"""
from configs import base


def get_config(size: str = "150m"):
  c = base.get_config()
  c.stage = "pretrain"
  c.model = base.model_config(size)
  if size in ("tiny", "demo"):
    c.model.max_seq_len = 512
    c.train.global_batch_size = 16
    c.train.max_steps = 300
    c.train.warmup_steps = 30
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
  if size in ("150m", "1.2b"):  # the paper's models: held-out loss on 100 x 64 shuffled sequences (SPEC §3)
    c.train.eval_batches = 100
    c.eval.batch_size = 64
    c.eval.shuffle = True
  if size == "150m":
    c.train.micro_batch_size = 64  # 4 accumulation steps: fits one 80 GB GPU (see the dry run's memory estimate)
  if size == "1.2b":
    c.train.max_steps = 192000  # the paper's 1.2B schedule (SPEC §1); prior/aux models use 150m
    c.train.warmup_steps = 8000
    c.train.micro_batch_size = 16
  return c
