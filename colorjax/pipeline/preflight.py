"""The pipeline's preflight: what every artifact of a work directory must have been built from, which existing
ones are stale, and whether every training step's settings fit its data and the mesh — all before any work.

An artifact's request names its inputs by content id and is known before the artifact is built (artifacts.lineage),
so the expected request of each step follows, in pipeline order, from the ids of the inputs that are there now; an
input that is missing or stale leaves the request of everything built from it unknown.
"""
import dataclasses
import gzip
import pathlib
import shutil
import time

from colorjax import errors
from colorjax import methods
from colorjax import prepare
from colorjax import score
from colorjax.selection import stage as selection_stage
from colorjax.artifacts import formats
from colorjax.artifacts import lineage as lineage_lib
from colorjax.data import corpus
from colorjax.data import sft_rows as sft_rows_lib
from colorjax.data import stores
from colorjax.data import synthetic
from colorjax.data import tasks as tasks_lib
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.model import transformer
from colorjax.pipeline import pools
from colorjax.pipeline import protocol as protocol_lib
from colorjax.training import run_folder
from colorjax.training import step_plan


def check_stage_settings(cfg, stages, sizes: dict, data_parallel: int) -> list[tuple[str, object]]:
  """Every training step's batch plan against its data size and the mesh; one error listing every problem."""
  problems, plans = [], []
  def step(name, tcfg, num_items, seq_len):
    try:
      plans.append((name, step_plan.step_plan(tcfg, num_items, seq_len, data_parallel)))
    except errors.ConfigError as e:
      problems.append(f"{name}: {e}")
  seq = sizes["seq_len"]
  proto = protocol_lib.of(cfg)
  if proto.fixed_n:
    try:
      pools.check_fits(cfg, sizes["pool"])
    except errors.ConfigError as e:
      problems.append(str(e))
  step("prior", stages.prior, proto.prior_sequences(sizes["pool"]), seq)
  step("conditional", stages.conditional, sizes["target_train"], sizes.get("sft_seq_len", seq))
  if stages.reference is not None:
    step("reference", stages.reference, sizes.get("target_text", sizes["target_train"]), seq)
  checked = set()
  for r in stages.runs:
    candidates, k = proto.candidates_and_kept(r, sizes["pool"])
    if not r.selection:  # RHO-down: a single pass over its candidates, tau x batch of them per step
      step(r.name, r.config, candidates, seq)
      continue
    if k <= 0:
      problems.append(f"select {r.selection}: tau {r.tau:g} keeps 0 of {candidates:,} pool sequences")
      continue
    if r.selection not in checked:  # the stage's own data checks (a distill sample too small to fit): before scoring
      checked.add(r.selection)
      sel = stages.selections[r.selection]
      try:
        selection_stage.get(sel.stage).fits(sel, selection_stage.Sizes(
            candidates, proto.shared_from(sizes["pool"]), seq, cfg.score.tokens_per_s_per_device))
      except errors.ConfigError as e:
        problems.append(f"select {r.selection}: {e}")
    step(r.name, r.config, k, seq)
  if problems:
    raise errors.ConfigError("the pipeline's settings do not fit its data (nothing was trained):\n  "
                             + "\n  ".join(problems))
  return plans



@dataclasses.dataclass(frozen=True)
class Expected:
  label: str
  path: pathlib.Path  # folder (or file) of the artifact
  request: dict | None  # None: an input is missing or will be rebuilt, so its id is not known yet
  recorded: dict | None  # the request the existing artifact was made for (None: absent)
  exists: bool


def _recorded(path: pathlib.Path, marker: pathlib.Path | None = None) -> tuple[dict | None, bool]:
  if marker is not None:
    return (formats.read_json(marker).get("request") if marker.exists() else None), path.exists()
  for folder in (path / "params", path):
    found = lineage_lib.recorded_request(folder)
    if found is not None:
      return found, True
  return None, path.exists() and any(path.iterdir())


def _expect(label, path, request, marker=None) -> Expected:
  recorded, exists = _recorded(path, marker)
  return Expected(label, path, request, recorded, exists)


def _id(expected: Expected) -> str | None:
  return lineage_lib.content_id(expected.request) if expected.request is not None else None


def lineage(cfg, root: pathlib.Path, stages) -> list[Expected]:
  """Every artifact of the work directory with the request it must have been made for, in pipeline order."""
  pcfg = cfg.pipeline
  out: list[Expected] = []
  tasks_text = pcfg.target == "tasks" and "target_train" in stages.stores and not pcfg.target_train_store
  if pcfg.pool_store:
    ids = {name: stores.TokenStore(path).id for name, path in stages.stores.items()
           if not (tasks_text and name == "target_train")}
    tok_info = stores.TokenStore(stages.stores["pool"]).manifest["tokenizer"]
    if tasks_text:
      out.append(_tasks_text(cfg, root, stages, stores.TokenStore(stages.stores["pool"]).tokenizer_path()))
      ids["target_train"] = _id(out[-1])
  else:
    folder = corpus.data_dir(cfg, root, create=False)
    split_req = corpus.split_request_for(cfg, root, folder) if pathlib.Path(folder).exists() else None
    out.append(_expect("data split", root / "data" / "split.json", split_req, root / "data" / "split.json"))
    split_ok = split_req is not None and out[-1].recorded == lineage_lib.normalized(split_req)
    tok_path = pathlib.Path(pcfg.tokenizer) if pcfg.tokenizer else root / "data" / "tokenizer.json"
    tok_ok = split_ok
    if not pcfg.tokenizer and split_req is not None:
      out.append(_expect("tokenizer", tok_path, corpus.tokenizer_request(cfg, split_req),
                         root / "data" / "tokenizer.request.json"))
      tok_ok = split_ok and out[-1].recorded == lineage_lib.normalized(out[-1].request) and tok_path.exists()
    parts = corpus.part_paths(root / "data", *corpus.input_files(cfg, folder)) if split_ok else None
    ids, tok_info = {}, None
    for name, path in stages.stores.items():
      if tasks_text and name == "target_train":
        out.append(_tasks_text(cfg, root, stages, tok_path if tok_ok else None))
        ids[name] = _id(out[-1])
        continue
      request = None
      if tok_ok:
        request = prepare.check_inputs(corpus.prepare_config(cfg, parts[name], tok_path, path))[-1]
        tok_info = tok_info or tokenizer_lib.tokenizer_info(tokenizer_lib.load_tokenizer(str(tok_path)), str(tok_path))
      out.append(_expect(f"store {name}", path, request, path / formats.MANIFEST))
      ids[name] = _id(out[-1])
  prior_spec = transformer.ModelSpec.from_config(stages.prior.model)
  pool_id = ids.get("pool")
  proto = protocol_lib.of(cfg)
  nested = {}  # nested pool folder -> (id, sequences) (fixed n)
  for tau, size in (proto.sizes.items() if proto.fixed_n else ()):
    folder = pools.folder(root, tau)
    req = pools.request(pool_id, size, pcfg.split_seed) if pool_id else None
    out.append(_expect(f"nested pool tau{tau:g}", folder, req, folder / formats.MANIFEST))
    nested[str(folder)] = (_id(out[-1]), size)
  within = lambda path: (nested.get(str(path)) or (None, 0))[0] if path else None
  prior_index = None
  if proto.fixed_n and pool_id:  # pools/prior: known once the pool store (its size) is up to date
    folder, store_path = pools.folder(root, pools.PRIOR), pathlib.Path(stages.stores["pool"])
    store = stores.TokenStore(store_path) if (store_path / formats.MANIFEST).exists() else None
    req = pools.prior_request(cfg, pool_id, store.num_sequences) if store and store.id == pool_id else None
    out.append(_expect("the prior's pool", folder, req, folder / formats.MANIFEST))
    prior_index = _id(out[-1])
  prior_known = pool_id and (prior_index or not proto.fixed_n)
  prior_req = (run_folder.run_request(stages.prior, prior_spec, pool_id, False, prior_index, None) if prior_known
               else None)
  out.append(_expect("prior", root / "runs" / "prior", prior_req))
  cond = stages.conditional
  if cond.sft.tasks:
    sft = sft_rows_lib.sft_request(cond.sft.tasks, cond.sft.data_dir, cond.sft.train_split, tok_info,
                                   prior_spec.max_seq_len, cond.sft.limit) if tok_info else None
    cond_store, padded = (lineage_lib.content_id(sft) if sft else None), True
  else:
    cond_store, padded = ids.get("target_train"), False
  cond_req = None
  if prior_req and cond_store:
    cond_req = run_folder.run_request(cond, prior_spec, cond_store, padded, None, lineage_lib.content_id(prior_req))
  out.append(_expect("conditional", root / "runs" / "conditional", cond_req))
  prior_id, cond_id = _id(out[-2]), _id(out[-1])
  references = {"conditional": cond_id}
  if stages.reference is not None:
    target_id = ids.get("target_train")
    ref_req = run_folder.run_request(stages.reference, prior_spec, target_id, False, None, None) if target_id else None
    out.append(_expect("reference", root / "runs" / "reference", ref_req))
    references["reference"] = _id(out[-1])
  scores_req = None
  if cond_req:
    models = [{"name": "prior", "id": prior_id}, {"name": "conditional_0", "id": cond_id}]
    index = stages.score.score.index
    scores_req = (score.scores_request(pool_id, models, score.numerics_of(stages.score), within(index))
                  if not index or within(index) else None)
  scores_id = None
  if methods.needs_pool_scores(pcfg.methods):
    out.append(_expect("scores", root / "scores", scores_req, root / "scores" / formats.MANIFEST))
    scores_id = _id(out[-1])
  known = selection_stage.Known(pool_id, ids.get("target_train"), prior_id, cond_id, scores_id, nested)
  selection_ids = {}
  for name, sel in stages.selections.items():  # every artifact each stage will write, as its run builds them
    for label, folder, req in selection_stage.get(sel.stage).expected(sel, known):
      if label == "selection":
        out.append(_expect(f"selection {name}", folder, req, folder / formats.MANIFEST))
        selection_ids[name] = _id(out[-1])
      elif all(e.path != folder for e in out):  # parts shared by several selections are listed once
        out.append(_expect(label, folder, req, folder / formats.MANIFEST))
  for r in stages.runs:
    tcfg = r.config
    spec = transformer.ModelSpec.from_config(tcfg.model)
    if r.selection:
      sel_id = selection_ids[r.selection]
      req = run_folder.run_request(tcfg, spec, pool_id, False, sel_id, None) if sel_id else None
    else:
      ref_id = references[pathlib.Path(tcfg.train.rho_reference).parent.name]
      index_id = within(tcfg.data.index)
      known = pool_id and ref_id and (index_id or not tcfg.data.index)
      req = run_folder.run_request(tcfg, spec, pool_id, False, index_id, None, ref_id) if known else None
    out.append(_expect(f"target {r.name}", pathlib.Path(tcfg.workdir), req))
  return out


def _tasks_text(cfg, root: pathlib.Path, stages, tok_path) -> Expected:
  """The expected store of the tasks' rendered train examples (target=tasks with DSIR or RHO-down), known once
  its text file and the tokenizer are there."""
  path, text = stages.stores["target_train"], root / "data" / "tasks_train.jsonl"
  request = None
  if tok_path is not None and text.exists():
    request = prepare.check_inputs(corpus.prepare_config(cfg, [text], tok_path, path))[-1]
  return _expect("store target_train (task text)", path, request, path / formats.MANIFEST)


def stale(expected: list[Expected], root: pathlib.Path) -> list[tuple[Expected, str]]:
  """Artifacts that exist but were made for another request (or from inputs that are being rebuilt)."""
  out = []
  for e in expected:
    if not e.exists:
      continue
    if e.request is None:
      out.append((e, "built from inputs that are missing or stale"))
    elif e.recorded != lineage_lib.normalized(e.request):
      changed = lineage_lib.differences(e.recorded or {}, lineage_lib.normalized(e.request))
      out.append((e, f"made from other inputs or settings ({', '.join(changed) or 'no request recorded'})"))
  return out


def handle_stale(cfg, root: pathlib.Path, found: list[tuple[Expected, str]]) -> None:
  """Refuse with every stale artifact listed, or (on_stale=redo) move them to stale/<time>/ to be rebuilt."""
  if not found:
    return
  lines = "\n".join(f"  - {e.label} ({lineage_lib.relative(e.path, root)}): {why}" for e, why in found)
  if cfg.pipeline.on_stale != "redo":
    raise errors.DataError(f"{len(found)} artifact(s) in {root} are stale:\n{lines}\nRe-run with "
                           "--config.pipeline.on_stale=redo to move them to stale/ and rebuild them, or use a new "
                           "--config.workdir (nothing was changed)")
  aside = root / "stale" / time.strftime("%Y%m%d-%H%M%S")
  print(f"pipeline: moving {len(found)} stale artifact(s) to {aside} to rebuild them:\n{lines}")
  moved: list[pathlib.Path] = []
  for e, _ in found:
    paths = [e.path] + ([root / "data" / "tokenizer.request.json"] if e.label == "tokenizer" else [])
    if e.label == "data split":
      paths = [root / "data"]
    for path in paths:
      if path.exists() and not any(m in path.parents or m == path for m in moved):
        target = aside / lineage_lib.relative(path, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
        moved.append(path)


def store_sizes(stages, cfg) -> dict:
  """Sequences of the pool, of the conditional's data (target_train: the text store, or the SFT rows of a tasks
  target) and of the target text DSIR and RHO-down's reference read (target_text)."""
  pool = stores.TokenStore(stages.stores["pool"])
  sizes = {"pool": pool.num_sequences, "seq_len": pool.seq_len}
  if "target_train" in stages.stores:
    sizes["target_text"] = stores.TokenStore(stages.stores["target_train"]).num_sequences
  if cfg.pipeline.target == "tasks":
    sizes["target_train"] = sft_rows(cfg)
    sizes["sft_seq_len"] = transformer.ModelSpec.from_config(cfg.prior.model).max_seq_len
  else:
    sizes["target_train"] = sizes["target_text"]
  return sizes


def sft_rows(cfg) -> int:
  """How many SFT rows the conditional finetunes on: one per train document of each task (capped by sft.limit)."""
  if not cfg.sft.data_dir:
    return int(cfg.pipeline.target_sequences)
  total = 0
  for task in cfg.pipeline.tasks:
    path = tasks_lib.split_path(task, cfg.sft.train_split, cfg.sft.data_dir)
    if path is None:
      raise errors.DataError(f"{cfg.sft.data_dir}/{task} has no {cfg.sft.train_split!r} split; fix "
                             "--config.sft.data_dir or pipeline.tasks")
    with (gzip.open(path, "rt") if path.name.endswith(".gz") else open(path, encoding="utf-8")) as f:
      count = sum(1 for line in f if line.strip())
    total += min(count, cfg.sft.limit) if cfg.sft.limit else count
  return total


def estimated_sizes(cfg, root: pathlib.Path, stages) -> tuple[dict, str]:
  """Sequences of every store: real when the stores exist, given (pool_sequences / target_sequences), or
  estimated from the input text's size at pipeline.chars_per_token."""
  pcfg = cfg.pipeline
  if all((pathlib.Path(p) / formats.MANIFEST).exists() for p in stages.stores.values()):
    return store_sizes(stages, cfg), "from the token stores"
  seq = pcfg.seq_len
  if pcfg.pool_sequences:
    sizes = {"pool": int(pcfg.pool_sequences), "seq_len": seq, "target_train": int(pcfg.target_sequences)}
    how = "as given (pipeline.pool_sequences / target_sequences)"
  else:
    split = corpus.Split.from_config(pcfg)
    if pcfg.synthetic_docs:
      chars = {d: sum(map(len, synthetic.documents(d, pcfg.synthetic_docs, pcfg.synthetic_seed)))
               for d in synthetic.DOMAINS}
      target_names = [pathlib.Path(f).name.split(".")[0] for f in pcfg.target_files]
      target_chars = sum(c for d, c in chars.items() if d in target_names)
      pool_chars = [c for d, c in chars.items() if d not in target_names]
    else:
      target_files, pool_files = corpus.input_files(cfg, corpus.data_dir(cfg, root, create=False))
      target_chars = sum(corpus.text_chars(f) for f in target_files)
      pool_chars = [corpus.text_chars(f) for f in pool_files]
    cap = pcfg.max_chars_per_file or float("inf")
    pool_total = min(target_chars * split.pool, cap) + sum(min(c, cap) for c in pool_chars)
    to_seqs = lambda c: int(c / pcfg.chars_per_token // seq)
    sizes = {"pool": to_seqs(pool_total), "seq_len": seq, "target_train": to_seqs(target_chars * split.finetune)}
    how = f"estimated from the input text at {pcfg.chars_per_token:g} characters per token"
  if pcfg.target == "tasks":
    sizes["target_text"] = max(1, task_text_chars(cfg) // int(pcfg.chars_per_token * seq))
    sizes["target_train"] = sft_rows(cfg) or sizes["target_train"]
    sizes["sft_seq_len"] = transformer.ModelSpec.from_config(cfg.prior.model).max_seq_len
  return sizes, how


def task_text_chars(cfg) -> int:
  """Characters of the tasks' rendered train examples (the target text of DSIR and RHO-down with target=tasks);
  0 without local task files."""
  if not cfg.sft.data_dir:
    return 0
  return sum(len(tasks_lib.render_sft(task, doc)) for task in cfg.pipeline.tasks
             for doc in tasks_lib.load_docs(task, cfg.sft.train_split, cfg.sft.data_dir, limit=cfg.sft.limit or None))
