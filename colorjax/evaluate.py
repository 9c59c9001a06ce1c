"""Evaluation: held-out LM loss on token stores, zero-shot multiple choice on the 8 tasks, and the `eval` stage.

Held-out loss is the mean over sequences of each sequence's mean next-token CE (fp32, no z-loss) at the store's
sequence length, i.e. the training context length, over train.eval_batches batches: the store's first sequences, or
with eval.shuffle one fixed random sample of it (the original evaluated 100 x 64 shuffled sequences). Multiple
choice scores each (context, continuation) as the fp32 sum of the continuation's token log-probs (the original
summed bf16 log-probs) with contexts left-truncated to the model's context length (the original evaluated a
512-token model at 2048). Every batch has a fixed shape (held-out: one; multiple choice: one per length bucket) and
partial batches are padded with weight-0 rows, so nothing recompiles per batch.
"""
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from colorjax import console
from colorjax import errors
from colorjax import sharding
from colorjax.data import stores as stores_lib
from colorjax.data import tasks
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import metrics


def eval_batch_size(cfg, mesh) -> int:
  """Eval batch: the configured size (or the train micro-batch), rounded up to the data-parallel size."""
  size = int(cfg.eval.batch_size or cfg.train.micro_batch_size or cfg.train.global_batch_size)
  dp = sharding.data_parallel_size(mesh)
  return -(-size // dp) * dp


# The held-out sample's key: fixed rather than the run's seed, so every eval of a run, every run (any seed or
# method) and a standalone eval of the same store read the same sequences and their losses compare directly.
SAMPLE_SEED = 0
SAMPLE_STREAM = 0x686F6C64  # "hold": keeps the sample's permutation apart from the training order's streams


def heldout_ids(num_sequences: int, count: int, shuffle: bool) -> np.ndarray:
  """Ids of a held-out eval: `count` (0 = all) sequences, the first ones in id order or, with `shuffle`, a fixed
  seeded random sample like the original's shuffled eval loader (sorted, so reads stay sequential)."""
  count = min(count, num_sequences) if count else num_sequences
  if not shuffle or count == num_sequences:
    return np.arange(count, dtype=np.int64)
  sample = stores_lib.Permutation(num_sequences, SAMPLE_SEED, stream=SAMPLE_STREAM)(np.arange(count))
  return np.sort(sample)


def build_heldout_step(spec, param_sh, row_sh, weight_sh, pad_id, chunk: int, unroll: bool = False):
  """params, [batch, seq] tokens, [batch] weights -> (weighted sum of per-sequence mean NLL, sum of weights)."""
  def weighted_sum(params, tokens_bt, weight_b):
    per_seq = losses.sequence_nll(spec, params, tokens_bt, pad_id, chunk, unroll=unroll)
    return jnp.sum(per_seq * weight_b), jnp.sum(weight_b)
  return jax.jit(weighted_sum, in_shardings=(param_sh, row_sh, weight_sh))


def build_choice_step(spec, param_sh, row_sh, out_sh, chunk: int, unroll: bool = False):
  """params, [batch, length] inputs, [batch, k] positions, targets and mask -> [batch] summed continuation
  log-probs."""
  def logprob_sums(params, inputs_bt, positions_bk, targets_bk, mask_bk):
    nll_bk = losses.gathered_nll(spec, params, inputs_bt, positions_bk, targets_bk, chunk, unroll)
    return -jnp.sum(nll_bk * mask_bk, axis=1)
  return jax.jit(logprob_sums, in_shardings=(param_sh,) + (row_sh,) * 4, out_shardings=out_sh)


NOMINAL_CONTINUATION = 64  # compile_for: continuation tokens of the longest multiple-choice bucket (data decide it)


def abstract_steps(cfg, spec, mesh, seq_len: int, pad_id, token_dtype, unroll: bool = False) -> list:
  """[(kind, jitted step, ShapeDtypeStructs of its arguments on `mesh`, key)]: the held-out step at the eval batch,
  and with eval.tasks the multiple-choice step of the full-length bucket (a nominal continuation length)."""
  param_abstract = transformer.abstract_params(spec)
  param_sh = sharding.tree_shardings(param_abstract, transformer.param_axes(spec), mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), param_abstract, param_sh)
  row_sh, weight_sh = sharding.batch_sharding(mesh), sharding.batch_sharding(mesh, ndim=1)
  batch = eval_batch_size(cfg, mesh)
  key = {"model": spec.to_dict(), "mesh": dict(mesh.shape), "loss_chunk": int(cfg.train.loss_chunk)}
  found = [("heldout_step", build_heldout_step(spec, param_sh, row_sh, weight_sh, pad_id, cfg.train.loss_chunk, unroll),
            (params, jax.ShapeDtypeStruct((batch, seq_len), token_dtype, sharding=row_sh),
             jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=weight_sh)),
            key | {"step": "heldout", "batch": batch, "seq_len": seq_len, "pad_id": pad_id})]
  if cfg.eval.tasks:
    dp = sharding.data_parallel_size(mesh)
    length, k = spec.max_seq_len, min(NOMINAL_CONTINUATION, spec.max_seq_len)
    rows = max(dp, int(cfg.eval.batch_tokens) // length // dp * dp)
    arrays = [jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=row_sh)]
    arrays += [jax.ShapeDtypeStruct((rows, k), dtype, sharding=row_sh) for dtype in (jnp.int32, jnp.int32, jnp.float32)]
    found.append(("choice_step", build_choice_step(spec, param_sh, row_sh, sharding.replicated(mesh),
                                                   cfg.train.loss_chunk, unroll),
                  (params, *arrays), key | {"step": "choice", "batch": rows, "length": length, "continuation": k}))
  return found


class HeldoutEvaluator:
  """Mean per-sequence CE of params on each named token store: `max_batches` batches (0 = the whole store), in id
  order or (eval.shuffle) a fixed random sample of the store."""

  def __init__(self, spec, mesh, param_sh, stores: dict, cfg, max_batches: int | None = None):
    self.spec, self.mesh, self.stores = spec, mesh, stores
    self.batch = eval_batch_size(cfg, mesh)
    self.max_batches = cfg.train.eval_batches if max_batches is None else max_batches
    self.shuffle = bool(cfg.eval.shuffle)
    self.loss_on_padding = bool(cfg.sft.loss_on_padding)
    self.row_sh = sharding.batch_sharding(mesh)
    self.weight_sh = sharding.batch_sharding(mesh, ndim=1)
    self._fns = {}
    self.chunk = cfg.train.loss_chunk
    self.param_sh = param_sh

  def _fn(self, pad_id):
    if pad_id not in self._fns:
      self._fns[pad_id] = build_heldout_step(self.spec, self.param_sh, self.row_sh, self.weight_sh, pad_id,
                                             self.chunk)
    return self._fns[pad_id]

  def sample_ids(self, store: stores_lib.TokenStore) -> np.ndarray:
    """The ids `store_loss` reads: the same at every call."""
    return heldout_ids(store.num_sequences, (self.max_batches or 0) * self.batch, self.shuffle)

  def store_loss(self, params, store: stores_lib.TokenStore) -> float:
    sample = self.sample_ids(store)
    n = sample.size
    pad_id = losses.pad_to_mask(store, self.loss_on_padding)
    fn = self._fn(pad_id)
    shape = (self.batch, store.seq_len)
    start, stop = sharding.host_rows(self.row_sh, shape, dim=0)
    total, weight = 0.0, 0.0
    with sharding.use_mesh(self.mesh):
      for first in range(0, n, self.batch):
        positions = np.arange(first, first + self.batch)
        valid = positions < n
        rows = store.read(sample[np.where(valid, positions, 0)][start:stop])
        tokens = sharding.put_host_rows(rows, self.row_sh, shape, start)
        weights = sharding.put_host_rows(valid[start:stop].astype(np.float32), self.weight_sh, (self.batch,), start)
        s, w = fn(params, tokens, weights)
        total, weight = total + s, weight + w  # stays on device: no sync per batch
    return float(total) / max(float(weight), 1.0)

  def __call__(self, params) -> dict:
    return {f"{name}_loss": self.store_loss(params, store) for name, store in self.stores.items()}


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot multiple choice


@dataclasses.dataclass
class Bucket:
  """Requests padded to one fixed length, scored in fixed-shape batches (one compilation per bucket)."""
  length: int
  batch: int
  inputs: np.ndarray  # [n, length] tokens fed to the model
  positions: np.ndarray  # [n, k] input positions whose next token is a continuation token (k: longest continuation)
  targets: np.ndarray  # [n, k] those continuation tokens
  mask: np.ndarray  # [n, k] 1.0 on real continuation tokens, 0.0 on padding
  request_ids: np.ndarray  # [n] index into the flat request list


def bucket_lengths(max_len: int, smallest: int = 32) -> list[int]:
  lengths, length = [], smallest
  while length < max_len:
    lengths.append(length)
    length *= 2
  return lengths + [max_len]


def encode_requests(tokenizer, examples, max_len: int, eos_id: int):
  """(inputs, targets, n_continuation) per choice, flattened example-major, as OLMo builds them: context and
  continuation tokenized separately and concatenated; the model sees at most `max_len` tokens, left-truncated."""
  contexts = [c for e in examples for c in e.contexts]
  continuations = [c for e in examples for c in e.continuations]
  ctx_ids = [e.ids for e in tokenizer.encode_batch(contexts, add_special_tokens=False)]
  cont_ids = [e.ids for e in tokenizer.encode_batch(continuations, add_special_tokens=False)]
  requests = []
  for ctx, cont in zip(ctx_ids, cont_ids):
    full = (ctx or [eos_id]) + cont
    full = full[-(max_len + 1):]
    requests.append((np.asarray(full[:-1], np.int32), np.asarray(full[1:], np.int32), min(len(cont), len(full) - 1)))
  return requests


def make_buckets(requests, max_len: int, batch_tokens: int, data_parallel: int, pad_id: int) -> list[Bucket]:
  lengths = bucket_lengths(max_len)
  sizes = np.array([len(r[0]) for r in requests])
  which = np.searchsorted(lengths, sizes)
  buckets = []
  for b, length in enumerate(lengths):
    members = np.nonzero(which == b)[0]
    if not members.size:
      continue
    members = members[np.argsort(sizes[members], kind="stable")]
    k = max(1, max(requests[r][2] for r in members))
    inputs = np.full((members.size, length), pad_id, np.int32)
    positions = np.zeros((members.size, k), np.int32)
    targets = np.full((members.size, k), pad_id, np.int32)
    mask = np.zeros((members.size, k), np.float32)
    for row, r in enumerate(members):
      x, y, n = requests[r]
      inputs[row, : len(x)] = x
      positions[row, :n] = np.arange(len(y) - n, len(y))
      targets[row, :n] = y[len(y) - n:]
      mask[row, :n] = 1.0
    batch = max(data_parallel, batch_tokens // length // data_parallel * data_parallel)
    buckets.append(Bucket(length, batch, inputs, positions, targets, mask, members))
  return buckets


def load_task_examples(task_names, data_dir, split: str = "", limit: int = 0) -> dict:
  """{task: (split, [MCExample])} for the given tasks, each on its eval split (docs/definitions.md#tasks-and-metrics)
  unless `split` is set."""
  out = {}
  for task in task_names:
    task_split = split or tasks.EVAL_SPLIT[task]
    docs = tasks.load_docs(task, task_split, data_dir or None, limit=limit or None,
                           setting="--config.eval.tasks_dir")
    out[task] = (task_split, [tasks.render(task, doc, doc_id=i) for i, doc in enumerate(docs)])
  return out


class MultipleChoiceEvaluator:
  """Zero-shot accuracy on downstream tasks: fp32 sum of continuation log-probs per choice, argmax per doc."""

  def __init__(self, spec, mesh, param_sh, tokenizer_path, task_examples: dict, batch_tokens: int = 16384,
               chunk: int = 0):
    self.spec, self.mesh = spec, mesh
    self.data_dir = None  # the task folder the examples came from, for records (None: HuggingFace or unknown)
    tokenizer = tokenizer_lib.load_tokenizer(str(tokenizer_path))
    info = tokenizer_lib.tokenizer_info(tokenizer, str(tokenizer_path))
    self.task_examples = {}
    requests = []
    for task, (task_split, examples) in task_examples.items():
      self.task_examples[task] = (task_split, examples, len(requests))
      requests += encode_requests(tokenizer, examples, spec.max_seq_len, info["eos_id"])
    self.num_requests = len(requests)
    self.buckets = make_buckets(requests, spec.max_seq_len, batch_tokens, sharding.data_parallel_size(mesh),
                                info["pad_id"])
    self.row_sh = sharding.batch_sharding(mesh)

    self._fn = build_choice_step(spec, param_sh, self.row_sh, sharding.replicated(mesh), chunk)

  def logprobs(self, params, progress: bool = False) -> np.ndarray:
    """Summed continuation log-prob of every request (flat, example-major)."""
    out = np.zeros(self.num_requests, np.float64)
    bar = console.Progress(total=self.num_requests, unit="choices", desc="tasks",
                           enabled=progress and console.is_main())
    pending = None

    def finish(request_ids, sums):
      out[request_ids] = np.asarray(sums)[: request_ids.size]
      bar.update(request_ids.size)

    with sharding.use_mesh(self.mesh):
      for bucket in self.buckets:
        start, stop = sharding.host_rows(self.row_sh, (bucket.batch, bucket.length), dim=0)
        for first in range(0, len(bucket.request_ids), bucket.batch):
          rows = np.arange(first, first + bucket.batch)
          valid = rows < len(bucket.request_ids)
          local = np.where(valid, rows, 0)[start:stop]
          arrays = [sharding.put_host_rows(np.where(valid[start:stop, None], a[local], 0).astype(a.dtype),
                                           self.row_sh, (bucket.batch, a.shape[1]), start)
                    for a in (bucket.inputs, bucket.positions, bucket.targets, bucket.mask)]
          result = (bucket.request_ids[rows[valid]], self._fn(params, *arrays))
          if pending is not None:
            finish(*pending)  # one batch late: the device is already busy with the next one
          pending = result
    if pending is not None:
      finish(*pending)
    bar.close()
    return out

  def __call__(self, params, progress: bool = False) -> dict:
    flat = self.logprobs(params, progress)
    results = {}
    for task, (_, examples, first) in self.task_examples.items():
      sums, offset = [], first
      for example in examples:
        sums.append(flat[offset: offset + len(example.continuations)].tolist())
        offset += len(example.continuations)
      results[f"mc/{task}"] = tasks.accuracy(task, examples, sums)
    if results:
      results["mc/mean"] = float(np.mean(list(results.values())))
    return results


def format_table(results: dict) -> str:
  """Results as an aligned two-column table, held-out losses first, then task accuracies and their mean."""
  rows = [(k, f"{v:.4f}") for k, v in results.items() if not k.startswith("mc/")]
  rows += [(k[3:], f"{100 * v:.2f}") for k, v in results.items() if k.startswith("mc/") and k != "mc/mean"]
  if "mc/mean" in results:
    n_tasks = sum(k.startswith("mc/") and k != "mc/mean" for k in results)
    rows.append((f"mean ({n_tasks}-task)", f"{100 * results['mc/mean']:.2f}"))
  width = max((len(k) for k, _ in rows), default=4)
  return "\n".join(f"{k:<{width}}  {v:>8}" for k, v in rows)


def tasks_dir(cfg) -> str | None:
  """eval.tasks_dir, else the offline copy tasks.default_dir() finds; None = HuggingFace."""
  if cfg.eval.tasks_dir:
    return str(cfg.eval.tasks_dir)
  found = tasks.default_dir()
  if found and cfg.eval.tasks and console.is_main():
    print(f"eval: task data from {found} (--config.eval.tasks_dir is empty)")
  return found


def build_evaluators(cfg, spec, mesh, param_sh, tokenizer_path, stores: dict):
  """The held-out and multiple-choice evaluators a config asks for (either may be None)."""
  heldout = HeldoutEvaluator(spec, mesh, param_sh, stores, cfg) if stores else None
  mc = None
  if cfg.eval.tasks:
    directory = tasks_dir(cfg)
    examples = load_task_examples(tuple(cfg.eval.tasks), directory, cfg.eval.split, cfg.eval.limit)
    mc = MultipleChoiceEvaluator(spec, mesh, param_sh, tokenizer_path, examples, cfg.eval.batch_tokens,
                                 cfg.train.loss_chunk)
    mc.data_dir = directory
  return heldout, mc


def run(cfg) -> dict:
  """The eval stage: held-out losses and task accuracies of one params export, written to <workdir>/eval.json."""
  if not cfg.eval.params:
    raise errors.ConfigError("set --config.eval.params to a params export (<run>/params)")
  params_dir = pathlib.Path(cfg.eval.params).resolve()
  manifest = checkpoint.read_params_manifest(params_dir)
  spec = checkpoint.spec_from_manifest(manifest, cfg.model)
  workdir = pathlib.Path(cfg.workdir).resolve() if cfg.workdir else params_dir.parent / "eval"
  out_path = workdir / "eval.json"
  if out_path.exists():
    raise errors.DataError(f"{out_path} already exists; choose another --config.workdir (nothing was overwritten)")
  mesh = sharding.make_mesh(cfg.mesh)
  param_sh = sharding.tree_shardings(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  stores = stores_lib.eval_stores(cfg.data.eval_stores, manifest["tokenizer"], f"the params {params_dir}", spec)
  if cfg.eval.tokenizer:
    tokenizer_lib.check_tokenizer_file(cfg.eval.tokenizer, manifest["tokenizer"], "--config.eval.tokenizer",
                                       f"the params {params_dir}")
  tokenizer_path = cfg.eval.tokenizer or tokenizer_lib.checked_tokenizer_path(params_dir, manifest["tokenizer"])
  heldout, mc = build_evaluators(cfg, spec, mesh, param_sh, tokenizer_path, stores)
  if heldout is None and mc is None:
    raise errors.ConfigError("nothing to evaluate: set --config.data.eval_stores and/or --config.eval.tasks")
  params, _ = checkpoint.load_params(params_dir, spec, param_sh)
  start = time.time()
  results = {}
  with sharding.use_mesh(mesh):
    if heldout is not None:
      results.update(heldout(params))
    if mc is not None:
      results.update(mc(params, progress=True))
  seconds = time.time() - start
  if console.is_main():
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"event": "eval", "step": manifest.get("steps", 0), "params": str(params_dir), "seconds": seconds,
              **results}
    metrics.MetricsWriter(workdir).write(record)
    splits = {t: s for t, (s, _, _) in (mc.task_examples.items() if mc else [])}
    out_path.write_text(json.dumps({"params": str(params_dir), "params_id": manifest.get("id"), "results": results,
                                    "splits": splits, "tasks_dir": mc.data_dir if mc else None,
                                    "limit": cfg.eval.limit, "heldout_shuffle": bool(cfg.eval.shuffle),
                                    "seconds": seconds}, indent=1))
    print(format_table(results))
    print(f"eval: {seconds:.1f}s; results in {out_path}")
  return results


def describe(cfg) -> None:
  manifest = checkpoint.read_params_manifest(cfg.eval.params)
  spec = checkpoint.spec_from_manifest(manifest, cfg.model)
  counts = transformer.param_counts(spec)
  print(f"eval (dry run): params {cfg.eval.params}: total={counts['total']:,} non_embedding="
        f"{counts['non_embedding']:,}; tasks {', '.join(cfg.eval.tasks) or '-'}; held-out "
        f"{', '.join(cfg.data.eval_stores) or '-'}; flops/token (forward) "
        f"{transformer.flops_per_token(spec, spec.max_seq_len, training=False):,.0f}")
