"""The `report` stage: report.md + report.json + plots for a pipeline work directory.

Reads `pipeline.json` (the runs) and each run's metrics.jsonl and params manifest, the selections' manifests and the
scores. report.json: {"runs": [{"name", "method", "tau", "seed", "role", "train_tokens", "target_loss",
"tasks": {task: acc}, "tasks_mean", "curve": [[tokens, loss], ...]}], "summary": [...], "data_efficiency": {...},
"selections": {...}, "examples": {...}}.

Data efficiency: how many tokens of random data the random runs' learning curve needs to reach CoLoR's final
held-out loss, divided by CoLoR's tokens (linear interpolation between eval points; a lower bound when the random
curve never gets there).
"""
import json
import pathlib
import time

import numpy as np

from colorjax import data
from colorjax import errors
from colorjax import metrics
from colorjax import score as score_lib
from colorjax import select as select_lib


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


def collect_runs(plan: dict) -> list[dict]:
  rows = []
  for r in plan["runs"]:
    workdir = pathlib.Path(r["workdir"])
    records = metrics.read_metrics(workdir)
    final = _final_eval(records)
    key = _loss_key(final)
    manifest_path = workdir / "params" / data.MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
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
  """Mean and spread over seeds of each (method, τ) comparison group."""
  groups: dict = {}
  for r in rows:
    if r["role"] == "compare" and r["target_loss"] is not None:
      groups.setdefault((r["method"], r["tau"]), []).append(r)
  out = []
  for (method, tau), members in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
    losses = np.array([m["target_loss"] for m in members])
    means = [m["tasks_mean"] for m in members if m["tasks_mean"] is not None]
    out.append({"method": method, "tau": tau, "seeds": len(members), "train_tokens": members[0]["train_tokens"],
                "target_loss_mean": float(losses.mean()), "target_loss_std": float(losses.std()),
                "tasks_mean": float(np.mean(means)) if means else None})
  return out


def tokens_to_reach(curve: list, loss: float):
  """First token count at which a (tokens, loss) curve reaches `loss` (interpolated), or None."""
  for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
    if l1 <= loss:
      if l0 <= loss:
        return t0
      return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)
  return None


def data_efficiency(rows: list[dict], summary: list[dict]) -> dict:
  curves = [r["curve"] for r in rows if r["role"] == "curve" and len(r["curve"]) > 1]
  if not curves:
    return {}
  length = min(len(c) for c in curves)
  mean_curve = [[curves[0][i][0], float(np.mean([c[i][1] for c in curves]))] for i in range(length)]
  out = {}
  for s in summary:
    if s["method"] != "color":
      continue
    reach = tokens_to_reach(mean_curve, s["target_loss_mean"])
    max_tokens = mean_curve[-1][0]
    tokens = s["train_tokens"] or 1
    out[f"tau{s['tau']:g}"] = {
        "color_tokens": tokens, "color_loss": s["target_loss_mean"],
        "random_tokens_to_match": reach, "ratio": (reach if reach is not None else max_tokens) / tokens,
        "lower_bound": reach is None,
    }
  return out


def selection_diagnostics(root: pathlib.Path) -> dict:
  out = {}
  for folder in sorted((root / "selections").glob("*")):
    if (folder / data.MANIFEST).exists():
      m = json.loads((folder / data.MANIFEST).read_text())
      out[folder.name] = {"method": m["method"], "tau": m["tau"], "k": m["k"], "threshold": m["threshold"],
                          "sources": m["sources"], "score_stats": m.get("score_stats")}
  return out


class _Negated:
  def __init__(self, stream):
    self.stream = stream

  def __iter__(self):
    for start, values in self.stream:
      yield start, -values


def examples(plan: dict, k: int = 3, chars: int = 240) -> dict:
  """Highest and lowest CoLoR-scored sequences of the pool, decoded."""
  scores = score_lib.Scores(plan["scores"])
  store = data.TokenStore(plan["stores"]["pool"])
  tokenizer = data.load_tokenizer(str(store.tokenizer_path()))
  stream = select_lib.ScoreStream(scores, "color", "conditional_0", 1 << 20)
  out = {}
  for name, source in (("top", stream), ("bottom", _Negated(stream))):
    ids, _ = select_lib.top_k(source, min(k, scores.num_sequences))
    rows = scores.nll.oindex[ids].read().result()
    labels = store.labels() or ["all"]
    texts = tokenizer.decode_batch([r.tolist() for r in store.read(ids)], skip_special_tokens=False)
    out[name] = sorted([{"id": int(i), "score": float(row[0] - row[1]), "source": labels[lab],
                         "text": " ".join(t.split())[:chars]}
                        for i, row, lab, t in zip(ids, rows, store.label_ids(ids), texts)],
                       key=lambda e: -e["score"] if name == "top" else e["score"])
  return out


def plots(rows: list[dict], selections: dict, folder: pathlib.Path) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  made = []
  fig, ax = plt.subplots(figsize=(8, 5))
  colors = {"color": "tab:red", "random": "tab:blue", "conditional_only": "tab:green"}
  for r in rows:
    if r["curve"]:
      t, l = zip(*r["curve"])
      style = "--" if r["role"] == "curve" else "-"
      ax.plot(t, l, style, color=colors.get(r["method"], "gray"), alpha=0.8, label=r["name"])
  ax.set_xlabel("training tokens")
  ax.set_ylabel(f"held-out {rows[0]['loss_name'] or 'target loss'}" if rows else "loss")
  ax.set_title("Target models: held-out loss")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(folder / "learning_curves.png", dpi=120)
  plt.close(fig)
  made.append("plots/learning_curves.png")
  stats = next((s["score_stats"] for s in selections.values() if s.get("score_stats")), None)
  if stats:
    fig, ax = plt.subplots(figsize=(8, 4))
    edges = np.array(stats["hist_edges"])
    ax.bar(edges[:-1], stats["hist_counts"], width=np.diff(edges), align="edge", color="tab:gray")
    for name, s in selections.items():
      if s["method"] == "color" and s["threshold"] is not None:
        ax.axvline(s["threshold"], color="tab:red", linestyle="--")
        ax.text(s["threshold"], ax.get_ylim()[1] * 0.9, f" τ={s['tau']:g}", color="tab:red", fontsize=8)
    ax.set_xlabel("CoLoR score = NLL_prior − NLL_conditional")
    ax.set_ylabel("sequences")
    ax.set_title("Pool scores and the selection cut-offs")
    fig.tight_layout()
    fig.savefig(folder / "score_hist.png", dpi=120)
    plt.close(fig)
    made.append("plots/score_hist.png")
  return made


def _fmt(x, digits=4):
  return "-" if x is None else f"{x:.{digits}f}"


def markdown(plan, rows, summary, efficiency, selections, ex, made) -> str:
  task_names = sorted({t for r in rows for t in r["tasks"]})
  lines = [f"# colorjax report: {plan['preset']}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
  lines += ["## Target runs", ""]
  header = ["run", "method", "τ", "seed", "tokens", rows[0]["loss_name"] if rows else "loss"] + task_names
  header += ["tasks mean"] if task_names else []
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["name"], r["method"], f"{r['tau']:g}", str(r["seed"]), f"{r['train_tokens'] or 0:,}",
             _fmt(r["target_loss"])] + [_fmt(100 * r["tasks"][t], 1) if t in r["tasks"] else "-" for t in task_names]
    cells += [_fmt(100 * r["tasks_mean"], 1) if r["tasks_mean"] is not None else "-"] if task_names else []
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## CoLoR vs random (mean ± std over seeds)", "",
            "| method | τ | seeds | tokens | held-out loss | tasks mean |", "|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(f"| {s['method']} | {s['tau']:g} | {s['seeds']} | {s['train_tokens'] or 0:,} | "
                 f"{s['target_loss_mean']:.4f} ± {s['target_loss_std']:.4f} | "
                 f"{_fmt(100 * s['tasks_mean'], 1) if s['tasks_mean'] is not None else '-'} |")
  if efficiency:
    lines += ["", "## Data efficiency", "",
              "Tokens of random data (mean learning curve of the random runs) needed to reach CoLoR's held-out loss, "
              "over CoLoR's tokens.", "", "| τ | CoLoR tokens | CoLoR loss | random tokens to match | ratio |",
              "|---|---|---|---|---|"]
    for tau, e in efficiency.items():
      reach = f"{e['random_tokens_to_match']:,.0f}" if e["random_tokens_to_match"] is not None else "not reached"
      ratio = (">" if e["lower_bound"] else "") + f"{e['ratio']:.1f}x"
      lines.append(f"| {tau[3:]} | {e['color_tokens']:,} | {e['color_loss']:.4f} | {reach} | {ratio} |")
  if selections:
    sources = sorted({src for s in selections.values() for src in s["sources"]})
    lines += ["", "## Selections: per-source selection rates", "",
              "| selection | k | " + " | ".join(sources) + " |", "|---|---|" + "---|" * len(sources)]
    pool = next(iter(selections.values()))["sources"]
    lines.append("| (pool share) | - | " + " | ".join(
        f"{pool[s]['pool'] / max(1, sum(p['pool'] for p in pool.values())):.1%}" for s in sources) + " |")
    for name, s in selections.items():
      lines.append(f"| {name} | {s['k']:,} | " + " | ".join(
          f"{s['sources'][src]['rate']:.1%}" if src in s["sources"] else "-" for src in sources) + " |")
  if ex:
    for which in ("top", "bottom"):
      lines += ["", f"## {which.title()}-scored pool sequences", ""]
      for e in ex[which]:
        lines.append(f"- **{e['score']:+.3f}** ({e['source']}, id {e['id']}): {e['text']}")
  if made:
    lines += ["", "## Plots", ""] + [f"![{m}]({m})" for m in made]
  return "\n".join(lines) + "\n"


def write(root) -> pathlib.Path:
  root = pathlib.Path(root).resolve()
  plan_path = root / "pipeline.json"
  if not plan_path.exists():
    raise data.DataError(f"{plan_path} is missing: {root} is not a pipeline work directory (run the pipeline stage)")
  plan = json.loads(plan_path.read_text())
  rows = collect_runs(plan)
  summary = summarize(rows)
  efficiency = data_efficiency(rows, summary)
  selections = selection_diagnostics(root)
  ex = examples(plan)
  made = plots(rows, selections, root / "plots")
  result = {"preset": plan["preset"], "runs": rows, "summary": summary, "data_efficiency": efficiency,
            "selections": selections, "examples": ex, "plots": made}
  (root / "report.json").write_text(json.dumps(result, indent=1))
  (root / "report.md").write_text(markdown(plan, rows, summary, efficiency, selections, ex, made))
  for s in summary:
    print(f"  {s['method']:<17} tau {s['tau']:<4g} held-out loss {s['target_loss_mean']:.4f} ± "
          f"{s['target_loss_std']:.4f} ({s['seeds']} seeds, {s['train_tokens'] or 0:,} tokens)")
  for tau, e in efficiency.items():
    print(f"  data efficiency {tau}: {'>' if e['lower_bound'] else ''}{e['ratio']:.1f}x")
  return root / "report.md"


def run(cfg):
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to a pipeline work directory")
  path = write(cfg.workdir)
  print(f"report: {path}")
  return path


def describe(cfg):
  print(f"report (dry run): would read {pathlib.Path(cfg.workdir) / 'pipeline.json'} and write report.md/json")
