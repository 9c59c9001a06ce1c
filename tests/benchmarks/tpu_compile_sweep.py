"""Compile the 150M / 1.2B train steps (and the 150M scoring pair) for TPU slices over per-chip micro-batches and
remat, with colorjax's own compile_for machinery, and print one JSON line per compile: the figures of docs/tpu.md.
Needs libtpu (`pip install -e '.[tpu]'`); no TPU. Each compile takes seconds (tiny) to minutes (1.2B) on 2 cores.

  python tests/benchmarks/tpu_compile_sweep.py --slices v5e:2x4,v5p:2x2x2 --sizes 150m --micro 4,8,16,32 \
      --remat off,on --out sweep.jsonl

Per (slice, size) the micro-batches run smallest first without remat and stop at the first that does not fit (larger
ones would not either); with --remat auto (default) remat is then tried on the ones that did not fit, smallest first,
until one does not fit with it either. With --estimate (default) each fitting step's loop-free twin is compiled too,
for s/step. Lines already in --out are not compiled again.
"""
import argparse
import json
import pathlib
import sys
import time

from colorjax import config
from colorjax import sharding
from colorjax.aot import steps as aot_steps
from colorjax.aot import targets


def stage_config(kind: str, size: str, global_batch: int, micro: int, remat: bool, score_batch: int):
  cfg = config.pretrain_config(size) if kind == "train" else config.get_config()
  cfg.model = config.model_config(size)
  cfg.model.remat = remat
  if kind == "train":
    cfg.train.global_batch_size = global_batch
    cfg.train.micro_batch_size = micro
  else:
    cfg.stage = "score"
    cfg.score.batch_size = score_batch
  return cfg


def table(paths) -> str:
  """docs/tpu.md's markdown table from sweep JSON lines."""
  rows = [json.loads(line) for path in paths for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
  last = {(r["slice"], r["size"], r["kind"], r["per_chip"], r["remat"]): r for r in rows}  # an estimate written later
  rows = list(last.values())
  out = ["| chip | slice (chips / hosts) | model | step | per chip | remat | peak GiB / usable | s/step | "
         "tokens/s/chip | MFU | estimate from | compile s (+ twin) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    fits = f"{r['peak_gib']:.1f} / {r['usable_gib']:.2f}" if r["fits"] else (
        f"does not fit ({r['peak_gib']:.1f} / {r['usable_gib']:.2f})" if r["peak_gib"] else "does not fit")
    estimate = r["step_s"] and r["fits"]
    out.append(f"| {r['chip']} | {r['slice']} ({r['chips']} / {r['hosts']}) | {r['size']} | {r['kind']} | "
               f"{r['per_chip']} | {'on' if r['remat'] else 'off'} | {fits} | "
               f"{r['step_s']:.3f} | {r['tokens_per_s_per_chip']:,.0f} | {r['mfu']:.1%} | " if estimate else
               f"| {r['chip']} | {r['slice']} ({r['chips']} / {r['hosts']}) | {r['size']} | {r['kind']} | "
               f"{r['per_chip']} | {'on' if r['remat'] else 'off'} | {fits} | - | - | - | ")
    source = "-" if not estimate else "cost model" if r["source"].startswith("XLA TPU") else "roofline"
    out[-1] += f"{source} | {r['compile_s']:.0f}" + (f" (+ {r['twin_s']:.0f})" if r["twin_s"] else "") + " |"
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--slices", default="v4:2x2x2,v5e:2x4,v5p:2x2x2,v6e:2x4")
  parser.add_argument("--sizes", default="150m,1.2b")
  parser.add_argument("--kind", default="train", choices=("train", "score"))
  parser.add_argument("--micro", default="4,8,16,32", help="per-chip micro-batches (train) or batches (score)")
  parser.add_argument("--remat", default="auto", help="auto (on where off does not fit), off, on, or off,on")
  parser.add_argument("--global-batch", type=int, default=256)
  parser.add_argument("--estimate", default="all", choices=("all", "largest", "none"),
                      help="step-time estimates (a loop-free twin each) for every fitting step, or only for the "
                      "largest fitting micro-batch without remat and, if remat fits a larger one, with it")
  parser.add_argument("--out", default="", help="append the JSON lines to this file too")
  parser.add_argument("--table", nargs="*", help="print docs/tpu.md's table from these JSON-line files and exit")
  args = parser.parse_args(argv)
  if args.table:
    print(table(args.table))
    return 0
  targets.quiet_environment(args.slices.split(",")[0])
  done = {}  # (slice, size, kind, per chip, remat) -> the last record written for it
  if args.out and pathlib.Path(args.out).exists():
    for line in pathlib.Path(args.out).read_text().splitlines():
      r = json.loads(line)
      done[(r["slice"], r["size"], r["kind"], r["per_chip"], r["remat"])] = r
  out = open(args.out, "a") if args.out else None
  builder = aot_steps.BUILDERS[args.kind]
  for name in args.slices.split(","):
    target = targets.target(name)
    chips = len(target.devices)
    for size in args.sizes.split(","):
      failed, fitting = [], {}  # fitting: remat -> (per chip, report, rebuild, start) of the largest that fits
      for remat in ([False, True] if args.remat == "auto" else [r == "on" for r in args.remat.split(",")]):
        sizes = sorted(int(m) for m in args.micro.split(","))
        sizes = failed if args.remat == "auto" and remat else sizes
        for per_chip in sizes:
          if args.kind == "train" and args.global_batch % (per_chip * chips):
            continue
          previous = done.get((target.name, size, args.kind, per_chip, remat))
          if previous is not None and (previous["step_s"] or not previous["fits"] or args.estimate != "all"):
            if not previous["fits"]:
              failed = [m for m in sizes if m >= per_chip]
              break
            continue
          cfg = stage_config(args.kind, size, args.global_batch, per_chip * chips, remat, per_chip * chips)
          mesh = sharding.make_mesh(cfg.mesh, target.devices)
          (built,) = [b for b in builder(cfg, mesh) if b.kind == f"{args.kind}_step"]
          start = time.time()
          rebuild = lambda unroll=False, c=cfg, m=mesh: builder(c, m, unroll)
          report = aot_steps.compile_one(size, built, rebuild, target, mesh, args.estimate == "all")
          write(record_of(report, target, size, args, per_chip, remat, start), out)
          if not report.fits:
            failed = [m for m in sizes if m >= per_chip]
            break
          fitting[remat] = (per_chip, report, rebuild, mesh)
      if args.estimate == "largest":  # the step time of the largest that fits, and of remat's if it is larger
        chosen = [fitting[False]] if False in fitting else []
        if True in fitting and (not chosen or fitting[True][0] > chosen[0][0]):
          chosen.append(fitting[True])
        for per_chip, report, rebuild, mesh in chosen:
          start = time.time()
          report = aot_steps.add_estimate(report, rebuild, target, mesh)
          write(record_of(report, target, size, args, per_chip, report.built.key["model"]["remat"], start), out)
  return 0


def write(record: dict, out) -> None:
  line = json.dumps(record)
  print(line, flush=True)
  if out:
    out.write(line + "\n")
    out.flush()


def record_of(report, target, size, args, per_chip, remat, start) -> dict:
  built, chips = report.built, len(target.devices)
  return {"slice": target.name, "chip": target.devices[0].device_kind, "chips": chips, "hosts": target.hosts,
          "size": size, "kind": args.kind, "per_chip": per_chip, "remat": remat,
          "global_batch": args.global_batch if args.kind == "train" else per_chip * chips, "fits": report.fits,
          "peak_gib": round(report.result.needed / targets.GIB, 3),
          "usable_gib": round(target.usable_bytes / targets.GIB, 2),
          "compile_s": round(report.result.seconds, 1), "twin_s": round(report.twin_seconds, 1),
          "step_s": report.seconds, "source": report.source,
          "tokens_per_s_per_chip": built.tokens / chips / report.seconds if report.seconds else None,
          "mfu": built.model_flops / chips / report.seconds / target.peak_flops if report.seconds else None,
          "xla_flops_per_chip": report.flops_per_chip, "model_flops_per_chip": built.model_flops / chips,
          "xla_bytes_per_chip": report.bytes_per_chip,
          "error": report.result.error, "wall_s": round(time.time() - start, 1)}


if __name__ == "__main__":
  sys.exit(main())
