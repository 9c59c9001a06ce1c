"""Move models between the original CoLoR-Filter code (OLMo checkpoints) and colorjax. Arg: import | export.

  import: an OLMo checkpoint (model.safetensors or model.pt + config.yaml) -> <workdir>/params, a params export that
  score, finetune (train.init_from), eval and target runs read like their own
      python -m colorjax.main --config configs/olmo.py:import --config.olmo.weights=ckpt/step24000-unsharded \
          --config.olmo.tokenizer=../shared/data/tokenizer/gpt-neox-20b-pii-special.json \
          --config.workdir=runs/olmo-prior
  export: a params export -> <workdir>/model.safetensors + config.yaml, which the original code loads
      python -m colorjax.main --config configs/olmo.py:export --config.olmo.params=runs/cond-books/params \
          --config.workdir=olmo/cond-books
"""
from colorjax import config


def get_config(mode: str = "import"):
  if mode not in ("import", "export"):
    raise ValueError(f"olmo mode {mode!r}: choose import or export (e.g. configs/olmo.py:import)")
  c = config.get_config()
  c.stage = "olmo"
  c.olmo.mode = mode
  return c
