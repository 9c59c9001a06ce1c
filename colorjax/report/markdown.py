"""report.md and the report stage's console summary, rendered from the result that report.py computes (the
dict it also writes as report.json), so the text follows report.json exactly."""
import os
import pathlib
import time

from colorjax.report import cheap
from colorjax.report import compute
from colorjax.report import sweep


def _fmt(x, digits=4):
  return "-" if x is None else f"{x:.{digits}f}"


def count(x) -> str:
  """Thousands separators, "?" when unknown (report.py's target_loss text uses it too)."""
  return "?" if x is None else f"{x:,.0f}"


def _listed(names: list, most: int = 8) -> str:
  shown = ", ".join(str(n) for n in names[:most])
  return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _share(fraction) -> str:
  return "?" if fraction is None else f"{fraction:.0%}"


def _loss_cell(mean: float, std, seeds: int) -> str:
  """Mean ± std over seeds; one seed has no spread, so just the mean."""
  return f"{mean:.4f}" if seeds == 1 or std is None else f"{mean:.4f} ± {std:.4f}"


def _grouping(target: dict) -> str:
  if target.get("group_field"):
    return f"a work is the documents sharing a `{target['group_field']}` value"
  regex = target.get("group_regex")
  if regex is None:
    return "as split.json records them"
  return f"a work starts at each document matching `{regex}`" if regex else "each document is one work"


def _fractions(fractions) -> str:
  """How the works were shared out: target_split's two fractions, and target_pool_split's when recorded."""
  fractions = list(fractions or [None, None])
  text = f"{_share(fractions[0])} finetune the conditional, {_share(fractions[1])} are held out to evaluate the targets"
  if len(fractions) < 3 or None in fractions or abs(sum(fractions) - 1) < 1e-9:
    return text + ", the rest join the pool"
  return text + f", {_share(fractions[2])} join the pool and the rest are unused"


def _work_names(names: list, files: list, most: int = 12) -> str:
  """Work names as split.json records them ("file: title"), without the file when there is only one."""
  prefix = f"{pathlib.Path(files[0]).name}: " if len(files) == 1 else ""
  short = [(n[len(prefix):] if prefix and n.startswith(prefix) else n)[:60] for n in names[:most]]
  return "; ".join(short) + (f"; and {len(names) - most} more" if len(names) > most else "")


def _md_target(target: dict, stores: dict) -> list[str]:
  if target.get("kind") == "tasks":
    held = stores.get("tasks_eval")
    rows = f" (`{held['path']}`: {count(held['sequences'])} rows)" if held else ""
    return [f"**Target** (target=tasks): the downstream tasks. The conditional is finetuned on the train splits of "
            f"{_listed(target['finetune_tasks'], 20) or '?'}; the targets' held-out loss is on their "
            f"{target['heldout_split']} rows{rows}, and accuracy on {_listed(target['eval_tasks'], 20) or '-'}.", ""]
  files = ", ".join(f"`{f}`" for f in target["files"]) or "(not recorded)"
  if target.get("data_dir") and not any(os.path.isabs(f) for f in target["files"]):
    files += f" (in `{target['data_dir']}`)"
  lines = [f"**Target data** (target=text): {files}. Its works ({_grouping(target)}) are split at random: "
           f"{_fractions(target['fractions'])}.", "",
           "| target part | works | documents | sequences | tokens |", "|---|---|---|---|---|"]
  names = {"target_train": "finetune (conditional)", "target_eval": "held-out (target_loss)",
           "pool": "pool (the target's works in it)", "unused": "unused"}
  for part, p in target["parts"].items():
    lines.append(f"| {names[part]} | {count(p['works'])} | {count(p['documents'])} | {count(p['sequences'])} | "
                 f"{count(p['tokens'])} |")
  if target.get("heldout_works") and (target.get("group_field") or target.get("group_regex")):
    lines += ["", f"Held-out works: {_work_names(target['heldout_works'], target['files'])}."]
  return lines + [""]


def _md_pool(pool: dict, store: dict) -> list[str]:
  sources = store.get("sources") or {k: {"documents": n, "sequences": None, "tokens": None}
                                     for k, n in (pool.get("documents") or {}).items()}
  if store:
    head = (f"**Pool**: {count(store['sequences'])} sequences of {store['seq_len']} tokens "
            f"({count(store['tokens'])} tokens) from {count(store['documents'])} documents of {len(sources)} "
            f"sources (`{store['path']}`; tokenizer `{store['tokenizer']['name']}`, vocabulary "
            f"{count(store['tokenizer']['vocab_size'])})")
  else:
    head = f"**Pool**: {len(sources)} sources (token store manifest not found)"
  if pool.get("duplicates_dropped") is not None:
    head += f"; {pool['duplicates_dropped']:,} pool documents identical to a target document were dropped"
  if pool.get("max_chars_per_file"):
    head += f"; each file sampled to about {pool['max_chars_per_file']:,} characters of whole documents"
  lines = [head + ".", ""]
  if sources:
    total = sum(s["tokens"] or 0 for s in sources.values())
    lines += ["| source | documents | sequences | tokens | share of tokens |", "|---|---|---|---|---|"]
    ordered = sorted(sources.items(), key=lambda kv: -(kv[1]["tokens"] or kv[1]["documents"] or 0))
    for name, s in ordered[:20]:
      share = f"{s['tokens'] / total:.1%}" if total and s["tokens"] is not None else "-"
      lines.append(f"| {name} | {count(s['documents'])} | {count(s['sequences'])} | {count(s['tokens'])} | "
                   f"{share} |")
    if len(ordered) > 20:
      lines.append(f"| ({len(ordered) - 20} more sources) | | | | |")
    lines.append("")
  return lines


def _md_models(models: dict) -> list[str]:
  if not models:
    return []
  trained = {"prior": "pretrained on the pool", "conditional": "the prior, finetuned on the target data",
             "target": "from scratch on each selection (tokens per run below)"}
  lines = ["**Models**", "", "| model | d_model | layers | heads | MLP hidden | vocab | params | non-embedding params "
           "| training |", "|---|---|---|---|---|---|---|---|---|"]
  for name, m in models.items():
    tokens = f": {m['tokens']:,} tokens, {count(m.get('steps'))} steps" if m.get("tokens") else ""
    lines.append(f"| {name} | {m['d_model']} | {m['n_layers']} | {m['n_heads']} | {m['mlp_hidden']} | "
                 f"{m['vocab_size']:,} | {m['params_total']:,} | {m['params_non_embedding']:,} | "
                 f"{trained[name]}{tokens} |")
  return lines + [""]


def _md_prior_data(prior: dict | None) -> list[str]:
  """Under fixed n: where the prior's n sequences came from."""
  if not prior:
    return []
  if prior.get("outside_largest_pool"):
    return [f"**Prior data** (fixed n): the prior drew its sequences from the {count(prior.get('k'))} pool-store "
            f"sequences outside the largest nested pool ({count(prior.get('largest_pool_sequences'))}), so no "
            "candidate of any τ was prior training data.", ""]
  return [f"**Prior data** (fixed n): the pool store is too small to keep the prior's sequences outside the largest "
          f"nested pool ({count(prior.get('largest_pool_sequences'))} of its {count(prior.get('k'))} sequences), so "
          "the prior drew from the whole store and some candidates were prior training data.", ""]


def _md_setup(s: dict) -> list[str]:
  lines = ["## Setup", ""] + _md_target(s["target"], s["stores"]) + _md_pool(s["pool"], s["stores"].get("pool", {}))
  lines += _md_prior_data(s.get("prior_data"))
  return lines + _md_models(s["models"]) + [f"**target_loss**: {s['target_loss']}", ""]


def _md_runs(rows: list[dict]) -> list[str]:
  task_names = sorted({t for r in rows for t in r["tasks"]})
  header = ["run", "method", "τ", "seed", "tokens", rows[0]["loss_name"] if rows else "loss"] + task_names
  header += ["tasks mean"] if task_names else []
  lines = ["## Target runs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["name"], r["method"], f"{r['tau']:g}", str(r["seed"]), f"{r['train_tokens'] or 0:,}",
             _fmt(r["target_loss"])] + [_fmt(100 * r["tasks"][t], 1) if t in r["tasks"] else "-" for t in task_names]
    cells += [_fmt(100 * r["tasks_mean"], 1) if r["tasks_mean"] is not None else "-"] if task_names else []
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def _gain_cell(gain: dict | None) -> str:
  return "-" if gain is None or gain["gain"] is None else f"{gain['gain']:.1%}"


def _md_summary(summary: list[dict], gains: list[dict]) -> list[str]:
  one_seed = all(s["seeds"] == 1 for s in summary)
  title = "1 seed" if one_seed else "mean ± sample std over seeds; the mean alone for a group of 1 seed"
  by = {(g["method"], g["tau"]): g for g in gains}
  lines = [f"## CoLoR vs random ({title})", "",
           "Gain: the share of CoLoR's held-out loss gain over random at the same τ that a method keeps, (random − "
           "method) / (random − CoLoR), from the means.", "",
           "| method | τ | seeds | tokens | held-out loss | gain | tasks mean |", "|---|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(f"| {s['method']} | {s['tau']:g} | {s['seeds']} | {s['train_tokens'] or 0:,} | "
                 f"{_loss_cell(s['target_loss_mean'], s['target_loss_std'], s['seeds'])} | "
                 f"{_gain_cell(by.get((s['method'], s['tau'])))} | "
                 f"{_fmt(100 * s['tasks_mean'], 1) if s['tasks_mean'] is not None else '-'} |")
  return lines + [""]


def _bounded(value, bound, suffix: str = "") -> str:
  if value is None:
    return "-"
  mark = {"lower": ">", "upper": "<"}.get(bound, "")
  return f"{mark}{value:,.1f}{suffix}" if suffix else f"{mark}{value:,.0f}"


def _md_efficiency(efficiency: dict, method: str) -> list[str]:
  if not efficiency:
    return []
  points = next(iter(efficiency.values()))["random_points"]
  lines = ["## Data efficiency", "", method, ""]
  if points:
    lines += ["Random points (tokens → mean final held-out loss): "
              + "; ".join(f"{t:,.0f} → {l:.4f}" for t, l in points) + ".", ""]
  lines += ["| τ | CoLoR tokens | CoLoR loss | random tokens to match | read between random at | ratio | from the "
            "curve (mid-schedule, understates) |", "|---|---|---|---|---|---|---|"]
  for tau, e in efficiency.items():
    curve = _bounded(e["curve_ratio"], "lower" if e["curve_lower_bound"] else None, "x")
    bracket = " and ".join(f"{t:,.0f} ({l:.4f})" for t, l in e.get("bracket") or []) or "-"
    lines.append(f"| {tau[3:]} | {count(e['color_tokens'])} | {e['color_loss']:.4f} | "
                 f"{_bounded(e['random_tokens_to_match'], e['bound'])} | {bracket} | "
                 f"{_bounded(e['ratio'], e['bound'], 'x')} | {curve} |")
  notes = {"lower": "\">\": CoLoR's loss is below every random point (a lower bound).",
           "upper": "\"<\": every random budget already does better than CoLoR (an upper bound)."}
  used = [notes[b] for b in ("lower", "upper") if any(e["bound"] == b for e in efficiency.values())]
  return lines + ([""] + used if used else []) + [""]


def _md_selections(selections: dict) -> list[str]:
  if not selections:
    return []
  sources = sorted({src for s in selections.values() for src in s["sources"]})
  lines = ["## Selections: per-source selection rates", "",
           "| selection | k | " + " | ".join(sources) + " |", "|---|---|" + "---|" * len(sources)]
  pool = next(iter(selections.values()))["sources"]
  lines.append("| (pool share) | - | " + " | ".join(
      f"{pool[s]['pool'] / max(1, sum(p['pool'] for p in pool.values())):.1%}" for s in sources) + " |")
  for name, s in selections.items():
    lines.append(f"| {name} | {s['k']:,} | " + " | ".join(
        f"{s['sources'][src]['rate']:.1%}" if src in s["sources"] else "-" for src in sources) + " |")
  return lines + [""]


def _md_selection_cost(selections: dict, gains: list[dict]) -> list[str]:
  """What each selection's scoring cost against scoring its candidates, how well it agrees with the headline's,
  and how much of the headline's gain its targets keep."""
  shown = {name: s for name, s in selections.items() if s.get("scoring_share") is not None or s.get("recall")}
  if not shown:
    return []
  by = {(g["method"], g["tau"]): g for g in gains}
  lines = ["## Selections: scoring cost and agreement with CoLoR", "",
           "Scoring: FLOPs the prior and conditional spent on the selection, as a share of scoring its candidates "
           "(the pool, or its fixed-n pool) with both. ρ: the distilled scorer's Spearman correlation with the CoLoR "
           "score on its held-out sample. Recall: the share of CoLoR's selection from the same candidates and of the "
           "same size that this selection also keeps. Gain: the share of CoLoR's held-out loss gain over random its "
           "targets keep (mean over seeds).", "",
           "| selection | method | τ | scoring | ρ | recall | gain |", "|---|---|---|---|---|---|---|"]
  for name, s in shown.items():
    share = "?" if s.get("scoring_share") is None else f"{s['scoring_share']:.1%}"
    rho = "-" if s.get("spearman") is None else f"{s['spearman']:.3f}"
    recall = "-" if s.get("recall") is None else f"{s['recall']:.1%}"
    gain = _gain_cell(by.get((s["method"], s.get("tau_requested") or s["tau"])))
    tau = s.get("tau_requested") or s["tau"]  # the τ asked for (the realized pool / k may differ by rounding)
    lines.append(f"| {name} | {s['method']} | {tau:g} | {share} | {rho} | {recall} | {gain} |")
  return lines + [""]


def _md_examples(ex: dict) -> list[str]:
  lines = []
  for which in ("top", "bottom"):
    if ex.get(which):
      lines += [f"## {which.title()}-scored pool sequences", ""]
      lines += [f"- **{e['score']:+.3f}** ({e['source']}, id {e['id']}): {e['text']}" for e in ex[which]] + [""]
  return lines


def markdown(result: dict) -> str:
  lines = [f"# colorjax report: {result['preset']}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
  lines += _md_setup(result["setup"]) + _md_runs(result["runs"])
  lines += _md_summary(result["summary"], result.get("gain") or [])
  lines += sweep.markdown(result["summary"], result["target"])
  lines += _md_efficiency(result["data_efficiency"], result["setup"]["data_efficiency_method"])
  lines += compute.markdown(result["runs"], result.get("compute") or {}, result.get("scoring_done"))
  lines += _md_selections(result["selections"]) + _md_selection_cost(result["selections"], result.get("gain") or [])
  lines += cheap.markdown(result.get("cheap") or {})
  lines += _md_examples(result["examples"])
  if result["plots"]:
    lines += ["## Plots", ""] + [f"![{m}]({m})" for m in result["plots"]]
  return "\n".join(lines).rstrip("\n") + "\n"


def print_summary(result: dict):
  """The comparison and data-efficiency lines the report stage prints to the console."""
  for s in result["summary"]:
    print(f"  {s['method']:<17} tau {s['tau']:<4g} held-out loss "
          f"{_loss_cell(s['target_loss_mean'], s['target_loss_std'], s['seeds'])} "
          f"({s['seeds']} seed{'s' if s['seeds'] > 1 else ''}, {s['train_tokens'] or 0:,} tokens)")
  for tau, e in result["data_efficiency"].items():
    curve = _bounded(e["curve_ratio"], "lower" if e["curve_lower_bound"] else None, "x")
    print(f"  data efficiency {tau}: {_bounded(e['ratio'], e['bound'], 'x')} from finished runs "
          f"(curve, mid-schedule: {curve})")

