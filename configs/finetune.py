"""Finetune a prior into a conditional model. Arg: "<target>[,<size>[,<slice>]]", target books | tasks, size
tiny|150m|1.2b; a TPU slice such as v5p-64 sets the micro-batch and remat chosen for it (docs/tpu.md).

  books: one epoch over a token store of target-domain text (warmup 20, lr 1e-3; docs/definitions.md#recipe)
      python -m colorjax.main --config configs/finetune.py:books --config.train.init_from=runs/prior/params \
          --config.data.train_store=stores/books --config.workdir=runs/cond-books
  tasks: one epoch over the downstream tasks' train splits rendered as padded SFT rows (warmup 100, lr 1e-3)
      python -m colorjax.main --config configs/finetune.py:tasks --config.train.init_from=runs/prior/params \
          --config.sft.data_dir=../shared/data/tasks --config.workdir=runs/cond-tasks
"""
from colorjax import config
from colorjax.aot import targets

# The 7 tasks with train splits in the offline data (SciQ has none); add "sciq" when loading all 8 from the hub.
TRAIN_TASKS = ("piqa", "hellaswag", "winogrande", "openbookqa", "boolq", "arc_easy", "arc_challenge")


def get_config(arg: str = "books"):
  target, _, rest = arg.partition(",")
  size, _, tpu_slice = rest.partition(",")
  size = size or "150m"
  if target not in ("books", "tasks"):
    raise ValueError(f"finetune target {target!r}: choose books or tasks (e.g. configs/finetune.py:tasks,tiny)")
  c = config.get_config()
  c.stage = "finetune"
  c.model = config.model_config(size)
  c.train.max_steps = 0  # one epoch: the data decides the length
  c.train.single_pass = True
  c.train.anneal_to_data = True  # the schedule ends with the epoch
  c.train.warmup_steps = 20 if target == "books" else 100
  c.train.lr = 1e-3
  c.train.eval_every = 100
  c.train.checkpoint_every = 200
  if target == "tasks":
    c.sft.tasks = TRAIN_TASKS
  if size in ("tiny", "demo"):
    c.train.global_batch_size = 16
    c.train.log_every = 10
    c.train.eval_batches = 8
  if size in ("150m", "1.2b"):  # as pretrain: the whole 256-row batch in one pass needs ~160 GiB of activations
    c.train.micro_batch_size = 64 if size == "150m" else 16
  if tpu_slice:
    c.train.micro_batch_size, c.model.remat = targets.train_defaults(size, tpu_slice, c.train.global_batch_size)
  return c
