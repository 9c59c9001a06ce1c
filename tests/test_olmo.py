"""OLMo checkpoints of the original code in and out of colorjax, proven on ../shared/fixtures/olmo-original: the
imported prior and conditional reproduce the original's scores and logits, finetuning the imported prior with the
recorded batches reproduces the original's conditional step by step, hostile pickles never run, architectures
colorjax cannot run are refused by name, and export -> import is the identity."""
import base64
import json
import pathlib
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from colorjax import errors
from colorjax import score
from colorjax import select
from colorjax import sharding
from colorjax import train
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.interop import olmo
from colorjax.interop import olmo_config
from colorjax.interop import olmo_weights
from colorjax.interop import torch_files
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import step_plan
from colorjax.artifacts import scores as scores_lib
from conftest import REPO, make_config, run_cli

FIXTURE = REPO.parent / "shared" / "fixtures" / "olmo-original"
PRIOR = FIXTURE / "models" / "prior"
CONDITIONAL = FIXTURE / "models" / "conditional"
SEQ = 64
FP32 = dict(model__compute_dtype="float32", model__precision="fp32_residual", model__attention="xla")

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/olmo-original not found")


@pytest.fixture(scope="module")
def ref():
  return json.loads((FIXTURE / "reference.json").read_text())


def token_rows(path) -> np.ndarray:
  """An original token file (headerless uint16) as its floor(n / 64) sequences; the tail is ignored, as there."""
  tokens = np.fromfile(path, dtype="<u2")
  return tokens[: tokens.size // SEQ * SEQ].reshape(-1, SEQ)


def pool_rows() -> np.ndarray:
  return np.concatenate([token_rows(FIXTURE / "data" / "pool" / f"part-00{i}.npy") for i in range(3)])


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  """The fixture's 1000-token vocabulary (ids 2-999 plus EOS 0 / PAD 1) as a WordLevel tokenizer.json."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  vocab = {"<|endoftext|>": 0, "<|padding|>": 1, **{f"t{i}": i for i in range(2, 1000)}}
  tokenizer = Tokenizer(tok_models.WordLevel(vocab, unk_token="<|padding|>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
  tokenizer.save(str(path))
  return path


def import_config(weights, workdir, tokenizer, **extra):
  return make_config("olmo", "import", olmo__weights=str(weights), olmo__tokenizer=str(tokenizer),
                     workdir=str(workdir), **{**FP32, **extra})


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tokenizer_path):
  """Params exports of the fixture's prior (model.pt) and conditional (model.safetensors), imported in-process."""
  root = tmp_path_factory.mktemp("imported")
  return {name: olmo.run(import_config(folder, root / name, tokenizer_path))
          for name, folder in (("prior", PRIOR), ("conditional", CONDITIONAL))}


def load(export) -> tuple[transformer.ModelSpec, dict]:
  """Params of an export computed in fp32 end to end (the fixture's precision)."""
  compute = make_config("score", "demo", **FP32).model
  spec = checkpoint.spec_from_manifest(checkpoint.read_params_manifest(export), compute)
  return spec, checkpoint.load_params(export, spec)[0]


def test_readers_see_the_state_dict_the_original_saved(ref):
  pt = olmo_weights.read_model_pt(PRIOR / "model.pt")
  st = olmo_weights.read_olmo_safetensors(CONDITIONAL / "model.safetensors")
  expected = [(key, shape, dtype) for key, shape, dtype in ref["state_dict"]]
  assert [(k, list(v.shape), str(v.dtype)) for k, v in pt.items()] == expected  # model.pt order
  assert sorted((k, list(v.shape), str(v.dtype)) for k, v in st.items()) == sorted(expected)
  assert [key for key, _, _ in olmo_weights.key_map(2)] == [key for key, _, _ in expected]
  names = torch_files.read_safetensors(CONDITIONAL / "model.safetensors")
  assert {olmo_weights.olmo_name(k) for k in st} == set(names)  # the writer names tensors exactly as OLMo did
  assert sum(v.size for v in pt.values()) == ref["model_config"]["n_params"]


def test_import_writes_a_params_export_with_the_originals_architecture(imported, tokenizer_path):
  manifest = checkpoint.read_params_manifest(imported["prior"])
  assert manifest["stage"] == "olmo_import" and manifest["source"]["format"] == "torch-zip"
  assert manifest["model"] == {"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_hidden": 256, "vocab_size": 1024,
                               "rope_theta": 10000.0, "norm_eps": 1e-5}
  assert manifest["model_spec"]["max_seq_len"] == 64
  assert (manifest["tokenizer"]["eos_id"], manifest["tokenizer"]["pad_id"]) == (0, 1)
  assert manifest["request"]["weights_sha256"] == lineage.fingerprint(PRIOR / "model.pt")["sha256"]
  assert manifest["id"] == lineage.content_id(manifest["request"])
  assert manifest["steps"] is None and manifest["tokens"] is None  # no train.pt in the fixture
  tokenizer_lib.checked_tokenizer_path(imported["prior"], manifest["tokenizer"])  # the copy matches its recorded hash
  cond = checkpoint.read_params_manifest(imported["conditional"])
  assert cond["source"]["format"] == "olmo-safetensors" and cond["id"] != manifest["id"]
  again = olmo.run(import_config(PRIOR, imported["prior"].parent, tokenizer_path))  # same import: reused
  assert again == imported["prior"]


def test_imported_models_reproduce_the_originals_scores(imported, ref):
  tokens = pool_rows()
  assert tokens.shape == (ref["pool"]["num_sequences"], SEQ)
  for name, key in (("prior", "prior_nll"), ("conditional", "cond_nll")):
    spec, params = load(imported[name])
    nll = np.asarray(jax.jit(lambda p, t, s=spec: losses.sequence_nll(s, p, t, None))(params, tokens))
    diff = np.abs(nll - np.asarray(ref[key], np.float32))
    print(f"{name}: max |NLL - original| = {diff.max():.2e}")
    assert diff.max() < 1e-5, (name, int(diff.argmax()))


def test_imported_prior_reproduces_the_originals_logits(imported, ref):
  spec, params = load(imported["prior"])
  logits = np.asarray(transformer.bind(spec, params)(jnp.asarray(pool_rows()[:1], jnp.int32)))[0]
  assert logits.shape == (SEQ, 1024)
  for position, expected in ref["prior_logits_sequence_0"].items():
    row = logits[int(position)]
    np.testing.assert_allclose(row[:5], expected["first5"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(row[1000:1005], expected["padded_rows_1000_to_1004"], atol=1e-4, rtol=0)
    assert abs(float(jax.nn.logsumexp(row)) - expected["logsumexp_all_1024"]) < 1e-4


def finetune_config(ref):
  """The conditional's run (reference.json runs.conditional) as colorjax config: lr 1e-3, warmup 2, one epoch of
  64 sequences in batches of 8 (micro 4), base.yaml's AdamW (0.9, 0.95, eps 1e-15, no decay), clip 1.0, z-loss."""
  overrides = dict(item.split("=", 1) for item in ref["runs"]["conditional"])
  assert (overrides["optimizer.learning_rate"], overrides["scheduler.t_warmup"], overrides["max_duration"]) == \
      ("1.0e-3", "2", "1ep")
  original = yaml.safe_load((CONDITIONAL / "config.yaml").read_text())
  opt = original["optimizer"]
  assert original["softmax_auxiliary_loss"] and original["scheduler"]["name"] == "cosine_with_warmup"
  return make_config(
      "finetune", "books,demo", **FP32, train__lr=float(opt["learning_rate"]), train__b1=opt["betas"][0],
      train__b2=opt["betas"][1], train__eps=float(opt["eps"]), train__weight_decay=float(opt["weight_decay"]),
      train__grad_clip=float(original["max_grad_norm"]), train__warmup_steps=int(original["scheduler"]["t_warmup"]),
      train__min_lr_ratio=float(original["scheduler"]["alpha_f"]), train__z_loss=1e-4, train__loss_chunk=0,
      train__global_batch_size=int(original["global_train_batch_size"]),
      train__micro_batch_size=int(original["device_train_microbatch_size"]))


def test_finetuning_the_imported_prior_reproduces_the_originals_conditional(imported, ref):
  """colorjax's own train step fed the conditional's recorded batches: every lr, CE and z-loss of the original's
  8 steps, and the resulting weights against the original's conditional."""
  cfg = finetune_config(ref)
  spec, params = load(imported["prior"])
  _, target = load(imported["conditional"])
  store = token_rows(FIXTURE / "data" / "target" / "part-000.npy")
  mesh = sharding.make_mesh(cfg.mesh)
  plan = step_plan.step_plan(cfg, store.shape[0], SEQ, sharding.data_parallel_size(mesh))
  assert (plan.total_steps, plan.schedule_steps, plan.n_micro) == (8, 8, 2)
  tx, schedule = train.make_optimizer(cfg.train, plan.schedule_steps)
  param_sh = sharding.tree_shardings(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  init_state = lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}
  abstract = jax.eval_shape(init_state, params)
  state_sh = {"params": param_sh, "step": sharding.replicated(mesh),
              "opt_state": sharding.opt_state_shardings(tx, abstract["opt_state"], param_sh, mesh)}
  batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
  worst = {"lr": 0.0, "ce": 0.0, "z": 0.0}
  with sharding.use_mesh(mesh):
    state = jax.jit(init_state, out_shardings=state_sh)(params)
    step = train.build_train_step(spec, tx, schedule, plan, state_sh, batch_sh, param_sh, cfg.train.z_loss, None,
                                  cfg.train.loss_chunk)
    for record in ref["training"]["conditional"]:
      batch = store[np.asarray(record["index"])].reshape(plan.n_micro, plan.micro_batch, SEQ).astype(np.int32)
      state, stats = step(state, jax.device_put(batch, batch_sh))
      stats = jax.device_get(stats)
      worst["lr"] = max(worst["lr"], abs(float(stats["lr"]) - record["lr"]))
      worst["ce"] = max(worst["ce"], abs(float(stats["loss"]) - record["ce_loss"]))
      worst["z"] = max(worst["z"], abs(cfg.train.z_loss * float(stats["z_loss"]) - record["z_loss"]))  # weighted
  drift = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(target)))
  print(f"conditional: max |lr| {worst['lr']:.1e}, |CE| {worst['ce']:.1e}, |z| {worst['z']:.1e}; "
        f"max |params - original conditional| = {drift:.2e}")
  assert max(worst.values()) < 1e-4, worst
  assert drift < 1e-5


def test_the_priors_recorded_schedule_is_colorjaxs(ref):
  """The prior's 30 recorded steps (warmup 5, cosine to 0.1 lr at step 30) against train.lr_at."""
  steps = ref["training"]["prior"]
  lrs = [float(train.lr_at(r["step"], 1e-3, 5, len(steps), 0.1)) for r in steps]
  np.testing.assert_allclose(lrs, [r["lr"] for r in steps], atol=1e-9, rtol=0)


def hostile_zip(path: pathlib.Path, payload: bytes, prefix: str = "archive") -> pathlib.Path:
  """A torch-style zip whose data.pkl is `payload`."""
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(f"{prefix}/data.pkl", payload)
    archive.writestr(f"{prefix}/byteorder", "little")
  return path


def reduce_payload(module: str, name: str, arg: str) -> bytes:
  """A protocol-0 pickle that calls module.name(arg) when loaded: GLOBAL, MARK, STRING, TUPLE, REDUCE."""
  return f"c{module}\n{name}\n(S{arg!r}\ntR.".encode()


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("subprocess", "getoutput"),
                                         ("builtins", "eval"), ("builtins", "exec")])
def test_a_hostile_model_pt_is_refused_and_never_run(tmp_path, module, name):
  marker = tmp_path / "pwned"
  arg = f"open({str(marker)!r}, 'w').close()" if module == "builtins" else f"touch {marker}"
  path = hostile_zip(tmp_path / "model.pt", reduce_payload(module, name, arg))
  with pytest.raises(errors.DataError, match=f"model.pt: refused to unpickle {module}.{name}"):
    olmo_weights.read_model_pt(path)
  assert not marker.exists()
  if (module, name) == ("os", "system"):
    pickle.loads(reduce_payload(module, name, arg))  # the payload is live: plain pickle runs it
    assert marker.exists()


def test_hostile_pickles_elsewhere_are_refused(tmp_path):
  """OLMo's safetensors tensor names and train.pt are pickles too; and only tensor rebuilders may be rebuilt."""
  marker = tmp_path / "pwned"
  payload = reduce_payload("os", "system", f"touch {marker}")
  name = base64.urlsafe_b64encode(b"\x80\x02" + payload).decode()
  torch_files.write_safetensors(tmp_path / "model.safetensors", {name: np.zeros(2, np.float32)})
  with pytest.raises(errors.DataError, match="refused to unpickle os.system"):
    olmo_weights.read_olmo_safetensors(tmp_path / "model.safetensors")
  with pytest.raises(errors.DataError, match="refused to unpickle os.system"):
    olmo_weights.read_train_state(hostile_zip(tmp_path / "train.pt", payload, "train"))
  assert not marker.exists()
  smuggled = b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\nctorch\nTensor\n)}tR."
  with pytest.raises(errors.DataError, match="other than a tensor rebuilder"):
    olmo_weights.read_model_pt(hostile_zip(tmp_path / "smuggled.pt", smuggled))
  rewrite = b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeK\x01s\x86b."  # BUILD on a stand-in
  with pytest.raises(errors.DataError, match="tries to modify _StorageType"):
    olmo_weights.read_model_pt(hostile_zip(tmp_path / "rewrite.pt", rewrite))
  later = olmo_weights.read_model_pt(PRIOR / "model.pt")
  assert later["transformer.wte.weight"].dtype == np.float32  # later loads unharmed
  with pytest.raises(errors.DataError, match="not a torch zip"):
    olmo_weights.read_model_pt(FIXTURE / "reference.json")


@pytest.mark.parametrize("field,value", [
    ("weight_tying", True), ("activation_type", "swiglu"), ("include_bias", True), ("bias_for_layer_norm", True),
    ("layer_norm_type", "rms"), ("block_type", "llama"), ("alibi", True), ("rope", False), ("n_kv_heads", 1),
    ("multi_query_attention", True), ("clip_qkv", 8.0), ("rope_full_precision", False), ("scale_logits", True),
    ("attention_layer_norm", False), ("residual_dropout", 0.1), ("moe_num_experts", 8)])
def test_architectures_colorjax_cannot_run_are_refused_by_field(tmp_path, tokenizer_path, field, value):
  config = yaml.safe_load((PRIOR / "config.yaml").read_text())
  config["model"][field] = value
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
  cfg = import_config(PRIOR / "model.pt", tmp_path / "run", tokenizer_path, olmo__config=str(tmp_path / "config.yaml"))
  with pytest.raises(errors.DataError, match=f"config.yaml: model.{field}={value!r}"):
    olmo.run(cfg)
  assert not (tmp_path / "run").exists()


def test_missing_defaults_are_the_originals(tmp_path, tokenizer_path):
  """A config.yaml without weight_tying gets the original's default (tied), which colorjax refuses."""
  config = yaml.safe_load((PRIOR / "config.yaml").read_text())
  del config["model"]["weight_tying"]
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
  cfg = import_config(PRIOR / "model.pt", tmp_path / "run", tokenizer_path, olmo__config=str(tmp_path / "config.yaml"))
  with pytest.raises(errors.DataError, match="model.weight_tying=True"):
    olmo.run(cfg)


def test_state_dict_keys_are_checked_by_name():
  state = olmo_weights.read_model_pt(PRIOR / "model.pt")
  section = olmo_config.model_section(olmo_config.read_config_yaml(PRIOR / "config.yaml"), "config.yaml")
  spec = olmo_config.spec_from_olmo(section, make_config("score", "demo", **FP32).model, "config.yaml")
  missing = {k: v for k, v in state.items() if k != "transformer.blocks.1.ff_norm.weight"}
  with pytest.raises(errors.DataError, match="has no transformer.blocks.1.ff_norm.weight"):
    olmo_weights.state_to_params(missing, spec, "model.pt")
  with pytest.raises(errors.DataError, match="e.g. transformer.blocks.0.att_proj.bias"):
    olmo_weights.state_to_params({**state, "transformer.blocks.0.att_proj.bias": np.zeros(192, np.float32)}, spec,
                                 "model.pt")
  wrong = {**state, "transformer.wte.weight": np.zeros((1000, 64), np.float32)}
  with pytest.raises(errors.DataError, match=r"transformer.wte.weight has shape \[1000, 64\]"):
    olmo_weights.state_to_params(wrong, spec, "model.pt")
  grouped = {k.replace("transformer.blocks.1.", "transformer.block_groups.0.1.")
             .replace("transformer.blocks.0.", "_fsdp_wrapped_module.transformer.block_groups.0.0."): v
             for k, v in state.items()}
  assert olmo_weights.normalized_keys(grouped, 2, "model.pt").keys() == state.keys()


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, neox_tokenizer_path):
  cfg = import_config(PRIOR, tmp_path / "run", neox_tokenizer_path)
  with pytest.raises(errors.DataError, match="has 50280 tokens but the model has only 1024 embedding rows"):
    olmo.run(cfg)


def test_export_then_import_is_the_identity(imported, tmp_path, tokenizer_path):
  out = olmo.run(make_config("olmo", "export", olmo__params=str(imported["prior"]), workdir=str(tmp_path / "olmo")))
  exported = olmo_weights.read_olmo_safetensors(out / "model.safetensors")
  original = olmo_weights.read_model_pt(PRIOR / "model.pt")
  assert list(exported) == list(original)
  assert all(np.array_equal(exported[k], original[k]) and exported[k].dtype == original[k].dtype for k in original)
  written = yaml.safe_load((out / "config.yaml").read_text())
  assert written["model"] == yaml.safe_load((PRIOR / "config.yaml").read_text())["model"]  # field for field
  again = olmo.run(import_config(out, tmp_path / "again", tokenizer_path))
  for a, b in zip(jax.tree.leaves(load(imported["prior"])[1]), jax.tree.leaves(load(again)[1])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(errors.DataError, match="already holds an OLMo checkpoint"):
    olmo.run(make_config("olmo", "export", olmo__params=str(imported["prior"]), workdir=str(out)))


def write_pool_store(folder: pathlib.Path, tokenizer_path) -> pathlib.Path:
  """The fixture pool as a colorjax token store (one .npy per original file, same global ids)."""
  tokenizer = tokenizer_lib.load_tokenizer(str(tokenizer_path))
  folder.mkdir(parents=True)
  files = []
  for i in range(3):
    rows = token_rows(FIXTURE / "data" / "pool" / f"part-00{i}.npy")
    np.save(folder / f"part-00{i}.npy", rows)
    files.append({"array": f"part-00{i}.npy", "sequences": int(rows.shape[0])})
  (folder / tokenizer_lib.TOKENIZER).write_text(tokenizer.to_str())
  manifest = {"format": formats.STORE.format, "version": formats.STORE.version, "id": "olmo-fixture-pool",
              "seq_len": SEQ, "dtype": "uint16",
              "tokenizer": tokenizer_lib.tokenizer_info(tokenizer, str(tokenizer_path), 0, 1),
              "num_sequences": sum(f["sequences"] for f in files), "files": files, "padded": False}
  (folder / formats.MANIFEST).write_text(json.dumps(manifest))
  return folder


def test_cli_import_feeds_the_score_stage(imported, tmp_path, tokenizer_path, ref):
  """`olmo.py:import` on the command line (with a train.pt beside the weights), then the score stage on the
  fixture pool with the imported prior and conditional: the original's scores."""
  checkpoint_dir = tmp_path / "step30-unsharded"
  shutil.copytree(PRIOR, checkpoint_dir)
  trainer = {"global_step": 30, "global_train_tokens_seen": 30 * 8 * SEQ, "rng": {"numpy": np.random.get_state()}}
  with zipfile.ZipFile(checkpoint_dir / "train.pt", "w") as archive:
    archive.writestr("train/data.pkl", pickle.dumps(trainer, protocol=2))
  run_cli(["--config", "configs/olmo.py:import", f"--config.olmo.weights={checkpoint_dir}",
           f"--config.olmo.tokenizer={tokenizer_path}", f"--config.workdir={tmp_path / 'prior'}"])
  manifest = checkpoint.read_params_manifest(tmp_path / "prior" / "params")
  assert (manifest["steps"], manifest["tokens"]) == (30, 30 * 8 * SEQ)
  store = write_pool_store(tmp_path / "pool", tokenizer_path)
  cfg = make_config("score", "demo", **FP32, workdir=str(tmp_path / "scores"), score__store=str(store),
                    score__prior=str(tmp_path / "prior" / "params"),
                    score__conditionals=(str(imported["conditional"]),))
  nll = scores_lib.Scores(score.run(cfg)).read(0, 256)
  assert np.abs(nll[:, 0] - np.asarray(ref["prior_nll"], np.float32)).max() < 1e-5
  assert np.abs(nll[:, 1] - np.asarray(ref["cond_nll"], np.float32)).max() < 1e-5
  chosen = select.run(make_config("select", "color,4", workdir=str(tmp_path / "sel"),
                                  select__scores=str(tmp_path / "scores")))
  assert set(np.load(chosen / "index.npy").tolist()) == set(ref["selection"]["selected_indices"])  # the original's 64
