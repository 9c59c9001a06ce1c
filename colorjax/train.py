"""Training: pretraining the prior, finetuning conditionals, and training targets on a selection
(docs/definitions.md#recipe).

One jitted step per optimizer update (gradient accumulation over micro-batches is a `lax.scan` inside it), with
explicit in/out shardings and the train state donated. Metrics are fetched one step late so the host never stalls
the device. The data order depends only on (seed, step), so a resumed run reproduces an uninterrupted one.
"""
import dataclasses
import functools
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from colorjax import console
from colorjax import errors
from colorjax import evaluate
from colorjax import sharding
from colorjax.aot import compiler
from colorjax.aot import targets
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.model import estimate
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import loops
from colorjax.training import metrics
from colorjax.training import rho as rho_lib
from colorjax.training import run_folder
from colorjax.training import step_plan


def lr_at(step, lr: float, warmup: int, max_steps: int, min_ratio: float):
  """OLMo's schedule, step counted from 1: linear warmup min_ratio·lr -> lr, cosine to min_ratio·lr at max_steps."""
  step = jnp.asarray(step, jnp.float32)
  floor = lr * min_ratio
  warm = floor + (lr - floor) * jnp.minimum(step, warmup) / max(warmup, 1)
  progress = jnp.clip((step - warmup) / max(max_steps - warmup, 1), 0.0, 1.0)
  cosine = floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup, warm, cosine)


def make_optimizer(tcfg, schedule_steps: int):
  """Global-norm clip, then AdamW on the schedule above (optax counts updates from 0, the schedule from 1)."""
  schedule = lambda count: lr_at(count + 1, tcfg.lr, tcfg.warmup_steps, schedule_steps, tcfg.min_lr_ratio)
  tx = optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip),
      optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay))
  return tx, schedule


def build_train_step(spec, tx, schedule, steps: step_plan.StepPlan, state_sh, batch_sh, param_sh, z_weight: float,
                     pad_id: int | None, loss_chunk: int, rho: rho_lib.Rho | None = None, reference_sh=None,
                     unroll: bool = False):
  """The jitted update: token-mean CE + z-loss over the whole global batch, accumulated over micro-batches. With
  `rho`, the step takes the candidates and the reference params and first keeps the batch it trains on. `unroll`:
  every loop as straight-line code, for the compile-ahead report's cost estimate (XLA counts a loop body once)."""

  micro_loss = functools.partial(losses.batch_loss, spec, pad_id=pad_id, z_weight=z_weight, chunk=loss_chunk,
                                 unroll=unroll)
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step_fn(state, tokens_mbt, reference_params=None):
    params = state["params"]
    selection = {}
    if rho is not None:
      tokens_mbt, selection = rho_lib.select(rho, params, reference_params, tokens_mbt, unroll)
      tokens_mbt = jax.lax.with_sharding_constraint(tokens_mbt, batch_sh)
    if tokens_mbt.shape[0] == 1:
      (_, (ce, z, count)), grads = grad_fn(params, tokens_mbt[0])
    else:
      def accumulate(carry, tokens_bt):
        acc, ce, z, count = carry
        (_, (ce_i, z_i, count_i)), g = grad_fn(params, tokens_bt)
        acc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, acc, g), param_sh)
        return (acc, ce + ce_i, z + z_i, count + count_i), None
      zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), param_sh)
      (grads, ce, z, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, 0.0), tokens_mbt, unroll=unroll)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
    stats = {"loss": ce / denom, "z_loss": z / denom, "grad_norm": optax.tree.norm(grads),
             "lr": schedule(state["step"]), "tokens": count, **selection}
    return new_state, stats

  if rho is None:
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, reference_sh), out_shardings=(state_sh, None),
                 donate_argnums=(0,))


class BatchSource:
  """Produces this host's rows of step `s`'s [n_micro, micro, seq] batch (RHO-down: candidates) as a global
  jax.Array."""

  def __init__(self, store: stores.TokenStore, steps: step_plan.StepPlan, seed: int, index, batch_sh: NamedSharding):
    self.store, self.plan, self.seed, self.index, self.sharding = store, steps, seed, index, batch_sh
    self.shape = (steps.rows_per_step // steps.micro_batch, steps.micro_batch, store.seq_len)
    self.row_start, self.row_stop = sharding.host_rows(batch_sh, self.shape, dim=1)

  def ids(self, step: int) -> np.ndarray:
    ids = stores.step_ids(step, self.plan.rows_per_step, self.plan.num_items, self.seed, self.index)
    return ids.reshape(self.shape[:2])

  def __call__(self, step: int):
    local_ids = self.ids(step)[:, self.row_start:self.row_stop]
    rows = self.store.read(local_ids.reshape(-1)).reshape(local_ids.shape + (self.store.seq_len,))
    return sharding.put_host_rows(rows, self.sharding, self.shape, self.row_start, dim=1)


def _print(msg: str):
  if console.is_main():
    print(msg, flush=True)


def run(cfg) -> pathlib.Path:
  """Train per cfg; returns the folder of the params export (<workdir>/params). Everything is checked before the
  run folder is created, and a run that fails before its first step leaves no folder behind."""
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the run folder")
  workdir = pathlib.Path(cfg.workdir).resolve()
  spec = transformer.ModelSpec.from_config(cfg.model)
  metrics.StepProfiler(cfg.profile_steps, workdir / "profile")  # a malformed range fails before any work
  metrics.check_mirrors(cfg.train)
  if not (math.isfinite(cfg.train.checkpoint_minutes) and cfg.train.checkpoint_minutes >= 0):
    raise errors.ConfigError(f"train.checkpoint_minutes={cfg.train.checkpoint_minutes}: minutes between checkpoints, "
                             ">= 0 (0 = off)")
  if cfg.train.log_every < 1:
    raise errors.ConfigError(f"train.log_every={cfg.train.log_every}: steps per metrics record, >= 1")
  if cfg.seed < 0:
    raise errors.ConfigError(f"seed={cfg.seed}: the seed of init and data order is an integer >= 0")
  inputs = run_folder.resolve_inputs(cfg, workdir, spec)
  finished = run_folder.check_run_folder(cfg, workdir, inputs.request)
  multihost_utils.sync_global_devices(f"checked {workdir}")  # every host checks before process 0 writes
  if finished:
    _print(f"{cfg.stage}: {workdir} is already finished; nothing to do")
    return workdir / "params"
  mesh = sharding.make_mesh(cfg.mesh)
  index = None
  if cfg.data.index and not cfg.sft.tasks:
    store = stores.TokenStore(inputs.store_path)
    index = stores.load_index(cfg.data.index, store)
    step_plan.step_plan(cfg, index.size, store.seq_len, sharding.data_parallel_size(mesh))  # fail before writing
  created = not workdir.exists()
  with lineage.Lock(workdir):
    started = []
    try:
      return _train(cfg, workdir, spec, mesh, inputs, index, started)
    except BaseException:
      if created and not started and console.is_main() and workdir.exists():
        shutil.rmtree(workdir)  # a run that never took a step leaves nothing to clean up by hand
      raise


def _train(cfg, workdir, spec, mesh, inputs: run_folder.Inputs, index, started: list) -> pathlib.Path:
  """The run's named steps: open the data, write the run folder, init or restore, loop, export."""
  if cfg.sft.tasks:
    run_folder.build_sft_stores(cfg, inputs, spec)
  store = stores.TokenStore(inputs.store_path)
  stores.check_store_fits(store, spec)
  steps = step_plan.step_plan(cfg, store.num_sequences if index is None else index.size, store.seq_len,
                              sharding.data_parallel_size(mesh))
  eval_sets = stores.eval_stores(cfg.data.eval_stores, store.manifest["tokenizer"], f"the training store {store.path}",
                                 spec)
  if inputs.sft_eval_path is not None:
    eval_sets[f"tasks_{cfg.sft.eval_split}"] = stores.TokenStore(inputs.sft_eval_path)
  run_folder.write_run_folder(cfg, workdir, inputs.request)
  if steps.note:
    _print(f"{cfg.stage}: {steps.note}")
  tx, schedule = make_optimizer(cfg.train, steps.schedule_steps)
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.keep_checkpoints)
  with sharding.use_mesh(mesh):
    state, state_sh, param_sh, start_step = init_or_restore(cfg, spec, mesh, tx, ckpt)
    if start_step:
      _print(f"{cfg.stage}: resumed {workdir} at step {start_step}")
    batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
    pad_id = losses.pad_to_mask(store, cfg.sft.loss_on_padding)
    rho, reference, reference_sh = load_reference(cfg, spec, inputs, mesh, steps, pad_id)
    jitted = build_train_step(spec, tx, schedule, steps, state_sh, batch_sh, param_sh, cfg.train.z_loss, pad_id,
                              cfg.train.loss_chunk, rho, reference_sh)
    if cfg.compile_load:  # the same step, compiled ahead of time (compile_for + compile_save)
      key = step_key(spec, steps, cfg.train, pad_id, store.dtype, mesh, rho)
      jitted = compiler.load(cfg.compile_load, "train_step", mesh.devices.flat, key)
      _print(f"{cfg.stage}: train step loaded from {cfg.compile_load} (compiled ahead of time)")
    train_step = jitted if rho is None else (lambda state, batch: jitted(state, batch, reference))
    evaluators = [e for e in evaluate.build_evaluators(cfg, spec, mesh, param_sh, store.tokenizer_path(), eval_sets)
                  if e is not None]
    config = json.loads(cfg.to_json())
    log = metrics.TrainLog(workdir, cfg.stage, start_step, steps.total_steps, steps.global_batch * store.seq_len,
                           transformer.flops_per_token(spec, store.seq_len, training=True),
                           metrics.peak_flops(cfg.train.peak_flops), cfg.train.log_every,
                           truncate=cfg.train.resume,
                           mirrors=metrics.open_mirrors(cfg.train, workdir, cfg.stage, start_step, config))
    try:
      log.start(_header(cfg, spec, mesh, steps, store, state, start_step))
      source = BatchSource(store, steps, cfg.seed, index, batch_sh)
      state = loops.train_loop(cfg, state, train_step, source, start_step, steps, ckpt, log, evaluators, workdir,
                               started, meta={"config": config, "store_id": store.id})
    finally:
      log.close()
    export_dir = run_folder.publish_params(cfg, workdir, spec, store, inputs, steps, state, compute(spec, steps, rho))
    _print(f"{cfg.stage}: done; params exported to {export_dir}")
    return export_dir


def load_reference(cfg, spec, inputs: run_folder.Inputs, mesh, steps: step_plan.StepPlan, pad_id):
  """RHO-down's fixed reference model (its own architecture, sharded like any params), or (None, None, None)."""
  if not steps.candidates:
    return None, None, None
  reference_spec = checkpoint.spec_from_manifest(inputs.reference_manifest, cfg.model)
  reference_sh = sharding.tree_shardings(transformer.abstract_params(reference_spec),
                                         transformer.param_axes(reference_spec), mesh)
  params, _ = checkpoint.load_params(cfg.train.rho_reference, reference_spec, reference_sh)
  rho = rho_lib.Rho(spec, reference_spec, steps.global_batch, pad_id, cfg.train.loss_chunk)
  _print(f"{cfg.stage}: RHO-down: {steps.candidates} candidates per step, training on the {steps.global_batch} with "
         f"the largest NLL - NLL_ref ({cfg.train.rho_reference})")
  return rho, params, reference_sh


def compute(spec, steps: step_plan.StepPlan, rho) -> dict:
  """The run's FLOPs (docs/definitions.md#flop-counts-and-reference-figures): training, and RHO-down's extra scoring
  forwards."""
  train_flops = float(transformer.flops_per_token(spec, steps.seq_len, training=True)) * steps.tokens
  selection = rho_lib.forward_flops_per_step(rho, steps.candidates, steps.seq_len) * steps.total_steps if rho else 0.0
  return {"train_flops": train_flops, "selection_forward_flops": selection}


def _init_state(spec, tx, key, params=None):
  params = transformer.init_params(spec, key) if params is None else params
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def state_layout(spec, tx, mesh):
  """(abstract train state, its shardings, the params' shardings) on `mesh`. Outside `use_mesh` for a mesh of
  compile-only devices (compile_for), where nothing may run eagerly."""
  param_sh = sharding.tree_shardings(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  abstract_state = jax.eval_shape(functools.partial(_init_state, spec, tx), jax.random.key(0))
  state_sh = {"params": param_sh, "step": sharding.replicated(mesh),
              "opt_state": sharding.opt_state_shardings(tx, abstract_state["opt_state"], param_sh, mesh)}
  return abstract_state, state_sh, param_sh


def init_or_restore(cfg, spec, mesh, tx, ckpt: checkpoint.Checkpointer):
  """The sharded train state: the latest checkpoint (resume), else params from train.init_from, else a fresh init.
  Returns (state, state shardings, param shardings, start step)."""
  sharding.warn_replicated(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  init_state = functools.partial(_init_state, spec, tx)
  abstract_state, state_sh, param_sh = state_layout(spec, tx, mesh)
  latest = ckpt.latest_step() if cfg.train.resume else None
  if latest is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
    state, _ = ckpt.restore(latest, target)
    return state, state_sh, param_sh, int(latest)
  if cfg.train.init_from:
    params, _ = checkpoint.load_params(cfg.train.init_from, spec, param_sh)
    return jax.jit(lambda p: init_state(None, p), out_shardings=state_sh)(params), state_sh, param_sh, 0
  return jax.jit(init_state, out_shardings=state_sh)(jax.random.key(cfg.seed)), state_sh, param_sh, 0


def _header(cfg, spec, mesh, steps: step_plan.StepPlan, store, state, start_step: int) -> dict:
  counts = transformer.param_counts(spec)
  flops_token = transformer.flops_per_token(spec, store.seq_len, training=True)
  _print(f"params: total={counts['total']:,} non_embedding={counts['non_embedding']:,}")
  _print(f"flops/token: {flops_token:,.0f} (6N+12LdT, N={counts['non_embedding'] + counts['head']:,}); mesh "
         f"{sharding.describe(mesh)}; {steps.total_steps:,} steps x {steps.global_batch} x {store.seq_len} = "
         f"{steps.tokens:,} tokens; schedule over {steps.schedule_steps:,} steps ({steps.schedule}); "
         f"{steps.n_micro} micro-batch(es) of {steps.micro_batch}")
  return {"event": "start", "step": start_step, "stage": cfg.stage, "params_total": counts["total"],
          "params_non_embedding": counts["non_embedding"], "flops_per_token": flops_token,
          "total_steps": steps.total_steps, "schedule_steps": steps.schedule_steps, "schedule": steps.schedule,
          "tokens_planned": steps.tokens, "train_items": steps.num_items, "mesh": dict(mesh.shape),
          "param_bytes_per_device": sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state["params"]))}


@dataclasses.dataclass(frozen=True)
class DataPlan:
  """What a run's step is cut from, known before its data is read: from the store (and index) when they exist,
  else from the figures given (the pipeline's plan) or nominal ones."""
  steps: step_plan.StepPlan
  pad_id: int | None  # the PAD id the loss skips (padded SFT stores); None = no mask
  token_dtype: np.dtype  # the store's token dtype, the step's input dtype
  notes: tuple  # what was assumed, for the user


def data_plan(cfg, spec, data_parallel: int, num_items: int | None = None, seq_len: int | None = None,
              size_note: str = "") -> DataPlan:
  seq_len = seq_len or spec.max_seq_len
  pad_id, dtype = None, stores.token_dtype(spec.vocab_size)
  store_exists = bool(cfg.data.train_store) and pathlib.Path(cfg.data.train_store, formats.MANIFEST).exists()
  if store_exists:
    store = stores.TokenStore(cfg.data.train_store)
    stores.check_store_fits(store, spec)
    seq_len, pad_id, dtype = store.seq_len, losses.pad_to_mask(store, cfg.sft.loss_on_padding), store.dtype
    if cfg.data.index and pathlib.Path(cfg.data.index).exists():
      num_items = stores.load_index(cfg.data.index, store).size
    elif not cfg.data.index:
      num_items = store.num_sequences
  steps = step_plan.step_plan(cfg, num_items, seq_len, data_parallel)
  notes = [steps.note] if steps.note else []
  if num_items is None:
    notes.append("train store not found: the step count is the nominal max_steps")
  elif not store_exists or (cfg.data.index and not pathlib.Path(cfg.data.index).exists()):
    notes.append(f"data size taken as {num_items:,} sequences ({size_note or 'nominal'})")
  return DataPlan(steps, pad_id, dtype, tuple(notes))


def step_key(spec, steps: step_plan.StepPlan, tcfg, pad_id, token_dtype, mesh, rho=None) -> dict:
  """Everything a compiled train step depends on besides the code: an executable saved for one key serves only a
  run with the same key (`aot.compiler.load`)."""
  train = {k: tcfg[k] for k in ("lr", "warmup_steps", "min_lr_ratio", "b1", "b2", "eps", "weight_decay",
                                "grad_clip", "z_loss", "loss_chunk")}
  return {"step": "train", "model": spec.to_dict(), "mesh": dict(mesh.shape), "global_batch": steps.global_batch,
          "micro_batch": steps.micro_batch, "seq_len": steps.seq_len, "candidates": steps.candidates,
          "schedule_steps": steps.schedule_steps, "train": train, "pad_id": pad_id,
          "tokens": np.dtype(token_dtype).name, "reference": rho.reference_spec.to_dict() if rho else None}


def abstract_step(cfg, spec, plan: DataPlan, mesh, reference_spec=None, unroll: bool = False):
  """(the jitted train step, ShapeDtypeStructs of its arguments laid out on `mesh`, its key) for compiling ahead of
  time on any devices, compile-only ones too; the step `_train` runs, built by the same function."""
  steps = plan.steps
  tx, schedule = make_optimizer(cfg.train, steps.schedule_steps)
  abstract_state, state_sh, param_sh = state_layout(spec, tx, mesh)
  batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
  rho = reference_sh = None
  if steps.candidates:
    reference_spec = reference_spec or spec
    reference_abstract = transformer.abstract_params(reference_spec)
    reference_sh = sharding.tree_shardings(reference_abstract, transformer.param_axes(reference_spec), mesh)
    rho = rho_lib.Rho(spec, reference_spec, steps.global_batch, plan.pad_id, cfg.train.loss_chunk)
  jitted = build_train_step(spec, tx, schedule, steps, state_sh, batch_sh, param_sh, cfg.train.z_loss, plan.pad_id,
                            cfg.train.loss_chunk, rho, reference_sh, unroll)
  laid_out = lambda tree, shardings: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
  tokens = jax.ShapeDtypeStruct((steps.rows_per_step // steps.micro_batch, steps.micro_batch, steps.seq_len),
                                plan.token_dtype, sharding=batch_sh)
  args = (laid_out(abstract_state, state_sh), tokens)
  if rho is not None:
    args += (laid_out(transformer.abstract_params(rho.reference_spec), reference_sh),)
  return jitted, args, step_key(spec, steps, cfg.train, plan.pad_id, plan.token_dtype, mesh, rho)


def describe(cfg, num_items: int | None = None, seq_len: int | None = None, size_note: str = "") -> dict:
  """Dry run: sizes, FLOPs, steps, tokens and per-device memory, all without allocating. `num_items` and `seq_len`
  stand in for the data when the store (or index) does not exist yet, e.g. when planning a whole pipeline. On this
  machine's accelerators (or with compile_for=local) the step is also compiled and XLA's memory shown."""
  spec = transformer.ModelSpec.from_config(cfg.model)
  num_devices = cfg.dry_run_devices or jax.device_count()
  mesh = sharding.abstract_mesh(cfg.mesh, num_devices)
  plan = data_plan(cfg, spec, sharding.data_parallel_size(mesh), num_items, seq_len, size_note)
  steps = plan.steps
  tx, _ = make_optimizer(cfg.train, steps.schedule_steps)
  abstract_params = transformer.abstract_params(spec)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  planned = estimate.print_model_and_training(cfg.stage, spec, mesh, steps, abstract_params, abstract_opt, tx=tx,
                                              data_note="; ".join(plan.notes) or None,
                                              loss_chunk=cfg.train.loss_chunk)
  if targets.local_compiler(cfg):
    real_mesh = sharding.make_mesh(cfg.mesh)
    jitted, args, _ = abstract_step(cfg, spec, plan, real_mesh)
    print(compiler.memory_line(compiler.compile_step(jitted, args, real_mesh), targets.target(targets.LOCAL)))
  return planned
