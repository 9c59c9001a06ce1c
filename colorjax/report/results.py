"""The `report` stage: report.md + report.json + plots for a pipeline work directory. This module reads the work
directory and computes the result (report.json); setup.py describes the setup (data, models, target_loss),
markdown.py renders the result as report.md and plots.py draws the plots.

Reads `pipeline.json` (the runs; its paths are relative to the work directory, absolute in older ones), each run's
metrics.jsonl and params manifest, data/split.json, the token stores', selections' and prior/conditional manifests
and the scores. Everything but pipeline.json may be missing (older or partial work directories): the report then
leaves that part out. report.json:
  {"preset", "target",
   "setup": {"target", "pool", "stores", "models", "target_loss", "data_efficiency_method"},
   "runs": [{"name", "method", "tau", "seed", "role", "train_tokens", "finished", "target_loss", "loss_name",
             "tasks": {task: acc}, "tasks_mean", "curve": [[tokens, loss], ...], "schedule"}],
   "summary": [{"method", "tau", "seeds", "train_tokens", "compute_mean", "target_loss_mean", "target_loss_std",
                "tasks_mean"}],
   "compute": {shared step: FLOPs} (each run also gets "compute": {"train", "selection_forward", "shared", "total"}),
   "data_efficiency": {"tau<τ>": {"color_tokens", "color_loss", "random_points", "random_tokens_to_match", "ratio",
                                  "bound", "bracket", "curve_tokens_to_match", "curve_ratio", "curve_lower_bound"}},
   "gain": [{"method", "tau", "loss", "color_loss", "random_loss", "gain"}],
   "selections": {...}, "examples": {...}, "plots": [...]}
"""
import json
import math
import pathlib

import numpy as np

from colorjax import errors
from colorjax import methods
from colorjax.artifacts import formats
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import losses
from colorjax.report import cheap
from colorjax.report import compute
from colorjax.report import markdown
from colorjax.report import plots
from colorjax.report import setup
from colorjax.report import sweep
from colorjax.training import metrics
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib

EFFICIENCY_METHOD = (
    "Every finished random run (the random comparison run at each τ; under fixed n the runs at n, at each "
    "pipeline.random_budgets multiple of n and the curve run over 1/curve_tau of the largest pool) gives one point "
    "(training tokens, final held-out loss), averaged over seeds per budget. The tokens at which random reaches "
    "CoLoR's mean final loss are interpolated between the two neighbouring budgets that bracket it (named in the "
    "table) with the loss linear in log(tokens); ratio = those tokens / CoLoR's tokens. When CoLoR's loss is below "
    "every random point the ratio is a lower bound (\">\": largest random budget / CoLoR's tokens); when even the "
    "smallest random budget does better, an upper bound (\"<\": smallest budget / CoLoR's tokens). The secondary "
    "figure reads the same off the curve runs' learning curve (linear between eval points) while they are still "
    "mid-schedule (learning rate not annealed), so it understates the ratio.")


# ----------------------------------------------------------------------------------------------------------------
# Runs


def _final_eval(records: list[dict]) -> dict:
  evals = [r for r in records if r.get("event") == "eval"]
  return evals[-1] if evals else {}


def _loss_key(record: dict) -> str | None:
  keys = [k for k in record if k.startswith("eval/") and k.endswith("_loss")]
  for prefix in ("eval/target", "eval/tasks_"):
    for key in keys:
      if key.startswith(prefix):
        return key
  return keys[0] if keys else None


def collect_runs(pipeline_record: dict, root: pathlib.Path) -> list[dict]:
  rows = []
  for r in pipeline_record["runs"]:
    workdir = setup.run_dir(root, r)
    records = metrics.read_metrics(workdir)
    final = _final_eval(records)
    key = _loss_key(final)
    manifest = setup.load(workdir / "params" / formats.MANIFEST)
    tasks = {k[len("eval/mc/"):]: v for k, v in final.items() if k.startswith("eval/mc/") and k != "eval/mc/mean"}
    start = next((x for x in records if x.get("event") == "start"), {})
    tokens_per_step = (start.get("tokens_planned", 0) / start["total_steps"]) if start.get("total_steps") else 0
    curve = [[x["step"] * tokens_per_step, x[key]] for x in records if x.get("event") == "eval" and key in x]
    rows.append({
        "name": r["name"], "method": r["method"], "tau": r["tau"], "seed": r["seed"], "role": r["role"],
        "train_tokens": manifest.get("tokens"), "finished": bool(manifest), "target_loss": final.get(key),
        "loss_name": key[len("eval/"):] if key else None, "tasks": tasks,
        "tasks_mean": final.get("eval/mc/mean"), "curve": curve, "schedule": manifest.get("schedule"),
    })
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  """Mean and sample std (None for one seed: no spread to report) over seeds of each (method, τ) comparison."""
  groups: dict = {}
  for r in rows:
    if r["role"] == "compare" and r["target_loss"] is not None:
      groups.setdefault((r["method"], r["tau"]), []).append(r)
  out = []
  for (method, tau), members in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
    target_losses = np.array([m["target_loss"] for m in members])
    means = [m["tasks_mean"] for m in members if m["tasks_mean"] is not None]
    totals = [m["compute"]["total"] for m in members if (m.get("compute") or {}).get("total") is not None]
    out.append({"method": method, "tau": tau, "seeds": len(members), "train_tokens": members[0]["train_tokens"],
                "compute_mean": float(np.mean(totals)) if len(totals) == len(members) else None,
                "target_loss_mean": float(target_losses.mean()),
                "target_loss_std": float(target_losses.std(ddof=1)) if len(members) > 1 else None,
                "tasks_mean": float(np.mean(means)) if means else None,
                "tasks_std": float(np.std(means, ddof=1)) if len(means) > 1 else None})
  return out


# ----------------------------------------------------------------------------------------------------------------
# Data efficiency


def tokens_to_reach(curve: list, loss: float):
  """First token count at which a (tokens, loss) curve reaches `loss` (linear interpolation), or None."""
  if curve and curve[0][1] <= loss:
    return curve[0][0]
  for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
    if l1 <= loss:
      return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)
  return None


def random_points(rows: list[dict]) -> list[list]:
  """[tokens, final held-out loss] of the finished random runs, averaged over seeds per budget, by tokens."""
  budgets: dict = {}
  for r in rows:
    if r["method"] == methods.BASELINE.name and r["finished"] and r["train_tokens"] and r["target_loss"] is not None:
      budgets.setdefault(r["train_tokens"], []).append(r["target_loss"])
  return [[tokens, float(np.mean(seed_losses))] for tokens, seed_losses in sorted(budgets.items())]


def random_tokens_to_match(points: list, loss: float) -> tuple:
  """(tokens, bound, bracket): where random's (tokens, loss) points, sorted by tokens, reach `loss`, with the loss
  linear in log(tokens) between the two neighbouring budgets that bracket it (`bracket`: those two points; finished
  runs at a few budgets, so log spacing is the natural scale).

  bound None: an interpolated match. "lower": `loss` is below every point, random needs more than its largest
  budget (returned). "upper": the smallest budget (returned) already does better. The bracket is then the one point
  it is bounded by. (None, None, None) without points.
  """
  if not points:
    return None, None, None
  if points[0][1] <= loss:
    return points[0][0], ("upper" if points[0][1] < loss else None), [points[0]]
  for (t0, l0), (t1, l1) in zip(points, points[1:]):
    if l1 <= loss:
      frac = (l0 - loss) / (l0 - l1)
      return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))), None, [[t0, l0], [t1, l1]]
  return points[-1][0], "lower", [points[-1]]


def mean_curve(rows: list[dict]) -> list[list]:
  """The curve runs' learning curves averaged over seeds (eval points aligned by index)."""
  curves = [r["curve"] for r in rows if r["role"] == "curve" and len(r["curve"]) > 1]
  if not curves:
    return []
  length = min(len(c) for c in curves)
  return [[curves[0][i][0], float(np.mean([c[i][1] for c in curves]))] for i in range(length)]


def _ratio(tokens, color_tokens):
  return tokens / color_tokens if tokens is not None and color_tokens else None


def data_efficiency(rows: list[dict], summary: list[dict]) -> dict:
  """Per τ: random tokens to reach CoLoR's final loss over CoLoR's tokens, from finished runs (primary) and from
  the mid-schedule learning curve (secondary, understates); see EFFICIENCY_METHOD."""
  points, curve = random_points(rows), mean_curve(rows)
  if not points and not curve:
    return {}
  out = {}
  for s in summary:
    if s["method"] != methods.HEADLINE.name:
      continue
    tokens, loss = s["train_tokens"], s["target_loss_mean"]
    match, bound, bracket = random_tokens_to_match(points, loss)
    reach = tokens_to_reach(curve, loss) if curve else None
    out[f"tau{s['tau']:g}"] = {
        "color_tokens": tokens, "color_loss": loss, "random_points": points,
        "random_tokens_to_match": match, "ratio": _ratio(match, tokens), "bound": bound, "bracket": bracket,
        "curve_tokens_to_match": reach,
        "curve_ratio": _ratio(reach if reach is not None else curve[-1][0], tokens) if curve else None,
        "curve_lower_bound": (reach is None) if curve else None,
    }
  return out


def gains(summary: list[dict]) -> list[dict]:
  """Per method and τ: the share of CoLoR's held-out loss gain over random (at the same τ, mean over seeds) that the
  method keeps: (random − method) / (random − CoLoR). None where a side is missing or CoLoR gains nothing."""
  by = {(s["method"], s["tau"]): s["target_loss_mean"] for s in summary}
  out = []
  for s in summary:
    color, random = by.get((methods.HEADLINE.name, s["tau"])), by.get((methods.BASELINE.name, s["tau"]))
    if s["method"] == methods.BASELINE.name or color is None or random is None:
      continue
    gap = random - color
    share = (random - s["target_loss_mean"]) / gap if gap > 0 else None
    out.append({"method": s["method"], "tau": s["tau"], "loss": s["target_loss_mean"], "color_loss": color,
                "random_loss": random, "gain": share})
  return out


# ----------------------------------------------------------------------------------------------------------------
# Selections, examples


def selection_diagnostics(root: pathlib.Path) -> dict:
  """Each selection's cut-off, per-source rates, fitted scorer quality (distilled methods), cascade rescoring and
  recall: the share of the headline method's selection from the same candidates (the pool, or a fixed-n nested
  pool: `within`) and of the same size that it also selects (None without one)."""
  out, indexes = {}, {}
  for folder in sorted((root / "selections").glob("*")):
    if (folder / formats.MANIFEST).exists():
      m = json.loads((folder / formats.MANIFEST).read_text())
      out[folder.name] = {"method": m["method"], "tau": m["tau"], "k": m["k"], "threshold": m.get("threshold"),
                          "tau_requested": m.get("tau_requested"), "within": (m.get("within") or {}).get("id"),
                          "candidates": m.get("num_sequences"),
                          "sources": m.get("sources") or {}, "score_stats": m.get("score_stats"),
                          "spearman": ((m.get("scorer") or {}).get("quality") or {}).get("spearman_heldout"),
                          "cascade": m.get("cascade")}
      indexes[folder.name] = folder / "index.npy"
  headline = {(s["within"], s["k"]): name for name, s in out.items() if s["method"] == methods.HEADLINE.name}
  for name, s in out.items():
    reference = headline.get((s["within"], s["k"]))
    shared = None if reference is None else _overlap(indexes[name], indexes[reference])
    s["recall"] = None if shared is None else shared / s["k"]
  return out


def _overlap(a: pathlib.Path, b: pathlib.Path) -> int | None:
  """How many sequence ids two selections share (None when either index is unreadable)."""
  try:
    return int(np.intersect1d(np.load(a), np.load(b)).size)
  except (OSError, ValueError):
    return None


class _Negated:
  def __init__(self, stream):
    self.stream = stream

  def __iter__(self):
    for start, values in self.stream:
      yield start, -values


def examples(pipeline_record: dict, root: pathlib.Path, k: int = 3, chars: int = 240) -> dict:
  """Highest and lowest CoLoR-scored sequences of the pool, decoded ({} when the scores or the pool are gone)."""
  scores_path = setup.at(root, pipeline_record.get("scores"))
  pool_path = setup.at(root, (pipeline_record.get("stores") or {}).get("pool"))
  if not all(p is not None and (p / formats.MANIFEST).is_file() for p in (scores_path, pool_path)):
    return {}
  scores = scores_lib.Scores(scores_path)
  store = stores.TokenStore(pool_path)
  tokenizer = tokenizer_lib.load_tokenizer(str(store.tokenizer_path()))
  stream = selection_lib.ScoreStream(scores, methods.HEADLINE, "conditional_0", 1 << 20)
  out = {}
  for name, source in (("top", stream), ("bottom", _Negated(stream))):
    positions, _ = selection_lib.top_k(source, min(k, scores.num_sequences))
    ids = scores.global_ids(positions)
    rows = scores.read_ids(ids)
    values = losses.color_score(rows[:, scores.column("prior")], rows[:, scores.column("conditional_0")])
    labels = store.labels() or ["all"]
    texts = tokenizer.decode_batch([r.tolist() for r in store.read(ids)], skip_special_tokens=False)
    out[name] = sorted([{"id": int(i), "score": float(value), "source": labels[lab],
                         "text": " ".join(t.split())[:chars]}
                        for i, value, lab, t in zip(ids, values, store.label_ids(ids), texts)],
                       key=lambda e: -e["score"] if name == "top" else e["score"])
  return out


PIPELINE_PARTS = ("data", "stores", "pools", "runs", "scores", "distill", "selections")


def missing_record(root: pathlib.Path) -> str:
  """Why `root` has no report: a pipeline that has not finished (what it holds so far), or no pipeline at all."""
  if not root.is_dir():
    return f"{root} does not exist; give --config.workdir the pipeline's work directory"
  found = [name for name in PIPELINE_PARTS if (root / name).is_dir()]
  if not found:
    return (f"{root / 'pipeline.json'} is missing and {root} holds none of a pipeline's folders "
            f"({', '.join(PIPELINE_PARTS)}): it is not a pipeline work directory; give --config.workdir one")
  runs = sorted(p.name for p in (root / "runs").glob("*") if (p / "params" / formats.MANIFEST).exists())
  return (f"{root / 'pipeline.json'} is missing: the pipeline in {root} has not finished (it writes pipeline.json "
          f"after its last target run). It holds {', '.join(found)}/ so far; finished runs: "
          f"{', '.join(runs) or 'none'}."
          " Re-run the same pipeline command to finish it (finished steps are skipped); it writes the report")


def write(root) -> pathlib.Path:
  root = pathlib.Path(root).resolve()
  record_path = root / "pipeline.json"
  if not record_path.exists():
    raise errors.DataError(missing_record(root))
  pipeline_record = json.loads(record_path.read_text())
  rows = collect_runs(pipeline_record, root)
  costs = compute.account(rows, pipeline_record, lambda path: setup.at(root, path))
  summary = summarize(rows)
  selections = selection_diagnostics(root)
  at = lambda p: setup.at(root, p)
  compute.selection_scoring(selections, costs, compute.scored_sequences(pipeline_record, at),
                            compute.pool_scoring_flops(pipeline_record, at))
  result = {"preset": pipeline_record.get("preset", "?"), "target": pipeline_record.get("target", "text"),
            "setup": setup.setup(pipeline_record, root, rows, EFFICIENCY_METHOD), "runs": rows, "summary": summary,
            "data_efficiency": data_efficiency(rows, summary), "gain": gains(summary), "compute": costs,
            "scoring_done": compute.scoring_done(root, compute.scored_sequences(pipeline_record, at)),
            "cheap": cheap.analyse(root, pipeline_record, at),
            "selections": selections,
            "examples": examples(pipeline_record, root),
            "protocol": pipeline_record.get("config", {}).get("pipeline", {}).get("protocol", "fixed_pool"),
            "plots": plots.draw(rows, selections, root / "plots") + compute.plot(rows, root / "plots")}
  result["plots"] += sweep.plot(summary, root / "plots", result["target"], result["protocol"])
  result["plots"] += cheap.plot(result["cheap"], root / "plots")
  (root / "report.json").write_text(formats.json_text(result))
  (root / "report.md").write_text(markdown.markdown(result))
  markdown.print_summary(result)
  return root / "report.md"


def run(cfg):
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to a pipeline work directory")
  path = write(cfg.workdir)
  print(f"report: {path}")
  return path


def describe(cfg):
  print(f"report (dry run): would read {pathlib.Path(cfg.workdir) / 'pipeline.json'} and write report.md/json")
