"""Models that load in transformers, and lm-evaluation-harness on colorjax's forward, on the original's prior
(../shared/fixtures/olmo-original, imported with the olmo stage). The export itself needs no torch and is always
checked; loading it in transformers needs torch + transformers (pip install -e .[hf]) and lm-eval needs
pip install -e .[lm_eval]: those tests skip, saying so, where they are not installed."""
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from colorjax import errors
from colorjax import evaluate
from colorjax import sharding
from colorjax.data import tasks
from colorjax.interop import hf_export
from colorjax.interop import hub
from colorjax.interop import olmo_weights
from colorjax.interop import torch_files
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from conftest import make_config
from conftest import run_cli
from test_olmo import FIXTURE, FP32, PRIOR, import_config, pool_rows, tokenizer_path  # pylint: disable=unused-import

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/olmo-original not found")


@pytest.fixture(scope="module")
def prior(tmp_path_factory, tokenizer_path):  # pylint: disable=redefined-outer-name
  from colorjax.interop import olmo  # pylint: disable=import-outside-toplevel
  return olmo.run(import_config(PRIOR, tmp_path_factory.mktemp("prior"), tokenizer_path))


@pytest.fixture(scope="module")
def exported(prior, tmp_path_factory):
  out = tmp_path_factory.mktemp("hf") / "prior"
  hub.run(make_config("hub", "transformers", hub__params=str(prior), workdir=str(out), **FP32))
  return out


@functools.lru_cache(maxsize=None)
def fp32_params(prior):
  compute = make_config("score", "demo", **FP32).model
  spec = checkpoint.spec_from_manifest(checkpoint.read_params_manifest(prior), compute)
  return spec, checkpoint.load_params(prior, spec)[0]


def colorjax_logits(prior, tokens) -> np.ndarray:
  """colorjax's fp32 logits [batch, seq, vocab] of the imported prior."""
  spec, params = fp32_params(prior)
  return np.asarray(transformer.bind(spec, params)(jnp.asarray(tokens, jnp.int32)))


def test_the_export_is_custom_code_config_and_safetensors_written_without_torch(prior, exported):
  assert sorted(p.name for p in exported.iterdir()) == [
      "colorjax_manifest.json", "config.json", "model.safetensors", "modeling_colorjax.py", "tokenizer.json",
      "tokenizer_config.json"]
  config = json.loads((exported / "config.json").read_text())
  assert config["auto_map"] == {"AutoConfig": "modeling_colorjax.ColorjaxConfig",
                                "AutoModelForCausalLM": "modeling_colorjax.ColorjaxForCausalLM"}
  assert (config["vocab_size"], config["d_model"], config["n_layers"], config["n_heads"], config["mlp_hidden"],
          config["max_position_embeddings"], config["eos_token_id"], config["pad_token_id"]) == (
              1024, 64, 2, 4, 256, 64, 0, 1)
  manifest = checkpoint.read_params_manifest(prior)
  assert config["colorjax"]["params_id"] == manifest["id"] and not config["tie_word_embeddings"]
  header_size = int.from_bytes((exported / "model.safetensors").read_bytes()[:8], "little")
  header = json.loads((exported / "model.safetensors").read_bytes()[8:8 + header_size])
  assert header["__metadata__"] == {"format": "pt"}
  tensors = torch_files.read_safetensors(exported / "model.safetensors")
  original = olmo_weights.read_model_pt(PRIOR / "model.pt")  # OLMo's own names and layouts, the same values
  assert sorted(tensors) == sorted(original)
  assert all(np.array_equal(tensors[k], original[k]) for k in original)
  tok = json.loads((exported / "tokenizer_config.json").read_text())
  assert (tok["eos_token"], tok["pad_token"], tok["model_max_length"]) == ("<|endoftext|>", "<|padding|>", 64)
  with pytest.raises(errors.DataError, match="already exists"):  # never overwritten
    hf_export.export(prior, exported, make_config("score", "demo").model)


def test_transformers_loads_the_export_and_its_logits_are_colorjaxs(prior, exported, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # where trust_remote_code copies the code
  torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e .[hf])")
  transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[hf])")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True,
                                                            dtype=torch.float32)
  model.eval()
  tokens = pool_rows()[:4]
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    masked = model(torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.ones(tokens.shape)).logits.numpy()
    ids = torch.as_tensor(tokens, dtype=torch.long)
    loss = float(model(ids, labels=ids).loss)
  ours = colorjax_logits(prior, tokens)
  diff = float(np.abs(theirs - ours).max())
  print(f"transformers vs colorjax fp32 logits: max |diff| = {diff:.2e}")
  assert theirs.shape == (4, 64, 1024) and diff <= 1e-4
  np.testing.assert_array_equal(masked, theirs)
  ref = json.loads((FIXTURE / "reference.json").read_text())
  np.testing.assert_allclose(theirs[0, 0, :5], ref["prior_logits_sequence_0"]["0"]["first5"], atol=1e-4)
  assert abs(loss - float(np.mean(ref["prior_nll"][:4]))) < 1e-4  # mean CE over the 4 x 63 targets
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
  assert tokenizer("t5 t17 t999")["input_ids"] == [5, 17, 999] and tokenizer.eos_token_id == 0
  prompt = torch.as_tensor(tokens[:1, :8], dtype=torch.long)
  generated = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=1)[0, 8:].tolist()
  greedy, row = [], tokens[0, :8].tolist()
  for _ in range(3):  # colorjax's greedy continuation of the same prompt
    greedy.append(int(np.argmax(colorjax_logits(prior, [row])[0, -1])))
    row.append(greedy[-1])
  assert generated == greedy


def examples_in_the_fixtures_vocabulary():
  """Two multiple-choice docs whose words are the fixture tokenizer's tokens (t2 .. t999)."""
  rng = np.random.default_rng(0)
  words = lambda n: " ".join(f"t{int(t)}" for t in rng.integers(2, 1000, n))
  return [tasks.MCExample("fixture", i, (words(20),) * 3, tuple(" " + words(int(k)) for k in (1, 3, 5)), 0)
          for i in range(2)] + [tasks.MCExample("fixture", 2, ("",), (words(4),), 0)]  # an empty context: EOS


def test_lm_eval_scores_as_colorjaxs_multiple_choice(prior, tmp_path):
  pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e .[lm_eval])")
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  from colorjax.interop import harness  # pylint: disable=import-outside-toplevel
  lm = harness.ColorjaxLM(prior, make_config("score", "demo", **FP32).model)
  examples = examples_in_the_fixtures_vocabulary()
  spec, cfg = lm.spec, make_config("eval", **FP32)
  mesh = sharding.make_mesh(cfg.mesh)
  param_sh = sharding.tree_shardings(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  mc = evaluate.MultipleChoiceEvaluator(spec, mesh, param_sh, prior / "tokenizer.json", {"fixture": ("x", examples)})
  theirs = lm.loglikelihood([Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(
      (c, x) for e in examples for c, x in zip(e.contexts, e.continuations))])
  ours = mc.logprobs(lm.params)
  np.testing.assert_allclose([s for s, _ in theirs], ours, rtol=0, atol=1e-4)
  assert all(isinstance(g, bool) for _, g in theirs)
  # greedy: a continuation made of the model's own argmax tokens is greedy, the same length of others is not
  context = examples[0].contexts[0]
  ids = [int(t[1:]) for t in context.split()]
  own = []
  for _ in range(2):
    own.append(int(np.argmax(colorjax_logits(prior, [ids + own])[0, -1])))
  other = [2 + (t - 1) % 998 for t in own]
  (_, is_greedy), (_, not_greedy) = lm.loglikelihood([
      Instance("loglikelihood", {}, (context, " " + " ".join(f"t{t}" for t in tokens)), 0) for tokens in (own, other)])
  assert is_greedy and not not_greedy
  # rolling: a string within the context is its EOS-prefixed total log-prob; a longer one is scored window by window
  text = lm.tokenizer.decode(pool_rows()[5, :40].tolist())  # documents joined by EOS: "... t17 <|endoftext|> t412 ..."
  (short,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  row = np.asarray([[0] + pool_rows()[5, :40].tolist()], np.int32)
  nll, _ = losses.next_token_nll(spec, lm.params, row)
  assert abs(short + float(np.sum(nll))) < 1e-3
  long_text = lm.tokenizer.decode(pool_rows()[5:7].reshape(-1)[:150].tolist())
  (long,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
  assert long < short < 0
  with pytest.raises(NotImplementedError, match="transformers"):
    lm.generate_until([])


TASK_YAML = """task: fixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_the_lm_eval_action_runs_a_harness_task_on_colorjax(prior, tmp_path):
  """configs/hub.py:lm_eval on a task of the harness's own format (a local JSON dataset, offline): its accuracy is
  the argmax of colorjax's summed log-probs."""
  pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e .[lm_eval])")
  rng = np.random.default_rng(1)
  words = lambda n: " ".join(f"t{int(t)}" for t in rng.integers(2, 1000, n))
  docs = [{"context": words(12), "choices": [words(2) for _ in range(4)], "label": int(rng.integers(4))}
          for _ in range(8)]
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "fixture.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "tasks" / "fixture_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "tasks" / "fixture.jsonl"))
  env = {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
  run_cli(["--config", "configs/hub.py:lm_eval", f"--config.hub.params={prior}",
           "--config.hub.lm_eval_tasks=('fixture_mc',)", f"--config.hub.lm_eval_include={tmp_path / 'tasks'}",
           f"--config.workdir={tmp_path / 'out'}", "--config.model.compute_dtype=float32",
           "--config.model.precision=fp32_residual"], env_extra=env, timeout=600)
  result = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  from colorjax.interop import harness  # pylint: disable=import-outside-toplevel
  lm = harness.ColorjaxLM(prior, make_config("score", "demo", **FP32).model)
  sums = lm.loglikelihood([Instance("loglikelihood", {}, (d["context"], " " + c), 0)
                           for d in docs for c in d["choices"]])
  expected = np.mean([np.argmax([s for s, _ in sums[4 * i:4 * i + 4]]) == d["label"] for i, d in enumerate(docs)])
  assert result["results"]["fixture_mc"]["acc,none"] == pytest.approx(expected) and result["params_id"]
