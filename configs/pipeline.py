"""The whole CoLoR-Filter pipeline in one work directory. Arg: preset.

  demo        embedded synthetic domains and a locally trained tokenizer; no downloads; CPU minutes
  books       real text (../shared/data/corpus or --config.pipeline.data_dir): target = Shakespeare, pool = all
              sources; CPU tens of minutes
  tasks       conditional finetuned on the downstream tasks' train splits; targets scored on the 8-task suite
  paper-150m  the paper's 150M setting (pool store given by path; accelerators); check it with a dry run
  paper-1.2b  the paper's 1.2B targets (192k-step schedule) on the same selections
  books-fixed-n[,<size>]  the paper's fixed-n protocol (§5.1, Fig. 2) on books: n = the prior's tokens, every
              method selects n from nested pools of τ·n, τ = 2..16, every target trains on n; one CPU seed ~75 min
  tasks-fixed-n[,<size>]  the same with the downstream tasks as target (DSIR and RHO-down model their rendered
              train examples); CPU hours
              <size>: demo (default, CPU) | tiny | 150m | 1.2b (150m and 1.2b: the paper's prior, n = 3.1B tokens)

  python -m colorjax.main --config configs/pipeline.py:demo
  python -m colorjax.main --config configs/pipeline.py:paper-1.2b --config.dry_run=True --config.dry_run_devices=64
"""

from colorjax import config

PRESETS = ("demo", "books", "tasks", "paper-150m", "paper-1.2b", "books-fixed-n", "tasks-fixed-n")
FIXED_N_METHODS = ("color", "conditional_only", "random", "dsir", "rho_down", "rho_down_prior")  # the paper's Fig. 2
ALL_TASKS = config.ALL_TASKS


def get_config(arg: str = "demo"):
  preset, _, size = arg.partition(",")
  if preset not in PRESETS:
    raise ValueError(f"unknown pipeline preset {preset!r}; choose one of {', '.join(PRESETS)}")
  if size and not preset.endswith("fixed-n"):
    raise ValueError(f"pipeline preset {arg!r}: only the fixed-n presets take a model size after the comma")
  if size and size not in config.MODEL_SIZES:
    raise ValueError(f"pipeline preset {arg!r}: unknown model size {size!r}; choose one of "
                     f"{', '.join(config.MODEL_SIZES)}")
  c = config.pipeline_config()
  c.workdir = f"runs/{preset}"
  p = c.pipeline
  p.preset = preset

  if preset == "demo":
    p.synthetic_docs = 1200
    p.target_files = ("stories.jsonl.gz",)
    p.group_regex = ""
    p.target_split = (0.3, 0.2)
    p.target_pool_split = 0.5
    p.tokenizer_vocab = 1024
    p.seq_len = 128
    p.taus = (8.0,)
    p.seeds = (0,)
    p.curve_tau = 2.0
    c.prior.model.vocab_size = c.target.model.vocab_size = 1024
    c.prior.train.max_steps = 150
    c.target.train.global_batch_size = 8
    c.target.train.eval_every = 20
    c.score.batch_size = 64
    c.score.loss_chunk = 8  # the fastest head chunk on CPU (docs/performance.md, CPU scoring)
  elif preset == "books":
    p.max_chars_per_file = 1_000_000
    c.score.batch_size = 16  # CPU: a small step keeps each head tile in cache
    c.score.loss_chunk, c.score.vocab_tile = 32, 2048  # the fastest CPU head (docs/performance.md, CPU scoring)
  elif preset == "tasks":
    p.target = "tasks"
    p.max_chars_per_file = 1_000_000
    p.taus = (4.0,)
    c.sft.limit = 2000
    c.eval.tasks = ALL_TASKS
    c.eval.limit = 500
    c.eval.tasks_dir = ""  # set to <data>/tasks (e.g. ../shared/data/tasks); "" = HuggingFace datasets
    c.conditional.train.warmup_steps = 100
    c.score.batch_size = 16  # CPU: a small step keeps each head tile in cache
    c.score.loss_chunk, c.score.vocab_tile = 32, 2048  # the fastest CPU head (docs/performance.md, CPU scoring)
  elif preset.endswith("fixed-n"):
    _fixed_n(c, preset, size or "demo")
  else:
    _paper(c, preset)
  return c


def _fixed_n(c, preset: str, size: str):
  """The paper's Figure 2 protocol: n = the prior's tokens; τ·n-sequence nested pools; every target trains on n."""
  p = c.pipeline
  p.protocol = "fixed_n"
  p.taus = (2.0, 4.0, 8.0, 16.0)
  p.seeds = (0,)
  p.methods = FIXED_N_METHODS
  p.curve_tau = 2.0  # the random curve run: half the τ=16 pool = 8n tokens (the paper's "random with 8x data")
  p.random_budgets = (2.0, 4.0)  # random at 2n and 4n too: data efficiency read between neighbouring budgets
  c.score.batch_size = 16  # CPU: a small step keeps each head tile in cache
  c.score.loss_chunk, c.score.vocab_tile = 32, 2048  # the fastest CPU head (docs/performance.md, CPU scoring)
  if preset == "tasks-fixed-n":
    p.target = "tasks"
    c.sft.limit = 2000
    c.eval.tasks = ALL_TASKS
    c.eval.limit = 500
    c.eval.tasks_dir = ""  # set to <data>/tasks; "" = ../shared/data/tasks or HuggingFace datasets
    c.conditional.train.warmup_steps = 100
  if size in ("150m", "1.2b"):  # the paper's prior (3.1B tokens of 512) and recipe; planned with a dry run
    _paper(c, "paper-150m" if size == "150m" else "paper-1.2b")
    p.target = "tasks" if preset == "tasks-fixed-n" else "text"
    p.taus, p.curve_tau = (2.0, 4.0, 8.0, 16.0), 2.0
    p.pool_sequences = 16 * 24_000 * 256 + 24_000 * 256  # dry runs: the τ=16 pool and the prior's own data
    p.target_sequences = 114_170 if p.target == "tasks" else 200_000
    c.target.train.max_steps = 24_000 if size == "150m" else 192_000
    c.reference.train = config.train_config()
    c.reference.train.micro_batch_size = 64
    c.reference.train.max_steps = 0
    c.reference.train.single_pass = True
    return
  c.prior.model = config.model_config(size)
  c.target.model = config.model_config(size)
  c.prior.model.vocab_size = c.target.model.vocab_size = 4096
  p.max_chars_per_file = 6_000_000  # the τ=16 pool needs 51,200 sequences; this pool holds ~60k
  c.prior.train.max_steps = 200  # n = 200 x 16 x 256 = 819,200 tokens; the τ=16 pool: 13.1M tokens


def _paper(c, preset: str):
  """docs/definitions.md: 150M prior 24k x 256 x 512 on C4, conditionals on tasks, taus 7..64, 150M or 1.2B targets."""
  p = c.pipeline
  p.target = "tasks"
  p.tokenizer = "gpt-neox-20b-pii-special.json"  # GPT-NeoX-20B; point at your copy
  p.seq_len = 512
  p.taus = (7.0, 16.0, 32.0, 64.0)
  p.seeds = (0,)
  p.curve_tau = 0.0
  p.pool_sequences = 342_000_000  # C4: ~175B tokens in 512-token sequences (docs/definitions.md#pipeline)
  p.target_sequences = 114_170  # the 7 offline tasks' train documents, one SFT row each
  c.eval.tasks = ALL_TASKS
  c.eval.batch_size = 64  # held-out loss as the original: 100 batches x 64 shuffled sequences per eval (the recipe)
  c.eval.shuffle = True
  c.sft.loss_on_padding = True  # the original's SFT loss counted PAD positions (the recipe); False = the fix
  c.prior.model = config.model_config("150m")
  c.prior.train = config.train_config()  # 24,000 x 256 x 512, warmup 1000, docs/definitions.md#recipe
  c.prior.train.micro_batch_size = 64
  c.conditional.train = config.train_config()
  c.conditional.train.max_steps = 0
  c.conditional.train.single_pass = True
  c.conditional.train.anneal_to_data = True
  c.conditional.train.warmup_steps = 100
  c.conditional.train.micro_batch_size = 64
  size = "150m" if preset == "paper-150m" else "1.2b"
  c.target.model = config.model_config(size)
  c.target.train = config.train_config()
  c.target.train.single_pass = True
  c.target.train.anneal_to_data = False  # the original: schedule on the nominal max_steps
  c.target.train.eval_every = 2000
  c.target.train.micro_batch_size = 64 if size == "150m" else 16
  if size == "1.2b":
    c.target.train.max_steps = 192_000
    c.target.train.warmup_steps = 8000
  for t in (c.prior.train, c.conditional.train, c.target.train):  # each stage reads its own train section
    t.eval_batches = 100
  c.score.batch_size = 256
  c.score.loss_chunk = 64
