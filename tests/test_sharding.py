"""colorjax.sharding: logical-axis rules, optimizer-state and batch shardings, host rows, and activation constraints.

Layout checks run on AbstractMeshes (any machine); the numerical check of `use_mesh` + `constrain` runs in a
subprocess with 8 simulated CPU devices, since a 1-device mesh never constrains anything.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from colorjax import sharding
from colorjax import train
from colorjax.model import estimate
from colorjax.model import transformer
from conftest import REPO, make_config
from colorjax import config


def abstract_mesh(data=1, fsdp=4, tensor=2):
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def tiny_spec(**overrides):
  m = config.model_config("tiny")
  for key, value in overrides.items():
    m[key] = value
  return transformer.ModelSpec.from_config(m)


def test_logical_names_map_through_the_rules():
  assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("batch", "seq", "act_mlp")) == P(("data", "fsdp"), None, "tensor")
  assert sharding.logical_to_spec(("norm",)) == P(None)
  assert sharding.logical_to_spec((None, "embed")) == P(None, "fsdp")
  assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)  # fsdp shards one dim only
  assert sharding.logical_to_spec(("mlp", "vocab")) == P("tensor", None)
  with pytest.raises(KeyError, match="no sharding rule"):
    sharding.logical_to_spec(("nonsense",))


def test_fit_spec_replicates_only_dims_the_mesh_does_not_divide():
  mesh = abstract_mesh(data=2, fsdp=4, tensor=2)
  assert sharding.fit_spec(P("tensor", "fsdp"), (50304, 128), mesh) == P("tensor", "fsdp")
  assert sharding.fit_spec(P("tensor", "fsdp"), (50257, 128), mesh) == P(None, "fsdp")
  assert sharding.fit_spec(P(("data", "fsdp"), None), (12, 5), mesh) == P(None, None)  # 12 % (2*4)
  assert sharding.fit_spec(P(("data", "fsdp")), (16, 5), mesh) == P(("data", "fsdp"), None)  # padded to rank
  assert sharding.fit_spec(P("tensor"), (7,), abstract_mesh(tensor=1)) == P("tensor")  # size-1 axes always fit


def test_replicated_parameters_are_reported(caplog):
  spec = tiny_spec(vocab_size=50257)
  abstract, axes = transformer.abstract_params(spec), transformer.param_axes(spec)
  assert sharding.describe_replicated(abstract, axes, abstract_mesh(tensor=1)) == []
  lines = sharding.describe_replicated(abstract, axes, abstract_mesh())
  assert lines == ["embed (50257, 128): dim 0 of 50257 not split over tensor=2 (50257 % 2 != 0)",
                   "head (128, 50257): dim 1 of 50257 not split over tensor=2 (50257 % 2 != 0)"]
  data_fsdp = sharding.describe_replicated({"w": jax.ShapeDtypeStruct((12, 4), np.float32)}, {"w": ("batch", None)},
                                           abstract_mesh(data=2, fsdp=4, tensor=1))
  assert data_fsdp == ["w (12, 4): dim 0 of 12 not split over data=2xfsdp=4 (12 % 8 != 0)"]
  with caplog.at_level(logging.WARNING):
    assert sharding.warn_replicated(abstract, axes, abstract_mesh()) == lines
  assert "2 parameter dim(s) left replicated" in caplog.text and lines[0] in caplog.text


def optimizer_and_state(spec):
  tx, _ = train.make_optimizer(make_config("pretrain", "tiny").train, 100)
  return tx, jax.eval_shape(tx.init, transformer.abstract_params(spec))


def adam_states(tree):
  """The ScaleByAdamState nodes of an optimizer-state-shaped tree."""
  return [node for node in jax.tree.leaves(tree, is_leaf=lambda x: type(x).__name__ == "ScaleByAdamState")
          if type(node).__name__ == "ScaleByAdamState"]


def test_opt_state_shardings_follow_the_params_and_replicate_counts():
  spec, mesh = tiny_spec(), abstract_mesh()
  param_sh = sharding.tree_shardings(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  tx, abstract_opt = optimizer_and_state(spec)
  opt_sh = sharding.opt_state_shardings(tx, abstract_opt, param_sh, mesh)
  assert jax.tree.structure(opt_sh) == jax.tree.structure(abstract_opt)
  (adam,) = adam_states(opt_sh)
  assert adam.mu == param_sh and adam.nu == param_sh
  assert adam.mu["embed"].spec == P("tensor", "fsdp")
  counts = [leaf for leaf, shape in zip(jax.tree.leaves(opt_sh), jax.tree.leaves(abstract_opt)) if shape.shape == ()]
  assert len(counts) == 2 and all(c == sharding.replicated(mesh) for c in counts)  # adam's and the schedule's


def test_opt_state_axes_give_the_dry_run_its_optimizer_bytes():
  spec, mesh = tiny_spec(), abstract_mesh()
  axes = transformer.param_axes(spec)
  tx, abstract_opt = optimizer_and_state(spec)
  opt_axes = sharding.opt_state_axes(tx, abstract_opt, axes)
  (adam,) = adam_states(opt_axes)
  assert adam.mu == axes and adam.nu == axes
  params_b = estimate.sharded_bytes(transformer.abstract_params(spec), axes, mesh)
  assert estimate.sharded_bytes(abstract_opt, opt_axes, mesh) == 2 * params_b + 2 * 4  # mu, nu + two int32 counts


def test_batch_sharding_covers_every_batch_layout():
  mesh = abstract_mesh(data=2, fsdp=2, tensor=2)
  dp = ("data", "fsdp")
  assert sharding.batch_sharding(mesh).spec == P(dp, None)  # [batch, seq] rows, [batch, models] scores
  assert sharding.batch_sharding(mesh, ndim=1).spec == P(dp)  # [batch] weights
  assert sharding.batch_sharding(mesh, ndim=3, batch_dim=1).spec == P(None, dp, None)  # [n_micro, micro, seq]
  assert sharding.batch_sharding(mesh) == NamedSharding(mesh, P(dp, None))
  assert sharding.batch_sharding(mesh, ndim=3, batch_dim=1).shard_shape((2, 16, 64)) == (2, 4, 64)
  assert sharding.data_parallel_size(mesh) == 4


def test_host_rows_on_one_host_cover_the_whole_batch():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  dp = sharding.data_parallel_size(mesh)
  rows = np.arange(4 * dp * 6, dtype=np.int32).reshape(4 * dp, 6)
  batch_sh = sharding.batch_sharding(mesh)
  assert sharding.host_rows(batch_sh, rows.shape) == (0, rows.shape[0])
  np.testing.assert_array_equal(np.asarray(sharding.put_host_rows(rows, batch_sh, rows.shape, 0)), rows)
  micro = rows.reshape(2, 2 * dp, 6)
  micro_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
  assert sharding.host_rows(micro_sh, micro.shape, dim=1) == (0, 2 * dp)
  put = sharding.put_host_rows(micro, micro_sh, micro.shape, 0, dim=1)
  assert put.sharding == micro_sh
  np.testing.assert_array_equal(np.asarray(put), micro)


def test_use_mesh_sets_and_restores_jax_mesh_context():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  assert jax.sharding.get_abstract_mesh().empty
  with sharding.use_mesh(mesh) as active:
    assert active is mesh and jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
    with sharding.use_mesh(mesh):  # evaluate.run nests the evaluators' own blocks in its own
      assert jax.sharding.get_mesh() == mesh
    assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
  assert jax.sharding.get_abstract_mesh().empty
  with sharding.use_mesh(abstract_mesh()):  # dry runs: no devices of that shape needed
    assert jax.sharding.get_abstract_mesh() == abstract_mesh()
  assert jax.sharding.get_abstract_mesh().empty


def test_abstract_params_stay_mesh_free_when_first_built_under_a_mesh():
  """nnx.eval_shape attaches the context mesh; the cached graph must not hand that to callers outside it."""
  spec = tiny_spec(n_layers=1)
  transformer._graph.cache_clear()
  with sharding.use_mesh(abstract_mesh()):
    inside = transformer.abstract_params(spec)
  assert all(leaf.sharding is None for leaf in jax.tree.leaves(inside))
  assert transformer.abstract_params(spec) == inside


EIGHT_DEVICES = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from colorjax import config, sharding
    from colorjax.model import losses, transformer

    m = config.model_config("tiny")
    m.vocab_size, m.compute_dtype, m.max_seq_len = 512, "float32", 64
    spec = transformer.ModelSpec.from_config(m)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    param_sh = sharding.tree_shardings(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
    params = jax.jit(lambda k: transformer.init_params(spec, k), out_shardings=param_sh)(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 512, size=(8, 32), dtype=np.int32)
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
    nll = lambda p, t: losses.sequence_nll(spec, p, t, None)
    fn = jax.jit(nll, in_shardings=(param_sh, sharding.batch_sharding(mesh)))
    plain = np.asarray(fn(params, tokens))
    plain_jaxpr = str(jax.make_jaxpr(nll)(params, tokens))
    with sharding.use_mesh(mesh):
      constrained = np.asarray(fn(params, tokens))
      constrained_jaxpr = str(jax.make_jaxpr(nll)(params, tokens))
      hlo = fn.lower(params, tokens).as_text()
    again = np.asarray(fn(params, tokens))
    abstract = jax.sharding.AbstractMesh((2, 4, 1), sharding.MESH_AXES)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, tokens))
    with sharding.use_mesh(abstract):
      dry_jaxpr = str(jax.make_jaxpr(nll)(*shapes))
      dry_out = jax.eval_shape(nll, *shapes)
    print(json.dumps({
        "devices": jax.device_count(), "plain": plain.tolist(), "constrained": constrained.tolist(),
        "again": again.tolist(), "plain_constraints": plain_jaxpr.count("sharding_constraint"),
        "constraints": constrained_jaxpr.count("sharding_constraint"),
        "hlo_constraints": hlo.count("sharding_constraint"), "dry_constraints": dry_jaxpr.count("sharding_constraint"),
        "dry_abstract_mesh": "AbstractMesh('data': 2, 'fsdp': 4" in dry_jaxpr, "dry_shape": list(dry_out.shape)}))
""")


@pytest.fixture(scope="module")
def eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_constrained_forward_equals_the_unconstrained_one(eight_devices):
  out = eight_devices
  assert out["devices"] == 8
  assert out["plain_constraints"] == 0 and out["constraints"] > 0 and out["hlo_constraints"] > 0
  np.testing.assert_allclose(out["constrained"], out["plain"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["again"], out["plain"])  # leaving the block drops the constraints again


def test_abstract_mesh_dry_run_traces_the_constraints(eight_devices):
  assert eight_devices["dry_constraints"] == eight_devices["constraints"]
  assert eight_devices["dry_abstract_mesh"] and eight_devices["dry_shape"] == [8]
