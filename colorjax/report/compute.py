"""Compute accounting of a pipeline's methods, as the paper compares them: what each selection method spends to
reach its held-out loss, in FLOPs from colorjax's own counters (6N + 12LdT per trained token, 2N + 4LdT per scored
token: docs/definitions.md#flop-counts-and-reference-figures).

Per target run: its training, plus RHO-down's scoring forwards of every candidate; plus the work its method needs
before training — CoLoR: prior, conditional and scoring the pool with both; conditional-only: prior, conditional and
one scoring pass; distilled CoLoR: prior, conditional and scoring its sample (the fit and the n-gram predictions
are CPU work, not counted in FLOPs); RHO-down + prior: prior and conditional; RHO-down: its target-only reference;
random and DSIR: nothing (DSIR's n-gram counting is not counted in FLOPs). Each method's shared steps are its
registry entry's `shared_work`.

Under the fixed-n protocol one scoring pass of the largest nested pool (and one distill sample of it) serves every
τ; a selection among a τ·n pool is charged the scoring of its own pool: the shared scoring steps times its
candidates / the sequences scored (what scoring that pool alone would have cost; the sample in the same proportion).
"""
import dataclasses
import json
import pathlib

import numpy as np

from colorjax import methods
from colorjax.artifacts import formats
from colorjax.model import transformer



def _manifest(path: pathlib.Path | None, sub: str = "") -> dict:
  """The manifest in `path`, else in its `sub` folder (a run folder's params/); {} when absent."""
  for folder in ((path, path / sub) if path is not None else ()):
    if (folder / formats.MANIFEST).is_file():
      return json.loads((folder / formats.MANIFEST).read_text())
  return {}


def run_flops(manifest: dict) -> dict:
  """A run's training and selection FLOPs: recorded by the run, else counted from its architecture and tokens."""
  if manifest.get("compute"):
    return dict(manifest["compute"])
  if not manifest.get("model_spec") or not manifest.get("tokens"):
    return {"train_flops": None, "selection_forward_flops": 0.0}
  spec = transformer.ModelSpec(**manifest["model_spec"])
  seq = manifest.get("config", {}).get("model", {}).get("max_seq_len", spec.max_seq_len)
  return {"train_flops": float(transformer.flops_per_token(spec, seq, training=True)) * manifest["tokens"],
          "selection_forward_flops": 0.0}


def shared_costs(pipeline_record: dict, at) -> dict:
  """FLOPs of the pipeline's shared steps (None when a step's artifact is missing)."""
  trained = lambda key: run_flops(_manifest(at(pipeline_record.get(key)), "params"))["train_flops"]
  costs = {"prior": trained("prior"), "conditional": trained("conditional"), "reference": trained("reference")}
  prior = _manifest(at(pipeline_record.get("prior")), "params")
  per_model = _scoring_flops(_manifest(at(pipeline_record.get("scores"))), prior)
  costs["scoring"] = None if per_model is None else per_model[0] * per_model[1]
  costs["scoring_one"] = None if per_model is None else per_model[0]
  distilled = at(pipeline_record.get("distill"))
  if distilled is not None:  # the distill stage's sample, scored by prior and conditional
    sample = _scoring_flops(_manifest(distilled / "sample_scores"), prior)
    costs["scoring_sample"] = None if sample is None else sample[0] * sample[1]
  return costs


def _scoring_flops(scores: dict, prior: dict) -> tuple[float, int] | None:
  """(FLOPs of one model over a score folder's sequences, its models), or None when either manifest is missing."""
  if not scores or not prior.get("model_spec"):
    return None
  spec = transformer.ModelSpec(**prior["model_spec"])
  seq = scores["store"]["seq_len"]
  return float(transformer.flops_per_token(spec, seq, training=False)) * scores["num_sequences"] * seq, len(
      scores["models"])


def scored_sequences(pipeline_record: dict, at) -> int | None:
  """Sequences the pipeline's whole-pool scoring covers (the pool, or under fixed n the largest nested pool), done
  or not (a pipeline of cheap methods scores no whole pool)."""
  recorded = (pipeline_record.get("pool_scoring") or {}).get("sequences")
  return recorded or _manifest(at(pipeline_record.get("scores"))).get("num_sequences")


def pool_scoring_flops(pipeline_record: dict, at) -> float | None:
  """FLOPs of scoring the pool (the candidates) with the prior and the conditional: what the cheap methods' scoring
  is a share of."""
  prior = _manifest(at(pipeline_record.get("prior")), "params")
  scored, seq = scored_sequences(pipeline_record, at), (pipeline_record.get("pool_scoring") or {}).get("seq_len")
  seq = seq or (_manifest(at(pipeline_record.get("scores"))).get("store") or {}).get("seq_len")
  if not prior.get("model_spec") or not scored or not seq:
    return None
  spec = transformer.ModelSpec(**prior["model_spec"])
  return 2 * float(transformer.flops_per_token(spec, seq, training=False)) * scored * seq


SCORE_FOLDERS = ("scores", "distill/sample_scores", "distill/rescored-*")


def scoring_done(root: pathlib.Path, pool_sequences: int | None) -> dict:
  """What the pipeline's own counters say it scored: per score folder, the sequences its score jobs recorded
  (metrics.jsonl, x its models), and their sum as a share of scoring the pool once with both models."""
  folders = {}
  for pattern in SCORE_FOLDERS:
    for folder in sorted(root.glob(pattern)):
      records = [r for r in _read_jsonl(folder / "metrics.jsonl") if r.get("event") == "score"]
      if records:
        folders[str(folder.relative_to(root))] = sum(int(r.get("sequences", 0)) * int(r.get("models", 2))
                                                     for r in records)
  total = sum(folders.values())
  share = total / (2 * pool_sequences) if pool_sequences else None
  return {"folders": folders, "model_sequences": total, "share_of_pool": share}


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pool_fraction(selection: dict, scored: int | None) -> float:
  """The share of the scored sequences a selection's candidates are: its fixed-n pool's size / the sequences scored
  (1 for a selection from the whole pool)."""
  within = selection.get("within") or {}
  if not within.get("sequences") or not scored:
    return 1.0
  return min(1.0, within["sequences"] / scored)


def _charged(method, costs: dict, fraction: float) -> float | None:
  """A method's shared work, its scoring steps scaled by its pool's `fraction` of what was scored."""
  needed = [(costs.get(step), step.startswith("scoring")) for step in (method.shared_work if method else ())]
  if any(c is None for c, _ in needed):
    return None
  return float(sum(c * (fraction if scoring else 1.0) for c, scoring in needed))


def account(rows: list[dict], pipeline_record: dict, at) -> dict:
  """Adds "compute" ({"train", "selection_forward", "shared", "total"}) to every run row; returns the shared costs."""
  costs = shared_costs(pipeline_record, at)
  scored = scored_sequences(pipeline_record, at)
  workdirs = {r["name"]: r.get("workdir") for r in pipeline_record.get("runs", [])}
  selections = {r["name"]: r.get("selection_dir") for r in pipeline_record.get("runs", [])}
  for r in rows:
    own = run_flops(_manifest(at(workdirs.get(r["name"])), "params"))
    selection = _manifest(at(selections.get(r["name"])))
    shared = _charged(methods.REGISTRY.get(r["method"]), costs, pool_fraction(selection, scored))
    # a selection's own scoring (the cascade's rescored candidates), recorded in its manifest
    cascade = selection.get("cascade") or {}
    forward = (own.get("selection_forward_flops") or 0.0) + (cascade.get("scoring_flops") or 0.0)
    parts = (own["train_flops"], forward, shared)
    r["compute"] = {"train": parts[0], "selection_forward": parts[1], "shared": shared,
                    "total": None if None in parts else float(sum(parts))}
  return costs


def markdown_scoring(done: dict | None) -> list[str]:
  """What the pipeline scored, from its score jobs' counters."""
  if not done or not done.get("folders"):
    return []
  parts = "; ".join(f"`{name}` {count:,}" for name, count in done["folders"].items())
  share = "" if done.get("share_of_pool") is None else f" = {done['share_of_pool']:.1%} of scoring the candidates once"
  return ["## Scoring done", "", f"Sequences the prior and the conditional scored, from the score jobs' own counters "
          f"(metrics.jsonl; one count per model): {parts}; in all {done['model_sequences']:,} model-sequences{share}.",
          ""]


def markdown(rows: list[dict], costs: dict, done: dict | None = None) -> list[str]:
  """The report's compute table: every comparison run's held-out loss against what its method spent."""
  compared = [r for r in rows if r["role"] == "compare" and r.get("compute")]
  if not compared:
    return markdown_scoring(done)
  e = lambda x: "-" if x is None else f"{x:.3e}"
  steps = ", ".join(f"{k} {e(v)}" for k, v in costs.items() if k != "scoring_one")
  needs = "; ".join(f"{m.name}: {', '.join(m.shared_work) or 'none'}" for m in methods.REGISTRY.values()
                    if any(r["method"] == m.name for r in compared))
  lines = ["## Compute", "", "FLOPs each method spent to reach its held-out loss (6N + 12LdT per trained token, "
           "2N + 4LdT per scored token). Shared: the steps "
           f"a method needs before it selects ({needs}). Shared steps: {steps}.",
           "", "| run | method | τ | loss | training | selection forwards | shared | total |",
           "|---|---|---|---|---|---|---|---|"]
  for r in compared:
    c = r["compute"]
    loss = "-" if r["target_loss"] is None else f"{r['target_loss']:.4f}"
    lines.append(f"| {r['name']} | {r['method']} | {r['tau']:g} | {loss} | {e(c['train'])} | "
                 f"{e(c['selection_forward'])} | {e(c['shared'])} | {e(c['total'])} |")
  return lines + [""] + markdown_scoring(done)


def selection_scoring(selections: dict, costs: dict, scored: int | None, full: float | None) -> None:
  """Adds each selection's scoring by the prior and conditional ("scoring_flops": its method's shared scoring,
  charged for its own candidates, plus a cascade's rescoring) and its share of scoring its candidates with both
  ("scoring_share": of the whole pool, or of its fixed-n pool; `full`: FLOPs of scoring all `scored`)."""
  for s in selections.values():
    method = methods.REGISTRY.get(s["method"])
    fraction = pool_fraction({"within": {"sequences": s.get("candidates")} if s.get("within") else None}, scored)
    scoring = dataclasses.replace(method, shared_work=tuple(w for w in method.shared_work if w.startswith("scoring")))\
        if method is not None else None
    shared = _charged(scoring, costs, fraction)
    flops = None if shared is None else shared + ((s.get("cascade") or {}).get("scoring_flops") or 0.0)
    s["scoring_flops"] = flops
    s["scoring_share"] = None if flops is None or not full else flops / (full * fraction)


def plot(rows: list[dict], folder: pathlib.Path) -> list[str]:
  """Held-out loss against the selection's compute (everything a method spends before its target trains: prior,
  conditional, scoring, reference, selection forwards), mean and spread over seeds, one marker per method and τ."""
  points = [r for r in rows if r["role"] == "compare" and r.get("compute", {}).get("shared") is not None
            and r["target_loss"] is not None]
  if not points:
    return []
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(7, 5))
  for name in sorted({r["method"] for r in points}):
    method = methods.REGISTRY.get(name)
    for tau in sorted({r["tau"] for r in points if r["method"] == name}):
      mine = [r for r in points if r["method"] == name and r["tau"] == tau]
      spent = [r["compute"]["shared"] + (r["compute"]["selection_forward"] or 0.0) for r in mine]
      loss = np.array([r["target_loss"] for r in mine])
      ax.errorbar(np.mean(spent), loss.mean(), yerr=loss.std() if len(mine) > 1 else None, fmt="o", capsize=3,
                  color=method.plot_color if method is not None else "gray",
                  label=name if tau == min(r["tau"] for r in points if r["method"] == name) else None)
      ax.annotate(f"τ={tau:g}", (np.mean(spent), loss.mean()), fontsize=7, xytext=(4, 2), textcoords="offset points")
  ax.set_xlabel("selection compute: FLOPs spent before the target trains")
  ax.set_ylabel("held-out target loss")
  ax.set_title("Target loss against the compute each selection spent")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(folder / "loss_vs_selection_compute.png", dpi=120)
  plt.close(fig)
  return ["plots/loss_vs_selection_compute.png"]
