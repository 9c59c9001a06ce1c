"""`--config.compile_for`: every jitted step of a stage (or of a whole pipeline) compiled for a TPU slice or this
machine, without running anything. Per step it prints the compiler's per-chip memory against the chip's HBM, the
compile time, FLOPs per chip and an estimated step time, tokens/s per chip and MFU; a step that does not fit names
the micro-batch (or remat) that would; `compile_save` writes the executables a run loads with `compile_load`.

The steps are the stages' own (`train.abstract_step`, `score.abstract_step`, `evaluate.abstract_steps`): the same
builders the runs use, given ShapeDtypeStructs laid out on the target's devices. XLA's cost analysis counts a loop
body once (the micro-batch scan, the head's chunk loop), so the estimate compiles a twin of the step: one micro-batch,
every loop unrolled, scaled by the micro-batches per step.
"""
import dataclasses
import pathlib

from colorjax import config
from colorjax import errors
from colorjax import evaluate
from colorjax import score
from colorjax import sharding
from colorjax import train
from colorjax.aot import compiler
from colorjax.aot import gpus
from colorjax.aot import targets
from colorjax.artifacts import formats
from colorjax.data import stores
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import rho as rho_lib

GIB = targets.GIB
STAGE_KINDS = {"pretrain": "train", "finetune": "train", "score": "score", "eval": "eval"}
ESTIMATE_NOTE = "XLA TPU cost-model estimate, not a measurement"


@dataclasses.dataclass
class Built:
  """One step ready to compile: the jitted function, its abstract arguments and key, and what one call does."""
  kind: str  # the executable's name: train_step, score_step, heldout_step, choice_step
  jitted: object
  args: tuple
  key: dict
  tokens: int  # tokens one call trains on or scores (all devices)
  model_flops: float  # SPEC §5 FLOPs of one call (all devices)
  describe: str  # batch layout, for the report
  repeat: int = 1  # calls of a twin per real step (micro-batches)


def _copy(cfg, **dotted):
  """A copy of cfg with `a__b=value` fields set."""
  return config.with_fields(cfg, {name.replace("__", "."): value for name, value in dotted.items()})


def _exists(path: str) -> bool:
  return bool(path) and pathlib.Path(path, formats.MANIFEST).exists()


def train_steps(cfg, mesh, unroll: bool = False, num_items: int | None = None, seq_len: int | None = None) -> list:
  """The train step (pretrain, finetune, RHO-down) of `cfg` on `mesh`; with `unroll`, its cost twin: one
  micro-batch, every loop written out."""
  spec = transformer.ModelSpec.from_config(cfg.model)
  dp = sharding.data_parallel_size(mesh)
  if num_items is None and cfg.train.max_steps <= 0 and not _exists(cfg.data.train_store):
    num_items = 1000 * int(cfg.train.global_batch_size)  # a one-pass schedule over data not there yet: nominal
  plan = train.data_plan(cfg, spec, dp, num_items, seq_len)
  steps = plan.steps
  reference = (checkpoint.spec_from_manifest(checkpoint.read_params_manifest(cfg.train.rho_reference), cfg.model)
               if steps.candidates and _exists(cfg.train.rho_reference) else None)
  repeat = 1
  if unroll and steps.n_micro > 1:
    repeat = steps.n_micro
    plan = dataclasses.replace(plan, steps=dataclasses.replace(steps, global_batch=steps.micro_batch,
                                                               candidates=steps.candidates // steps.n_micro))
  jitted, args, key = train.abstract_step(cfg, spec, plan, mesh, reference, unroll)
  tokens = plan.steps.global_batch * steps.seq_len
  flops = transformer.flops_per_token(spec, steps.seq_len, training=True) * tokens
  if steps.candidates:
    rho = rho_lib.Rho(spec, reference or spec, 0, None, 0)
    flops += rho_lib.forward_flops_per_step(rho, plan.steps.candidates, steps.seq_len)
  layout = (f"{steps.global_batch} x {steps.seq_len} tokens per step, micro-batch {steps.micro_batch} "
            f"({steps.micro_batch // dp} per data-parallel device) x {steps.n_micro}, remat "
            f"{'on' if spec.remat else 'off'}" + (f", {steps.candidates} RHO-down candidates" if steps.candidates
                                                  else ""))
  return [Built("train_step", jitted, args, key, tokens, flops, layout, repeat)]


def _score_spec(cfg):
  """The scoring models' spec and count: from the params exports when they exist, else the config's model and one
  conditional."""
  if _exists(cfg.score.prior) and all(_exists(p) for p in cfg.score.conditionals):
    entries, spec = score.model_entries(cfg)
    return spec, len(entries)
  return score.scoring_spec(transformer.ModelSpec.from_config(cfg.model), cfg.score), 1 + max(
      1, len(cfg.score.conditionals))


def score_steps(cfg, mesh, unroll: bool = False, seq_len: int | None = None) -> list:
  """The scoring pair step (prior + conditionals in one vmapped pass)."""
  spec, models = _score_spec(cfg)
  seq_len, pad_id, dtype = seq_len or spec.max_seq_len, None, stores.token_dtype(spec.vocab_size)
  if _exists(cfg.score.store):
    store = stores.TokenStore(cfg.score.store)
    seq_len, pad_id, dtype = store.seq_len, losses.pad_to_mask(store), store.dtype
  jitted, args, key = score.abstract_step(cfg, spec, models, seq_len, pad_id, dtype, mesh, unroll)
  batch = key["batch"]
  tokens = batch * seq_len
  flops = transformer.flops_per_token(spec, seq_len, training=False) * models * tokens
  layout = (f"{models} models x {batch} x {seq_len} tokens per step ({batch // sharding.data_parallel_size(mesh)} "
            f"per data-parallel device), head chunk {cfg.score.loss_chunk}, vocab tile {cfg.score.vocab_tile or 'off'}"
            + (", fp8" if spec.fp8 else ""))
  return [Built("score_step", jitted, args, key, tokens, flops, layout)]


def eval_steps(cfg, mesh, unroll: bool = False, seq_len: int | None = None) -> list:
  """The held-out loss step, and with eval.tasks the longest multiple-choice bucket's."""
  spec = transformer.ModelSpec.from_config(cfg.model)
  if _exists(cfg.eval.params):
    spec = checkpoint.spec_from_manifest(checkpoint.read_params_manifest(cfg.eval.params), cfg.model)
  seq_len, pad_id, dtype = seq_len or spec.max_seq_len, None, stores.token_dtype(spec.vocab_size)
  named = [entry.split("=", 1)[-1] for entry in cfg.data.eval_stores]
  if named and _exists(named[0]):
    store = stores.TokenStore(named[0])
    seq_len, pad_id, dtype = store.seq_len, losses.pad_to_mask(store, cfg.sft.loss_on_padding), store.dtype
  out = []
  for kind, jitted, args, key in evaluate.abstract_steps(cfg, spec, mesh, seq_len, pad_id, dtype, unroll):
    length = key.get("length", seq_len)
    tokens = key["batch"] * length
    layout = (f"{key['batch']} x {length} tokens per step" + (f", {key['continuation']} continuation tokens "
                                                              "(nominal)" if kind == "choice_step" else ""))
    out.append(Built(kind, jitted, args, key, tokens,
                     transformer.flops_per_token(spec, length, training=False) * tokens, layout))
  return out


BUILDERS = {"train": train_steps, "score": score_steps, "eval": eval_steps}


# --- compile, estimate, report ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
  label: str
  built: Built
  result: compiler.Result
  seconds: float  # estimated step time (0 = none)
  source: str  # where `seconds` came from
  flops_per_chip: float  # XLA's count for the whole step (twin x repeat), 0 = not estimated
  fits: bool
  twin_seconds: float = 0.0  # compile time of the cost twin
  bytes_per_chip: float = 0.0  # XLA's HBM bytes accessed for the whole step (twin x repeat)


def _estimate(target, twin: compiler.Result, repeat: int) -> tuple[float, str]:
  """A step's time from its loop-free twin: the compiler's own estimate where it gives one, else the roofline of
  its FLOPs and HBM bytes on the chip."""
  if twin.error:
    return 0.0, f"no estimate: the loop-free twin did not fit ({twin.error})"
  if target.estimates_time and twin.optimal_seconds >= 0:
    return twin.optimal_seconds * repeat, ESTIMATE_NOTE.removesuffix(", not a measurement")
  if target.peak_flops and target.hbm_bandwidth:
    seconds = max(twin.flops / target.peak_flops, twin.bytes_accessed / target.hbm_bandwidth) * repeat
    return seconds, ("roofline: max(XLA's FLOPs / peak, XLA's HBM bytes / bandwidth); the compiler gives no "
                     "step-time estimate for this chip")
  return 0.0, "no estimate for this device"


def compile_one(label: str, built: Built, rebuild, target, mesh, estimate: bool) -> Report:
  """Compile `built`; if it fits and `estimate`, also its cost twin (`rebuild(unroll=True)`)."""
  result = compiler.compile_step(built.jitted, built.args, mesh)
  fits = not result.error and (not target.usable_bytes or result.needed <= target.usable_bytes)
  report = Report(label, built, result, 0.0, "not estimated (compile_estimate=False)", 0.0, fits)
  return add_estimate(report, rebuild, target, mesh) if fits and estimate else report


def add_estimate(report: Report, rebuild, target, mesh) -> Report:
  """`report` with the step time, its source and XLA's FLOPs from the step's cost twin (`rebuild(unroll=True)`)."""
  twin = next(b for b in rebuild(unroll=True) if b.kind == report.built.kind)
  twin_result = compiler.compile_step(twin.jitted, twin.args, mesh)
  seconds, source = _estimate(target, twin_result, twin.repeat)
  return dataclasses.replace(report, seconds=seconds, source=source, flops_per_chip=twin_result.flops * twin.repeat,
                             twin_seconds=twin_result.seconds, bytes_per_chip=twin_result.bytes_accessed * twin.repeat)


def report_lines(report: Report, target, devices: int) -> list[str]:
  lines = [f"{report.label} ({report.built.kind}): {report.built.describe}"]
  if report.result.error:
    lines.append(f"  does not fit: {report.result.error}")
    return lines
  lines.append(f"  memory/chip: {compiler.memory_parts(report.result, target.usable_bytes)}: "
               f"{'fits' if report.fits else 'DOES NOT FIT'}; compiled in {report.result.seconds:.1f} s"
               + (f" (+ {report.twin_seconds:.1f} s its loop-free twin)" if report.twin_seconds else ""))
  model = report.built.model_flops / devices
  if report.seconds:
    tokens = report.built.tokens / devices / report.seconds
    mfu = f", MFU {model / report.seconds / target.peak_flops:.1%}" if target.peak_flops else ""
    lines.append(f"  estimate ({report.source}; not a measurement): {report.seconds:.4g} s/step -> "
                 f"{tokens:,.0f} tokens/s per chip{mfu}; {report.flops_per_chip:.3e} FLOPs/chip per step (XLA's "
                 f"count; model 6N+12LdT: {model:.3e})")
  else:
    lines.append(f"  estimate: {report.source}; model FLOPs/chip per step {model:.3e}")
  return lines


# --- the fit search --------------------------------------------------------------------------------------------------


def _candidates(cfg, kind: str, mesh) -> list[tuple[str, dict]]:
  """Smaller batch settings to try, largest first: (the flag, the config change)."""
  dp = sharding.data_parallel_size(mesh)
  if kind == "train":
    batch = int(cfg.train.global_batch_size)
    micro = int(cfg.train.micro_batch_size) or batch
    return [(f"--config.train.micro_batch_size={m}", {"train__micro_batch_size": m})
            for m in range(micro - 1, 0, -1) if batch % m == 0 and m % dp == 0]
  field = "score.batch_size" if kind == "score" else "eval.batch_size"
  size = int(cfg.score.batch_size) if kind == "score" else evaluate.eval_batch_size(cfg, mesh)
  sizes = []
  while size // 2 >= dp:
    size //= 2
    sizes.append(size - size % dp)
  return [(f"--config.{field}={s}", {field.replace(".", "__"): s}) for s in dict.fromkeys(sizes)]


def _search_runs(cfg, kind: str, mesh) -> list[list[tuple[str, dict]]]:
  """Runs of settings to try, each ordered by falling memory: smaller batches; then (training without remat) remat
  at the same and at smaller micro-batches."""
  runs = [_candidates(cfg, kind, mesh)]
  if kind == "train" and not cfg.model.remat:
    flag, change = "--config.model.remat=True", {"model__remat": True}
    runs.append([(flag, change)] + [(f"{flag} {f}", change | c) for f, c in runs[0]])
  return runs


def _boundary(fits, count: int, start: int) -> int:
  """The first index of a list whose entries fail up to some point and fit from it on (memory falls along it):
  probe `start`, gallop away from it (1, 2, 4 ... entries) until the answer flips, bisect the bracket. A guess on
  the boundary or one entry off costs two or three compiles. `count` when none fits."""
  if count == 0:
    return 0
  start = min(max(start, 0), count - 1)
  offsets = [1 << k for k in range(count.bit_length() + 1)]
  if fits(start):  # the boundary is at or before start: probe start-1, start-2, start-4 ...
    lo, hi = 0, start
    for offset in offsets:
      if start - offset < 0:
        break
      if not fits(start - offset):
        lo = start - offset + 1
        break
      hi = start - offset
  else:  # after start: probe start+1, start+2, start+4 ...
    lo, hi = start + 1, count
    for offset in offsets:
      if start + offset >= count:
        break
      if fits(start + offset):
        hi = start + offset
        break
      lo = start + offset + 1
  while lo < hi:  # fits(hi) is known (or hi == count); entries before lo fail
    mid = (lo + hi) // 2
    if fits(mid):
      hi = mid
    else:
      lo = mid + 1
  return lo


def would_fit(cfg, kind: str, step_kind: str, target, mesh, needed: float = 0.0) -> str:
  """The flags of the largest smaller micro-batch (or batch) that fits, else of remat with the largest that fits,
  with its peak memory; "" when nothing does. The first probe scales the batch by usable / `needed` (memory grows
  about linearly with it), so a good guess costs two compiles."""
  texts = {}

  def fits(flags: str, change: dict) -> bool:
    built = next(b for b in BUILDERS[kind](_copy(cfg, **change), mesh) if b.kind == step_kind)
    result = compiler.compile_step(built.jitted, built.args, mesh)
    texts[flags] = f"{flags} (peak {result.needed / GIB:.2f} GiB per chip)"
    return not result.error and (not target.usable_bytes or result.needed <= target.usable_bytes)

  for number, run in enumerate(_search_runs(cfg, kind, mesh)):
    start = len(run) // 2
    if number == 0 and run and needed and target.usable_bytes:
      sizes = [next(iter(change.values())) for _, change in run]
      current = 2 * sizes[0] if kind != "train" else int(cfg.train.micro_batch_size or cfg.train.global_batch_size)
      guess = current * 0.9 * target.usable_bytes / needed
      start = next((i for i, size in enumerate(sizes) if size <= guess), len(run) - 1)
    found = _boundary(lambda i, r=run: fits(*r[i]), len(run), start)
    if found < len(run):
      return texts[run[found][0]]
  return ""


def _hand_estimate(cfg, kind: str, devices: int) -> None:
  """The stage's dry run for the same device count: the hand-computed figures beside the compiler's."""
  planning = _copy(cfg, dry_run_devices=devices, compile_for="")
  if kind == "train":
    train.describe(planning)
  elif kind == "score":
    spec, models = _score_spec(cfg)
    seq = stores.TokenStore(cfg.score.store).seq_len if _exists(cfg.score.store) else spec.max_seq_len
    score.describe_nominal(planning, int(cfg.score.batch_size), seq, models)


def compile_stage(cfg) -> list[Report]:
  """compile_for of one stage (pretrain, finetune, score, eval): its hand estimate, then each step compiled."""
  kind = STAGE_KINDS.get(cfg.stage)
  if kind is None:
    raise errors.ConfigError(f"compile_for: stage {cfg.stage!r} has no jitted step; it applies to "
                             f"{', '.join(STAGE_KINDS)} and pipeline")
  return compile_all(cfg, [(cfg.stage, cfg, kind, None, None)])


def compile_all(cfg, entries) -> list[Report]:
  """Compile each distinct step of `entries` [(label, stage config, kind, data size or None, seq_len or None)]
  once for cfg.compile_for, print the report, save executables (compile_save). A step that does not fit names the
  setting that would, and ends with a ConfigError after every step was reported."""
  target = targets.target(cfg.compile_for)
  mesh = sharding.make_mesh(cfg.mesh, target.devices)
  print(f"compile_for {target.describe()}; mesh {sharding.describe(mesh)}", flush=True)
  if gpus.is_description(target) and cfg.model.attention == "auto":
    print(gpus.ATTENTION_NOTE, flush=True)
  if len(entries) == 1:
    _hand_estimate(entries[0][1], entries[0][2], len(target.devices))
  reports, seen, refused = [], {}, []
  for label, stage_cfg, kind, num_items, seq_len in entries:
    extra = {"num_items": num_items} if kind == "train" else {}
    rebuild = lambda unroll=False, c=stage_cfg, k=kind, e=extra, s=seq_len: BUILDERS[k](c, mesh, unroll,
                                                                                       seq_len=s, **e)
    for built in rebuild():
      key = compiler.key_id(built.key if cfg.compile_save else _shape(built.key))
      if key in seen:
        print(f"{label} ({built.kind}): the same step as {seen[key]}", flush=True)
        continue
      seen[key] = label
      report = compile_one(label, built, rebuild, target, mesh, bool(cfg.compile_estimate))
      reports.append(report)
      print("\n".join(report_lines(report, target, len(target.devices))), flush=True)
      if not report.fits:
        hint = would_fit(stage_cfg, kind, built.kind, target, mesh, report.result.needed)
        fix = (f"would fit with {hint}" if hint else "no smaller batch fits, with or without remat: use more "
               "chips or --config.mesh.tensor")
        print(f"  {fix}", flush=True)
        refused.append(f"{label} {built.kind} ({built.describe}) does not fit a {target.name} chip; {fix}")
      elif cfg.compile_save:
        record = compiler.manifest(built.kind, target.name, target.devices, built.key)
        print(f"  saved {compiler.save(cfg.compile_save, report.result, record)}", flush=True)
  if len(reports) > 1:
    print_table(reports, target)
  if refused:
    raise errors.ConfigError("; ".join(refused))
  return reports


def _shape(key: dict) -> dict:
  """A step key without what only changes constants (the LR schedule, the padding id): steps with equal shape keys
  compile to the same memory and cost."""
  out = {k: v for k, v in key.items() if k not in ("schedule_steps", "pad_id")}
  if isinstance(out.get("train"), dict):
    out["train"] = {"loss_chunk": out["train"].get("loss_chunk")}
  return out


def print_table(reports: list[Report], target) -> None:
  devices = len(target.devices)
  print(f"\n| step | layout | peak GiB/chip (of {target.usable_bytes / GIB:.2f}) | s/step | tokens/s/chip | MFU |")
  print("|---|---|---|---|---|---|")
  for r in reports:
    tokens = f"{r.built.tokens / devices / r.seconds:,.0f}" if r.seconds else "-"
    mfu = (f"{r.built.model_flops / devices / r.seconds / target.peak_flops:.1%}"
           if r.seconds and target.peak_flops else "-")
    peak = "does not fit" if not r.fits else f"{r.result.needed / GIB:.2f}"
    seconds = f"{r.seconds:.4g}" if r.seconds else "-"
    print(f"| {r.label} {r.built.kind} | {r.built.describe} | {peak} | {seconds} | {tokens} | {mfu} |")
  sources = sorted({r.source for r in reports if r.seconds})
  print(f"(s/step, tokens/s and MFU: {'; '.join(sources)}; not measurements)" if sources else
        "(no step-time estimates: --config.compile_estimate=True compiles each step's loop-free twin for one)",
        flush=True)


def compile_pipeline(cfg, stages, seq_len: int) -> list[Report]:
  """compile_for of a pipeline: the prior's, conditional's, reference's and every target's train step (and their
  in-loop held-out step), and the scoring step, each distinct step once (`stages`: runner.stage_configs)."""
  entries = [("prior", stages.prior, "train", None, seq_len),
             ("conditional", stages.conditional, "train", None, seq_len)]
  if stages.reference is not None:
    entries.append(("reference", stages.reference, "train", None, seq_len))
  entries.append(("score", stages.score, "score", None, seq_len))
  entries += [(r.name, r.config, "train", None, seq_len) for r in stages.runs]
  entries += [(f"{label} held-out eval", c, "eval", None, seq_len) for label, c, kind, _, _ in list(entries)
              if kind == "train" and c.data.eval_stores]
  return compile_all(cfg, entries)
