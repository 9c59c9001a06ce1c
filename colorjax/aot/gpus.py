"""Compiling for NVIDIA GPUs without one: `--config.compile_for=h100`, `h200x8` (8 GPUs on one host) or `h100:2x8`
(2 hosts of 8).

The CUDA PJRT plugin (`pip install -e '.[gpu-aot]'`: jax-cuda12-pjrt at the pinned jax, no CUDA libraries, no driver)
describes GPUs from a target description (XLA's GpuTargetConfigProto, `gpu_specs/`: the H100 SXM's from XLA's
source, the H200's as XLA wrote it on this project's lent H200), and jax compiles for those compile-only devices as
for a TPU slice's. What comes back: the per-device memory analysis (arguments, temporaries, outputs) and a
serialized executable. XLA's GPU compiler gives no cost analysis and no step time without the hardware, so the
report's time is the roofline of the step's FLOPs and HBM bytes; with no GPU there is no autotuning either, so the
plan is compiled with cuBLAS GEMMs (`--xla_gpu_enable_triton_gemm=false`, also colorjax's default on GPUs).
"""
import dataclasses
import importlib.util
import os
import pathlib
import re

import jax

from colorjax import errors

GIB = 1024 ** 3
SPECS = pathlib.Path(__file__).with_name("gpu_specs")
INSTALL = "pip install -e '.[gpu-aot]' (the CUDA PJRT plugin at the pinned jax: 458 MB, no CUDA libraries)"
# jax's default share of GPU memory it preallocates and lets a program use (XLA_PYTHON_CLIENT_MEM_FRACTION overrides)
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Gpu:
  name: str  # as in compile_for: h100, h200
  device_kind: str  # what jax reports for one of its devices
  spec: str  # its GpuTargetConfigProto in gpu_specs/
  hbm_bytes: float  # the device's memory (the spec's device_memory_size)
  peak_flops: float  # dense bf16 FLOP/s (NVIDIA's datasheet)
  hbm_bandwidth: float  # bytes/s


GPUS = {
    "h100": Gpu("h100", "NVIDIA H100 80GB HBM3", "h100.txtpb", 84_942_979_072, 989e12, 3.35e12),
    "h200": Gpu("h200", "NVIDIA H200", "h200.txtpb", 150_109_880_320, 989e12, 4.8e12),
}
_NAME = re.compile(r"^(h100|h200)(?:x(\d+)|:(\d+)x(\d+))?$")


def parse(text: str) -> tuple[Gpu, int, int, str] | None:
  """(GPU, hosts, GPUs per host, canonical name) of `h100`, `h200x8`, `h100:2x8`; None when `text` names no GPU."""
  match = _NAME.match(text.strip().lower())
  if not match:
    return None
  gpu = GPUS[match.group(1)]
  hosts, per_host = (int(match.group(3)), int(match.group(4))) if match.group(3) else (1, int(match.group(2) or 1))
  if hosts < 1 or per_host < 1:
    raise errors.ConfigError(f"compile_for={text!r}: a GPU count is at least 1, e.g. {gpu.name}x8 or {gpu.name}:2x8")
  name = gpu.name + (f":{hosts}x{per_host}" if hosts > 1 else (f"x{per_host}" if per_host > 1 else ""))
  return gpu, hosts, per_host, name


def target_config(gpu: Gpu) -> str:
  """The GpuTargetConfigProto text of `gpu` (comment lines dropped)."""
  lines = (SPECS / gpu.spec).read_text().splitlines()
  return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def cuda_plugin_installed() -> bool:
  """Whether a CUDA PJRT plugin (jax-cuda12-pjrt or jax-cuda13-pjrt) is importable; without any jax plugin the
  `jax_plugins` namespace itself is missing."""
  if importlib.util.find_spec("jax_plugins") is None:
    return False
  return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def devices(gpu: Gpu, hosts: int, per_host: int) -> tuple:
  """Compile-only devices of `hosts` x `per_host` GPUs, described by the CUDA PJRT plugin."""
  if not cuda_plugin_installed():
    raise errors.ConfigError(f"compile_for={gpu.name}: the CUDA PJRT plugin is not installed; {INSTALL}")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(gpu),
                                            topology=f"1x{hosts}x{per_host}")
  except jax.errors.JaxRuntimeError as e:
    raise errors.ConfigError(f"compile_for={gpu.name}: the CUDA PJRT plugin refused its description "
                             f"({str(e).splitlines()[0]}); install the plugin at the pinned jax: {INSTALL}") from e
  return tuple(topology.devices)


def usable_bytes(gpu: Gpu) -> float:
  """What a program may use of one GPU: jax's preallocated share of its memory."""
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
  return fraction * gpu.hbm_bytes


# Measured on an H200 (jax 0.11.2): compile_for=h200 here vs compile_for=local there vs the step's measured peak.
ATTENTION_NOTE = ("note: compiled without a GPU, attention is XLA's ([batch, heads, seq, seq] scores in memory), "
                  "not the cuDNN fused kernel a GPU run uses (model.attention=auto): temporaries are overstated. On "
                  "an H200 the 150M train step (micro-batch 128) compiled here needs 72.0 GiB, on the GPU 34.9 "
                  "(measured peak 35.8); the 1.2B (micro 32) 88.4 vs 51.9 (57.2); the 150M scoring pair 14.9 vs 6.4 "
                  "(7.5). compile_for=local on the GPU gives its own figures (docs/tpu.md)")


def is_description(target) -> bool:
  """Whether `target` is a GPU described here (compile_for=h100...), not this machine's own devices."""
  return target.name != "local" and target.devices[0].platform in ("gpu", "cuda")
