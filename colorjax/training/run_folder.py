"""A training run's folder and inputs: the request that decides its result (its hash is the run's id), the inputs
found and checked before anything is written, the run folder (another run's is refused, an unfinished one of this
run resumed), and the params export later stages read.
"""
import dataclasses
import json
import pathlib

from jax.experimental import multihost_utils

from colorjax import console
from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import sft_rows
from colorjax.data import stores
from colorjax.data import tasks
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import metrics
from colorjax.training import step_plan


# Config fields that decide a run's result besides its inputs (which the request names by content id).
TRAIN_KEYS = ("global_batch_size", "max_steps", "lr", "warmup_steps", "min_lr_ratio", "b1", "b2", "eps",
              "weight_decay", "grad_clip", "z_loss", "single_pass", "anneal_to_data")


def run_request(cfg, spec: transformer.ModelSpec, store_id: str, padded: bool, index_id, init_id,
                reference_id: str | None = None) -> dict:
  """What decides a training run's result: its inputs by content id, the seed, the architecture and the recipe.
  The run's id is this request's hash, so it is known (and checkable downstream) before the run trains."""
  request = {"stage": cfg.stage, "store": store_id, "index": index_id, "init_from": init_id, "seed": int(cfg.seed),
             "model": spec.architecture(), **spec.numerics(),
             "train": {k: cfg.train[k] for k in TRAIN_KEYS},
             "loss_on_padding": bool(padded and cfg.sft.loss_on_padding)}
  if cfg.train.rho_tau:
    request["rho"] = {"tau": float(cfg.train.rho_tau), "reference": reference_id}
  return request


@dataclasses.dataclass(frozen=True)
class Inputs:
  """A run's inputs, resolved and checked before anything is written."""
  store_path: pathlib.Path  # the token store to train on (SFT rows: where they will be built)
  store_id: str
  padded: bool
  sft_eval_path: pathlib.Path | None  # task finetuning: the held-out SFT rows
  index_id: str | None
  init_manifest: dict | None
  reference_manifest: dict | None  # RHO-down's reference model
  request: dict


def resolve_inputs(cfg, workdir: pathlib.Path, spec: transformer.ModelSpec) -> Inputs:
  """Find the store (or SFT task rows), index and init params, and compute the run's request, writing nothing."""
  init_manifest = checkpoint.read_params_manifest(cfg.train.init_from) if cfg.train.init_from else None
  if init_manifest is not None:
    checkpoint.check_architecture(init_manifest, spec, cfg.train.init_from)
  sft_eval = None
  if cfg.sft.tasks:
    if cfg.data.train_store:
      raise errors.ConfigError("set either data.train_store or sft.tasks, not both")
    if init_manifest is None:
      raise errors.ConfigError("task finetuning starts from a prior: set --config.train.init_from=<prior run>/params")
    if not cfg.sft.data_dir and tasks.default_dir():
      cfg.sft.data_dir = tasks.default_dir()  # the offline task folder, as the eval stage finds it
    request = sft_rows.sft_request(cfg.sft.tasks, cfg.sft.data_dir, cfg.sft.train_split,
                                   init_manifest["tokenizer"], spec.max_seq_len, cfg.sft.limit)
    store_path, store_id, padded = workdir / "sft_train", lineage.content_id(request), True
    sft_eval = workdir / "sft_eval" if cfg.sft.eval_split else None
  else:
    if not cfg.data.train_store:
      raise errors.ConfigError("set --config.data.train_store (or --config.sft.tasks to finetune on downstream tasks)")
    store = stores.TokenStore(cfg.data.train_store)
    stores.check_store_fits(store, spec)
    if init_manifest is not None:
      tokenizer_lib.check_same_tokenizer(init_manifest["tokenizer"], f"the params {cfg.train.init_from}",
                                         store.manifest["tokenizer"], f"the training store {store.path}")
    store_path, store_id, padded = store.path.resolve(), store.id, store.padded
  index_id = stores.index_id(cfg.data.index) if cfg.data.index else None
  init_id = init_manifest.get("id") if init_manifest else None
  reference = None
  if cfg.train.rho_tau and cfg.train.rho_reference:
    reference = checkpoint.read_params_manifest(cfg.train.rho_reference)
    tok_info = init_manifest["tokenizer"] if init_manifest else stores.TokenStore(store_path).manifest["tokenizer"]
    tokenizer_lib.check_same_tokenizer(reference["tokenizer"], f"the RHO reference {cfg.train.rho_reference}",
                                       tok_info, "the training data")
  return Inputs(store_path, store_id, padded, sft_eval, index_id, init_manifest, reference,
                run_request(cfg, spec, store_id, padded, index_id, init_id, reference.get("id") if reference else None))


def build_sft_stores(cfg, inputs: Inputs, spec: transformer.ModelSpec) -> None:
  """Task finetuning: render the task splits into padded rows with the tokenizer of the params being finetuned."""
  tokenizer = tokenizer_lib.checked_tokenizer_path(cfg.train.init_from, inputs.init_manifest["tokenizer"])
  tok_info = inputs.init_manifest["tokenizer"]
  splits = [(cfg.sft.train_split, inputs.store_path)] + ([(cfg.sft.eval_split, inputs.sft_eval_path)]
                                                         if inputs.sft_eval_path else [])
  for split, path in splits:
    console.on_main_then_sync(lambda s=split, p=path: sft_rows.build_sft_store(
        cfg.sft.tasks, cfg.sft.data_dir, s, tokenizer, tok_info, spec.max_seq_len, p, limit=cfg.sft.limit),
        f"sft rows {split}")


def check_run_folder(cfg, workdir: pathlib.Path, request: dict) -> bool:
  """True when `workdir` holds this run, finished. Refuses a folder holding another run (a different request) and
  an unfinished run unless train.resume; nothing is overwritten."""
  fix = "choose another --config.workdir, or delete it to retrain"
  if lineage.up_to_date(workdir / "params", request, "a finished run", fix):
    if not cfg.train.resume:
      raise errors.DataError(f"{workdir} holds this finished run already; pass --config.train.resume=True to reuse it, "
                             "or choose another --config.workdir (nothing was overwritten)")
    return True
  saved = lineage.recorded_request(workdir)
  if saved is None and (workdir / "config.json").exists():
    raise errors.DataError(f"{workdir} holds a run without a recorded request (made by an older colorjax); {fix}")
  if saved is not None:
    if not cfg.train.resume:
      raise errors.DataError(f"{workdir} already holds a run; pass --config.train.resume=True to continue it, or "
                             "choose another --config.workdir (nothing was overwritten)")
    if saved != lineage.normalized(request):
      changed = ", ".join(lineage.differences(saved, lineage.normalized(request)))
      raise errors.DataError(f"cannot resume {workdir}: its inputs or settings differ ({changed}); resume with the "
                             f"original ones, or {fix}")
  return False


def write_run_folder(cfg, workdir: pathlib.Path, request: dict) -> None:
  """config.json (for people) and request.json (what resume and lineage checks compare), by process 0."""
  if console.is_main():
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json(indent=1))
    (workdir / formats.REQUEST).write_text(json.dumps({"request": request}, indent=1))
  multihost_utils.sync_global_devices(f"prepared {workdir}")


def publish_params(cfg, workdir: pathlib.Path, spec, store, inputs: Inputs, steps: step_plan.StepPlan, state,
                   flops: dict) -> pathlib.Path:
  """The params export later stages read: params, tokenizer, and a manifest naming the run's request and id."""
  final = {k: v for k, v in (metrics.read_metrics(workdir)[-1] if console.is_main() else {}).items()
           if k.startswith("eval/")}
  export_dir = workdir / "params"
  rel = lambda path: lineage.relative(path, export_dir) if path else None
  manifest = {
      "stage": cfg.stage, "model": spec.architecture(), "model_spec": spec.to_dict(),
      "tokenizer": store.manifest["tokenizer"], "train_store": {"path": rel(store.path), "id": store.id},
      "index": rel(cfg.data.index), "index_id": inputs.index_id, "init_from": rel(cfg.train.init_from),
      "init_from_id": inputs.request["init_from"], "steps": steps.total_steps, "tokens": steps.tokens,
      "schedule": steps.schedule, "schedule_steps": steps.schedule_steps, "seed": cfg.seed,
      "id": lineage.content_id(inputs.request), "request": inputs.request, "compute": flops,
      "final_eval": final, "config": json.loads(cfg.to_json()),
  }
  checkpoint.export_params(export_dir, state["params"], manifest, store.tokenizer_path())
  return export_dir
