"""Summarize a jax.profiler trace: where device time went, by kernel, as a short table and one JSON line.

  python tests/benchmarks/trace_summary.py <trace folder>      # a folder written by jax.profiler.trace

Reads the Perfetto JSON (`*.trace.json.gz` / `perfetto_trace.json.gz`) that `jax.profiler.trace(...,
create_perfetto_trace=True)` writes. On GPU it keeps the device streams' kernel events; elsewhere (CPU) the XLA op
events, so the tool can be tried without a GPU.
"""
import collections
import gzip
import json
import pathlib
import sys
import time

import jax


def profile(fn, folder: pathlib.Path, steps: int = 3) -> dict:
  """Trace `steps` calls of fn (after one untraced call) into `folder` and print the summary."""
  jax.block_until_ready(fn())
  with jax.profiler.trace(str(folder), create_perfetto_trace=True):
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
  time.sleep(0.5)
  summary = summarize(folder, steps)
  print(format_summary(summary), flush=True)
  print(json.dumps({"measure": "profile", "folder": str(folder), **{k: v for k, v in summary.items()
                                                                      if k != "top"}}), flush=True)
  return summary


def _trace_file(folder: pathlib.Path) -> pathlib.Path:
  found = sorted(pathlib.Path(folder).rglob("*.json.gz"), key=lambda p: p.stat().st_mtime)
  if not found:
    raise FileNotFoundError(f"no *.json.gz trace under {folder}; was it written with create_perfetto_trace=True?")
  return found[-1]


def summarize(folder: pathlib.Path, steps: int = 1, top: int = 40) -> dict:
  """Per-step device time by event name: total, count, and the `top` names by time."""
  with gzip.open(_trace_file(folder), "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, name in names.items() if "/device:GPU" in name}
  keep = gpu or {pid for pid, name in names.items() if "/host:CPU" in name or "CPU" in name} or set(names)
  by_name: dict = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in keep and "dur" in e:
      by_name[e["name"]][0] += float(e["dur"])
      by_name[e["name"]][1] += 1
  total_us = sum(v[0] for v in by_name.values())
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
  return {"device_events": "gpu" if gpu else "host", "ms_per_step": round(total_us / 1e3 / steps, 3),
          "events_per_step": round(sum(v[1] for v in by_name.values()) / steps, 1),
          "top": [(name, round(us / 1e3 / steps, 3), count // max(steps, 1)) for name, (us, count) in ranked[:top]]}


def format_summary(summary: dict) -> str:
  lines = [f"trace ({summary['device_events']} events): {summary['ms_per_step']} ms/step of event time, "
           f"{summary['events_per_step']} events/step"]
  for name, ms, count in summary["top"]:
    share = ms / max(summary["ms_per_step"], 1e-9)
    lines.append(f"  {ms:9.3f} ms {share:6.1%} x{count:<5d} {name[:110]}")
  return "\n".join(lines)


if __name__ == "__main__":
  print(format_summary(summarize(pathlib.Path(sys.argv[1]))))
