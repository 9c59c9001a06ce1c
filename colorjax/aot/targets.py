"""What `--config.compile_for` compiles for: a TPU slice by name (`v5p:2x2x2`, or an accelerator type such as
`v5p-16`), whose devices libtpu describes without the hardware, or `local`, this machine's own devices.

Per chip: the HBM the compiler may use, nominal HBM and bf16 peak FLOP/s (Google's Cloud TPU pages), and HBM
bandwidth for the roofline of chips whose compiler gives no step-time estimate. NVIDIA GPUs without one (`h100`,
`h200x8`, `h100:2x8`) come from the CUDA PJRT plugin given a target description (gpus.py).
"""
import dataclasses
import importlib.metadata
import importlib.util
import os
import re

import jax

from colorjax import errors
from colorjax.aot import gpus
from colorjax.training import metrics

GIB = 1024 ** 3
LOCAL = "local"
INSTALL = ("pip install -e '.[tpu]' (jax[tpu] at the jax version requirements.txt pins, which brings the matching "
           "libtpu)")


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # as in a topology name: v4, v5e, v5p, v6e
  device_kind: str  # what jax reports for one of its devices
  accelerator: str  # prefix of its Cloud accelerator types (v5litepod-16)
  rank: int  # dimensions of its slice shapes (2x2 or 2x2x2)
  cores_per_chip: int  # TensorCores an accelerator type counts per chip (v4-16 and v5p-16 are 8 chips)
  hbm_gib: float  # HBM per chip, Google's figure
  usable_gib: float  # HBM the compiler lets a program use (its "available HBM" when a program does not fit)
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip
  options: tuple = ()  # extra arguments of libtpu's topology lookup


# cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}; usable HBM: libtpu 0.0.42's RESOURCE_EXHAUSTED message on each chip.
CHIPS = {
    "v4": Chip("v4", "TPU v4", "v4", 3, 2, 32, 30.75, 275e12, 1200e9, (("chip_config_name", "megacore"),)),
    "v5e": Chip("v5e", "TPU v5 lite", "v5litepod", 2, 1, 16, 15.75, 197e12, 819e9),
    "v5p": Chip("v5p", "TPU v5", "v5p", 3, 2, 95, 95.74, 459e12, 2765e9),
    "v6e": Chip("v6e", "TPU v6 lite", "v6e", 2, 1, 32, 31.25, 918e12, 1638e9),
}
# Google's default slice shape of an accelerator type, by chips (v5e and v6e are 2-D, v4 and v5p 3-D).
SHAPES = {2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
          3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}}
# Training the paper's models on a slice: (largest per-chip micro-batch, remat), chosen from docs/tpu.md's compiled
# table (8-chip slices, global batch 256 x 512, FSDP over every chip): the largest micro-batch that fits without
# remat (where estimated, also the best tokens/s); tests/test_compile.py checks them against the page.
# `configs/pretrain.py:<size>,<slice>` (and finetune.py, target.py) apply it.
TRAIN_DEFAULTS = {
    ("v4", "150m"): (32, False), ("v5e", "150m"): (32, False), ("v5p", "150m"): (32, False),
    ("v6e", "150m"): (32, False),
    ("v4", "1.2b"): (8, False), ("v5e", "1.2b"): (4, False), ("v5p", "1.2b"): (32, False),
    ("v6e", "1.2b"): (16, False),
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)$")
_ACCELERATOR = re.compile(r"^(v4|v5p|v5litepod|v5e|v6e)-(\d+)$")  # v5e-N: as v5litepod-N


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, and what one of them holds and computes."""
  name: str  # the topology (v5p:2x2x2) or "local"
  devices: tuple
  usable_bytes: float  # per device; 0 = unknown
  hbm_bytes: float  # per device, nominal; 0 = unknown
  peak_flops: float  # per device; 0 = unknown
  hbm_bandwidth: float  # per device; 0 = unknown
  estimates_time: bool  # whether the compiler's own step-time estimate (optimal_seconds) is valid here

  @property
  def hosts(self) -> int:
    return len({d.process_index for d in self.devices})

  def describe(self) -> str:
    d = self.devices[0]
    parts = [f"{len(self.devices)} {d.device_kind} device(s) on {self.hosts} host(s)"]
    if self.usable_bytes:
      parts.append(f"{self.usable_bytes / GIB:.2f} GiB HBM usable per chip")
    if self.peak_flops:
      parts.append(f"{self.peak_flops / 1e12:.0f} TFLOP/s bf16 peak")
    return f"{self.name}: " + ", ".join(parts)


def parse(text: str, setting: str = "compile_for") -> tuple[Chip, str]:
  """(chip, canonical topology name) of `v5p:2x2x2` or an accelerator type (`v5p-16`, `v5litepod-16`); errors name
  `setting`, where the text came from."""
  text = text.strip().lower()
  match = _TOPOLOGY.match(text)
  if match:
    chip = CHIPS[match.group(1)]
    if len(match.group(2).split("x")) != chip.rank:
      raise errors.ConfigError(f"{setting}={text!r}: a {chip.name} slice has {chip.rank} dimensions, e.g. "
                               f"{chip.name}:{SHAPES[chip.rank][8]}")
    return chip, text
  match = _ACCELERATOR.match(text)
  if match:
    chip = next(c for c in CHIPS.values() if match.group(1) in (c.accelerator, c.name))
    chips = int(match.group(2)) // chip.cores_per_chip
    if chips not in SHAPES[chip.rank]:
      raise errors.ConfigError(f"{setting}={text!r}: no default shape for {chips} {chip.name} chips; name the "
                               f"slice, e.g. {chip.name}:{SHAPES[chip.rank][8]}")
    return chip, f"{chip.name}:{SHAPES[chip.rank][chips]}"
  if gpus.parse(text) is not None:
    raise errors.ConfigError(f"{setting}={text!r} is a GPU: it has no TPU slice defaults (compile_for takes it)")
  if re.match(r"^(h100|h200|b200|a100|gpu|cuda)", text):
    raise errors.ConfigError(f"{setting}={text!r}: write a GPU as {', '.join(gpus.GPUS)}, with a count (h200x8) or "
                             f"hosts x GPUs (h100:2x8); on another GPU machine use --config.compile_for={LOCAL}")
  raise errors.ConfigError(f"{setting}={text!r}: write a TPU slice as <chip>:<shape> with chip one of "
                           f"{', '.join(CHIPS)} (v5p:2x2x2, v5e:4x4) or an accelerator type (v5p-16, v5litepod-16), "
                           f"or {LOCAL} for this machine's devices")


def train_defaults(size: str, text: str, global_batch: int) -> tuple[int, bool]:
  """(train.micro_batch_size, model.remat) for model `size` on slice `text`: TRAIN_DEFAULTS' per-chip micro-batch
  times the chips, at most the global batch, rounded down to a multiple of the chips that divides it."""
  chip, name = parse(text, "the config's TPU slice")
  if (chip.name, size) not in TRAIN_DEFAULTS:
    raise errors.ConfigError(f"no {chip.name} defaults for model size {size!r}; sizes with defaults: "
                             f"{sorted({s for c, s in TRAIN_DEFAULTS if c == chip.name})}")
  per_chip, remat = TRAIN_DEFAULTS[(chip.name, size)]
  chips = 1
  for extent in name.split(":")[1].split("x"):
    chips *= int(extent)
  fitting = [m for m in range(chips, min(global_batch, per_chip * chips) + 1, chips) if global_batch % m == 0]
  return (fitting[-1] if fitting else global_batch), remat


def is_slice(text: str) -> bool:
  return bool(text) and text.strip().lower() != LOCAL


def local_compiler(cfg) -> bool:
  """Whether a dry run also compiles its steps for this machine's devices: when it plans for this machine's own
  accelerators (a CPU's dry runs plan for other machines; compile_for has its own report, aot.steps)."""
  return (not cfg.compile_for and jax.default_backend() != "cpu"
          and cfg.dry_run_devices in (0, jax.device_count()))


def quiet_environment(text: str) -> None:
  """Before any backend starts: keep jax on the CPU and libtpu from looking for a TPU (the metadata server, worker
  hostnames), so compiling for a TPU slice prints nothing but the report, here or on a TPU VM whose chips are busy.
  Only for compile_for processes: a run on a slice needs libtpu's own discovery."""
  if not is_slice(text):
    return
  if gpus.parse(text) is not None:  # the CUDA plugin describes the GPUs; jax itself stays on the CPU
    jax.config.update("jax_platforms", "cpu")
    return
  chip, name = parse(text)
  chips = 1
  for size in name.split(":")[1].split("x"):
    chips *= int(size)
  jax.config.update("jax_platforms", "cpu")
  # ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes /tmp/libtpu_lockfile, so a second process (another
  # compile, a test run) fails; nothing here drives a chip.
  os.environ.update(TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE=f"{chip.accelerator}-{chips * chip.cores_per_chip}",
                    TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0", ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def _tpu_devices(chip: Chip, name: str) -> tuple:
  if importlib.util.find_spec("libtpu") is None:
    raise errors.ConfigError(f"compile_for={name}: the TPU compiler (libtpu) is not installed; {INSTALL}")
  from jax.experimental import topologies
  try:
    return tuple(topologies.get_topology_desc(topology_name=name, platform="tpu", **dict(chip.options)).devices)
  except jax.errors.JaxRuntimeError as e:
    first = str(e).splitlines()[0]
    if not first.startswith("INVALID_ARGUMENT"):
      raise
    raise errors.ConfigError(f"compile_for={name}: libtpu has no such slice ({first}); use a shape of Google's "
                             f"table, e.g. {chip.name}:{SHAPES[chip.rank][8]}") from e


_TOPOLOGIES = {"tpu": _tpu_devices}  # platform -> (chip, topology name) -> compile-only devices


def target(text: str) -> Target:
  """The devices of `text` (a TPU slice, or `local`) and their per-device figures."""
  if not is_slice(text):
    devices = tuple(jax.devices())
    stats = devices[0].memory_stats() or {}
    usable = float(stats.get("bytes_limit", 0))
    kind = devices[0].device_kind
    chip = next((c for c in CHIPS.values() if c.device_kind == kind), None)
    return Target(LOCAL, devices, usable, chip.hbm_gib * GIB if chip else usable, metrics.peak_flops(),
                  chip.hbm_bandwidth if chip else 0.0, estimates_time=chip is None or chip.name == "v5p")
  gpu = gpus.parse(text)
  if gpu is not None:  # a GPU without one: its memory analysis, and a roofline for the time
    gpu, hosts, per_host, name = gpu
    return Target(name, gpus.devices(gpu, hosts, per_host), gpus.usable_bytes(gpu), gpu.hbm_bytes, gpu.peak_flops,
                  gpu.hbm_bandwidth, estimates_time=False)
  chip, name = parse(text)
  devices = _TOPOLOGIES["tpu"](chip, name)
  # libtpu 0.0.42 gives a valid optimal_seconds only on v5p (negative elsewhere): the others get a roofline
  return Target(name, devices, chip.usable_gib * GIB, chip.hbm_gib * GIB, chip.peak_flops, chip.hbm_bandwidth,
                estimates_time=chip.name == "v5p")


def signature(devices) -> dict:
  """What an executable is compiled for: platform, device kind, devices, hosts and slice shape (from the chips'
  coordinates; "" where devices have none). The same for a slice's compile-only devices and its real ones."""
  devices = list(devices)
  coords = [tuple(d.coords) for d in devices if getattr(d, "coords", None) is not None]
  shape = "x".join(str(max(c[i] for c in coords) + 1) for i in range(len(coords[0]))) if coords else ""
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
          "hosts": len({d.process_index for d in devices}), "shape": shape}


def versions(platform: str) -> dict:
  """The software that decides whether an executable loads: jax, jaxlib and (TPU) libtpu."""
  found = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")}
  if platform == "tpu":
    try:
      found["libtpu"] = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
      found["libtpu"] = ""
  return found
