"""The `hub` stage: the original's release on the Hugging Face hub in, colorjax's selections and models out
(docs/hub.md). `--config.hub.action` picks one; each writes under --config.workdir:

  models          the released models (hub.repo: models/<name>/, unsharded OLMo checkpoints; optim.pt is never
                  downloaded) -> <workdir>/<name>/params, through the olmo import
  selection       the released selection indices/c4-<target>-tau=<tau>/selected_indices.npy with its pool: the token
                  files full_data/c4 (in name order, or hub.token_files), their id order checked first (hub_ids.py:
                  rows rescored with the released prior, <workdir>/prior/params, against its released scores
                  scores/pretrain-*-seq; refused on a mismatch, naming the order that matches), then adopted in
                  place as <workdir>/store and the selection imported as <workdir>/c4-<target>-tau=<tau>
  push_selection  a selection as a hub dataset, one commit: Parquet {id, input_ids, score, source, text}, its
                  manifest, the tokenizer and a dataset card (staged in <workdir>/dataset, then <workdir>/push.json)
  push_model      a params export as a transformers model (hf_export.py) plus the params export itself under
                  params/ (readable by every stage as hf://<repo>/params), one commit (<workdir>/model, push.json)
  transformers    a params export -> <workdir>, a folder transformers loads with trust_remote_code=True
  lm_eval         lm-evaluation-harness tasks on colorjax's forward (harness.py) -> <workdir>/lm_eval.json

Every path of every stage may also be an hf:// URL (artifacts/hub_paths.py). Each artifact made from the hub
records the commit its inputs were downloaded at in its request, so another revision is another artifact.
"""
import glob
import json
import pathlib
import re
import shutil
import time
import urllib.parse

import ml_collections

from colorjax import config
from colorjax import console
from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import hub_paths
from colorjax.artifacts import lineage
from colorjax.data import stores
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.interop import dolma
from colorjax.interop import dolma_common as common
from colorjax.interop import dolma_export
from colorjax.interop import dolma_scores
from colorjax.interop import hf_export
from colorjax.interop import hub_ids
from colorjax.interop import olmo
from colorjax.interop import olmo_config
from colorjax.training import checkpoint
from colorjax.selection import artifact as selection_lib

ACTIONS = ("models", "selection", "push_selection", "push_model", "transformers", "lm_eval")
CHECKS = ("refuse", "warn", "off")
# Where the release keeps each part (hlzhang109/CoLoR-filter); another repo laid out the same way works as well.
LAYOUT = {"model": "models/{name}", "tokens": "full_data/c4", "prior_scores": "scores/pretrain-*-seq",
          "selection": "indices/c4-{target}-tau={tau}/selected_indices.npy"}
DATASET_FORMAT = "colorjax.hub_dataset"


def release_url(cfg, path: str) -> str:
  """hf:// URL of a path of hub.repo at hub.revision."""
  if not cfg.hub.repo:
    raise errors.ConfigError("set --config.hub.repo to the release (hlzhang109/CoLoR-filter) or a repo laid out as it")
  return f"{hub_paths.SCHEME}{cfg.hub.repo}@{urllib.parse.quote(cfg.hub.revision or 'main', safe='')}/{path}"


def derived(cfg, fields: dict) -> ml_collections.ConfigDict:
  """A copy of the config with dotted fields set: the config of a stage this action runs (olmo, dolma)."""
  return config.with_fields(cfg, fields)


def workdir(cfg) -> pathlib.Path:
  if not cfg.workdir:
    raise errors.ConfigError(f"set --config.workdir to the folder the hub {cfg.hub.action} output goes to")
  return pathlib.Path(cfg.workdir).resolve()


def natural(path) -> list:
  """Sort key: numbers by value (pretrain-10-seq after pretrain-9-seq)."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


# ----------------------------------------------------------------------------------------------------------------
# models, selection: the release in


def import_models(cfg, names=None) -> dict:
  """models/<name> of the release, each -> <workdir>/<name as the release calls it>/params; {name: params}."""
  out, tokenizer = {}, hub_paths.localize(cfg.hub.tokenizer)
  for name in names or common.as_list(cfg.hub.models):
    local = hub_paths.download(release_url(cfg, LAYOUT["model"].format(name=name)))
    sub = derived(cfg, {"stage": "olmo", "olmo.mode": "import", "olmo.weights": str(local), "olmo.config": "",
                        "olmo.tokenizer": tokenizer, "workdir": str(workdir(cfg) / local.name)})
    out[local.name] = olmo.import_checkpoint(sub)
  return out


def token_files(folder: pathlib.Path, names) -> list[pathlib.Path]:
  """The release's token files in the order given (file names), else in name order."""
  present = {p.name: p for p in folder.glob("*.npy")}
  if not present:
    raise errors.DataError(f"{folder} holds no .npy token files; check --config.hub.repo and --config.hub.revision")
  names = common.as_list(names)
  missing = [n for n in names if n not in present]
  if missing or (names and sorted(names) != sorted(present)):
    raise errors.ConfigError(f"--config.hub.token_files must name each of the {len(present)} files of "
                             f"{LAYOUT['tokens']} once (missing or unknown: {missing[:4] or 'none'}); they are "
                             f"{sorted(present)[:4]}{' ...' if len(present) > 4 else ''}")
  return [present[n] for n in (names or sorted(present))]


def check_ids(cfg, files, dtype: str, seq_len: int, prior: pathlib.Path) -> dict:
  """The id-order check (hub_ids.py): released prior scores against rows of each file rescored with the prior."""
  manifest = checkpoint.read_params_manifest(prior)
  spec = checkpoint.spec_from_manifest(manifest, cfg.model)
  params, _ = checkpoint.load_params(prior, spec)
  shards = sorted(glob.glob(str(hub_paths.download(release_url(cfg, LAYOUT["prior_scores"])))), key=natural)
  if not shards:
    raise errors.DataError(f"{release_url(cfg, LAYOUT['prior_scores'])} matches no score folder; the check needs the "
                           "released prior's scores (or set --config.hub.check_ids=off)")
  column = hub_ids.released_column(shards)
  samples = hub_ids.samples(files, dtype, seq_len, int(cfg.hub.check_rows),
                            lambda tokens: hub_ids.rescore(spec, params, tokens))
  report = hub_ids.check(samples, column, float(cfg.hub.check_tolerance))
  report.update(prior=manifest["id"], shards=[pathlib.Path(s).name for s in shards],
                hub=hub_paths.origins(files + [pathlib.Path(s) for s in shards]))
  return report


def refusal(report: dict, files) -> str:
  fix = (f"--config.hub.token_files=\"{tuple(report['matching_order'])}\" (the order that matches)"
         if report["matching_order"] else "the token files of the run that made these scores")
  return (f"{hub_ids.summary(report)}. Selecting by the released ids would take the wrong rows of "
          f"{files[0].parent}, so the pool was not adopted nor the selection imported (the check is in "
          f"id_check.json): re-run with {fix}, "
          "or --config.hub.check_ids=warn to adopt this order anyway")


def import_selection(cfg) -> pathlib.Path:
  """The released selection and the pool it indexes, its id order checked before anything is adopted."""
  out, h = workdir(cfg), cfg.hub
  if h.check_ids not in CHECKS:
    raise errors.ConfigError(f"hub.check_ids={h.check_ids!r}; choose one of {', '.join(CHECKS)}")
  tokens_dir = hub_paths.download(release_url(cfg, LAYOUT["tokens"]))
  files = token_files(tokens_dir, h.token_files)
  prior_dir = hub_paths.download(release_url(cfg, LAYOUT["model"].format(name="prior")))
  raw = olmo_config.read_config_yaml(prior_dir / olmo.CONFIG)
  model = olmo_config.model_section(raw, prior_dir / olmo.CONFIG)
  dtype, seq_len = str((raw.get("data") or {}).get("memmap_dtype") or "uint16"), int(model["max_sequence_length"])
  if h.check_ids != "off":
    prior = import_models(cfg, ["prior"])["prior"]
    report = check_ids(cfg, files, dtype, seq_len, prior)
    out.mkdir(parents=True, exist_ok=True)
    (out / "id_check.json").write_text(formats.json_text(report))
    if not report["matches"] and h.check_ids == "refuse":
      raise errors.DataError(refusal(report, files))
    print(f"hub selection: {'warning: ' if not report['matches'] else ''}{hub_ids.summary(report)}", flush=True)
  else:
    print("hub selection: warning: the id order of the token files is not checked (--config.hub.check_ids=off)")
  tokenizer = olmo.resolve_tokenizer(hub_paths.localize(h.tokenizer), raw, prior_dir / olmo.CONFIG)
  store = dolma.adopt(derived(cfg, {"stage": "dolma", "dolma.action": "adopt", "dolma.paths": tuple(map(str, files)),
                                    "dolma.paths_from": "", "dolma.dtype": dtype, "dolma.seq_len": seq_len,
                                    "dolma.eos_id": model["eos_token_id"], "dolma.pad_id": model["pad_token_id"],
                                    "dolma.tokenizer": tokenizer, "workdir": str(out / "store")}))
  selected = hub_paths.download(release_url(cfg, LAYOUT["selection"].format(target=h.target, tau=h.tau)))
  return dolma_scores.import_selection(derived(cfg, {"stage": "dolma", "dolma.action": "import_selection",
                                                     "dolma.store": str(store), "dolma.selection": str(selected),
                                                     "workdir": str(out / selected.parent.name)}))


# ----------------------------------------------------------------------------------------------------------------
# push_selection, push_model, transformers: colorjax out


def dataset_card(manifest: dict, store: stores.TokenStore, parquet: list[str]) -> str:
  k, n = manifest["k"], manifest["num_sequences"]
  return "\n".join([
      "---", "configs:", "- config_name: default", "  data_files:", "  - split: train", "    path: data/*.parquet",
      "tags: [colorjax, color-filter, data-selection]", "---", "",
      f"# colorjax selection {manifest['id']}", "",
      f"{k:,} of {n:,} sequences of {store.seq_len} tokens (tau {manifest['tau']:.4g}) selected by "
      f"`{manifest['method']}` from token store {store.id}, in id order, in {len(parquet)} Parquet files: `id` (the "
      "sequence's global id in the store), `input_ids`, `score` (the method's score, null when it has none), "
      f"`source` and `text` (decoded with `tokenizer.json`, {store.manifest['tokenizer']['name']}).", "",
      "`manifest.json` holds the selection's own manifest (its request names the scores and the store it was made "
      "from by content id) and the store's description.", ""])


def stage_dataset(cfg, folder: pathlib.Path, selection: pathlib.Path, manifest: dict, request: dict) -> None:
  """The dataset repo's files, built in `<folder>.partial` and moved into place (manifest.json last)."""
  store = stores.TokenStore(selection_lib.store_of(selection, manifest))
  ids = stores.load_index(selection, store)
  tokenizer = tokenizer_lib.load_tokenizer(str(store.tokenizer_path()))

  def write(part):
    names = dolma_export.write_parquet_part(part / "data", store, ids, dolma_export.selection_scores(
        selection, manifest), store.labels() or ["all"], int(cfg.dolma.rows_per_file), 0, 1, tokenizer)
    shutil.copyfile(store.tokenizer_path(), part / tokenizer_lib.TOKENIZER)
    (part / "README.md").write_text(dataset_card(manifest, store, names))
    lineage.write_manifest(part, {
        "format": DATASET_FORMAT, "id": lineage.content_id(request), "request": request, "selection": manifest,
        "store": {"id": store.id, "seq_len": store.seq_len, "dtype": store.dtype.name, "labels": store.labels(),
                  "num_sequences": store.num_sequences, "tokenizer": store.manifest["tokenizer"]},
        "num_sequences": int(ids.size), "parquet": [f"data/{n}" for n in names],
        "columns": ["id", "input_ids", "score", "source", "text"], "time": time.strftime("%Y-%m-%dT%H:%M:%S")})

  common.publish(folder, write)


def push(cfg, folder: pathlib.Path, repo_type: str, message: str, artifact_id: str) -> dict:
  """`folder` committed to hub.push_to as one commit; the commit recorded in <workdir>/push.json (a re-run with the
  same artifact and repo pushes nothing)."""
  record_path = workdir(cfg) / "push.json"
  if record_path.exists():
    record = formats.read_json(record_path)
    if record.get("id") == artifact_id and record.get("repo") == cfg.hub.push_to:
      print(f"hub push: {artifact_id} is already commit {record['commit']} of {cfg.hub.push_to}; nothing to do")
      return record
  record = {"id": artifact_id, **hub_paths.push_folder(folder, cfg.hub.push_to, repo_type, message,
                                                        bool(cfg.hub.private))}
  record_path.write_text(formats.json_text(record))
  print(f"hub push: {len(record['files'])} files of {folder} -> {record['url']} (one commit, {record['commit']})")
  return record


def push_selection(cfg) -> dict:
  if not cfg.hub.selection or not cfg.hub.push_to:
    raise errors.ConfigError("set --config.hub.selection (a selection folder) and --config.hub.push_to (<org>/<name> "
                             "of the dataset repo)")
  selection = pathlib.Path(cfg.hub.selection).resolve()
  manifest = formats.open_manifest(selection, formats.SELECTION)
  request = {"kind": "hub_dataset", "selection": manifest["id"], "store": manifest["store_id"],
             "rows_per_file": int(cfg.dolma.rows_per_file)}
  folder = workdir(cfg) / "dataset"
  if not lineage.up_to_date(folder, request, "another dataset", "choose another --config.workdir"):
    lineage.check_new(folder, "a staged dataset", "choose another --config.workdir")
    stage_dataset(cfg, folder, selection, manifest, request)
  message = cfg.hub.message or (f"colorjax selection {manifest['id']}: {manifest['method']}, tau {manifest['tau']:.4g}"
                                f", {manifest['k']:,} sequences")
  return push(cfg, folder, "dataset", message, lineage.content_id(request))


def push_model(cfg) -> dict:
  if not cfg.hub.params or not cfg.hub.push_to:
    raise errors.ConfigError("set --config.hub.params (a params export) and --config.hub.push_to (<org>/<name> of the "
                             "model repo)")
  params_dir = pathlib.Path(cfg.hub.params).resolve()
  manifest = checkpoint.read_params_manifest(params_dir)
  folder = workdir(cfg) / "model"
  staged = folder / hf_export.CONFIG
  if not staged.exists() or json.loads(staged.read_text())["colorjax"]["params_id"] != manifest["id"]:
    hf_export.export(params_dir, folder, cfg.model, card=True)
  if cfg.hub.push_params and not (folder / "params" / formats.MANIFEST).exists():
    shutil.copytree(params_dir, folder / "params", ignore=shutil.ignore_patterns(".*"))
  return push(cfg, folder, "model", cfg.hub.message or f"colorjax model {manifest['id']}", manifest["id"])


# ----------------------------------------------------------------------------------------------------------------
# Stage entry points


def _action(cfg) -> str:
  if cfg.hub.action not in ACTIONS:
    raise errors.ConfigError(f"hub.action={cfg.hub.action!r}; choose one of {', '.join(ACTIONS)}")
  return cfg.hub.action


def run(cfg):
  action = _action(cfg)
  if action == "transformers":
    if not cfg.hub.params:
      raise errors.ConfigError("set --config.hub.params to the params export to write for transformers")
    fn = lambda: hf_export.export(cfg.hub.params, workdir(cfg), cfg.model)
  elif action == "lm_eval":
    try:
      from colorjax.interop import harness  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise errors.ConfigError(f"hub lm_eval needs lm-evaluation-harness ({e.name} is missing): pip install -e "
                               ".[lm_eval]") from e
    fn = lambda: harness.run(cfg)
  else:
    fn = lambda: {"models": import_models, "selection": import_selection, "push_selection": push_selection,
                  "push_model": push_model}[action](cfg)
  return console.on_main_then_sync(fn, f"hub {action}")


def describe(cfg) -> None:
  """Dry run: what the action reads (for the release's parts: the files, their size and whether they are cached)
  and writes; nothing is downloaded."""
  action = _action(cfg)
  parts = {"models": [LAYOUT["model"].format(name=n) for n in common.as_list(cfg.hub.models)],
           "selection": [LAYOUT["tokens"], LAYOUT["model"].format(name="prior"), LAYOUT["prior_scores"],
                         LAYOUT["selection"].format(target=cfg.hub.target, tau=cfg.hub.tau)]}.get(action, [])
  for part in parts:
    files = hub_paths.plan(release_url(cfg, part))
    size = sum(f["bytes"] for f in files)
    cached = sum(f["cached"] for f in files)
    print(f"hub {action} (dry run): {release_url(cfg, part)}: {len(files)} files, {size / 2**30:.2f} GiB "
          f"({cached} already in the cache)")
  if not parts:
    print(f"hub {action} (dry run): reads {cfg.hub.params or cfg.hub.selection or '-'}, writes "
          f"{cfg.workdir or '<workdir>'}{' and pushes to ' + cfg.hub.push_to if action.startswith('push') else ''}")
