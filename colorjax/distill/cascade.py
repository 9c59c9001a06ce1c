"""The distill stage's selections: the distilled top 1/τ by prediction, and the cascade (sized by its factor or a
target recall; its unsampled candidates rescored; the top 1/τ of them and the sample by the true score); every
request known from the inputs' ids (what `run` checks first and the pipeline's preflight lists)."""
import math
import pathlib

import numpy as np

from colorjax import console
from colorjax import methods
from colorjax import score as score_lib
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.model import transformer
from colorjax.selection import artifact as selection_lib
from colorjax.training import ngram_scorer as scorer_lib

from colorjax.distill import parts
from colorjax.artifacts import scores as scores_lib

METHOD = "color_distilled"
CASCADE = "color_cascade"
# ----------------------------------------------------------------------------------------------------------------
# 5. The cascade and the selection


def cascade_factor(cfg, scorer_manifest: dict | None, sampled_share: float) -> tuple[float | None, float | None]:
  """(the factor the cascade rescores with, its estimated recall of CoLoR's top 1/τ): distill.cascade_factor, or with
  distill.target_recall the smallest factor whose estimate (the scorer's out-of-fold recall curve) reaches it, at most
  τ (every candidate rescored: exactly CoLoR). (None, None) while the scorer is not known."""
  d = cfg.distill
  if not d.target_recall:
    return float(d.cascade_factor), None
  if scorer_manifest is None:
    return None, None
  curve = (scorer_manifest.get("quality") or {}).get("recall_estimate") or {}
  factor, estimate = scorer_lib.factor_for(curve, float(d.tau), float(d.target_recall), sampled_share)
  if factor is None or factor >= d.tau:
    return float(d.tau), 1.0
  return float(factor), estimate


def candidates_request(cfg, factor: float, predictions_id: str, sample_id: str | None, store_id: str,
                       within_id: str | None = None) -> dict:
  d = cfg.distill
  return with_within({"method": "cascade_candidates", "factor": float(factor), "tau": float(d.tau),
                  "tokens": int(d.tokens), "predictions": predictions_id, "sample": sample_id, "store": store_id},
                 within_id)


def cascade_request(cfg, factor: float, rescored_id: str, sample_scores_id: str | None, store_id: str,
                    within_id: str | None = None) -> dict:
  d = cfg.distill
  return with_within({"method": CASCADE, "tau": float(d.tau), "tokens": int(d.tokens), "factor": float(factor),
                  "target_recall": float(d.target_recall), "rescored": rescored_id, "sample_scores": sample_scores_id,
                  "store": store_id}, within_id)


def with_within(request: dict, within_id: str | None) -> dict:
  """A request of a selection among `distill.within`'s candidates names them by id (unset: unchanged)."""
  return request | {"within": within_id} if within_id else request


def selection_request(cfg, predictions_id: str, store_id: str, within_id: str | None = None) -> dict:
  d = cfg.distill
  return with_within({"method": METHOD, "tau": float(d.tau), "tokens": int(d.tokens), "predictions": predictions_id,
                  "store": store_id}, within_id)


def candidates_folder(factor: float, within_id: str | None) -> str:
  """candidates-f<factor>-tau<τ> (and rescored-...) of the whole pool; of `distill.within`, named by its id."""
  return f"f{factor:g}" + (f"-within-{within_id}" if within_id else "")


def rescore_count(factor: float, unsampled: int, tau: float) -> int:
  """The unsampled candidates the cascade rescores: factor x their top 1/τ, at most all of them."""
  return min(unsampled, max(1, int(math.ceil(factor * unsampled / tau - 1e-9))))


def rescore_candidates(cfg, folders: dict, store: stores.TokenStore, values, predictions_id: str, factor: float,
                       sampled: np.ndarray, sample_id: str | None, within: np.ndarray | None = None,
                       within_id: str | None = None) -> scores_lib.Scores:
  """The top of the unsampled candidates (the pool, or `distill.within`) by prediction (process 0 writes them),
  parts.scored by the prior and the conditional (every host: the score stage, restricted to them)."""
  d = cfg.distill
  n = store.num_sequences if within is None else within.size
  tau = n / selection_lib.keep_count(n, store.seq_len, d.tau, d.tokens, "distill")
  root, name = folders["predictions"].parent, candidates_folder(factor, within_id) + f"-tau{d.tau:g}"
  candidates, rescored = root / f"candidates-{name}", root / f"rescored-{name}"
  request = candidates_request(cfg, factor, predictions_id, sample_id, store.id, within_id)

  def write_candidates():
    if lineage.up_to_date(candidates, request, "other candidates", "choose another distill.parts"):
      return
    pool = np.arange(store.num_sequences) if within is None else within
    unsampled = pool[~np.isin(pool, sampled)]
    m = rescore_count(factor, unsampled.size, tau)
    ids, _ = selection_lib.top_k(parts.Stream(values, d.block_rows, unsampled), m)
    ids = unsampled[ids]
    selection_lib.publish(candidates, ids, selection_lib.manifest(request, "cascade_candidates", ids, unsampled.size,
                                                                   store, candidates))

  console.on_main_then_sync(write_candidates, "cascade candidates")
  return parts.scored(cfg, rescored, candidates)


def scoring_flops(scores: scores_lib.Scores) -> float:
  """FLOPs the prior and the conditional spent on a score folder (2N + 4LdT per token per model:
  docs/definitions.md#flop-counts-and-reference-figures)."""
  spec = transformer.ModelSpec(**scores.manifest["model"])
  seq = int(scores.manifest["store"]["seq_len"])
  return float(transformer.flops_per_token(spec, seq, training=False)) * scores.num_sequences * seq * len(
      scores.manifest["models"])


def select(cfg, folder: pathlib.Path, store: stores.TokenStore, values, request: dict, scorer: dict,
            chosen: dict | None, within: np.ndarray | None) -> pathlib.Path:
  """The top k of the candidates (the pool, or `distill.within`) by prediction, or (chosen) by the true CoLoR score
  among the rescored candidates and the sampled ones."""
  if lineage.up_to_date(folder, request, "another selection", "choose another --config.workdir"):
    print(f"distill: {folder} is up to date; nothing to do")
    return folder
  d = cfg.distill
  n = store.num_sequences if within is None else within.size
  k = selection_lib.keep_count(n, store.seq_len, d.tau, d.tokens, "distill")
  if chosen is None:
    stream = parts.Stream(values, d.block_rows, within)
    ids, threshold = selection_lib.top_k(stream, k)
    ids = ids if within is None else within[ids]
    summary = None
  else:
    rescored, sample_scores, sampled = chosen["rescored"], chosen["sample_scores"], chosen["sampled"]
    streams = [(selection_lib.ScoreStream(rescored, methods.HEADLINE, "conditional_0", d.block_rows),
              rescored.num_sequences)]
    if sampled.size:
      streams.append((selection_lib.ScoreStream(sample_scores, methods.HEADLINE, "conditional_0", d.block_rows,
                                                sampled), sampled.size))
    stream = parts.Concat(streams)
    rows, threshold = selection_lib.top_k(stream, k)
    first = rows < rescored.num_sequences
    ids = np.sort(np.concatenate([rescored.global_ids(rows[first]), sampled[rows[~first] - rescored.num_sequences]]))
    summary = {"factor": chosen["factor"], "target_recall": float(d.target_recall) or None,
               "estimated_recall": chosen["estimate"], "rescored": rescored.num_sequences,
               "reused_sample": int(sampled.size), "scoring_flops": scoring_flops(rescored)}
  rescored = None if chosen is None else chosen["rescored"]
  manifest = selection_lib.stage_manifest(
      cfg, "distill", request, d.method, ids, n, store, folder, within, threshold=threshold, seed=None,
      conditional=None if chosen is None else "conditional_0",
      scores=None if rescored is None else {"path": lineage.relative(rescored.path, folder), "id": rescored.id,
                                            "models": rescored.manifest["models"]},
      cascade=summary, scorer={"id": scorer["id"], "quality": scorer["quality"]},
      score_stats=selection_lib.score_statistics(stream))
  selection_lib.publish(folder, ids, manifest, lock=False)  # run holds the selection's lock
  print(f"distill: {d.method} k={k:,} of {n:,} (tau {manifest['tau']:.2f}), threshold {threshold:.4f} -> {folder}")
  selection_lib.print_sources(manifest["sources"])
  return folder


# ----------------------------------------------------------------------------------------------------------------
# Lineage: every request, known from the inputs' ids


def reused_scorer(cfg) -> dict | None:
  """The manifest of the fitted scorer `distill.scorer` names (None when it is not there yet)."""
  path = pathlib.Path(cfg.distill.scorer) / formats.MANIFEST
  return formats.read_json(path) if path.is_file() else None


def expected_requests(cfg, store: stores.TokenStore, models: list[dict] | None,
                      within: tuple[str, int] | None = None, sample_from: tuple[str, int] | None = None) -> dict:
  """Every artifact's request computed from the inputs' ids alone, as `run` will make them (run checks its output
  with it before any work; the pipeline's preflight lists stale parts with it): sample -> its scores -> the scorer
  -> the predictions -> (a cascade's candidates -> their scores) -> the selection. `within`, `sample_from`: (id,
  size) of the candidates and of what the sample is drawn from, when set; `models`: the prior's and conditional's
  names and ids (None: not known yet). The scores' numerics are the score stage's own (score.numerics_of on the
  config this stage scores with), so score.fp8 is in them. A target-recall cascade's factor is known once its
  scorer is."""
  d = cfg.distill
  within_id, n = within if within else (None, store.num_sequences)
  sample_id, sampled_from = sample_from if sample_from else (None, store.num_sequences)
  numerics = score_lib.numerics_of(parts.score_config(cfg))
  out, scorer_manifest, sample_scores_id, sample = {}, None, None, None
  if d.scorer:
    scorer_manifest = reused_scorer(cfg)
    scorer_id = (scorer_manifest or {}).get("id")
  elif models is None:
    return {}
  else:
    out["sample"] = parts.sample_request(cfg, store.id, sample_id)
    sample = lineage.content_id(out["sample"])
    out["sample_scores"] = score_lib.scores_request(store.id, models, numerics, sample)
    sample_scores_id = lineage.content_id(out["sample_scores"])
    out["scorer"] = parts.scorer_request(cfg, sample_scores_id, parts.features_of(cfg, store),
                                         store.manifest["tokenizer"]["sha256"])
    scorer_id = lineage.content_id(out["scorer"])
    saved = pathlib.Path(parts.folders_of(cfg, pathlib.Path(cfg.workdir).resolve())["scorer"]) / formats.MANIFEST
    scorer_manifest = formats.read_json(saved) if saved.is_file() else None
    scorer_manifest = scorer_manifest if (scorer_manifest or {}).get("id") == scorer_id else None
  if scorer_id is None:
    return out
  out["predictions"] = parts.predictions_request(cfg, scorer_id, store.id)
  predictions_id = lineage.content_id(out["predictions"])
  if d.method != CASCADE:
    out["selection"] = selection_request(cfg, predictions_id, store.id, within_id)
    return out
  share = 0.0 if d.scorer else parts.sample_size(cfg, sampled_from) / sampled_from
  factor, _ = cascade_factor(cfg, scorer_manifest, share)
  if models is None or factor is None:
    return out
  name = candidates_folder(factor, within_id) + f"-tau{d.tau:g}"
  out[f"candidates-{name}"] = candidates_request(cfg, factor, predictions_id, sample, store.id, within_id)
  out[f"rescored-{name}"] = score_lib.scores_request(store.id, models, numerics,
                                                     lineage.content_id(out[f"candidates-{name}"]))
  out["selection"] = cascade_request(cfg, factor, lineage.content_id(out[f"rescored-{name}"]), sample_scores_id,
                                     store.id, within_id)
  return out


def part_folders(cfg, requests: dict) -> dict:
  """Where `run` puts the artifacts before the selection: the τ-independent ones (no sample, sample scores or scorer
  when `distill.scorer` reuses one) and a cascade's candidates and their scores."""
  folders = parts.folders_of(cfg, pathlib.Path(cfg.workdir).resolve())
  root = folders["predictions"].parent
  fitted = () if cfg.distill.scorer else ("sample", "sample_scores", "scorer")
  named = {name: folders[name] for name in fitted + ("predictions",)}
  return named | {name: root / name for name in requests if name.startswith(("candidates-", "rescored-"))}
