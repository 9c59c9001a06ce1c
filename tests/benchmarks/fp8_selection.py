"""How much would fp8 matmuls change CoLoR-Filter's selection? Scores a pool with a trained prior and conditional
under fp32, bf16 (the product) and the fp8 variants of tests/benchmarks/variants.py, and prints, per variant, how
far its scores are from fp32's and how much of each top-1/tau selection stays the same (against fp32's and, for
the fp8 variants, against bf16's: what turning on score.fp8 changes). CPU is enough: the fp8
variants use power-of-two scales, so CPU computes the products an fp8 GEMM would.

  python tests/benchmarks/fp8_selection.py --workdir runs/books      # a pipeline's work directory
  python tests/benchmarks/fp8_selection.py --prior P --conditional C --store S --limit 20000
"""
import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from colorjax.data import stores
from colorjax.model import losses
from colorjax.model import transformer  # noqa: E402
from colorjax.training import checkpoint
import variants  # noqa: E402  (beside this file)

TAUS = (4, 8, 16, 32, 64)


def pool_nll(spec, params, tokens, pad_id, batch: int) -> np.ndarray:
  fn = jax.jit(lambda p, t: losses.sequence_nll(spec, p, t, pad_id, 64))
  return np.concatenate([np.asarray(fn(params, jnp.asarray(tokens[i:i + batch])))
                         for i in range(0, len(tokens), batch)])


def top(scores: np.ndarray, tau: int) -> set:
  return set(np.argsort(-scores, kind="stable")[: int(len(scores) / tau)].tolist())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="", help="pipeline work directory (runs/prior, runs/conditional, "
                      "stores/pool)")
  parser.add_argument("--prior", default="")
  parser.add_argument("--conditional", default="")
  parser.add_argument("--store", default="")
  parser.add_argument("--limit", type=int, default=0, help="score the first N pool sequences (0 = all)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--variants", default="bf16,fp8,fp8+fp8_head")
  args = parser.parse_args()
  root = pathlib.Path(args.workdir)
  paths = {"prior": args.prior or root / "runs/prior/params",
           "conditional": args.conditional or root / "runs/conditional/params"}
  store = stores.TokenStore(args.store or root / "stores/pool")
  n = min(args.limit or store.num_sequences, store.num_sequences)
  tokens = store.read(np.arange(n))
  pad_id = losses.pad_to_mask(store)
  loaded = {}
  for name, path in paths.items():
    spec = transformer.ModelSpec(**checkpoint.read_params_manifest(path)["model_spec"])
    loaded[name] = (spec, checkpoint.load_params(path, spec)[0])

  def scores(variant: str) -> np.ndarray:
    nll = {}
    for name, (spec, params) in loaded.items():
      if variant == "fp32":
        spec = transformer.ModelSpec(**dict(spec.to_dict(), compute_dtype="float32", precision="fp32_residual",
                                            attention="xla"))
      else:
        spec = transformer.ModelSpec(**dict(spec.to_dict(), compute_dtype="bfloat16", precision="original"))
      with variants.applied("base" if variant in ("fp32", "bf16") else variant):
        nll[name] = pool_nll(spec, params, tokens, pad_id, args.batch)
    return losses.color_score(nll["prior"], nll["conditional"])

  start = time.time()
  reference = scores("fp32")
  print(f"fp32 reference: {n:,} sequences, score std {reference.std():.4f} ({time.time() - start:.0f} s)", flush=True)
  kept = lambda got, ref, tau: round(len(top(got, tau) & top(ref, tau)) / int(n / tau), 4)
  bf16 = None
  for variant in args.variants.split(","):
    got = scores(variant)
    bf16 = got if variant == "bf16" else bf16
    record = {"variant": variant, "sequences": n, "score_std_fp32": round(float(reference.std()), 4),
              "mean_abs_diff": round(float(np.mean(np.abs(got - reference))), 5),
              "max_abs_diff": round(float(np.max(np.abs(got - reference))), 5),
              **{f"kept_tau{tau}": kept(got, reference, tau) for tau in TAUS}}
    if bf16 is not None and variant != "bf16":  # the product's default is bf16: what an fp8 run changes against it
      record.update({f"kept_vs_bf16_tau{tau}": kept(got, bf16, tau) for tau in TAUS})
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
