"""The run's metrics.jsonl (with optional TensorBoard / W&B mirrors), and MFU bookkeeping.
Only process 0 writes or prints."""
import importlib
import json
import pathlib
import secrets
import time
import warnings

import jax

from colorjax import console
from colorjax import errors

# Dense bf16 peak FLOP/s per device, by substrings of jax's device_kind (989 TFLOP/s for an H100:
# docs/definitions.md#flop-counts-and-reference-figures).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
    ("B200", 2250e12), ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops(configured: float = 0.0) -> float:
  """Per-device peak for MFU: the configured value, else a lookup by device kind; 0 when unknown (e.g. CPU)."""
  if configured:
    return float(configured)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return 0.0


class MetricsWriter:
  """Appends one JSON object per line to <workdir>/metrics.jsonl (process 0 only), and passes each record to the
  mirrors (`MetricsMirror`s) it was given."""

  def __init__(self, workdir, truncate_after_step: int | None = None, mirrors=()):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = console.is_main()
    self.mirrors = list(mirrors) if self.enabled else []
    if self.enabled and truncate_after_step is not None and self.path.exists():
      self._drop_after(truncate_after_step)

  def _drop_after(self, step: int):
    """On resume, drop records of steps past the checkpoint and the evaluation at it (a kill during that eval would
    lose it, so the resumed run always evaluates there again): the resumed run writes them again, identically."""
    def kept(record: dict) -> bool:
      at = record.get("step", 0)
      return at < step or (at == step and record.get("event") != "eval")

    lines = self.path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and kept(json.loads(line))]
    if len(keep) != len(lines):
      print(f"resume: dropping {len(lines) - len(keep)} metric records after step {step} (they are recomputed)")
      self.path.write_text("".join(line + "\n" for line in keep))

  def write(self, record: dict):
    if not self.enabled:
      return
    record = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for mirror in list(self.mirrors):
      try:
        mirror.write(record)
      except Exception as e:  # pylint: disable=broad-except
        self._drop(mirror, e)

  def _drop(self, mirror, error):
    """A mirror that fails is switched off with a warning: metrics.jsonl is the record, a run must not die of it."""
    self.mirrors.remove(mirror)
    warnings.warn(f"{type(mirror).__name__} failed ({type(error).__name__}: {error}); it is off for the rest of this "
                  "run, metrics.jsonl has every record")

  def close(self):
    for mirror in list(self.mirrors):
      try:
        mirror.close()
      except Exception as e:  # pylint: disable=broad-except
        self._drop(mirror, e)
    self.mirrors = []


def scalars(record: dict) -> dict:
  """A train or eval record's numbers as `train/<key>` and `eval/<name>` tags (steps, events and None left out)."""
  event = record.get("event")
  if event not in ("train", "eval"):
    return {}
  return {(k if "/" in k else f"{event}/{k}"): float(v) for k, v in record.items()
          if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsMirror:
  """A copy of the scalar records elsewhere (a cluster's dashboard); metrics.jsonl stays the record."""

  def write(self, record: dict) -> None:
    values = scalars(record)
    if values:
      self.log(values, int(record["step"]))

  def log(self, values: dict, step: int) -> None:
    raise NotImplementedError

  def close(self) -> None:
    pass


# config switch -> (module, pip extra, pinned package); the modules are imported only when a switch is on
EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard", "tensorboardX==2.6.5"),
          "wandb_project": ("wandb", "wandb", "wandb==0.30.0")}


def _import_extra(field: str, where: str = "train"):
  module, extra, package = EXTRAS[field]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise errors.ConfigError(f"{where}.{field} needs the optional package {module}: pip install 'colorjax[{extra}]' "
                             f"(or pip install {package}); or turn the option off ({e})") from e


def check_mirrors(tcfg, where: str = "train") -> None:
  """Fail before anything runs when a mirror is switched on but its package is missing (on every host, alike)."""
  for field in EXTRAS:
    if tcfg[field]:
      _import_extra(field, where)


class TensorBoardMirror(MetricsMirror):
  """Scalars as TensorBoard event files in `folder` (tensorboardX: no TensorFlow). A resumed run hides the events
  past its checkpoint that the interrupted run wrote (`purge_step`), as the resume drops them from metrics.jsonl."""

  def __init__(self, folder, start_step: int = 0):
    tensorboardx = _import_extra("tensorboard")
    self.writer = tensorboardx.SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

  def log(self, values: dict, step: int) -> None:
    for tag, value in values.items():
      self.writer.add_scalar(tag, value, global_step=step)

  def close(self) -> None:
    self.writer.close()


class WandbMirror(MetricsMirror):
  """Scalars to a Weights & Biases run (`WANDB_MODE`, e.g. offline, and the other WANDB_* variables apply). The run
  id is kept in <workdir>/wandb/run_id, so a resumed training run continues the same W&B run. W&B drops steps below
  the last one it has: those a killed run logged past its checkpoint are not rewritten there (metrics.jsonl's are)."""

  def __init__(self, project: str, workdir, name: str, job_type: str, config: dict):
    wandb = _import_extra("wandb_project")
    folder = pathlib.Path(workdir) / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    if not id_file.exists():
      id_file.write_text(secrets.token_hex(4))
    self.run = wandb.init(project=project, dir=str(workdir), name=name, job_type=job_type, config=config,
                          id=id_file.read_text().strip(), resume="allow")

  def log(self, values: dict, step: int) -> None:
    self.run.log(values, step=step)

  def close(self) -> None:
    self.run.finish()


def open_mirrors(tcfg, workdir, stage: str, start_step: int, config: dict) -> list:
  """The mirrors train.tensorboard / train.wandb_project switch on, on process 0 (an empty list elsewhere)."""
  if not console.is_main():
    return []
  workdir = pathlib.Path(workdir)
  mirrors = []
  if tcfg.tensorboard:
    mirrors.append(TensorBoardMirror(workdir / "tensorboard", start_step))
  if tcfg.wandb_project:
    mirrors.append(WandbMirror(tcfg.wandb_project, workdir, workdir.name, stage, config))
  return mirrors


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StepProfiler:
  """Traces steps [a, b) of a loop (`profile_steps="a:b"`) with jax.profiler into `folder`: a TensorBoard /
  Perfetto trace (`*.trace.json.gz`) of what the devices ran; `tests/benchmarks/trace_summary.py` tabulates it."""

  def __init__(self, steps: str, folder):
    self.folder, self.active = pathlib.Path(folder), False
    self.start = self.stop = -1
    if steps:
      try:
        self.start, self.stop = (int(x) for x in steps.split(":"))
      except ValueError as e:
        raise errors.ConfigError(f"profile_steps={steps!r}: write it as a:b, e.g. 10:13") from e
      if not 0 <= self.start < self.stop:
        raise errors.ConfigError(f"profile_steps={steps!r}: need 0 <= a < b")

  def before(self, step: int) -> None:
    if step == self.start:
      self.folder.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs) -> None:
    if self.active and step + 1 >= self.stop:
      self.close(outputs)

  def close(self, outputs=None) -> None:
    if self.active:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      if console.is_main():
        print(f"profile: steps {self.start}:{self.stop} traced into {self.folder}", flush=True)


class TrainLog:
  """A training run's metrics: the start record, train records averaged over `log_every` steps (fetched one step
  late by the caller, so the host never stalls the device), eval records, and the console progress bar."""

  def __init__(self, workdir, stage: str, start_step: int, total_steps: int, tokens_per_step: int,
               flops_per_token: float, peak: float, log_every: int, truncate: bool, mirrors=()):
    self.writer = MetricsWriter(workdir, truncate_after_step=start_step if truncate else None, mirrors=mirrors)
    self.total, self.tokens_per_step, self.log_every = total_steps, tokens_per_step, log_every
    self.flops_per_token, self.peak = flops_per_token, peak
    self.bar = console.Progress(total=total_steps, unit="steps", desc=stage)
    self.bar.count = start_step
    self._bar_closed = False
    self._reset()

  def _reset(self):
    self.window = {"loss": 0.0, "z_loss": 0.0, "n": 0, "t0": time.time()}

  def start(self, header: dict) -> None:
    self.writer.write(header)

  def train(self, step_done: int, stats, flush: bool = False) -> None:
    """Step `step_done`'s stats; a record every log_every steps, at the end, and when `flush` (a run that stops)."""
    stats = jax.device_get(stats)
    self.bar.update(1)
    for k in ("loss", "z_loss"):
      self.window[k] += float(stats[k])
    self.window["n"] += 1
    if step_done % self.log_every and step_done != self.total and not flush:
      return
    n = self.window["n"]
    tokens_per_s = n * self.tokens_per_step / max(time.time() - self.window["t0"], 1e-9)
    mfu = tokens_per_s * self.flops_per_token / (self.peak * jax.device_count()) if self.peak else None
    record = {"event": "train", "step": step_done, "loss": self.window["loss"] / n, "z_loss": self.window["z_loss"] / n,
              "grad_norm": float(stats["grad_norm"]), "lr": float(stats["lr"]), "tokens_per_s": tokens_per_s,
              "tokens_seen": step_done * self.tokens_per_step, "mfu": mfu,
              **{k: float(v) for k, v in stats.items() if k.startswith("rho_")}}
    self.writer.write(record)
    self.bar.update(0, extra=f"loss {record['loss']:.4f} lr {record['lr']:.2e} {console.human(tokens_per_s)} tok/s"
                    + (f" mfu {mfu:.1%}" if mfu else ""), force=True)
    self._reset()

  def eval(self, step: int, results: dict) -> None:
    self.writer.write({"event": "eval", "step": step, **{f"eval/{k}": v for k, v in results.items()}})
    if console.is_main():
      print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()), flush=True)

  def done_stepping(self) -> None:
    """The progress bar's last line (evals and the final save still follow)."""
    if not self._bar_closed:
      self._bar_closed = True
      self.bar.close()

  def close(self) -> None:
    self.done_stepping()
    self.writer.close()
