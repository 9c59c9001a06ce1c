"""One jitted step, compiled ahead of time: its per-device memory and cost as the compiler reports them, a refusal
(out of memory) as data rather than a crash, and the executable saved beside a manifest that says what it was
compiled for, so that a run on the real devices loads it only when everything that went into it matches.

Stages import this module to load executables (`load`); `aot.steps` builds and reports the steps.
"""
import dataclasses
import hashlib
import json
import pathlib
import pickle
import re
import time

import jax

from colorjax import errors
from colorjax import sharding
from colorjax.aot import targets

FORMAT = "colorjax-executable/1"
# The modules whose code is inside a step's executable: a change to one makes saved executables stale.
STEP_CODE = ("model/transformer.py", "model/losses.py", "training/rho.py", "train.py", "score.py", "evaluate.py",
             "sharding.py")
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


@dataclasses.dataclass
class Result:
  """A step compiled (or refused) for some devices; bytes and FLOPs are per device."""
  executable: object  # jax.stages.Compiled, None when the compiler refused
  seconds: float  # compile time
  memory: dict  # argument, output, alias, temp, code, peak bytes
  flops: float = 0.0  # XLA's count (a loop body counted once)
  bytes_accessed: float = 0.0
  optimal_seconds: float = -1.0  # the compiler's step-time estimate (< 0: none)
  error: str = ""  # the compiler's refusal, first line

  @property
  def needed(self) -> float:
    """Bytes one device needs: XLA's peak of live buffers (or, when larger, arguments + temporaries + outputs not
    aliased to arguments) plus the program's code; the refusal's figure when the compiler refused."""
    m = self.memory
    total = m.get("argument", 0.0) + m.get("temp", 0.0) + m.get("output", 0.0) - m.get("alias", 0.0)
    return max(m.get("peak", 0.0), total) + m.get("code", 0.0)


def compile_step(jitted, args, mesh) -> Result:
  """Lower `jitted` on ShapeDtypeStructs `args` (laid out on `mesh`) and compile it; an out-of-memory refusal is a
  Result with `error` set and the memory it asked for."""
  with sharding.use_mesh(mesh):
    lowered = jitted.lower(*args)
  start = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e).splitlines()[0]
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    match = _OOM.search(message)
    need = float(match.group(1)) * targets.GIB if match else 0.0
    return Result(None, time.time() - start, {"peak": need}, error=message)
  seconds = time.time() - start
  stats = compiled.memory_analysis()
  memory = {name: float(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
            for name in ("argument", "output", "alias", "temp")}
  memory["code"] = float(getattr(stats, "generated_code_size_in_bytes", 0) or 0)
  peak = float(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  memory["peak"] = peak or memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  return Result(compiled, seconds, memory, float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                float(cost.get("optimal_seconds", -1.0)))


def size(nbytes: float) -> str:
  """Bytes as GiB, or MiB under a tenth of a GiB."""
  return f"{nbytes / targets.GIB:.2f} GiB" if nbytes >= targets.GIB / 10 else f"{nbytes / 2 ** 20:.1f} MiB"


def memory_parts(result: Result, usable: float) -> str:
  """'arguments A + temporaries T + outputs O (X aliased to arguments) + code C; peak P of U usable (N%)'."""
  m = result.memory
  of = f" of {size(usable)} usable ({result.needed / usable:.0%})" if usable else ""
  return (f"arguments {size(m['argument'])} + temporaries {size(m['temp'])} + outputs {size(m['output'])} "
          f"({size(m['alias'])} aliased to arguments) + code {size(m['code'])}; peak {size(result.needed)}{of}")


def memory_line(result: Result, target) -> str:
  """One line: a step's per-device memory as the compiler laid it out, against what a device holds."""
  if result.error:
    return f"memory/device (compiled by XLA for {target.name}): does not fit: {result.error}"
  return (f"memory/device (compiled by XLA for {target.name}; the figure to plan with, the estimate above is "
          f"hand-computed): {memory_parts(result, target.usable_bytes)}")


def code_hashes() -> dict:
  """sha256 (first 16 hex digits) of each module in STEP_CODE."""
  return {name: hashlib.sha256((_PACKAGE / name).read_bytes()).hexdigest()[:16] for name in STEP_CODE}


def key_id(key: dict) -> str:
  return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def manifest(kind: str, target_name: str, devices, key: dict) -> dict:
  """What an executable was made from: the step, the devices, the software and the step's settings (`key`)."""
  signature = targets.signature(devices)
  return {"format": FORMAT, "step": kind, "target": target_name, "devices": signature,
          "versions": targets.versions(signature["platform"]), "code": code_hashes(),
          "key": json.loads(json.dumps(key, default=str)), "key_id": key_id(key)}


def save(folder, result: Result, record: dict) -> pathlib.Path:
  """<folder>/<step>-<key id>.xla (the serialized executable and its argument trees) and .json (its manifest,
  with the compiler's memory figures): one folder holds the executables of many steps (a pipeline's)."""
  from jax.experimental import serialize_executable
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  stem = f"{record['step']}-{record['key_id']}"
  (folder / f"{stem}.xla").write_bytes(pickle.dumps(serialize_executable.serialize(result.executable)))
  (folder / f"{stem}.json").write_text(json.dumps(record | {"memory": result.memory}, indent=1))
  return folder / f"{stem}.xla"


def _flat(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def mismatch(saved: dict, wanted: dict) -> str:
  """Why an executable made as `saved` does not serve a run that needs `wanted` (both manifests); "" if it does."""
  def show(sig):
    shape = f" ({sig['shape']})" if sig.get("shape") else ""
    return f"{sig['devices']} {sig['device_kind']} device(s) on {sig['hosts']} host(s){shape}"

  if saved.get("format") != FORMAT:
    return f"it is not a {FORMAT} executable (format {saved.get('format')!r})"
  if saved["devices"] != wanted["devices"]:
    return (f"it was compiled for {saved['target']}: {show(saved['devices'])}; this run has "
            f"{show(wanted['devices'])}")
  if saved["versions"] != wanted["versions"]:
    differ = [f"{k} {saved['versions'].get(k)} there, {wanted['versions'].get(k)} here" for k in wanted["versions"]
              if saved["versions"].get(k) != wanted["versions"].get(k)]
    return "it was compiled with other software: " + "; ".join(differ)
  changed = [k for k in wanted["code"] if saved["code"].get(k) != wanted["code"][k]]
  if changed:
    return "colorjax's step code changed since it was compiled (" + ", ".join(f"colorjax/{k}" for k in changed) + ")"
  there, here = _flat(saved["key"]), _flat(wanted["key"])
  differ = [f"{k} ({there.get(k)!r} there, {here.get(k)!r} here)" for k in sorted(set(there) | set(here))
            if there.get(k) != here.get(k)]
  if differ:
    return "its step differs from this run's in " + ", ".join(differ)
  return ""


def _distance(saved: dict, wanted: dict) -> tuple:
  """How far a saved executable is from what a run needs: devices, then software, then code, then settings."""
  there, here = _flat(saved.get("key", {})), _flat(wanted["key"])
  return (saved.get("devices") != wanted["devices"], saved.get("versions") != wanted["versions"],
          saved.get("code") != wanted["code"], sum(there.get(k) != here.get(k) for k in set(there) | set(here)))


def load(folder, kind: str, devices, key: dict):
  """The `kind` executable saved in `folder` for this run (its devices, software, step code and settings), as a
  callable like the jitted step it replaces; a ConfigError names what differs from the nearest one saved."""
  from jax.experimental import serialize_executable
  folder = pathlib.Path(folder)
  wanted = manifest(kind, "this run", devices, key)
  redo = (f"compile it for this run (the same command with --config.compile_for=<this TPU slice, or local> "
          f"--config.compile_save={folder}) or drop --config.compile_load")
  path = folder / f"{kind}-{wanted['key_id']}.xla"
  saved = sorted(folder.glob(f"{kind}-*.json")) if folder.is_dir() else []
  records = [json.loads(p.read_text()) for p in saved]
  exact = [r for r in records if r.get("key_id") == wanted["key_id"]]
  candidates = exact or records
  if not candidates:
    held = sorted(p.stem for p in folder.glob("*.xla")) if folder.is_dir() else []
    raise errors.ConfigError(f"compile_load={folder}: no {kind} executable there (it holds: "
                             f"{', '.join(held) or 'none'}); {redo}")
  nearest = min(candidates, key=lambda r: _distance(r, wanted))
  reason = mismatch(nearest, wanted) or ("" if path.is_file() else f"{path.name} is missing beside its manifest")
  if reason:
    raise errors.ConfigError(f"compile_load={folder}: refused {kind}: {reason}; {redo}")
  serialized, in_tree, out_tree = pickle.loads(path.read_bytes())
  return serialize_executable.deserialize_and_load(serialized, in_tree, out_tree)
