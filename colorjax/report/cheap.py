"""How much of CoLoR's selection the cheap methods keep for what they score, read off a pipeline's exact scores.

A work directory whose pool was scored whole holds the true CoLoR score of every candidate, which no production
system has. So the cheap methods' trade-off can be drawn exactly, without scoring anything again:

- exact curves: for sample shares of 0.5-10% of the candidates, a sample is drawn (the distill stage's stream and
  seed), labelled with its true scores, cross-fitted (the stage's own fit and settings), and the candidates
  predicted; then per τ, the distilled selection's recall of CoLoR's top 1/τ (at the sample's share of the scoring),
  the cascade's at each factor (rescoring factor x the unsampled top 1/τ by prediction: share = sample +
  rescored), and the factor a target recall picks from the out-of-fold estimate, with that estimate beside the true
  recall it reaches (does the estimate predict the truth?);
- prefix agreement: how well the CoLoR score of each sequence's first k tokens (recorded by the score stage at no
  extra cost, score.prefix_fractions) ranks like the full one: Spearman ρ, and the share of the top 1/τ within the
  prefix score's top factor/τ — what a prefix-scoring stage between the n-gram scorer and full scoring would keep.

Both run on at most `max_rows` candidates (a seeded uniform subset when the pool is larger) and are cached in
`<workdir>/cheap/curves.json` under a request of their inputs, so re-running the report reuses them.
"""
import json
import math
import pathlib

import ml_collections
import numpy as np

from colorjax.distill import cascade as distill_cascade
from colorjax.distill import parts as distill_parts
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.model import losses
from colorjax.training import ngram_scorer as scorer_lib
from colorjax.selection import artifact as selection_lib
from colorjax.artifacts import scores as scores_lib

SAMPLE_SHARES = (0.005, 0.01, 0.02, 0.05, 0.1)
FACTORS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0)
TARGET_RECALLS = (0.9, 0.95, 0.97, 0.99)
PREFIX_FACTORS = (1.0, 1.5, 2.0, 3.0)
SUBSET_STREAM = 17  # the subset of candidates the curves run on, when the pool is larger than max_rows


def _top(values: np.ndarray, count: int) -> np.ndarray:
  """Positions of the `count` largest values (ties to the lower position)."""
  count = max(0, min(int(count), values.size))
  return np.argsort(-values, kind="stable")[:count]


def _rows(scores: scores_lib.Scores, max_rows: int, seed: int) -> np.ndarray:
  """The score folder's rows the analysis runs on: all, or a seeded uniform subset of `max_rows` (sorted)."""
  n = scores.num_sequences
  if n <= max_rows:
    return np.arange(n)
  return selection_lib.random_sample(n, max_rows, seed, 1 << 20, SUBSET_STREAM)


def _read_rows(read, rows: np.ndarray, block: int = 1 << 16) -> np.ndarray:
  """`read(start, stop)`'s values at sorted `rows`, read a block of the folder at a time."""
  out, i = [], 0
  while i < rows.size:
    start = int(rows[i]) // block * block
    stop = start + block
    j = int(np.searchsorted(rows, stop))
    out.append(read(start, min(stop, int(rows[j - 1]) + 1))[rows[i:j] - start])
    i = j
  return np.concatenate(out)


def _true_scores(scores: scores_lib.Scores, rows: np.ndarray) -> np.ndarray:
  nll = _read_rows(scores.read, rows)
  return losses.color_score(nll[:, scores.column("prior")], nll[:, scores.column("conditional_0")])


def cascade_point(true: np.ndarray, predicted: np.ndarray, sampled: np.ndarray, tau: float, factor: float) -> dict:
  """The cascade at one factor: rescore factor x the unsampled top 1/τ by prediction, keep the top 1/τ of the
  rescored and the sampled by true score. Its recall of CoLoR's top 1/τ and its share of scoring all."""
  n = true.size
  k = int(n // tau)
  unsampled = np.setdiff1d(np.arange(n), sampled)
  m = distill_cascade.rescore_count(factor, unsampled.size, tau)
  rescored = unsampled[_top(predicted[unsampled], m)]
  pool = np.concatenate([sampled, rescored])
  chosen = pool[_top(true[pool], k)]
  return {"factor": factor, "share": (sampled.size + rescored.size) / n,
          "recall": float(np.isin(_top(true, k), chosen).mean())}


def exact_curves(cfg, scores: scores_lib.Scores, store: stores.TokenStore, taus, max_rows: int) -> dict:
  """See the module docstring; `cfg`: the pipeline's config (its distill section's fit settings and seed)."""
  d = cfg.distill
  rows = _rows(scores, max_rows, int(d.seed))
  true = _true_scores(scores, rows)
  ids = scores.global_ids(rows)
  features = distill_parts.Features(int(d.buckets), int(d.ngram), tuple(sorted({store.eos_id, store.pad_id})))
  table = scorer_lib.SampleFeatures(features, store, ids, max_bytes=4 << 30)
  out = {"candidates": int(true.size), "of": scores.num_sequences, "shares": {}}
  for share in SAMPLE_SHARES:
    m = int(round(share * true.size))
    if m // distill_parts.folds(cfg) < distill_parts.MIN_FIT:
      continue
    sampled = selection_lib.random_sample(true.size, m, int(d.seed), 1 << 20, distill_parts.SAMPLE_STREAM)
    fit, oof, _ = scorer_lib.cross_fit(lambda r, s=sampled: table(s[r]), true[sampled], features.buckets,
                                       distill_parts.folds(cfg), int(d.seed), steps=int(d.steps), batch=int(d.batch),
                                       lr=float(d.lr), l2=float(d.l2), objective=d.objective,
                                       eval_every=int(d.eval_every))
    predicted = np.concatenate([scorer_lib.predict(fit.weights, fit.bias, table(np.arange(i, min(i + 4096, true.size))))
                                for i in range(0, true.size, 4096)])
    estimate = scorer_lib.recall_curve(true[sampled], oof, resamples=scorer_lib.RESAMPLES,
                                       quantile=scorer_lib.CAUTION, seed=int(d.seed))
    per_tau = {}
    for tau in taus:
      k = int(true.size // tau)
      if k < 4:
        continue
      point = {"distilled": {"share": m / true.size,
                             "recall": float(np.isin(_top(true, k), _top(predicted, k)).mean())},
               "cascade": [cascade_point(true, predicted, sampled, tau, f) for f in FACTORS if f <= tau],
               "target_recall": []}
      for target in TARGET_RECALLS:
        factor, estimated = scorer_lib.factor_for(estimate, float(tau), target, m / true.size)
        factor = float(tau) if factor is None or factor >= tau else factor
        reached = cascade_point(true, predicted, sampled, tau, factor)
        point["target_recall"].append({"target": target, "factor": factor, "estimated": estimated,
                                       "recall": reached["recall"], "share": reached["share"]})
      per_tau[f"{tau:g}"] = point
    out["shares"][f"{share:g}"] = {"sample": m, "spearman_oof": scorer_lib.spearman(oof, true[sampled]),
                                   "spearman_pool": scorer_lib.spearman(predicted, true), "taus": per_tau}
  return out


def prefix_agreement(scores: scores_lib.Scores, taus, max_rows: int, seed: int) -> dict:
  """Per recorded prefix: Spearman ρ of its CoLoR score with the full one, and per τ and factor the share of the top
  1/τ (full score) within the prefix score's top factor/τ. {} without recorded prefixes."""
  if not scores.prefixes:
    return {}
  rows = _rows(scores, max_rows, seed)
  true = _true_scores(scores, rows)
  prefix = _read_rows(scores.read_prefixes, rows)
  prior, cond = scores.column("prior"), scores.column("conditional_0")
  out = {}
  for j, length in enumerate(scores.prefixes):
    value = losses.color_score(prefix[:, prior, j], prefix[:, cond, j])
    per_tau = {}
    for tau in taus:
      k = int(true.size // tau)
      if k >= 4:
        per_tau[f"{tau:g}"] = {f"{f:g}": scorer_lib.top_recall(true, value, k, int(math.ceil(f * true.size / tau)))
                               for f in PREFIX_FACTORS}
    out[str(length)] = {"tokens": int(length), "spearman": scorer_lib.spearman(value, true), "recall": per_tau}
  return out


def analyse(root: pathlib.Path, pipeline_record: dict, at, max_rows: int = 100_000) -> dict:
  """Exact curves (when the pipeline ran a distilled method) and prefix agreement of a work directory with
  whole-pool scores, cached in <root>/cheap/curves.json; {} without whole-pool scores."""
  scores_path = at(pipeline_record.get("scores"))
  if scores_path is None or not (scores_path / formats.MANIFEST).is_file():
    return {}
  scores = scores_lib.Scores(scores_path)
  if not scores.done().all():
    return {}
  cfg = ml_collections.ConfigDict(pipeline_record.get("config") or {})
  taus = sorted(set(float(t) for t in cfg.pipeline.taus))
  wanted = {m for m in cfg.pipeline.methods if m in (distill_cascade.METHOD, distill_cascade.CASCADE)}
  request = {"scores": scores.id, "taus": taus, "max_rows": int(max_rows), "curves": bool(wanted),
             "distill": {k: cfg.distill[k] for k in ("buckets", "ngram", "steps", "batch", "lr", "l2", "seed",
                                                      "objective", "holdout_fraction", "eval_every")},
             "shares": list(SAMPLE_SHARES), "factors": list(FACTORS), "targets": list(TARGET_RECALLS)}
  cache = root / "cheap" / "curves.json"
  if cache.is_file():
    saved = json.loads(cache.read_text())
    if saved.get("request") == lineage.normalized(request):
      return saved
  result = {"request": request, "prefix_agreement": prefix_agreement(scores, taus, max_rows, int(cfg.distill.seed))}
  if wanted:
    store = stores.TokenStore(scores.store_path())
    result["curves"] = exact_curves(cfg, scores, store, taus, max_rows)
  cache.parent.mkdir(parents=True, exist_ok=True)
  cache.write_text(formats.json_text(result))
  return result


# ----------------------------------------------------------------------------------------------------------------
# report.md and the plot


def markdown(cheap: dict) -> list[str]:
  if not cheap:
    return []
  lines = []
  curves = cheap.get("curves")
  if curves and curves["shares"]:
    lines += ["## Cheap selection against exact CoLoR", "",
              f"From this pool's exact scores ({curves['candidates']:,} candidates): per sample share, a scorer "
              "cross-fitted on the sample's true scores (this pipeline's distill settings) predicts the rest. Recall: "
              "the share of CoLoR's top 1/τ selected; share: the prior's and conditional's scoring as a share of "
              "scoring every candidate. The cascade rescores factor x the unsampled top 1/τ by prediction; a target "
              "recall picks its factor from the out-of-fold estimate (est.) — compare it with the recall reached.",
              "", "| τ | sample | ρ (pool) | distilled recall | cascade ×1.5: recall (share) | ×2 | ×3 | "
              "target 0.97: factor, est. → recall (share) |", "|---|---|---|---|---|---|---|---|"]
    for share, entry in curves["shares"].items():
      for tau, point in entry["taus"].items():
        by_factor = {c["factor"]: c for c in point["cascade"]}
        cell = lambda f: (f"{by_factor[f]['recall']:.1%} ({by_factor[f]['share']:.1%})" if f in by_factor else "-")
        target = next((t for t in point["target_recall"] if t["target"] == 0.97), None)
        target_cell = "-"
        if target is not None:
          est = "-" if target["estimated"] is None else f"{target['estimated']:.1%}"
          target_cell = f"{target['factor']:g}, {est} → {target['recall']:.1%} ({target['share']:.1%})"
        rho = "-" if entry["spearman_pool"] is None else f"{entry['spearman_pool']:.3f}"
        lines.append(f"| {tau} | {float(share):.1%} | {rho} | {point['distilled']['recall']:.1%} | {cell(1.5)} | "
                     f"{cell(2.0)} | {cell(3.0)} | {target_cell} |")
    lines.append("")
  prefixes = cheap.get("prefix_agreement")
  if prefixes:
    taus = sorted({t for p in prefixes.values() for t in p["recall"]}, key=float)
    lines += ["## Prefix agreement", "", "The CoLoR score of each sequence's first k tokens (recorded by the score "
              "stage in the same pass) against the full score: Spearman ρ, and the share of the full score's top 1/τ "
              "within the prefix score's top factor/τ (a prefix stage scoring k/seq_len of the tokens).", "",
              "| prefix tokens | ρ | " + " | ".join(f"τ={t}: ×1 / ×1.5 / ×2" for t in taus) + " |",
              "|---|---|" + "---|" * len(taus)]
    for p in prefixes.values():
      cells = [" / ".join(f"{p['recall'][t][f]:.0%}" for f in ("1", "1.5", "2")) if t in p["recall"] else "-"
               for t in taus]
      rho = "-" if p["spearman"] is None else f"{p['spearman']:.3f}"
      lines.append(f"| {p['tokens']} | {rho} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


def plot(cheap: dict, folder: pathlib.Path) -> list[str]:
  """Recall of CoLoR's top 1/τ against the share of scoring spent: the cascade's factors per sample share (lines),
  the distilled selections (crosses), one panel per τ."""
  curves = (cheap or {}).get("curves")
  if not curves or not curves["shares"]:
    return []
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  taus = sorted({t for e in curves["shares"].values() for t in e["taus"]}, key=float)
  fig, axes = plt.subplots(1, len(taus), figsize=(4.5 * len(taus), 4), squeeze=False)
  for ax, tau in zip(axes[0], taus):
    for share, entry in curves["shares"].items():
      point = entry["taus"].get(tau)
      if point is None:
        continue
      xs, ys = zip(*[(c["share"], c["recall"]) for c in point["cascade"]])
      line, = ax.plot(xs, ys, "-o", ms=3, label=f"sample {float(share):.1%}")
      ax.plot([point["distilled"]["share"]], [point["distilled"]["recall"]], "x", color=line.get_color())
    ax.set_title(f"τ={tau}")
    ax.set_xlabel("scoring share (of every candidate)")
    ax.set_ylabel("recall of CoLoR's top 1/τ")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle("Cheap selection against exact CoLoR: cascade factors (lines), distilled (x)")
  fig.tight_layout()
  folder.mkdir(parents=True, exist_ok=True)
  fig.savefig(folder / "cheap_selection.png", dpi=110)
  plt.close(fig)
  return ["plots/cheap_selection.png"]
