"""Evaluate a params export: held-out LM losses and zero-shot multiple-choice accuracy. Arg: size (sets batch sizes;
the architecture always comes from the export's manifest).

  python -m colorjax.main --config configs/eval.py:150m --config.eval.params=runs/target/params \
      --config.eval.tasks_dir=../shared/data/tasks --config.data.eval_stores="('books=stores/books-val',)"
"""
from colorjax import config
from colorjax.data import tasks


def get_config(size: str = "150m"):
  c = config.get_config()
  c.stage = "eval"
  c.model = config.model_config(size)
  c.eval.tasks = tasks.TASK_NAMES
  c.eval.batch_size = 64 if size in ("150m", "1.2b") else 16
  c.eval.batch_tokens = 65536 if size in ("150m", "1.2b") else 16384
  c.train.eval_batches = 0  # the whole held-out store
  return c
