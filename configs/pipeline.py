"""The whole CoLoR-Filter pipeline in one work directory. Arg: preset (demo).

  python -m colorjax.main --config configs/pipeline.py:demo      # embedded synthetic data, CPU minutes
"""
import ml_collections

from configs import base


def get_config(preset: str = "demo"):
  if preset != "demo":
    raise ValueError(f"unknown pipeline preset {preset!r}; choose demo")
  c = base.get_config()
  c.stage = "pipeline"
  c.workdir = "runs/demo"

  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.preset = preset  # which preset built this config (informational)
  c.pipeline.seq_len = 128  # tokens per sequence of every store the pipeline prepares
  c.pipeline.synthetic_docs = 2000  # documents per synthetic domain (demo)
  c.pipeline.synthetic_seed = 0  # seed of the synthetic text (demo)
  c.pipeline.synthetic_vocab = 1024  # BPE vocabulary trained on the synthetic text (demo)

  c.prior = ml_collections.ConfigDict()
  c.prior.model = base.model_config("demo")  # the prior's architecture
  c.prior.model.vocab_size = 1024
  c.prior.train = base.train_config()  # the prior's pretraining recipe
  c.prior.train.global_batch_size = 16
  c.prior.train.max_steps = 150
  c.prior.train.warmup_steps = 15
  c.prior.train.log_every = 25
  c.prior.train.eval_every = 50
  c.prior.train.eval_batches = 4
  c.prior.train.checkpoint_every = 50
  return c
