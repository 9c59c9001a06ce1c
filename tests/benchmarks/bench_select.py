"""Benchmark: exact top-k selection over a large score array in bounded memory (not a test; prints figures).

  python tests/benchmarks/bench_select.py --n 100000000 --tau 16 --folder /tmp/bench-scores

Writes a finished score folder of N random (prior, conditional) NLL pairs (once; reused when present), then runs
the select stage in a fresh subprocess and reports its wall time and peak resident memory next to what an
in-memory argsort of the scores alone would need (8·N bytes of float64 keys, plus 8·N of int64 order).
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from colorjax import score as score_lib  # noqa: E402
from colorjax.artifacts import formats  # noqa: E402
from colorjax.artifacts import scores as scores_lib  # noqa: E402


def make_scores(folder: pathlib.Path, n: int, block: int = 1 << 22) -> None:
  if (folder / "manifest.json").exists() and scores_lib.Scores(folder).num_sequences == n:
    return
  chunk = 1 << 20
  manifest = {"format": formats.SCORES.format, "num_sequences": n, "columns": ["prior", "conditional_0"],
              "models": [{"name": "prior"}, {"name": "conditional_0"}], "chunk_rows": chunk, "batch_size": 0,
              "store": {"path": "", "id": "benchmark", "seq_len": 512}}
  scores_lib.open_output(folder, manifest, -(-n // chunk))  # pylint: disable=protected-access
  scores = scores_lib.Scores(folder)
  rng = np.random.default_rng(0)
  start = time.time()
  for first in range(0, n, block):
    rows = min(block, n - first)
    nll = rng.normal(3.5, 0.5, (rows, 2)).astype(np.float32)
    nll[:, 1] = np.round(nll[:, 1], 2)  # coarse values: plenty of exact ties in the score
    scores.nll[first:first + rows].write(nll).result()
  scores_lib.zarr(folder / "done.zarr")[:].write(np.ones(-(-n // chunk), np.uint8)).result()  # pylint: disable=protected-access
  print(f"wrote {n:,} scores in {time.time() - start:.0f}s")


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from colorjax import methods
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib
scores = scores_lib.Scores({folder!r})
stream = selection_lib.ScoreStream(scores, methods.HEADLINE, "conditional_0", {block})
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # interpreter + jax/tensorstore imports
start = time.time()
ids, threshold = selection_lib.top_k(stream, {k})
seconds = time.time() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(k=int(ids.size), threshold=threshold, seconds=seconds, peak_bytes=peak, baseline=baseline,
                      sorted=bool((ids[1:] > ids[:-1]).all()), first=ids[:3].tolist())))
"""


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, default=100_000_000)
  parser.add_argument("--tau", type=float, default=16)
  parser.add_argument("--block", type=int, default=1 << 20)
  parser.add_argument("--folder", default="/tmp/colorjax-bench-scores")
  args = parser.parse_args()
  folder = pathlib.Path(args.folder)
  make_scores(folder, args.n)
  k = int(args.n // args.tau)
  code = CHILD.format(repo=str(REPO), folder=str(folder), block=args.block, k=k)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  argsort_bytes = 16 * args.n
  print(f"N={args.n:,} tau={args.tau:g} k={result['k']:,} block_rows={args.block:,}")
  print(f"select: {result['seconds']:.1f}s ({args.n / result['seconds'] / 1e6:.1f}M scores/s, 3 passes), "
        f"peak RSS {result['peak_bytes'] / 2**20:,.0f} MiB, of which {result['baseline'] / 2**20:,.0f} MiB before "
        f"selecting (imports) (output ids alone: {8 * k / 2**20:,.0f} MiB; an "
        f"in-memory argsort would need >= {argsort_bytes / 2**20:,.0f} MiB); ids sorted: {result['sorted']}")


if __name__ == "__main__":
  main()
