"""The OLMo decoder: exact sizes, init, and the forward pass against an independent float64 numpy reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colorjax import config
from colorjax.model import losses
from colorjax.model import transformer
from reference import reference_logits


def spec_for(size, **kw):
  m = config.model_config(size)
  for k, v in kw.items():
    m[k] = v
  return transformer.ModelSpec.from_config(m)


@pytest.mark.parametrize("size,total,non_embedding", [
    ("150m", 254_067_712, 151_045_120),
    ("1.2b", 1_414_203_392, 1_208_158_208),
])
def test_parameter_counts_match_the_paper(size, total, non_embedding):
  counts = transformer.param_counts(spec_for(size))
  assert counts["total"] == total
  assert counts["non_embedding"] == non_embedding
  assert counts["embedding"] == counts["head"] == 50304 * config.MODEL_SIZES[size]["d_model"]


def test_flops_per_token_follows_the_spec_convention():
  spec = spec_for("150m")
  n = 151_045_120 + 51_511_296
  assert transformer.flops_per_token(spec, 512, training=True) == 6 * n + 12 * 12 * 1024 * 512
  assert transformer.flops_per_token(spec, 512, training=False) == 2 * n + 4 * 12 * 1024 * 512


def test_mitchell_init_scales_per_layer():
  spec = spec_for("tiny", vocab_size=512, n_layers=3)
  params = jax.jit(lambda k: transformer.init_params(spec, k))(jax.random.key(0))
  d, h = spec.d_model, spec.mlp_hidden
  trunc = math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / (math.erf(3 / math.sqrt(2))))  # std of N(0,1)|±3
  expect = {("embed",): 1 / math.sqrt(d), ("head",): 1 / math.sqrt(d)}
  for layer in range(3):
    scale = math.sqrt(2 * (layer + 1))
    expect[(f"block_{layer}", "attn", "qkv", "kernel")] = 1 / math.sqrt(d)
    expect[(f"block_{layer}", "attn", "out", "kernel")] = 1 / math.sqrt(d) / scale
    expect[(f"block_{layer}", "mlp", "up", "kernel")] = 1 / math.sqrt(d)
    expect[(f"block_{layer}", "mlp", "down", "kernel")] = 1 / math.sqrt(h) / scale
  for path, std in expect.items():
    w = np.asarray(params[path[0]] if len(path) == 1 else params[path[0]][path[1]][path[2]][path[3]])
    assert w.dtype == np.float32
    assert abs(w.std() / (std * trunc) - 1) < 0.03, path
    assert np.abs(w).max() <= 3 * std * (1 + 1e-6), path
  assert np.all(np.asarray(params["block_0"]["attn"]["q_norm"]["scale"]) == 1.0)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert not any("bias" in jax.tree_util.keystr(p) for p, _ in flat)


def _perturbed_params(spec, seed=0):
  """Random init plus non-trivial norm gains, so the gains' placement is tested too."""
  params = jax.jit(lambda k: transformer.init_params(spec, k))(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x * (1 + 0.3 * rng.standard_normal(x.shape).astype(np.float32))
      if "scale" in jax.tree_util.keystr(p) else x, params)


def test_forward_matches_independent_float64_reference():
  spec = spec_for("tiny", vocab_size=256, n_layers=2, d_model=64, n_heads=2, mlp_hidden=128, compute_dtype="float32")
  params = _perturbed_params(spec)
  tokens = np.random.default_rng(1).integers(0, 256, (2, 24))
  got = np.asarray(transformer.bind(spec, params)(jnp.asarray(tokens)))
  want = reference_logits(spec, params, tokens)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_bf16_compute_stays_close_to_fp32():
  kw = dict(vocab_size=256, n_layers=2, d_model=64, n_heads=2, mlp_hidden=128)
  spec32, spec16 = spec_for("tiny", compute_dtype="float32", **kw), spec_for("tiny", compute_dtype="bfloat16", **kw)
  params = _perturbed_params(spec32)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 32)))
  l32 = np.asarray(transformer.bind(spec32, params)(tokens))
  l16 = np.asarray(transformer.bind(spec16, params)(tokens))
  assert l16.dtype == np.float32  # logits are fp32 even with bf16 operands
  assert np.abs(l16 - l32).max() < 0.1
  assert not np.array_equal(l16, l32)


def test_causal_future_tokens_do_not_change_past_logits():
  spec = spec_for("tiny", vocab_size=256, compute_dtype="float32")
  params = _perturbed_params(spec)
  a = np.random.default_rng(3).integers(0, 256, (1, 20))
  b = a.copy()
  b[0, 12:] = (b[0, 12:] + 7) % 256
  fwd = jax.jit(lambda p, t: transformer.bind(spec, p)(t))
  la, lb = np.asarray(fwd(params, a)), np.asarray(fwd(params, b))
  np.testing.assert_allclose(la[0, :12], lb[0, :12], rtol=1e-6, atol=1e-6)
  assert np.abs(la[0, 12:] - lb[0, 12:]).max() > 1e-3


def test_next_token_nll_matches_log_softmax_and_chunking_is_exact():
  spec = spec_for("tiny", vocab_size=256, compute_dtype="float32")
  params = _perturbed_params(spec)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (3, 33)))
  logits = np.asarray(transformer.bind(spec, params)(tokens), np.float64)[:, :-1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  want = -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
  nll_fn = jax.jit(lambda p, c: losses.next_token_nll(spec, p, tokens, c), static_argnums=1)
  nll, lse = nll_fn(params, 0)
  assert nll.shape == (3, 32) and nll.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(nll), want, rtol=1e-5, atol=1e-5)
  for chunk in (5, 8, 32):
    nll_c, lse_c = nll_fn(params, chunk)
    np.testing.assert_allclose(np.asarray(nll_c), np.asarray(nll), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse_c), np.asarray(lse), rtol=1e-6, atol=1e-6)
  grad = lambda c: jax.jit(jax.grad(lambda p: losses.next_token_nll(spec, p, tokens, c)[0].mean()))(params)
  g0, g5 = grad(0), grad(5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g5)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_rope_is_relative():
  rng = np.random.default_rng(5)
  q, k = rng.standard_normal((1, 1, 1, 64)), rng.standard_normal((1, 1, 1, 64))
  def at(x, pos):
    seq = np.zeros((1, pos + 1, 1, 64))
    seq[0, pos] = x[0, 0]
    return np.asarray(transformer.rope(jnp.asarray(seq, jnp.float32), 10000.0))[0, pos, 0]
  assert abs(at(q, 3) @ at(k, 1) - at(q, 9) @ at(k, 7)) < 1e-4
  assert abs(np.linalg.norm(at(q, 11)) - np.linalg.norm(q)) < 1e-4


def test_remat_gives_the_same_gradients():
  kw = dict(vocab_size=256, compute_dtype="float32")
  spec, spec_remat = spec_for("tiny", **kw), spec_for("tiny", remat=True, **kw)
  params = _perturbed_params(spec)
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 256, (2, 16)))
  grads = [jax.jit(jax.grad(lambda p, s=s: losses.next_token_nll(s, p, tokens)[0].mean()))(params)
           for s in (spec, spec_remat)]
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_model_spec_rejects_bad_heads():
  m = config.model_config("tiny")
  m.n_heads = 3
  with pytest.raises(ValueError, match="divisible"):
    transformer.ModelSpec.from_config(m)


def test_layer_norm_matches_float64_also_far_from_zero():
  """The fp32 LayerNorm against float64, on centred rows and on rows whose mean is 100 standard deviations from zero
  (where one-pass E[x²] − E[x]² statistics would be off by ~4e-3)."""
  rng = np.random.default_rng(0)
  centred = rng.standard_normal((64, 1024)) * 3.0
  offset = rng.standard_normal((64, 1024)) + 100.0
  gain = 1.0 + 0.1 * rng.standard_normal(1024)
  for rows, tolerance in ((centred, 1e-5), (offset, 1e-4)):
    x = rows.astype(np.float64)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gain
    got = np.asarray(transformer.layer_norm(jnp.asarray(rows, jnp.float32), jnp.asarray(gain, jnp.float32), 1e-5))
    assert np.max(np.abs(got - want)) < tolerance


@pytest.mark.parametrize("precision,rope_dtype", [("original", jnp.bfloat16), ("fp32_residual", jnp.float32)])
def test_qk_norm_output_enters_rope_in_the_activation_dtype(monkeypatch, precision, rope_dtype):
  """As OLMo (`q = self.q_norm(q).to(dtype=dtype)` before fp32 RoPE): under "original" the QK-norm output is rounded
  to bf16 before RoPE, which also halves the bytes between the two kernels on a GPU."""
  seen = []
  rope = transformer.rope
  monkeypatch.setattr(transformer, "rope", lambda x, theta: seen.append(x.dtype) or rope(x, theta))
  spec = spec_for("tiny", precision=precision)
  params = transformer.init_params(spec, jax.random.key(0))
  transformer.bind(spec, params)(jnp.zeros((1, 8), jnp.int32))
  assert seen and set(seen) == {jnp.dtype(rope_dtype)}
