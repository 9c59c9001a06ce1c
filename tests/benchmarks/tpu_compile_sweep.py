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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--slices", default="v4:2x2x2,v5e:2x4,v5p:2x2x2,v6e:2x4")
  parser.add_argument("--sizes", default="150m,1.2b")
  parser.add_argument("--kind", default="train", choices=("train", "score"))
  parser.add_argument("--micro", default="4,8,16,32", help="per-chip micro-batches (train) or batches (score)")
  parser.add_argument("--remat", default="auto", help="auto (on where off does not fit), off, on, or off,on")
  parser.add_argument("--global-batch", type=int, default=256)
  parser.add_argument("--no-estimate", dest="estimate", action="store_false")
  parser.add_argument("--out", default="", help="append the JSON lines to this file too")
  args = parser.parse_args(argv)
  targets.quiet_environment(args.slices.split(",")[0])
  done = {}
  if args.out and pathlib.Path(args.out).exists():
    for line in pathlib.Path(args.out).read_text().splitlines():
      r = json.loads(line)
      done[(r["slice"], r["size"], r["kind"], r["per_chip"], r["remat"])] = r["fits"]
  out = open(args.out, "a") if args.out else None
  for name in args.slices.split(","):
    target = targets.target(name)
    chips = len(target.devices)
    for size in args.sizes.split(","):
      failed = []
      remats = [False, True] if args.remat == "auto" else [r == "on" for r in args.remat.split(",")]
      for remat in remats:
        sizes = sorted(int(m) for m in args.micro.split(","))
        if args.remat == "auto" and remat:
          sizes = failed
        for per_chip in sizes:
          cfg = stage_config(args.kind, size, args.global_batch, per_chip * chips, remat, per_chip * chips)
          if args.kind == "train" and args.global_batch % (per_chip * chips):
            continue
          previous = done.get((target.name, size, args.kind, per_chip, remat))
          if previous is not None:
            if not previous:
              failed = [m for m in sizes if m >= per_chip]
              break
            continue
          mesh = sharding.make_mesh(cfg.mesh, target.devices)
          builder = aot_steps.BUILDERS[args.kind]
          (built,) = [b for b in builder(cfg, mesh) if b.kind == f"{args.kind}_step"]
          start = time.time()
          report = aot_steps.compile_one(f"{size}", built, lambda unroll=False, c=cfg: builder(c, mesh, unroll),
                                         target, mesh, args.estimate)
          record = {"slice": target.name, "chip": target.devices[0].device_kind, "chips": chips,
                    "hosts": target.hosts, "size": size, "kind": args.kind, "per_chip": per_chip,
                    "remat": remat, "global_batch": args.global_batch if args.kind == "train" else per_chip * chips,
                    "fits": report.fits, "peak_gib": round(report.result.needed / targets.GIB, 3),
                    "usable_gib": round(target.usable_bytes / targets.GIB, 2),
                    "compile_s": round(report.result.seconds, 1), "twin_s": round(report.twin_seconds, 1),
                    "step_s": report.seconds, "source": report.source,
                    "tokens_per_s_per_chip": built.tokens / chips / report.seconds if report.seconds else None,
                    "mfu": (built.model_flops / chips / report.seconds / target.peak_flops
                            if report.seconds else None),
                    "xla_flops_per_chip": report.flops_per_chip, "model_flops_per_chip": built.model_flops / chips,
                    "error": report.result.error, "wall_s": round(time.time() - start, 1)}
          line = json.dumps(record)
          print(line, flush=True)
          if out:
            out.write(line + "\n")
            out.flush()
          if not report.fits:
            failed = [m for m in sizes if m >= per_chip]
            break
  return 0


if __name__ == "__main__":
  sys.exit(main())
