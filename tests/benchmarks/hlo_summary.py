"""Summarize an optimized HLO dump (`bench_throughput.py --hlo DIR` on a GPU): the kernels one step launches, by
kind, and the fp32 tensors of activation size that kernels write to device memory for other kernels to read, the
traffic a bf16 policy should not have.

  python tests/benchmarks/hlo_summary.py score-base.hlo.txt[.gz] [--min-elements 1000000]
"""
import argparse
import collections
import gzip
import re


def instructions(text: str):
  """(name, dtype, shape, opcode) of every instruction in every computation that is not a fusion's body."""
  bodies = set(re.findall(r"calls=%([\w.\-]+)", text))
  current = None
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
      continue
    op = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(", line)
    if op and current not in bodies:
      array = re.fullmatch(r"(\w+)\[([0-9,]*)\]\S*", op.group(2))  # a tuple result (library calls) is not one
      dtype, dims = (array.group(1), array.group(2)) if array else ("tuple", "")
      yield op.group(1), dtype, tuple(int(d) for d in dims.split(",") if d), op.group(3)


def summarize(text: str, min_elements: int) -> dict:
  kinds = collections.Counter()
  fp32_writes = []
  kinds["fp8 gemm"] = len(re.findall(r'custom_call_target="__cublas\$lt\$matmul\$f8"', text))
  for name, dtype, shape, opcode in instructions(text):
    if opcode in ("fusion", "custom-call", "all-reduce", "all-gather", "reduce-scatter", "copy"):
      kinds[opcode] += 1
      elements = 1
      for d in shape:
        elements *= d
      if dtype == "f32" and elements >= min_elements:
        fp32_writes.append((name, shape))
  return {"kernels": dict(kinds), "fp32_activation_writes": fp32_writes}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("path")
  parser.add_argument("--min-elements", type=int, default=1_000_000)
  args = parser.parse_args()
  opener = gzip.open if args.path.endswith(".gz") else open
  with opener(args.path, "rt") as f:
    summary = summarize(f.read(), args.min_elements)
  print(f"kernels (outside loops counted once): {summary['kernels']}")
  print(f"fp32 tensors of >= {args.min_elements:,} elements written by a kernel: "
        f"{len(summary['fp32_activation_writes'])}")
  for name, shape in summary["fp32_activation_writes"]:
    print(f"  {name} f32{list(shape)}")


if __name__ == "__main__":
  main()
