"""The Hugging Face hub and ecosystem (docs/hub.md). Arg: the action[,tau] (selection: the released tau).

  # the released prior and conditional -> runs/released/{prior,conditional_all}/params
  python -m colorjax.main --config configs/hub.py:models --config.workdir=runs/released
  # the released tau=64 selection of C4, its token files adopted (ids checked against the released prior's scores)
  python -m colorjax.main --config configs/hub.py:selection,64 --config.workdir=released/c4-all
  # a selection as a dataset (Parquet text, ids, scores + manifest), a model that loads in transformers: one commit
  python -m colorjax.main --config configs/hub.py:push_selection --config.hub.selection=selections/color-tau64 \
      --config.hub.push_to=me/color-c4-tau64 --config.workdir=push/color-c4-tau64
  python -m colorjax.main --config configs/hub.py:push_model --config.hub.params=runs/target/params \
      --config.hub.push_to=me/colorjax-target --config.workdir=push/target
  # a params export as a transformers model (AutoModelForCausalLM, trust_remote_code=True)
  python -m colorjax.main --config configs/hub.py:transformers --config.hub.params=runs/target/params \
      --config.workdir=hf/target
  # lm-evaluation-harness tasks on colorjax's own forward (pip install -e .[lm_eval])
  python -m colorjax.main --config configs/hub.py:lm_eval --config.hub.params=runs/target/params \
      --config.hub.lm_eval_tasks="('arc_easy',)" --config.workdir=runs/target/lm_eval
"""
from colorjax import config

ACTIONS = ("models", "selection", "push_selection", "push_model", "transformers", "lm_eval")


def get_config(arg: str = "models"):
  action, *rest = arg.split(",")
  if action not in ACTIONS or len(rest) > (action == "selection"):
    raise ValueError(f"hub config {arg!r}: choose one of {', '.join(ACTIONS)} (selection may add its tau: "
                     "configs/hub.py:selection,64)")
  c = config.get_config()
  c.stage = "hub"
  c.hub.action = action
  if rest:
    c.hub.tau = int(rest[0])
  return c
