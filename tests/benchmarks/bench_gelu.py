"""Micro-benchmark: exact-GELU formulations on the 150M scoring shape [2, 131072, 4096] bf16 (ms per call, and the
largest difference from the fp32 reference in bf16 ulps), to choose the MLP's activation code on a device.

  python tests/benchmarks/bench_gelu.py
"""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def variants():
  f32 = jnp.float32
  return {
      "jax_gelu_bf16": lambda x: jax.nn.gelu(x, approximate=False),
      "jax_gelu_f32": lambda x: jax.nn.gelu(x.astype(f32), approximate=False).astype(x.dtype),
      "erf_f32_inline": lambda x: (0.5 * x.astype(f32) * (1.0 + jax.lax.erf(x.astype(f32) * 0.7071067811865476)))
      .astype(x.dtype),
      "erfc_f32": lambda x: (0.5 * x.astype(f32) * jax.lax.erfc(-x.astype(f32) * 0.7071067811865476)).astype(x.dtype),
      "tanh_approx_bf16 (not exact)": lambda x: jax.nn.gelu(x, approximate=True),
      "copy_bf16 (bandwidth floor)": lambda x: x * 1.0001,
  }


def main(shape=(2, 131072, 4096), steps=20):
  x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16) * 2
  ref = np.asarray(jax.jit(lambda v: jax.nn.gelu(v.astype(jnp.float64) if jax.config.jax_enable_x64 else
                                                 v.astype(jnp.float32), approximate=False))(x[0, :4096]))
  for name, fn in variants().items():
    f = jax.jit(fn)
    jax.block_until_ready(f(x))
    start = time.perf_counter()
    for _ in range(steps):
      y = f(x)
    jax.block_until_ready(y)
    ms = (time.perf_counter() - start) / steps * 1e3
    out = np.asarray(f(x[0, :4096]).astype(jnp.float32))
    ulp = np.abs(out - ref) / np.maximum(np.abs(ref) * 2.0**-8, 1e-30)
    print(json.dumps({"measure": "gelu", "variant": name, "ms": round(ms, 3), "max_bf16_ulps": round(float(ulp.max()), 2),
                      "mismatch_vs_f32_rounding": float(np.mean(out != ref.astype(jnp.bfloat16).astype(np.float32)))}),
          flush=True)


if __name__ == "__main__":
  main()
