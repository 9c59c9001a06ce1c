"""The `distill` stage's entry: settings, run, the dry run, and the pipeline's view of it
(colorjax.selection.stage)."""
import math
import pathlib

import numpy as np

from colorjax import config as config_lib
from colorjax import console
from colorjax import errors
from colorjax import score as score_lib
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.model import transformer
from colorjax.selection import artifact as selection_lib
from colorjax.selection import stage as selection_stage
from colorjax.training import ngram_scorer as scorer_lib

from colorjax.distill import cascade
from colorjax.distill import parts

# ----------------------------------------------------------------------------------------------------------------
# Settings


def check_settings(cfg) -> None:
  d = cfg.distill
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the folder the distilled selection goes to")
  if not d.store:
    raise errors.ConfigError("set --config.distill.store to the pool's token store")
  if not d.scorer and not (d.prior and d.conditional):
    raise errors.ConfigError("set --config.distill.prior and --config.distill.conditional (params exports) to fit a "
                             "scorer, or --config.distill.scorer to reuse a fitted one")
  if d.method == cascade.CASCADE and not (d.prior and d.conditional):
    raise errors.ConfigError("distill.method=color_cascade rescores its candidates with the prior and the "
                             "conditional: set --config.distill.prior and --config.distill.conditional (params "
                             "exports), also when --config.distill.scorer reuses a fitted scorer")
  check_values(cfg)


def check_values(cfg) -> None:
  """The distill section's values alone (no paths): what the pipeline checks before any of its work."""
  d = cfg.distill
  if not 0 < d.sample_fraction <= 1 or not 0 < d.holdout_fraction <= 0.5 or d.sample_size < 0:
    raise errors.ConfigError(f"distill.sample_fraction={d.sample_fraction} must be in (0, 1], distill.sample_size="
                             f"{d.sample_size} >= 0 and distill.holdout_fraction={d.holdout_fraction} in (0, 0.5]")
  if min(d.buckets, d.ngram, d.steps, d.batch, d.block_rows, d.eval_every) < 1 or not d.lr > 0 or d.l2 < 0:
    raise errors.ConfigError("distill.buckets, ngram, steps, eval_every, batch and block_rows must be >= 1, "
                             "distill.lr > 0 and distill.l2 >= 0")
  if d.objective not in scorer_lib.OBJECTIVES:
    raise errors.ConfigError(f"distill.objective={d.objective!r}; choose one of {', '.join(scorer_lib.OBJECTIVES)}")
  if d.tokens < 0 or (not d.tokens and not (math.isfinite(d.tau) and d.tau >= 1)):
    raise errors.ConfigError(f"distill.tau={d.tau}, distill.tokens={d.tokens}: keep the top 1/tau of the pool "
                             "(tau >= 1) or a positive token budget")
  if cfg.seed < 0 or d.seed < 0:
    raise errors.ConfigError(f"seed={cfg.seed}, distill.seed={d.seed}: seeds are integers >= 0")
  if d.method not in (cascade.METHOD, cascade.CASCADE):
    raise errors.ConfigError(f"distill.method={d.method!r}; choose {cascade.METHOD} or {cascade.CASCADE}")
  if d.method == cascade.CASCADE and not (math.isfinite(d.cascade_factor) and d.cascade_factor >= 1):
    raise errors.ConfigError(f"distill.cascade_factor={d.cascade_factor}: the rescored candidates are "
                             "cascade_factor x the selection, so it is a number >= 1")
  if not 0 <= d.target_recall < 1:
    raise errors.ConfigError(f"distill.target_recall={d.target_recall}: a recall in [0, 1) (0 = use "
                             "distill.cascade_factor)")


# ----------------------------------------------------------------------------------------------------------------
# The stage


def run(cfg) -> pathlib.Path:
  check_settings(cfg)
  d = cfg.distill
  workdir = pathlib.Path(cfg.workdir).resolve()
  store = stores.TokenStore(d.store)
  within, within_id = selection_lib.within_ids(d.within, store, "distill.within")
  candidates = store.num_sequences if within is None else within.size
  selection_lib.keep_count(candidates, store.seq_len, d.tau, d.tokens, "distill")
  path, setting = parts.sample_source(cfg)
  source, source_id = selection_lib.within_ids(path, store, setting)
  sampled_from = store.num_sequences if source is None else source.size
  folders = parts.folders_of(cfg, workdir)
  models = parts.check_models(cfg, store) if (not d.scorer or d.method == cascade.CASCADE) else None
  if d.scorer:
    parts.open_scorer(pathlib.Path(d.scorer).resolve(), store, parts.features_of(cfg, store))
  else:
    parts.check_sample(cfg, sampled_from)
  expected = cascade.expected_requests(cfg, store, models, (within_id, candidates) if within_id else None,
                                       (source_id, sampled_from) if source_id else None)
  # the output folder, before any work: up to date (nothing to do), or free to be written
  if "selection" in expected and lineage.up_to_date(workdir, expected["selection"], "another selection",
                                                    "choose another --config.workdir"):
    print(f"distill: {workdir} is up to date; nothing to do")
    return workdir
  lineage.check_new(workdir, "a distilled selection", "choose another --config.workdir")
  with lineage.Lock(folders["predictions"].parent):  # the shared parts: one job writes them
    scorer_path = pathlib.Path(d.scorer).resolve() if d.scorer else folders["scorer"]
    sample_scores, sample_id = None, None
    if not d.scorer:
      sample_id = console.on_main_then_sync(lambda: parts.make_sample(cfg, folders["sample"], store), "distill sample")
      sample_scores = parts.scored(cfg, folders["sample_scores"], folders["sample"])
      console.on_main_then_sync(lambda: parts.fit_scorer(cfg, scorer_path, store, sample_scores), "distill fit")
      sample_id = sample_id or lineage.content_id(parts.sample_request(cfg, store.id, source_id))
    scorer = parts.open_scorer(scorer_path, store, parts.features_of(cfg, store))
    console.on_main_then_sync(lambda: parts.predict_pool(cfg, folders["predictions"], store, scorer), "distill predict")
    predictions_id = formats.read_json(folders["predictions"] / formats.MANIFEST)["id"]
    values = parts.open_predictions(folders["predictions"], store.num_sequences)
    chosen = None
    if d.method == cascade.CASCADE:
      chosen = _cascade(cfg, folders, store, values, predictions_id, scorer, sample_scores, sample_id, sampled_from,
                        within, within_id)
      request = cascade.cascade_request(cfg, chosen["factor"], chosen["rescored"].id,
                                        None if sample_scores is None else sample_scores.id, store.id, within_id)
    else:
      request = cascade.selection_request(cfg, predictions_id, store.id, within_id)
  if not console.is_main():  # selection is CPU work of process 0
    return folders["selection"]
  with lineage.Lock(workdir):
    return cascade.select(cfg, folders["selection"], store, values, request, scorer, chosen, within)


def _cascade(cfg, folders, store, values, predictions_id, scorer, sample_scores, sample_id, sampled_from, within,
             within_id) -> dict:
  """Sizes the cascade (its factor, printed with what it costs), rescores its candidates, and returns what the
  selection ranks: the rescored scores and the sampled candidates with their true scores."""
  d = cfg.distill
  sampled = np.zeros(0, np.int64)
  if sample_scores is not None:
    sampled = sample_scores.global_ids(np.arange(sample_scores.num_sequences))
    sampled = sampled if within is None else np.intersect1d(sampled, within)
  n = store.num_sequences if within is None else within.size
  share = 0.0 if sample_scores is None else parts.sample_size(cfg, sampled_from) / sampled_from
  factor, estimate = cascade.cascade_factor(cfg, scorer, share)
  rescored = cascade.rescore_candidates(cfg, folders, store, values, predictions_id, factor, sampled, sample_id, within,
                                within_id)
  if console.is_main():
    how = (f"distill.target_recall {d.target_recall:g}: estimated recall {estimate:.1%}" if d.target_recall
           else "distill.cascade_factor")
    print(f"distill: cascade factor {factor:g} ({how}); rescored {rescored.num_sequences:,} + {sampled.size:,} "
          f"sampled of {n:,} candidates = {(rescored.num_sequences + sampled.size) / n:.1%} of scoring them")
  return {"factor": factor, "estimate": estimate, "rescored": rescored, "sample_scores": sample_scores,
          "sampled": sampled}


def scoring_plan(cfg, candidates: int, sampled_from: int, seq_len: int) -> dict:
  """What one selection has the prior and the conditional score, in sequences: the sample (of `sampled_from`, drawn
  once for every τ; none with a reused scorer) and a cascade's rescored candidates (of `candidates`; with a target
  recall, planned at distill.cascade_factor: the factor is chosen after the fit), and the share of scoring the
  candidates that comes to, the sample charged in proportion to the candidates it serves (the report's count)."""
  d = cfg.distill
  k = selection_lib.keep_count(candidates, seq_len, d.tau, d.tokens, "distill")
  sample = 0 if d.scorer else parts.sample_size(cfg, sampled_from)
  charged_sample = sample * candidates / max(sampled_from, 1)
  rescored = 0
  if d.method == cascade.CASCADE:
    unsampled = max(candidates - round(charged_sample), 1)
    rescored = cascade.rescore_count(float(d.cascade_factor), unsampled, candidates / k)
  charged = charged_sample + rescored
  return {"k": k, "sample": sample, "rescored": rescored, "charged": charged, "share": charged / candidates}


def describe(cfg) -> None:
  check_settings(cfg)
  d = cfg.distill
  store = stores.TokenStore(d.store)
  within, _ = selection_lib.within_ids(d.within, store, "distill.within")
  path, setting = parts.sample_source(cfg)
  source, _ = selection_lib.within_ids(path, store, setting)
  n = store.num_sequences if within is None else within.size
  sampled_from = store.num_sequences if source is None else source.size
  if not d.scorer:
    parts.check_sample(cfg, sampled_from)
  plan = scoring_plan(cfg, n, sampled_from, store.seq_len)
  scorer = f"reuses the scorer {d.scorer}" if d.scorer else (
      f"the prior and conditional score a sample of {plan['sample']:,} of {sampled_from:,}, a linear model on hashed "
      f"token 1..{d.ngram}-grams ({d.buckets:,} buckets, {d.objective}, {parts.folds(cfg)} folds) predicts the rest")
  rescoring = ""
  if d.method == cascade.CASCADE:
    how = (f"the factor reaching an estimated recall of {d.target_recall:g}, chosen after the fit (planned at "
           f"{d.cascade_factor:g})" if d.target_recall else f"{d.cascade_factor:g} x the top 1/tau")
    rescoring = f"; the cascade rescores the top {plan['rescored']:,} unsampled by prediction ({how})"
  print(f"distill (dry run): {d.method} keeps {plan['k']:,} of {n:,} sequences; {scorer}{rescoring}: "
        f"{plan['share']:.1%} of scoring the {n:,} candidates")
  if plan["sample"] or plan["rescored"]:
    scfg = parts.score_config(cfg)
    _, spec = score_lib.model_entries(scfg)
    for key, value in spec.architecture().items():
      scfg.model[key] = value
    score_lib.describe_nominal(scfg, plan["sample"] + plan["rescored"], store.seq_len, 2)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline's view of this stage (colorjax.selection_stage)


def pipeline_config(cfg, inputs: selection_stage.Inputs, selection: selection_stage.Selection):
  """The distill stage's config for one of a pipeline's selections: the sample, its scores, the scorer and the
  predictions in the pipeline's parts folder serve every τ (under fixed n drawn from the largest pool)."""
  dcfg = config_lib.stage_config(cfg, "distill", model=cfg.prior.model)
  d = dcfg.distill
  d.store, d.prior, d.conditional = str(inputs.pool), str(inputs.prior), str(inputs.conditional)
  d.parts, d.method, d.tau = str(inputs.parts), selection.method, selection.tau
  if selection.shared_within is not None:
    d.sample_within = str(selection.shared_within)
  selection_stage.place(dcfg, "distill", selection, inputs.seq_len)
  return dcfg


def expected(dcfg, known: selection_stage.Known) -> list:
  """Every part and the selection, with the requests `run` will make (cascade.expected_requests) from the known ids."""
  d = dcfg.distill
  store_path = pathlib.Path(d.store)
  within, sample_from = known.within(d.within), known.within(d.sample_within)
  ready = (known.pool and (store_path / formats.MANIFEST).is_file()
           and all(known.within(p) and known.within(p)[0] for p in (d.within, d.sample_within) if p))
  requests = {}
  if ready:
    requests = cascade.expected_requests(dcfg, stores.TokenStore(store_path), known.models(), within, sample_from)
  folders = cascade.part_folders(dcfg, requests)
  out = [(f"distill {part}", folder, requests.get(part)) for part, folder in folders.items()]
  return out + [("selection", pathlib.Path(dcfg.workdir), requests.get("selection"))]


def plan(dcfg, sizes: selection_stage.Sizes, counted: set) -> float:
  """Prints what one selection has the prior and the conditional score (scoring_plan: the report's count), in FLOPs
  and device-hours; returns what it adds to a plan that already counted the parts in `counted` (the sample, shared by
  every τ and both methods, once)."""
  d = dcfg.distill
  per_sequence = 2 * transformer.flops_per_token(transformer.ModelSpec.from_config(dcfg.model), sizes.seq_len,
                                                 training=False) * sizes.seq_len
  p = scoring_plan(dcfg, sizes.candidates, sizes.shared_from, sizes.seq_len)
  flops = per_sequence * (p["sample"] + p["rescored"])
  hours = (p["sample"] + p["rescored"]) * sizes.seq_len / max(sizes.tokens_per_s, 1.0) / 3600
  planned = ""
  if d.method == cascade.CASCADE and d.target_recall:
    planned = (f" (planned at cascade_factor {d.cascade_factor:g}: with distill.target_recall {d.target_recall:g} the "
               "factor is chosen after the fit, printed with its cost)")
  print(f"  {pathlib.Path(dcfg.workdir).name}: scores {p['sample']:,} sampled (of {sizes.shared_from:,}, shared by "
        f"every tau) + {p['rescored']:,} rescored sequences = {flops:.3e} FLOPs, {hours:,.2f} device-hours at "
        f"{sizes.tokens_per_s:,.0f} pool tok/s per device; charged {p['share']:.1%} of scoring its "
        f"{sizes.candidates:,} candidates{planned}")
  sampled = "distill sample" in counted
  counted.add("distill sample")
  return per_sequence * p["rescored"] if sampled else flops


def fits(dcfg, sizes: selection_stage.Sizes) -> None:
  """A sample too small to fit a scorer is refused before the pipeline scores anything."""
  if not dcfg.distill.scorer:
    parts.check_sample(dcfg, sizes.shared_from if dcfg.distill.sample_within else sizes.candidates)


STAGE = selection_stage.register(selection_stage.SelectionStage("distill", pipeline_config, expected, plan, run,
                                                                 check_values, fits))
