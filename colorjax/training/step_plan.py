"""How a training run is cut: its length in optimizer steps, the length the LR schedule is defined over, and the
global batch split into micro-batches that spread over the data-parallel devices (RHO-down: the candidates drawn per
step). Decided from the config and the data size alone, so the dry run and preflight plan runs without their data.
"""
import dataclasses
import math

from colorjax import errors


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """How long a run is and how its batches are cut."""
  total_steps: int  # optimizer steps this run will take
  schedule_steps: int  # steps the LR schedule is defined over
  schedule: str  # "nominal" (max_steps, the original) or "data" (annealed to the data size)
  global_batch: int
  micro_batch: int
  seq_len: int
  num_items: int  # sequences (or index entries) the order permutes
  note: str | None = None  # an adjustment the plan made to the configured batch, for the user to see
  candidates: int = 0  # RHO-down: sequences drawn per step, of which global_batch are trained on (0 = off)

  @property
  def n_micro(self) -> int:
    return self.global_batch // self.micro_batch

  @property
  def tokens(self) -> int:
    return self.total_steps * self.global_batch * self.seq_len

  @property
  def rows_per_step(self) -> int:
    """Sequences each step reads from the data: the batch, or RHO-down's candidates."""
    return self.candidates or self.global_batch


def step_plan(cfg, num_items: int | None, seq_len: int, data_parallel: int) -> StepPlan:
  tcfg = cfg.train
  batch = int(tcfg.global_batch_size)
  micro = int(tcfg.micro_batch_size) or batch
  if batch <= 0 or batch % micro:
    raise errors.ConfigError(f"train.global_batch_size={batch} must be a positive multiple of "
                             f"train.micro_batch_size={micro}")
  note = None
  if micro % data_parallel:
    rounded = -(-micro // data_parallel) * data_parallel
    if batch % rounded:
      raise errors.ConfigError(f"train.micro_batch_size={micro} does not split over the data-parallel size "
                               f"{data_parallel} (mesh data×fsdp), and {rounded} does not divide "
                               f"train.global_batch_size={batch}; change the batch or the mesh")
    note = (f"micro-batch raised from {micro} to {rounded}: one or more rows for each of {data_parallel} "
            "data-parallel devices (per-device memory does not grow)")
    micro = rounded
  candidates = rho_candidates(tcfg, batch, micro)
  per_step = candidates or batch
  total = int(tcfg.max_steps)
  if total <= 0:
    if num_items is None:
      raise errors.ConfigError("train.max_steps <= 0 means one pass over the data, but the data size is unknown")
    total = num_items // per_step
  schedule_steps, schedule = total, "nominal"
  if tcfg.single_pass and num_items is not None:
    data_steps = num_items // per_step
    if data_steps == 0:
      raise errors.ConfigError(f"a single pass over {num_items} sequences cannot fill one batch of {per_step}; "
                               "give the stage more data or lower train.global_batch_size (or train.rho_tau)")
    total = min(total, data_steps)
    if tcfg.anneal_to_data:
      schedule_steps, schedule = total, "data"
  if total <= 0:
    raise errors.ConfigError(f"the run would take 0 steps ({num_items} sequences, batch {per_step}); give it more "
                             "data or set train.max_steps")
  return StepPlan(total, schedule_steps, schedule, batch, micro, seq_len, num_items or 0, note, candidates)


def rho_candidates(tcfg, batch: int, micro: int) -> int:
  """RHO-down's candidates per step (0 when off), checked to be a whole number of micro-batches."""
  tau = float(tcfg.rho_tau)
  if not tau:
    return 0
  if not (math.isfinite(tau) and tau >= 1):
    raise errors.ConfigError(f"train.rho_tau={tau}: draw tau x batch candidates per step, so tau >= 1 (0 = off)")
  if not tcfg.rho_reference:
    raise errors.ConfigError("train.rho_tau is set: give the reference model with --config.train.rho_reference")
  candidates = int(round(tau * batch))
  if candidates % micro:
    raise errors.ConfigError(f"train.rho_tau={tau:g} x global_batch_size={batch} = {candidates} candidates is not a "
                             f"multiple of the micro-batch {micro}; pick a tau that makes it one")
  return candidates
