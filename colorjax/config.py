"""The config schema: the one config every stage shares; the presets in configs/ override a few fields of it.

Every field has a default and a one-line comment. `main.py` locks the config, so an override that names a field
that does not exist (a typo) fails before anything runs. It lives in the package (not in configs/) so that library
code reads the schema without importing the presets, and the presets import nothing but colorjax.
"""
import ml_collections

# Model sizes. The 150m and 1.2b rows are the paper's (docs/definitions.md#model); tiny is for CPU development.
MODEL_SIZES = {
    "demo": dict(d_model=64, n_layers=2, n_heads=2, mlp_hidden=256),
    "tiny": dict(d_model=128, n_layers=2, n_heads=2, mlp_hidden=512),
    "150m": dict(d_model=1024, n_layers=12, n_heads=16, mlp_hidden=4096),
    "1.2b": dict(d_model=2048, n_layers=24, n_heads=32, mlp_hidden=8192),
}


def model_config(size: str = "150m") -> ml_collections.ConfigDict:
  """OLMo-style decoder hyperparameters (docs/definitions.md#model)."""
  if size not in MODEL_SIZES:
    raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
  m = ml_collections.ConfigDict()
  m.size = size  # name of the size preset these numbers came from (informational)
  m.d_model = MODEL_SIZES[size]["d_model"]  # residual stream width
  m.n_layers = MODEL_SIZES[size]["n_layers"]  # number of transformer blocks
  m.n_heads = MODEL_SIZES[size]["n_heads"]  # attention heads (head dim = d_model / n_heads)
  m.mlp_hidden = MODEL_SIZES[size]["mlp_hidden"]  # MLP hidden width
  m.vocab_size = 50304  # embedding rows: the tokenizer's vocab padded to a multiple of 64
  m.max_seq_len = 512  # longest sequence the model is trained/evaluated on
  m.rope_theta = 10000.0  # RoPE base
  m.norm_eps = 1e-5  # LayerNorm epsilon
  m.compute_dtype = "bfloat16"  # matmul/attention dtype; params, optimizer, norm statistics, softmax, losses fp32
  m.precision = "original"  # original (bf16 residual stream and logits, as the paper's runs) | fp32_residual
  m.attention = "auto"  # attention kernel: auto (cudnn on GPU with bf16, else xla) | xla | cudnn
  m.remat = False  # recompute each block in the backward pass (less memory, ~1/3 more compute)
  return m


def train_config() -> ml_collections.ConfigDict:
  """Optimizer, schedule, batch and loop settings (docs/definitions.md#recipe); every training stage shares it."""
  t = ml_collections.ConfigDict()
  t.global_batch_size = 256  # sequences per optimizer step (all hosts together)
  t.micro_batch_size = 0  # sequences per forward/backward pass; 0 = whole batch (no accumulation)
  t.max_steps = 24000  # nominal length, on which the LR schedule is defined (<= 0: one pass over the data)
  t.lr = 1e-3  # peak learning rate
  t.warmup_steps = 1000  # linear warmup from min_lr_ratio*lr to lr (the 150M prior and targets; 1.2B: 8000)
  t.min_lr_ratio = 0.1  # warmup start and cosine floor, as a fraction of lr
  t.b1 = 0.9  # AdamW beta1
  t.b2 = 0.95  # AdamW beta2
  t.eps = 1e-15  # AdamW epsilon
  t.weight_decay = 0.0  # AdamW decoupled weight decay
  t.grad_clip = 1.0  # global gradient-norm clip
  t.z_loss = 1e-4  # weight of mean(logsumexp^2) added to the training loss
  t.loss_chunk = 128  # output head + loss over this many positions (x all rows) at a time (0 = all at once)
  t.single_pass = False  # stop when the data (store or index) is used once instead of at max_steps
  t.anneal_to_data = False  # single pass: define the schedule on the data size, not max_steps
  t.init_from = ""  # params export to start from (finetune); empty = fresh init
  t.rho_tau = 0.0  # RHO-down: per step, train on the batch of rho_tau x batch candidates with most reducible loss
  t.rho_reference = ""  # RHO-down: params export of the fixed reference (target-only model, or the conditional)
  t.log_every = 10  # steps between console/metrics.jsonl lines
  t.eval_every = 500  # steps between held-out evals (0 = only at the end)
  t.eval_batches = 20  # batches of each eval store per eval (0 = the whole store)
  t.checkpoint_every = 1000  # steps between checkpoints (0 = only at the end)
  t.checkpoint_minutes = 0.0  # also checkpoint when this many minutes passed since the last save (0 = off)
  t.keep_checkpoints = 2  # checkpoints kept on disk
  t.resume = False  # continue the run in workdir from its latest checkpoint
  t.peak_flops = 0.0  # per-device peak FLOP/s for MFU (0 = look up by device kind)
  t.tensorboard = False  # mirror train/eval scalars to TensorBoard files in <workdir>/tensorboard (extra: tensorboard)
  t.wandb_project = ""  # mirror them to this Weights & Biases project ("" = off; extra: wandb; WANDB_MODE applies)
  return t


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"  # what main runs: one of main.STAGES (prepare, pretrain, score, select, pipeline, ...)
  c.workdir = ""  # run folder: config, metrics.jsonl, checkpoints and outputs of this stage
  c.seed = 0  # seeds init and data order; data order depends only on (seed, step)
  c.dry_run = False  # validate, build everything abstractly, print sizes/FLOPs/memory, exit
  c.dry_run_devices = 0  # dry run only: pretend the mesh has this many devices (0 = the real ones)
  c.profile_steps = ""  # "a:b": jax.profiler trace of steps [a, b) of train/score into <workdir>/profile
  c.compile_for = ""  # compile every jitted step for a TPU slice (v5p:2x2x2, v5litepod-16) or "local"; run nothing
  c.compile_save = ""  # compile_for: write each step's serialized executable and its manifest into this folder
  c.compile_load = ""  # a run: take its train/score step from this folder (refused unless everything matches)
  c.compile_estimate = True  # compile_for: also compile each step with loops unrolled for the cost estimate

  c.model = model_config("150m")

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data-parallel replicas (params replicated across this axis)
  c.mesh.fsdp = -1  # FSDP shards (params/optimizer sharded, batch split); -1 = all remaining devices
  c.mesh.tensor = 1  # tensor-parallel shards of heads/MLP/vocab
  c.mesh.distributed = "auto"  # multi-host init: auto (when the environment names a cluster) | on | off
  # Added to $XLA_FLAGS (a flag already there wins; "" = none). Triton GEMMs off: cuBLAS was faster on the
  # 150M/1.2B shapes (H200, jax 0.11.2: train +1.5%, scoring +3.5%; docs/performance.md).
  c.mesh.xla_flags = "--xla_gpu_enable_triton_gemm=false"

  c.prepare = ml_collections.ConfigDict()
  c.prepare.inputs = ()  # text files or globs (jsonl, jsonl.gz, txt, txt.gz); order kept, each glob sorted
  c.prepare.output = ""  # token store folder to write (must not exist yet, unless resuming a partial one)
  c.prepare.tokenizer = ""  # path to a tokenizer.json, or a name `tokenizers` can fetch when online
  c.prepare.eos_id = -1  # end-of-document token id (-1 = the tokenizer's <|endoftext|>, </s> or <eos>)
  c.prepare.pad_id = -1  # padding token id (-1 = the tokenizer's <|padding|>, <pad> or [PAD])
  c.prepare.seq_len = 512  # tokens per stored sequence
  c.prepare.text_field = "text"  # JSON field holding a document's text
  c.prepare.source_field = "source"  # JSON field naming a document's source (optional; else the file stem)
  c.prepare.workers = 0  # tokenizer worker processes (0 = one per CPU core, at most one per file)
  c.prepare.docs_per_chunk = 512  # documents per encode_batch call

  c.data = ml_collections.ConfigDict()
  c.data.train_store = ""  # token store to train on
  c.data.index = ""  # ids to train on: a selection folder or its index.npy (any 1-D .npy of ids); "" = whole store
  c.data.eval_stores = ()  # held-out LM-loss sets as "name=path" token stores
  c.data.prefetch = 4  # batches the background loader keeps ready

  c.sft = ml_collections.ConfigDict()
  c.sft.tasks = ()  # finetune on these tasks' rows (context + gold continuation); empty = data.train_store
  c.sft.data_dir = ""  # folder of <task>/<split>.jsonl(.gz) files; empty = HuggingFace datasets (online)
  c.sft.train_split = "train"  # split rendered into training rows
  c.sft.limit = 0  # documents per task and split (0 = all)
  c.sft.eval_split = "validation"  # split rendered into the held-out set "tasks_<split>" ("" = none)
  c.sft.loss_on_padding = False  # True reproduces the original: loss also on PAD positions of padded SFT rows

  c.eval = ml_collections.ConfigDict()
  c.eval.params = ""  # eval stage: the params export to evaluate (<run>/params)
  c.eval.tasks = ()  # multiple-choice tasks (eval stage, and in-loop during training when set)
  c.eval.tasks_dir = ""  # folder of <task>/<split>.jsonl(.gz) files; empty = HuggingFace datasets (online)
  c.eval.split = ""  # split for every task ("" = each task's eval split of docs/definitions.md#tasks-and-metrics)
  c.eval.limit = 0  # documents per task (0 = all)
  c.eval.batch_size = 0  # sequences per held-out eval batch (0 = the train micro-batch)
  c.eval.shuffle = False  # held-out: a fixed seeded random sample of each store, not its first batches in id order
  c.eval.batch_tokens = 16384  # tokens per multiple-choice batch (batch = this / bucket length)
  c.eval.tokenizer = ""  # tokenizer.json for the prompts ("" = the one the params or store carry)

  c.score = ml_collections.ConfigDict()
  c.score.store = ""  # the pool token store to score
  c.score.prior = ""  # params export of the prior model
  c.score.conditionals = ()  # params exports of one or more conditional models (same architecture as the prior)
  c.score.batch_size = 256  # sequences per scoring step (all hosts together)
  c.score.loss_chunk = 64  # head + log-softmax over this many positions at a time (bounds logits memory)
  c.score.vocab_tile = 0  # head + log-softmax over this many vocabulary columns at a time, online (0 = all at once)
  c.score.fp8 = False  # opt-in: trunk matmuls in fp8 e4m3 (H100/H200 fp8 GEMMs); changes the scores (performance.md)
  c.score.tokens_per_s_per_device = 464_000.0  # dry-run time estimate: pool tok/s per device (150M x2, one H200)
  c.score.chunk_rows = 0  # rows per output chunk, the unit of writing and resuming (0 = about 65,536)
  c.score.shard = ""  # "i/n": score only the i-th of n row ranges (independent jobs, one shared output)
  c.score.index = ""  # score only these pool sequences: a selection folder or .npy of ids ("" = the whole pool)
  c.score.prefix_fractions = (0.25, 0.5)  # also record the mean NLL of these leading shares of each sequence
  c.score.verify = False  # re-read every chunk marked done and re-score the unreadable or NaN ones (a disk fault)

  c.select = ml_collections.ConfigDict()
  c.select.scores = ""  # score folder written by the score stage
  c.select.store = ""  # method random without scores: the pool store to draw from ("" = the scores' store)
  c.select.method = "color"  # color (NLL_prior - NLL_cond) | conditional_only (-NLL_cond) | random
  c.select.conditional = "conditional_0"  # which conditional column of the scores to use
  c.select.tau = 16.0  # keep the top floor(N / tau) sequences
  c.select.tokens = 0  # instead of tau: keep floor(tokens / seq_len) sequences (0 = use tau)
  c.select.block_rows = 1 << 20  # rows per streamed block (memory is O(block_rows), not O(N))
  c.select.within = ""  # select among these pool sequences only: a selection folder or .npy (a fixed-n pool)

  c.export = ml_collections.ConfigDict()
  c.export.selection = ""  # selection folder (select stage output) whose sequences to write out as text
  c.export.max_rows = 0  # write at most this many sequences (0 = all), in id order

  c.olmo = ml_collections.ConfigDict()
  c.olmo.mode = "import"  # import (OLMo checkpoint -> params export) | export (params export -> OLMo checkpoint)
  c.olmo.weights = ""  # import: an OLMo checkpoint's model.safetensors or model.pt, or the folder holding it
  c.olmo.config = ""  # import: that checkpoint's config.yaml ("" = the one beside the weights)
  c.olmo.tokenizer = ""  # import: its tokenizer.json ("" = the shared GPT-NeoX pii-special if config.yaml names it)
  c.olmo.params = ""  # export: the params export to write in OLMo's format (<run>/params)

  c.dolma = ml_collections.ConfigDict()
  c.dolma.action = "adopt"  # adopt | import_scores | import_selection | export_selection; output goes to workdir
  c.dolma.paths = ()  # adopt: token files, globs or folders (globs and folders: *.npy sorted), in global-id order
  c.dolma.paths_from = ""  # adopt: an original run's config.yaml; its data.paths are the files (original order)
  c.dolma.root = ""  # adopt: folder that relative paths are taken from when not found as given (paths_from's run)
  c.dolma.dtype = ""  # adopt: token dtype of the files, uint16 | uint32 ("" = paths_from's data.memmap_dtype)
  c.dolma.seq_len = 0  # adopt: tokens per sequence, the original's chunk_size (0 = model.max_sequence_length)
  c.dolma.tokenizer = ""  # adopt: the tokenizer.json the tokens were made with (the original's gpt-neox-20b one)
  c.dolma.eos_id = -1  # adopt: end-of-document id (-1 = paths_from's model.eos_token_id, else the tokenizer's)
  c.dolma.pad_id = -1  # adopt: padding id (-1 = paths_from's model.pad_token_id, else the tokenizer's)
  c.dolma.labels = ()  # adopt: a source name per file (names may repeat); empty = each file's stem
  c.dolma.store = ""  # import_scores / import_selection: the adopted store the original scored / selected
  c.dolma.prior = ""  # import_scores: the prior's score folders joined by "+" (as the original's extra_data_paths)
  c.dolma.conditionals = ()  # import_scores: per conditional model, its score folders joined by "+"
  c.dolma.models = ()  # import_scores: params exports (or ids) of prior + conditionals; empty = ids of the scores
  c.dolma.rows = 0  # import_scores: rows each full scoring shard wrote (steps x batch); 0 = decide from the files
  c.dolma.selection = ""  # import_selection: selected_indices.npy; export_selection: a colorjax selection folder
  c.dolma.formats = ("tokens", "parquet")  # export_selection: dolma/OLMo token files and/or Parquet
  c.dolma.max_tokens_per_file = 1 << 30  # export_selection: tokens per token file at most (whole sequences)
  c.dolma.rows_per_file = 100_000  # export_selection: sequences per Parquet file at most

  c.hub = ml_collections.ConfigDict()  # the `hub` stage (interop/hub.py); any path elsewhere may be hf:// too
  c.hub.action = "models"  # models | selection | push_selection | push_model | transformers | lm_eval
  c.hub.repo = "hlzhang109/CoLoR-filter"  # models / selection: the original's release, or a repo laid out as it
  c.hub.revision = "main"  # branch, tag or commit of hub.repo; the commit it resolves to is in every artifact made
  c.hub.models = ("prior", "conditional_all")  # models: folders of models/ to import (registry names are mapped)
  c.hub.tokenizer = ""  # models / selection: the models' tokenizer.json, a path or hf:// ("" = the shared NeoX one)
  c.hub.target = "all"  # selection: which released selection, indices/c4-<target>-tau=<tau> (all | books)
  c.hub.tau = 64  # selection: its tau (7, 16, 32 or 64 in the release)
  c.hub.token_files = ()  # selection: full_data/c4 file names in global-id order (empty = name order, checked)
  c.hub.check_ids = "refuse"  # selection: rescore rows of each file to check the id order: refuse | warn | off
  c.hub.check_rows = 4  # selection: rows of each token file the check rescores with the released prior
  c.hub.check_tolerance = 0.05  # selection: largest |rescored - released prior NLL| of the same row (bf16 runs)
  c.hub.params = ""  # push_model / transformers / lm_eval: a params export (<run>/params; hf:// works too)
  c.hub.selection = ""  # push_selection: a selection folder (select, dsir, distill or dolma import_selection)
  c.hub.push_to = ""  # push_selection / push_model: the repo to commit to, <org>/<name> (created when missing)
  c.hub.private = True  # push_*: a repo created by the push is private
  c.hub.message = ""  # push_*: the commit message ("" = names the artifact and its id)
  c.hub.push_params = True  # push_model: also push the colorjax params export (params/, readable as hf://...)
  c.hub.lm_eval_tasks = ()  # lm_eval: lm-evaluation-harness task names (needs pip install -e .[lm_eval])
  c.hub.lm_eval_limit = 0  # lm_eval: documents per task (0 = all)
  c.hub.lm_eval_fewshot = 0  # lm_eval: few-shot examples per prompt
  c.hub.lm_eval_include = ""  # lm_eval: a folder of more task YAMLs (your own or offline tasks; "" = the harness's)

  c.distill = ml_collections.ConfigDict()
  c.distill.method = "color_distilled"  # color_distilled (top 1/tau by prediction) | color_cascade (rescore, below)
  c.distill.cascade_factor = 1.5  # color_cascade: rescore the unsampled top cascade_factor/tau by prediction
  c.distill.store = ""  # pool token store to select from
  c.distill.within = ""  # select among these pool sequences only: a selection folder or .npy (a fixed-n pool)
  c.distill.prior = ""  # params export of the prior (labels the sample with the conditional)
  c.distill.conditional = ""  # params export of the conditional
  c.distill.scorer = ""  # a fitted scorer folder to reuse ("" = fit one: sample, score the sample, fit)
  c.distill.parts = ""  # folder of the sample, its scores, the scorer and the predictions ("" = <workdir>-parts)
  c.distill.sample_size = 200_000  # sequences the prior and conditional score to label the scorer (0 = no cap)
  c.distill.sample_fraction = 0.1  # ...at most this share of what the sample is drawn from (small pools)
  c.distill.sample_within = ""  # draw the sample from these pool sequences (a selection folder; "" = the candidates)
  c.distill.seed = 0  # seed of the sample, its folds and the fit (not the target runs' seeds)
  c.distill.holdout_fraction = 0.2  # cross-fitting: 1/holdout_fraction folds, each holds out this share
  c.distill.objective = "mse"  # the fit's loss: mse (scores) | ordinal (logistic on "in the top q", q = 1/2..1/64)
  c.distill.eval_every = 100  # fit steps between held-out evaluations (early stopping at the best)
  c.distill.target_recall = 0.97  # color_cascade: rescore the fewest reaching this estimated recall (0: cascade_factor)
  c.distill.buckets = 1 << 18  # hashed n-gram feature buckets
  c.distill.ngram = 2  # token n-gram orders 1..ngram
  c.distill.steps = 3000  # Adam steps of each fold's fit, at most (early stopping)
  c.distill.batch = 256  # sampled sequences per fit step
  c.distill.lr = 0.01  # Adam learning rate
  c.distill.l2 = 0.0  # weight decay of the linear model's weights (L2 penalty)
  c.distill.tau = 8.0  # keep the top 1/tau of the pool by predicted score
  c.distill.tokens = 0  # or a token budget (whole sequences; 0 = use tau)
  c.distill.block_rows = 4096  # pool rows predicted (and written, with a done flag) at a time
  c.dsir = ml_collections.ConfigDict()
  c.dsir.store = ""  # pool token store to resample from
  c.dsir.target = ""  # target token store whose n-gram distribution the selection should match (same tokenizer)
  c.dsir.within = ""  # resample among these pool sequences only: a selection folder or .npy (a fixed-n pool)
  c.dsir.buckets = 10000  # hash buckets of the n-gram features (the paper's 10,000)
  c.dsir.ngram = 2  # hash token n-grams of orders 1..ngram (2 = unigrams + bigrams, as the paper)
  c.dsir.smoothing = 1e-8  # added to each bucket probability before the log (the data-selection package's)
  c.dsir.tau = 16.0  # keep floor(N / tau) sequences
  c.dsir.tokens = 0  # instead of tau: keep floor(tokens / seq_len) sequences (0 = use tau)
  c.dsir.seed = -1  # seed of the Gumbel noise and the raw sample (-1 = the top-level seed)
  c.dsir.raw_tokens = 0  # fit the raw (pool) model on a uniform sample of about this many tokens (0 = whole pool)
  c.dsir.block_rows = 1 << 13  # pool rows hashed per block (memory ~ block_rows x seq_len x 50 bytes)

  c.train = train_config()
  return c


def with_fields(cfg, fields: dict) -> ml_collections.ConfigDict:
  """A copy of cfg with dotted fields (`"train.micro_batch_size": 8`) set; the copy is locked as cfg is."""
  out = cfg.copy_and_resolve_references()
  with out.unlocked():
    for dotted, value in fields.items():
      *parents, leaf = dotted.split(".")
      node = out
      for part in parents:
        node = node[part]
      node[leaf] = value
  return out


def stage_config(cfg, stage: str, **sections) -> ml_collections.ConfigDict:
  """A single-stage config derived from the pipeline's: shared sections copied, then the given ones."""
  out = get_config()
  out.stage = stage
  out.seed = cfg.seed
  out.dry_run_devices = cfg.dry_run_devices
  out.profile_steps = cfg.profile_steps
  for name in ("mesh", "data", "eval", "sft", "score", "select", "dsir", "distill", "prepare"):
    out[name] = ml_collections.ConfigDict(cfg[name].to_dict())
  for name, value in sections.items():
    out[name] = ml_collections.ConfigDict(value.to_dict()) if isinstance(value, ml_collections.ConfigDict) else value
  return out


def pretrain_config(size: str = "150m") -> ml_collections.ConfigDict:
  """The pretrain stage at a model size: the paper's eval and micro-batch settings at 150m/1.2b, a short CPU run at
  tiny/demo. configs/pretrain.py and configs/target.py start from it."""
  c = get_config()
  c.stage = "pretrain"
  c.model = model_config(size)
  if size in ("tiny", "demo"):
    c.model.max_seq_len = 512
    c.train.global_batch_size = 16
    c.train.max_steps = 300
    c.train.warmup_steps = 30
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
  if size in ("150m", "1.2b"):  # the paper's models: held-out loss on 100 x 64 shuffled sequences (the recipe)
    c.train.eval_batches = 100
    c.eval.batch_size = 64
    c.eval.shuffle = True
  if size == "150m":
    c.train.micro_batch_size = 64  # 4 accumulation steps: fits one 80 GB GPU (see the dry run's memory estimate)
  if size == "1.2b":
    c.train.max_steps = 192000  # the paper's 1.2B schedule (docs/definitions.md#pipeline); prior/aux models use 150m
    c.train.warmup_steps = 8000
    c.train.micro_batch_size = 16
  return c


# ----------------------------------------------------------------------------------------------------------------
# The pipeline's sections: pipeline (the experiment), prior, conditional, reference and target (each step's recipe)

TASKS_WITH_TRAIN = ("piqa", "hellaswag", "winogrande", "openbookqa", "boolq", "arc_easy", "arc_challenge")
ALL_TASKS = ("piqa", "hellaswag", "winogrande", "openbookqa", "boolq", "sciq", "arc_easy", "arc_challenge")


def small_train(steps: int, batch: int = 16, warmup: int = 10) -> ml_collections.ConfigDict:
  """A short CPU recipe: the pipeline presets' prior, conditional, reference and targets start from it."""
  t = train_config()
  t.global_batch_size = batch
  t.max_steps = steps
  t.warmup_steps = warmup
  t.log_every = 25
  t.eval_every = 0
  t.eval_batches = 0
  t.checkpoint_every = 200
  return t


def pipeline_config() -> ml_collections.ConfigDict:
  """The pipeline stage's config: every stage's sections, plus the pipeline's own (configs/pipeline.py's presets
  override some)."""
  c = get_config()
  c.stage = "pipeline"
  c.workdir = "runs/pipeline"

  p = c.pipeline = ml_collections.ConfigDict()
  p.preset = ""  # which preset built this config (recorded in the report)
  p.target = "text"  # text: target = held-out documents of target files | tasks: the downstream task suite
  p.data_dir = ""  # folder the file lists below are relative to ("" = $COLORJAX_DATA/corpus or ../shared/data/corpus)
  p.target_files = ("shakespeare.jsonl.gz",)  # target-domain documents (split into finetune / eval / pool parts)
  p.target_split = (0.4, 0.2)  # fractions of target works used to finetune the conditional and to evaluate
  p.target_pool_split = 0.4  # fraction of target works put into the candidate pool (the rest is unused)
  p.group_field = ""  # JSON field naming each target document's work (same value = one work; "" = group_regex)
  p.group_regex = r"\n\nby William Shakespeare"  # a document matching this starts a new work ("" = each doc)
  p.split_seed = 0  # seed of the work-level split and of pool sampling
  p.pool_files = ("*.jsonl.gz",)  # candidate pool files (target files are swapped for their pool part)
  p.max_chars_per_file = 0  # sample whole documents up to about this many characters per pool file (0 = all)
  p.tokenizer = ""  # tokenizer.json for every store ("" = train a byte-level BPE on the pool text)
  p.tokenizer_vocab = 4096  # vocabulary of that BPE (model.vocab_size must be >= it, a multiple of 64)
  p.seq_len = 256  # tokens per sequence of every store
  p.tasks = TASKS_WITH_TRAIN  # target=tasks: tasks whose train splits finetune the conditional
  p.taus = (4.0, 8.0)  # selection ratios: keep the top 1/tau of the pool
  p.protocol = "fixed_pool"  # fixed_pool: keep 1/tau of one pool | fixed_n: keep n (the prior's tokens) of tau*n
  p.seeds = (0, 1)  # target-model seeds (init and data order; and the random selection's draw)
  p.methods = ("color", "random")  # compared at each tau: color random conditional_only dsir rho_down rho_down_prior
  p.curve_tau = 2.0  # one random run per seed over 1/curve_tau of the pool, its learning curve gives data efficiency
  p.curve_eval_every = 0  # eval interval of those curve runs (0 = the target's train.eval_every)
  p.random_budgets = ()  # fixed n: more random runs on these multiples of n (from the largest pool), e.g. (2, 4)
  p.synthetic_docs = 0  # demo: documents per synthetic domain (0 = read real files instead)
  p.synthetic_seed = 0  # demo: seed of the synthetic text
  p.pool_store = ""  # paper presets: an existing pool token store (skips split and prepare)
  p.target_train_store = ""  # paper presets, target=text: token store of target text for the conditional
  p.target_eval_store = ""  # paper presets, target=text: held-out target token store
  p.pool_sequences = 0  # dry runs: pool size to plan with when the pool store does not exist yet
  p.target_sequences = 0  # dry runs: conditional's data size to plan with
  p.chars_per_token = 4.0  # dry runs: characters per token, to estimate store sizes from the input text's size
  p.on_stale = "refuse"  # stale artifacts in the work directory: refuse (list them) | redo (move to stale/, rebuild)

  c.prior = ml_collections.ConfigDict()
  c.prior.model = model_config("demo")  # the prior's (and conditional's) architecture
  c.prior.model.vocab_size = 4096
  c.prior.train = small_train(600)  # the prior's pretraining recipe
  c.conditional = ml_collections.ConfigDict()
  c.conditional.train = small_train(0, warmup=20)  # finetuning recipe: one epoch (max_steps <= 0)
  c.conditional.train.single_pass = True
  c.conditional.train.anneal_to_data = True
  c.reference = ml_collections.ConfigDict()
  c.reference.train = small_train(300, warmup=20)  # RHO-down's reference: trained from scratch on the target text
  c.target = ml_collections.ConfigDict()
  c.target.model = model_config("demo")  # the target models' architecture
  c.target.model.vocab_size = 4096
  c.target.train = small_train(100000)  # target recipe: single pass over each selection
  c.target.train.single_pass = True
  c.target.train.anneal_to_data = True  # miniature: each run completes its schedule (paper presets: nominal)
  c.target.train.eval_every = 100
  return c
