"""RHO-down: the in-step selection equals a plain computation, and a run trains on what it selects."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colorjax import config
from colorjax import errors
from colorjax import sharding
from colorjax import train
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import rho as rho_lib
from colorjax.training import step_plan
from conftest import make_config, tiny_train_overrides


def _spec(**kw):
  cfg = config.model_config("demo")
  cfg.vocab_size, cfg.max_seq_len, cfg.compute_dtype, cfg.precision = 256, 32, "float32", "fp32_residual"
  for k, v in kw.items():
    cfg[k] = v
  return transformer.ModelSpec.from_config(cfg)


def test_selection_keeps_the_largest_reducible_losses():
  spec, ref_spec = _spec(), _spec(d_model=32, mlp_hidden=128)
  params, ref = transformer.init_params(spec, jax.random.key(0)), transformer.init_params(ref_spec, jax.random.key(1))
  candidates = jax.random.randint(jax.random.key(2), (4, 8, 32), 0, 256)
  rho = rho_lib.Rho(spec, ref_spec, keep=8, pad_id=None, chunk=0)
  chosen, stats = jax.jit(lambda p, r, c: rho_lib.select(rho, p, r, c))(params, ref, candidates)
  flat = np.asarray(candidates).reshape(32, 32)
  plain = (np.asarray(losses.sequence_nll(spec, params, jnp.asarray(flat), None))
           - np.asarray(losses.sequence_nll(ref_spec, ref, jnp.asarray(flat), None)))
  expected = np.sort(np.argsort(-plain, kind="stable")[:8])
  assert chosen.shape == (1, 8, 32)
  np.testing.assert_array_equal(np.asarray(chosen)[0], flat[expected])
  assert float(stats["rho_chosen_score"]) == pytest.approx(plain[expected].mean(), abs=1e-5)
  assert float(stats["rho_candidate_score"]) == pytest.approx(plain.mean(), abs=1e-5)
  assert plain[expected].min() >= np.delete(plain, expected).max()


def test_rho_step_equals_a_plain_step_on_the_selected_batch():
  spec, ref_spec = _spec(), _spec()
  cfg = make_config("pretrain", "demo", train__global_batch_size=8, train__micro_batch_size=4, train__max_steps=4,
                    train__warmup_steps=1)
  mesh = sharding.make_mesh(cfg.mesh)
  steps = step_plan.StepPlan(4, 4, "nominal", 8, 4, 32, 64, None, 16)
  tx, schedule = train.make_optimizer(cfg.train, 4)
  params = transformer.init_params(spec, jax.random.key(0))
  ref = transformer.init_params(ref_spec, jax.random.key(1))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  state_sh = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  param_sh = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  batch_sh = sharding.replicated(mesh)
  rho = rho_lib.Rho(spec, ref_spec, keep=8, pad_id=None, chunk=0)
  candidates = jax.random.randint(jax.random.key(3), (4, 4, 32), 0, 256)
  with sharding.use_mesh(mesh):
    selecting = train.build_train_step(spec, tx, schedule, steps, state_sh, batch_sh, param_sh, 1e-4, None, 0, rho,
                                       param_sh)
    plain = train.build_train_step(spec, tx, schedule, steps, state_sh, batch_sh, param_sh, 1e-4, None, 0)
    chosen, _ = rho_lib.select(rho, params, ref, candidates)
    copy = jax.tree.map(jnp.copy, state)
    new_a, stats_a = selecting(state, candidates, ref)
    new_b, stats_b = plain(copy, chosen)
  assert float(stats_a["loss"]) == pytest.approx(float(stats_b["loss"]), rel=1e-6)
  for a, b in zip(jax.tree.leaves(new_a["params"]), jax.tree.leaves(new_b["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_rho_down_run_trains_on_one_in_tau_and_accounts_for_its_forwards(synthetic_store, synthetic_prior, tmp_path):
  prior, _ = synthetic_prior
  overrides = tiny_train_overrides(synthetic_store, tmp_path / "rho", train__max_steps=0, train__single_pass=True,
                                   train__rho_tau=4.0, train__rho_reference=str(prior), model__max_seq_len=128)
  cfg = make_config("pretrain", "demo", **overrides)
  export = train.run(cfg)
  manifest = checkpoint.read_params_manifest(export)
  n = manifest["config"]["train"]["global_batch_size"]
  from colorjax.data import stores
  assert manifest["steps"] == stores.TokenStore(synthetic_store).num_sequences // (4 * n)
  assert manifest["request"]["rho"] == {"tau": 4.0, "reference": checkpoint.read_params_manifest(prior)["id"]}
  assert manifest["compute"]["selection_forward_flops"] > 0.5 * manifest["compute"]["train_flops"]
  bad = make_config("pretrain", "demo", **dict(overrides, workdir=str(tmp_path / "bad"), train__rho_reference=""))
  with pytest.raises(errors.ConfigError, match="rho_reference"):
    train.run(bad)
  assert not (tmp_path / "bad").exists()
