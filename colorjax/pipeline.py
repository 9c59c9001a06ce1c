"""The `pipeline` stage: every step of CoLoR-Filter in one work directory, each skipped when its artifact is done.

Steps build ordinary stage configs and call the stage modules, so any step can also be run alone with the same
result. A step whose finished artifact already exists (its manifest matches what the step would make) is skipped.
"""
import pathlib
import time

import ml_collections

from colorjax import prepare
from colorjax import synthetic
from colorjax import train
from configs import base


def _stage_config(cfg, stage: str, **sections) -> ml_collections.ConfigDict:
  """A single-stage config derived from the pipeline's: shared fields copied, then the given sections."""
  stage_cfg = base.get_config()
  stage_cfg.stage = stage
  stage_cfg.seed = cfg.seed
  stage_cfg.mesh = cfg.mesh
  for name, value in sections.items():
    if isinstance(value, ml_collections.ConfigDict):
      stage_cfg[name] = ml_collections.ConfigDict(value.to_dict())
    else:
      stage_cfg[name] = value
  return stage_cfg


def synthesize(cfg, root: pathlib.Path) -> dict:
  """Demo data: synthetic domains as jsonl.gz plus a BPE tokenizer trained on them (skipped when present)."""
  pcfg = cfg.pipeline
  text = root / "text"
  files = {}
  for domain in synthetic.DOMAINS:
    path = text / f"{domain}.jsonl.gz"
    if not path.exists():
      synthetic.write_domain(path, domain, pcfg.synthetic_docs, seed=pcfg.synthetic_seed)
    files[domain] = path
  tokenizer = root / "tokenizer.json"
  if not tokenizer.exists():
    synthetic.train_tokenizer(list(files.values()), tokenizer, vocab_size=pcfg.synthetic_vocab)
  return {"files": files, "tokenizer": tokenizer}


def run(cfg):
  if not cfg.workdir:
    raise ValueError("set --config.workdir to the pipeline's work directory")
  root = pathlib.Path(cfg.workdir).resolve()
  root.mkdir(parents=True, exist_ok=True)
  start = time.time()
  demo = synthesize(cfg, root / "data")

  pool_cfg = _stage_config(cfg, "prepare")
  pool_cfg.prepare.inputs = tuple(str(p) for p in demo["files"].values())
  pool_cfg.prepare.tokenizer = str(demo["tokenizer"])
  pool_cfg.prepare.output = str(root / "stores" / "pool")
  pool_cfg.prepare.seq_len = cfg.pipeline.seq_len
  pool = prepare.run(pool_cfg)

  prior_cfg = _stage_config(cfg, "pretrain", model=cfg.prior.model, train=cfg.prior.train)
  prior_cfg.workdir = str(root / "prior")
  prior_cfg.data.train_store = str(pool)
  prior_cfg.data.eval_stores = (f"pool={pool}",)
  prior_cfg.train.resume = True
  prior = train.run(prior_cfg)
  print(f"pipeline: done in {time.time() - start:.0f}s; prior params in {prior}; work directory {root}")


def describe(cfg):
  prior_cfg = _stage_config(cfg, "pretrain", model=cfg.prior.model, train=cfg.prior.train)
  train.describe(prior_cfg)
