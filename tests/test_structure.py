"""The package's shape (issue 20): subpackages without import cycles, nothing importing configs/, selection methods
named only by their registry and their ranking code, and a new method that is one registry entry."""
import ast
import json
import pathlib
import re
import shutil

import numpy as np

from colorjax import methods
from colorjax.pipeline import runner
from colorjax.artifacts import scores as scores_lib
from conftest import REPO, SMALL_DEMO, make_config

PACKAGE = REPO / "colorjax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
  """module -> the colorjax modules it imports anywhere in its text (function-level imports too)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          found.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        found |= {alias.name for alias in node.names}
    graph[name] = found
  return graph


def test_no_import_cycle_and_no_configs_import():
  graph = _imports()
  assert not [m for m, deps in graph.items() if any(d == "configs" or d.startswith("configs.") for d in deps)]
  local = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
  state = {}

  def visit(module, path):
    state[module] = "open"
    for dep in local[module]:
      assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
      if dep not in state:
        visit(dep, path + [dep])
    state[module] = "done"

  for module in sorted(local):
    if module not in state:
      visit(module, [module])


def test_top_level_is_small_and_families_are_folders():
  top = sorted(p.name for p in PACKAGE.glob("*.py"))
  packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
  assert len(top) <= 15, top
  assert {"artifacts", "data", "model", "training", "pipeline", "report", "interop"} <= set(packages)


def test_every_module_is_at_most_400_lines_of_at_most_120_characters():
  long_modules = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 400}
  long_lines = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py")
                for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
  assert not long_modules and not long_lines, (long_modules, long_lines[:10])


def test_method_names_live_in_the_registry_and_their_ranking_code():
  """A method's name as a string literal appears in colorjax/ only in methods.py, its own ranking stage (dsir.py and
  the distill family write their names into their selections) and the config schema's defaults."""
  allowed = {"colorjax/methods.py", "colorjax/dsir.py", "colorjax/distill/cascade.py", "colorjax/config.py"}
  pattern = re.compile(r"""["'](%s)["']""" % "|".join(methods.REGISTRY))
  found = []
  for path in PACKAGE.rglob("*.py"):
    if str(path.relative_to(REPO)) in allowed:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Compare):  # a stage name compared (sel.stage == "dsir") is a stage, not a method
        continue
      if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(repr(node.value)):
        found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
  stage_names = {"dsir"}  # also a stage: main's table and the stage configs name it
  assert [f for f in found if f.rsplit(" ", 1)[1].strip("'") not in stage_names] == []


def test_registry_entries_are_consistent():
  assert methods.HEADLINE.ranks_scores and not methods.BASELINE.ranks_scores and methods.BASELINE.seeded
  for m in methods.REGISTRY.values():
    assert m.stage in ("select", "dsir", "distill", "train")
    assert (m.stage == "train") == bool(m.reference)
    assert set(m.shared_work) <= {"prior", "conditional", "reference", "scoring", "scoring_one",
                                     "scoring_sample"}
    assert set(m.score_columns) <= {"prior", "conditional"}


def test_a_new_selection_method_is_one_registry_entry(demo_run, tmp_path, monkeypatch):
  """docs/architecture.md "Add a selection method": one entry (here: rank by the conditional's NLL alone, under a new name) and
  the pipeline selects with it, trains its target, and reports it with its compute."""
  work = tmp_path / "work"
  shutil.copytree(demo_run[0], work, symlinks=True)
  new = methods.Method("lowest_conditional_nll", "select", ("conditional",),
                       shared_work=("prior", "conditional", "scoring_one"), plot_color="tab:olive")
  monkeypatch.setitem(methods.REGISTRY, new.name, new)
  cfg = make_config("pipeline", "demo", workdir=str(work), pipeline__methods=("color", "random", new.name),
                    **SMALL_DEMO)
  runner.run(cfg)
  report = json.loads((work / "report.json").read_text())
  (row,) = [r for r in report["runs"] if r["method"] == new.name]
  assert row["finished"] and row["target_loss"] > 0 and row["compute"]["shared"] > 0
  selection = work / "selections" / f"{new.name}-tau8"
  ids = np.load(selection / "index.npy")
  scores = scores_lib.Scores(work / "scores")
  nll = scores.read(0, scores.num_sequences)[:, scores.column("conditional_0")]
  expected = np.sort(np.argsort(nll, kind="stable")[:ids.size])
  np.testing.assert_array_equal(ids, expected)


def test_a_new_ranking_stage_is_one_module_of_four_functions(demo_run, tmp_path, monkeypatch):
  """docs/architecture.md "Add a selection stage": a stage that ranks the pool by something new (here: the most
  documents per sequence, counted by EOS tokens) is its four functions registered, and its method's entry; the
  pipeline configures, checks, plans and runs it, trains its target and reports it, and a re-run finds it up to date
  — nothing else in the package changes."""
  from colorjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from colorjax.data import stores  # pylint: disable=import-outside-toplevel
  from colorjax.pipeline import plan, preflight  # pylint: disable=import-outside-toplevel
  from colorjax.selection import artifact as selection_lib  # pylint: disable=import-outside-toplevel
  from colorjax.selection import stage as selection_stage  # pylint: disable=import-outside-toplevel

  def configure(cfg, inputs, selection):
    c = config_lib.stage_config(cfg, "eos_count")
    c.select.store, c.select.method, c.select.tau = str(inputs.pool), selection.method, selection.tau
    selection_stage.place(c, "select", selection, inputs.seq_len)
    return c

  def request(c, pool_id):
    return {"method": c.select.method, "tau": c.select.tau, "tokens": c.select.tokens, "store": pool_id}

  def expected(c, known):
    return [("selection", pathlib.Path(c.workdir), request(c, known.pool) if known.pool else None)]

  def counts(store):
    return np.concatenate([(store.read(np.arange(i, min(i + 512, store.num_sequences))) == store.eos_id).sum(axis=1)
                           for i in range(0, store.num_sequences, 512)])

  def run(c):
    store, folder = stores.TokenStore(c.select.store), pathlib.Path(c.workdir)
    if (folder / "manifest.json").exists():
      return folder
    k = selection_lib.keep_count(store.num_sequences, store.seq_len, c.select.tau, c.select.tokens, "select")
    ids = np.sort(np.argsort(-counts(store), kind="stable")[:k])
    manifest = selection_lib.manifest(request(c, store.id), c.select.method, ids, store.num_sequences, store, folder)
    return selection_lib.publish(folder, ids, manifest)

  monkeypatch.setitem(selection_stage.STAGES, "eos_count",
                      selection_stage.SelectionStage("eos_count", configure, expected, selection_stage.no_cost, run))
  monkeypatch.setitem(methods.REGISTRY, "most_documents", methods.Method("most_documents", "eos_count"))
  work = tmp_path / "work"
  shutil.copytree(demo_run[0], work, symlinks=True)
  cfg = make_config("pipeline", "demo", workdir=str(work), pipeline__methods=("color", "random", "most_documents"),
                    **SMALL_DEMO)
  runner.run(cfg)
  store = stores.TokenStore(work / "stores" / "pool")
  ids = np.load(work / "selections" / "most_documents-tau8" / "index.npy")
  np.testing.assert_array_equal(ids, np.sort(np.argsort(-counts(store), kind="stable")[:ids.size]))
  report = json.loads((work / "report.json").read_text())
  (row,) = [r for r in report["runs"] if r["method"] == "most_documents"]
  assert row["finished"] and row["target_loss"] > 0
  stages = plan.stage_configs(cfg, work)
  assert preflight.stale(preflight.lineage(cfg, work, stages), work) == []
