"""The loss owner: fused head loss gradients, the vocabulary-tiled head, precision policies, the multiple-choice
gather, memory of the 150M step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colorjax import config
from colorjax import train
from colorjax.data import stores
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import metrics
from colorjax.training import step_plan


def spec_for(size="tiny", **kw):
  m = config.model_config(size)
  for k, v in kw.items():
    m[k] = v
  return transformer.ModelSpec.from_config(m)


def _params(spec, seed=0):
  params = transformer.init_params(spec, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)


@pytest.mark.parametrize("pad_id,chunk", [(None, 0), (None, 5), (7, 8), (7, 32)])
def test_fused_head_loss_matches_plain_autodiff(pad_id, chunk):
  spec = spec_for(vocab_size=256, compute_dtype="float32")
  params = _params(spec)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 33)))
  z = 1e-2

  def plain(p):
    nll, lse = losses.next_token_nll(spec, p, tokens)
    mask = losses.loss_mask(tokens, pad_id)
    return jnp.sum(mask * (nll + z * jnp.square(lse)))

  (fused, (ce, zsum, count)), g_fused = jax.jit(jax.value_and_grad(
      lambda p: losses.batch_loss(spec, p, tokens, pad_id, z, chunk), has_aux=True))(params)
  want, g_want = jax.jit(jax.value_and_grad(plain))(params)
  np.testing.assert_allclose(float(fused), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(ce + z * zsum), float(want), rtol=1e-6)
  assert float(count) == float(jnp.sum(losses.loss_mask(tokens, pad_id)))
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(g_fused["head"]).max()) > 1e-3


def test_gelu_is_torchs_exact_formula_rounded_once():
  x = jax.random.normal(jax.random.key(0), (4096,), jnp.float32) * 3
  want = np.asarray(jax.nn.gelu(x.astype(jnp.float64) if jax.config.jax_enable_x64 else x, approximate=False))
  np.testing.assert_allclose(np.asarray(transformer.gelu(x)), want, rtol=2e-6, atol=2e-6)
  xb = x.astype(jnp.bfloat16)
  got = np.asarray(transformer.gelu(xb).astype(jnp.float32))
  once = np.asarray(jax.nn.gelu(xb.astype(jnp.float32), approximate=False).astype(jnp.bfloat16).astype(jnp.float32))
  assert transformer.gelu(xb).dtype == jnp.bfloat16
  # One rounding of (nearly) the same fp32 value: at most one bf16 ulp apart; the far negative tail (|y| < 1e-5)
  # differs by cancellation in 1 + erf, exactly as in torch's formula.
  np.testing.assert_allclose(got, once, rtol=2.0**-8, atol=1e-5)
  bf16_steps = np.asarray(jax.nn.gelu(xb, approximate=False).astype(jnp.float32))
  assert np.mean(bf16_steps != once) > 0.05  # jax.nn.gelu on bf16 rounds after each op: not the original's math
  g = jax.grad(lambda v: jnp.sum(transformer.gelu(v)))(x)
  g_ref = jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def test_precision_policies_agree_on_a_trained_model(synthetic_prior, synthetic_store):
  """Per-sequence NLL under the original (bf16 residual) and fp32_residual policies, bf16 compute, trained params."""
  export, cfg = synthetic_prior
  trained = checkpoint.spec_from_manifest(checkpoint.read_params_manifest(export), cfg.model)
  params, _ = checkpoint.load_params(export, trained)
  tokens = jnp.asarray(stores.TokenStore(synthetic_store).read(np.arange(16)).astype(np.int32))
  per_policy = {}
  for precision in transformer.PRECISIONS:
    spec = transformer.ModelSpec(**dict(trained.to_dict(), precision=precision, compute_dtype="bfloat16"))
    per_policy[precision] = np.asarray(jax.jit(lambda p, t, s=spec: losses.sequence_nll(s, p, t, None, 16))(
        params, tokens))
  a, b = per_policy["original"], per_policy["fp32_residual"]
  assert np.isfinite(a).all() and a.mean() < math.log(trained.vocab_size) - 0.5  # trained: well below uniform
  assert np.abs(a - b).max() < 2e-2
  assert np.abs(a - b).max() > 0  # the policies really differ


def test_precision_policies_train_alike():
  """A tiny pretrain's loss curve is the same under both policies within bf16 noise."""
  curves = {}
  tokens = np.random.default_rng(1).integers(0, 64, (20, 8, 64)).astype(np.int32)
  tokens[:, :, 1::2] = (tokens[:, :, 0::2] * 3 + 1) % 64  # learnable structure: odd tokens follow even ones
  for precision in transformer.PRECISIONS:
    cfg = config.get_config()
    cfg.model = config.model_config("demo")
    cfg.model.vocab_size, cfg.model.max_seq_len, cfg.model.precision = 64, 64, precision
    cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.warmup_steps = 8, 20, 2
    spec = transformer.ModelSpec.from_config(cfg.model)
    plan = step_plan.step_plan(cfg, None, 64, 1)
    tx, schedule = train.make_optimizer(cfg.train, plan.schedule_steps)

    def step(state, batch, spec=spec, tx=tx):
      (_, (ce, _, count)), grads = jax.value_and_grad(
          lambda p: losses.batch_loss(spec, p, batch, None, 1e-4, 16), has_aux=True)(state[0])
      grads = jax.tree.map(lambda g: g / count, grads)
      updates, opt = tx.update(grads, state[1], state[0])
      return (jax.tree.map(jnp.add, state[0], updates), opt), ce / count

    params = transformer.init_params(spec, jax.random.key(0))
    state, curve = (params, tx.init(params)), []
    step = jax.jit(step)
    for batch in tokens:
      state, loss = step(state, jnp.asarray(batch))
      curve.append(float(loss))
    curves[precision] = np.asarray(curve)
  a, b = curves["original"], curves["fp32_residual"]
  assert a[-1] < a[0] - 0.5 and b[-1] < b[0] - 0.5  # both learn
  assert np.abs(a - b).max() < 0.05 * a[0]


def test_multiple_choice_gather_equals_the_full_head():
  spec = spec_for(vocab_size=256, compute_dtype="float32")
  params = _params(spec, seed=3)
  rng = np.random.default_rng(2)
  inputs = jnp.asarray(rng.integers(0, 256, (4, 24)))
  targets = jnp.asarray(rng.integers(0, 256, (4, 24)))
  positions = np.array([[20, 21, 22, 0], [5, 6, 0, 0], [23, 0, 0, 0], [10, 11, 12, 13]])
  mask = (positions > 0) | (np.arange(4) == 0)
  gathered_targets = jnp.take_along_axis(targets, jnp.asarray(positions), axis=1)
  module = transformer.bind(spec, params)
  full_logits = np.asarray(module(inputs), np.float64)
  logp = full_logits - np.log(np.exp(full_logits - full_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - full_logits.max(-1, keepdims=True)
  want = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  want = np.take_along_axis(want, positions, axis=1)
  for chunk in (0, 3):
    got = np.asarray(losses.gathered_nll(spec, params, inputs, jnp.asarray(positions), gathered_targets, chunk))
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_150m_step_at_micro_256_fits_80gb():
  """Bytes autodiff keeps for the backward pass of a 150M micro-batch of 256 x 512 (backend independent), plus
  params, grads and AdamW state: an upper bound on the GPU step's peak memory. Attention score matrices [.., T, T]
  are left out: cuDNN's flash attention (the GPU path) never stores them; the CPU's XLA attention does."""
  spec = spec_for("150m")
  fn = lambda p, t: jax.vjp(lambda q: losses.batch_loss(spec, q, t, None, 1e-4, 128)[0], p)[1]
  residuals = jax.tree.leaves(jax.eval_shape(fn, transformer.abstract_params(spec),
                                             jax.ShapeDtypeStruct((256, 512), jnp.int32)))
  is_scores = lambda a: a.ndim >= 2 and a.shape[-1] == 512 and a.shape[-2] == 512
  kept = sum(a.size * a.dtype.itemsize for a in residuals if not is_scores(a))
  fp32_acts = [a for a in residuals if a.dtype == jnp.float32 and a.size >= 256 * 512 * 1024 and not is_scores(a)]
  assert not fp32_acts, "precision 'original' keeps no fp32 activation for the backward pass"
  state = 4 * sum(math.prod(a.shape) * 4 for a in jax.tree.leaves(transformer.abstract_params(spec)))
  logits_chunk = 3 * 256 * 128 * spec.vocab_size * 4  # fp32 logits, probabilities and their gradient, one chunk
  total_gib = (kept + state + logits_chunk) / 2**30
  print(f"150M micro 256: residuals {kept / 2**30:.1f} GiB + state {state / 2**30:.1f} GiB + head chunk "
        f"{logits_chunk / 2**30:.1f} GiB = {total_gib:.1f} GiB")
  assert 30 < total_gib < 80


def test_bad_precision_and_profile_ranges_fail_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="model.precision='bf16'"):
    spec_for(precision="bf16")
  for bad in ("5-9", "9:5", "a:b"):
    with pytest.raises(ValueError, match="profile_steps"):
      metrics.StepProfiler(bad, tmp_path / "profile")
  assert not (tmp_path / "profile").exists()
  profiler = metrics.StepProfiler("1:2", tmp_path / "profile")
  profiler.before(0)
  assert not profiler.active and not (tmp_path / "profile").exists()


@pytest.mark.parametrize("vocab,tile,want_tile", [(256, 64, 64), (250, 64, 50), (256, 0, 256), (256, 512, 256)])
def test_vocab_tile_is_the_largest_divisor_of_the_vocabulary(vocab, tile, want_tile):
  assert losses.vocab_tile_size(tile, vocab) == want_tile


@pytest.mark.parametrize("compute_dtype,vocab,tile,tolerance", [("float32", 256, 64, 2e-5), ("float32", 250, 64, 2e-5),
                                                                ("float32", 97, 8, 2e-5), ("bfloat16", 256, 32, 2e-3)])
def test_vocab_tiled_head_equals_the_whole_vocabulary_head(compute_dtype, vocab, tile, tolerance):
  spec = spec_for(vocab_size=vocab, compute_dtype=compute_dtype)
  params = _params(spec, seed=4)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, vocab, (3, 40)))
  want_nll, want_lse = losses.next_token_nll(spec, params, tokens, chunk=16)
  got_nll, got_lse = losses.next_token_nll(spec, params, tokens, chunk=16, vocab_tile=tile)
  assert got_nll.shape == want_nll.shape == (3, 39) and got_nll.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got_nll), np.asarray(want_nll), rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), rtol=tolerance, atol=tolerance)
  means = [losses.sequence_nll(spec, params, tokens, 0, 8, t) for t in (0, tile)]
  np.testing.assert_allclose(np.asarray(means[1]), np.asarray(means[0]), rtol=tolerance, atol=tolerance)
