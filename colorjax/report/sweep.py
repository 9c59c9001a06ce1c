"""The paper's Figure 2 in miniature: each method's held-out target loss (and, for a tasks target, the mean task
accuracy) against τ, with the seeds' spread, beside the ordering the paper reports (docs/definitions.md#protocols)."""
import pathlib

import numpy as np

from colorjax import methods

# What the paper reports for the fixed-n protocol (150M, n = 3.1B tokens).
PAPER_ORDER = {
    "text": "Books (Fig. 2): CoLoR-Filter lowest and still improving as τ grows to 64; RHO-down + prior second",
    "tasks": "tasks at τ=16 (Table 2, 8-task mean accuracy): color 49.1 > rho_down_prior 48.5 > dsir 48.3 > "
             "random (τ=1) 46.3 > rho_down 46.1 > conditional_only 46.0",
}


def _by_method(summary: list[dict]) -> dict:
  out: dict = {}
  for s in summary:
    out.setdefault(s["method"], {})[s["tau"]] = s
  return out


def _cell(s: dict | None, key: str, scale: float = 1.0, digits: int = 4) -> str:
  if s is None or s[f"{key}_mean"] is None:
    return "-"
  std = s.get(f"{key}_std")
  spread = f" ± {scale * std:.{digits}f}" if std is not None else ""
  return f"{scale * s[f'{key}_mean']:.{digits}f}{spread}"


def markdown(summary: list[dict], target: str) -> list[str]:
  """A method x τ table of held-out loss (and task accuracy), each τ's order, and the paper's; [] with one τ."""
  taus = sorted({s["tau"] for s in summary})
  if len([t for t in taus if t > 1]) < 2:
    return []
  table = _by_method(summary)
  tasks = any(s["tasks_mean"] is not None for s in summary)
  lines = ["## Methods against τ (the paper's Figure 2 in miniature)", "",
           "Held-out target loss (lower is better)" + (" and mean task accuracy, %" if tasks else "")
           + "; mean ± sample std over seeds. Trend: the loss at the largest τ minus at the smallest τ > 1 "
           "(negative: the method improves as its pool grows).", "",
           "| method | " + " | ".join(f"τ={t:g}" for t in taus) + " | trend |", "|---|" + "---|" * (len(taus) + 1)]
  for name, by_tau in table.items():
    swept = [t for t in taus if t > 1 and t in by_tau]
    trend = (by_tau[swept[-1]]["target_loss_mean"] - by_tau[swept[0]]["target_loss_mean"]) if len(swept) > 1 else None
    lines.append(f"| {name} | " + " | ".join(_cell(by_tau.get(t), "target_loss") for t in taus)
                 + f" | {'-' if trend is None else f'{trend:+.4f}'} |")
    if tasks:
      lines.append(f"| {name} (accuracy) | " + " | ".join(_cell(by_tau.get(t), "tasks", 100, 1) for t in taus)
                   + " | |")
  lines.append("")
  for tau in [t for t in taus if t > 1]:
    ranked = sorted((s for s in summary if s["tau"] == tau), key=lambda s: s["target_loss_mean"])
    lines.append(f"- τ={tau:g}, by loss: " + " < ".join(s["method"] for s in ranked))
  lines += [f"- the paper: {PAPER_ORDER['tasks' if target == 'tasks' else 'text']}", ""]
  return lines


def plot(summary: list[dict], folder: pathlib.Path, target: str, protocol: str) -> list[str]:
  """Loss (and accuracy) against τ, a line per method with the seeds' spread; the τ=1 random baseline as a
  horizontal line."""
  taus = sorted({s["tau"] for s in summary})
  if len([t for t in taus if t > 1]) < 2:
    return []
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  tasks = any(s["tasks_mean"] is not None for s in summary)
  panels = [("target_loss", "held-out target loss", 1.0)] + ([("tasks", "mean task accuracy (%)", 100.0)] if tasks
                                                              else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
  for ax, (key, label, scale) in zip(axes[0], panels):
    for name, by_tau in _by_method(summary).items():
      method = methods.REGISTRY.get(name)
      color = method.plot_color if method is not None else "gray"
      swept = [t for t in sorted(by_tau) if t > 1 and by_tau[t][f"{key}_mean"] is not None]
      if swept:
        mean = np.array([scale * by_tau[t][f"{key}_mean"] for t in swept])
        std = np.array([scale * (by_tau[t].get(f"{key}_std") or 0.0) for t in swept])
        ax.errorbar(swept, mean, yerr=std, marker="o", capsize=3, color=color, label=name)
      if 1.0 in by_tau and by_tau[1.0][f"{key}_mean"] is not None:
        ax.axhline(scale * by_tau[1.0][f"{key}_mean"], color=color, linestyle=":", label=f"{name} (τ=1)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("τ (pool = τ·n; every target trains on n tokens)" if protocol == "fixed_n"
                  else "τ (each target trains on 1/τ of one pool)")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  fig.suptitle(f"Methods against τ ({'tasks' if target == 'tasks' else 'text'} target)")
  fig.tight_layout()
  fig.savefig(folder / "methods_vs_tau.png", dpi=120)
  plt.close(fig)
  return ["plots/methods_vs_tau.png"]
