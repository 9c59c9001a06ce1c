"""The report's plots: the target runs' held-out learning curves, and the pool's score histogram with each CoLoR
selection's cut-off. matplotlib is imported only here, when a report is written (the Agg backend: no display)."""
import pathlib

import numpy as np

from colorjax import methods


def _color(name: str) -> str:
  method = methods.REGISTRY.get(name)
  return method.plot_color if method is not None else "gray"


def draw(rows: list[dict], selections: dict, folder: pathlib.Path) -> list[str]:
  """Writes the plots into `folder`; returns their paths relative to the work directory, as report.md links them."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  made = []
  fig, ax = plt.subplots(figsize=(8, 5))
  for r in rows:
    if r["curve"]:
      t, l = zip(*r["curve"])
      style = "--" if r["role"] == "curve" else "-"
      ax.plot(t, l, style, color=_color(r["method"]), alpha=0.8, label=r["name"])
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
    for s in selections.values():
      if s["method"] == methods.HEADLINE.name and s["threshold"] is not None:
        ax.axvline(s["threshold"], color=methods.HEADLINE.plot_color, linestyle="--")
        ax.text(s["threshold"], ax.get_ylim()[1] * 0.9, f" τ={s['tau']:g}", color=methods.HEADLINE.plot_color,
                fontsize=8)
    ax.set_xlabel("CoLoR score = NLL_prior − NLL_conditional")
    ax.set_ylabel("sequences")
    ax.set_title("Pool scores and the selection cut-offs")
    fig.tight_layout()
    fig.savefig(folder / "score_hist.png", dpi=120)
    plt.close(fig)
    made.append("plots/score_hist.png")
  return made
