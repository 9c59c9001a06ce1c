"""lm-evaluation-harness on colorjax's own forward pass (the `hub lm_eval` action; pip install -e .[lm_eval]).

`ColorjaxLM` is an `lm_eval` LM: loglikelihood and loglikelihood_rolling are computed by colorjax's model on a
params export, no torch involved, so any harness task that scores log-likelihoods runs on colorjax's models. It
scores exactly as the eval stage's multiple choice (evaluate.py): context and continuation tokenized separately
and joined (an empty context is EOS), left-truncated to the model's context, the continuation's log-probs summed in
fp32, requests in fixed-shape length buckets (one compilation per bucket). generate_until is not implemented: export
the model for transformers (`hub transformers`) and use the harness's hf model for generative tasks. The OLMo-style
8-task evaluation (`eval` stage) stays colorjax's default; this is for the harness's tasks and metrics. One process,
one device (no mesh).
"""
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import evaluator
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from colorjax import errors
from colorjax import evaluate
from colorjax.data import tasks
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint

DEFAULT_BATCH_TOKENS = 8192


class ColorjaxLM(LM):
  """An lm_eval LM over a colorjax params export."""

  def __init__(self, params_dir, model_cfg, batch_tokens: int = DEFAULT_BATCH_TOKENS):
    super().__init__()
    params_dir = pathlib.Path(params_dir)
    manifest = checkpoint.read_params_manifest(params_dir)
    self.spec = checkpoint.spec_from_manifest(manifest, model_cfg)
    self.params, _ = checkpoint.load_params(params_dir, self.spec)
    tok = manifest["tokenizer"]
    self.tokenizer = tokenizer_lib.load_tokenizer(str(tokenizer_lib.checked_tokenizer_path(params_dir, tok)))
    self.eos_id, self.pad_id = tok["eos_id"], tok["pad_id"]
    self.batch_tokens = int(batch_tokens)
    spec = self.spec

    def sums_and_greedy(params, inputs_bt, positions_bk, targets_bk, mask_bk):
      module = transformer.bind(spec, params)
      hidden_bkd = jnp.take_along_axis(module.hidden(inputs_bt), positions_bk[..., None], axis=1)
      nll_bk = losses.head_nll(hidden_bkd, module.head[...], targets_bk, spec.logits_dtype)[0]
      greedy_bk = (jnp.argmax(module.logits(hidden_bkd), axis=-1) == targets_bk) | (mask_bk == 0)
      return -jnp.sum(nll_bk * mask_bk, axis=1), jnp.all(greedy_bk, axis=1)

    self._fn = jax.jit(sums_and_greedy)

  @property
  def max_length(self) -> int:
    return self.spec.max_seq_len

  def score(self, requests) -> list[tuple[float, bool]]:
    """(summed continuation log-prob, greedy) of token requests (inputs, targets, n) as evaluate.encode_requests
    builds them, in their order."""
    out = [(0.0, True)] * len(requests)
    for bucket in evaluate.make_buckets(requests, self.max_length, self.batch_tokens, 1, self.pad_id):
      for first in range(0, len(bucket.request_ids), bucket.batch):
        rows = np.arange(first, first + bucket.batch)
        valid = rows < len(bucket.request_ids)
        take = np.where(valid, rows, 0)
        sums, greedy = self._fn(self.params, *(a[take] for a in (bucket.inputs, bucket.positions, bucket.targets,
                                                                  bucket.mask)))
        for r, s, g in zip(bucket.request_ids[rows[valid]], np.asarray(sums), np.asarray(greedy)):
          out[int(r)] = (float(s), bool(g))
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    del disable_tqdm
    pairs = [r.args for r in requests]
    example = tasks.MCExample("lm_eval", 0, tuple(c for c, _ in pairs), tuple(c for _, c in pairs), 0)
    return self.score(evaluate.encode_requests(self.tokenizer, [example], self.max_length, self.eos_id))

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each string's total log-prob, EOS-prefixed, in disjoint windows of the model's context (every token scored
    once, each with as much context as fits)."""
    del disable_tqdm
    windows, owner = [], []
    for i, request in enumerate(requests):
      ids = self.tokenizer.encode(request.args[0], add_special_tokens=False).ids
      for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          ids, prefix_token=self.eos_id, max_seq_len=self.max_length, context_len=1)):
        full = ctx + pred
        windows.append((np.asarray(full[:-1], np.int32), np.asarray(full[1:], np.int32), len(pred)))
        owner.append(i)
    totals = np.zeros(len(requests), np.float64)
    for i, (total, _) in zip(owner, self.score(windows)):
      totals[i] += total
    return totals.tolist()

  def generate_until(self, requests, disable_tqdm: bool = False):
    raise NotImplementedError("colorjax's lm-eval model scores log-likelihoods only; for generative tasks export the "
                              "model (configs/hub.py:transformers) and run the harness's hf model with "
                              "trust_remote_code=True")


def run(cfg) -> dict:
  """The `hub lm_eval` action: harness tasks on a params export -> <workdir>/lm_eval.json and a table."""
  if not cfg.hub.params or not cfg.hub.lm_eval_tasks or not cfg.workdir:
    raise errors.ConfigError("set --config.hub.params (a params export), --config.hub.lm_eval_tasks (harness task "
                             "names) and --config.workdir (where lm_eval.json goes)")
  out = pathlib.Path(cfg.workdir).resolve() / "lm_eval.json"
  if out.exists():
    raise errors.DataError(f"{out} already exists; choose another --config.workdir (nothing was overwritten)")
  lm = ColorjaxLM(cfg.hub.params, cfg.model, cfg.eval.batch_tokens)
  start = time.time()
  task_manager = TaskManager(include_path=cfg.hub.lm_eval_include) if cfg.hub.lm_eval_include else None
  results = evaluator.simple_evaluate(model=lm, tasks=list(cfg.hub.lm_eval_tasks), task_manager=task_manager,
                                      num_fewshot=int(cfg.hub.lm_eval_fewshot),
                                      limit=int(cfg.hub.lm_eval_limit) or None, log_samples=False)
  out.parent.mkdir(parents=True, exist_ok=True)
  record = {"params": str(cfg.hub.params), "params_id": checkpoint.read_params_manifest(cfg.hub.params).get("id"),
            "tasks": list(cfg.hub.lm_eval_tasks), "results": results["results"],
            "versions": results.get("versions"), "n-shot": results.get("n-shot"), "seconds": time.time() - start}
  out.write_text(json.dumps(record, indent=1, default=str))
  print(lm_utils.make_table(results))
  print(f"hub lm_eval: results in {out}")
  return record
