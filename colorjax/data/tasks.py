"""Downstream multiple-choice tasks: loading, prompt rendering, and scoring.

Prompts follow the original OLMo in-loop evaluation (`olmo/eval/downstream.py`
in the CoLoR-Filter fork of OLMo), not the newer OLMES prompts stored in each
offline doc's `olmes` field, so accuracies are comparable with the paper.
"""
import dataclasses
import gzip
import itertools
import json
import os
import pathlib
import re
from typing import Any, Callable

from colorjax import errors

TASK_NAMES = (
    "piqa",
    "hellaswag",
    "winogrande",
    "openbookqa",
    "boolq",
    "sciq",
    "arc_easy",
    "arc_challenge",
)

EVAL_SPLIT = {
    "piqa": "validation",
    "hellaswag": "validation",
    "winogrande": "validation",
    "openbookqa": "test",
    "boolq": "validation",
    "sciq": "validation",  # The paper used test; the offline copy has none.
    "arc_easy": "test",
    "arc_challenge": "test",
}

METRIC = {
    "piqa": "len_norm",
    "hellaswag": "len_norm",
    "winogrande": "acc",
    "openbookqa": "len_norm",
    "boolq": "acc",
    "sciq": "acc",
    "arc_easy": "acc",
    "arc_challenge": "len_norm",
}

HF_SOURCES = {
    "piqa": ("ybisk/piqa", None),
    "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "openbookqa": ("allenai/openbookqa", "main"),
    "boolq": ("google/boolq", None),
    "sciq": ("allenai/sciq", None),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
}

_SUFFIXES = (".jsonl.gz", ".jsonl")
_ARC_NUM_TO_LETTER = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


@dataclasses.dataclass(frozen=True)
class MCExample:
  """One rendered doc: choice i is scored as log p(continuations[i] | contexts[i])."""

  task: str
  doc_id: int
  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  gold: int


def check_task(task: str) -> None:
  """Fails early with the valid names, so a typo never reaches the data layer."""
  if task not in TASK_NAMES:
    raise errors.ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")


def split_path(task: str, split: str, data_dir: str | os.PathLike) -> pathlib.Path | None:
  """The existing `<data_dir>/<task>/<split>.jsonl[.gz]` file, or None."""
  folder = pathlib.Path(data_dir) / task
  for suffix in _SUFFIXES:
    path = folder / f"{split}{suffix}"
    if path.is_file():
      return path
  return None


def available_splits(task: str, data_dir: str | os.PathLike) -> tuple[str, ...]:
  """Splits present on disk for a task, for error messages and train_tasks."""
  folder = pathlib.Path(data_dir) / task
  if not folder.is_dir():
    return ()
  names = set()
  for path in folder.iterdir():
    for suffix in _SUFFIXES:
      if path.is_file() and path.name.endswith(suffix):
        names.add(path.name[: -len(suffix)])
        break
  return tuple(sorted(names))


class MissingTaskData(errors.DataError, FileNotFoundError):
  """A task split is not on disk: a DataError (main reports it cleanly) that callers may catch as FileNotFoundError."""


class DatasetsMissing(errors.ConfigError, ImportError):
  """HuggingFace loading was asked for without `datasets`: fixable by config, catchable as ImportError."""


DIR_SETTINGS = "--config.eval.tasks_dir (evaluation) or --config.sft.data_dir (finetuning)"


def default_dir() -> str | None:
  """The offline task folder used when none is configured ($COLORJAX_DATA/tasks or ../shared/data/tasks); None
  means HuggingFace."""
  from colorjax.data import stores  # pylint: disable=import-outside-toplevel
  return stores.shared_dir("tasks")


def _missing_file_error(task: str, split: str, data_dir: str | os.PathLike, setting: str) -> MissingTaskData:
  folder = pathlib.Path(data_dir) / task
  looked = folder / f"{split}.jsonl.gz"
  splits = available_splits(task, data_dir)
  if splits:
    found = f"splits present in {folder}: {', '.join(splits)}"
  else:
    found = f"{folder} holds no <split>.jsonl[.gz] files"
  return MissingTaskData(
      f"no {split!r} split for task {task!r}: looked for {looked} (or .jsonl); {found}. "
      f"Pass a split that exists or point {setting or DIR_SETTINGS} at the folder holding <task>/<split>.jsonl.gz; "
      "empty loads from HuggingFace (evaluation and the pipeline first try $COLORJAX_DATA/tasks, ../shared/data/tasks)."
  )


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
  """Reads JSON objects one per line, in file order, so line i is doc_id i."""
  path = pathlib.Path(path)
  opener = gzip.open if path.name.endswith(".gz") else open
  docs = []
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if limit is not None and len(docs) >= limit:
          break
        try:
          doc = json.loads(line)
        except json.JSONDecodeError as e:
          raise errors.DataError(
              f"{path}: line {lineno}: invalid JSON ({e.msg}); the file is corrupt, re-create it"
          ) from e
        if not isinstance(doc, dict):
          raise errors.DataError(f"{path}: line {lineno}: expected a JSON object, got {type(doc).__name__}")
        docs.append(doc)
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise errors.DataError(
        f"{path}: unreadable ({e}); expected UTF-8 JSONL (gzip if named .gz), re-create the file"
    ) from e
  return docs


def load_hf_docs(task: str, split: str, limit: int | None = None, setting: str = "") -> list[dict]:
  """Loads a split from the HuggingFace hub; `datasets` is optional, hence the lazy import."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetsMissing(
        f"loading task {task!r} from HuggingFace (no task folder given) needs the `datasets` package: set "
        f"{setting or DIR_SETTINGS} to the folder holding <task>/<split>.jsonl.gz, or `pip install datasets`"
    ) from e
  path, name = HF_SOURCES[task]
  dataset = datasets.load_dataset(path, name, split=split)
  return [dict(row) for row in itertools.islice(dataset, limit)]


def load_docs(
    task: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    setting: str = "",
) -> list[dict]:
  """Raw docs of one split in dataset order (list index == doc_id); `setting` is the config flag that set
  data_dir, named by the errors (default: both task-folder flags)."""
  check_task(task)
  if data_dir is None:
    return load_hf_docs(task, split, limit, setting)
  path = split_path(task, split, data_dir)
  if path is None:
    raise _missing_file_error(task, split, data_dir, setting)
  docs = read_jsonl(path, limit)
  if not docs and limit != 0:
    raise MissingTaskData(f"{path} holds no documents (an interrupted download?); re-create it, or point "
                          f"{setting or DIR_SETTINGS} at a folder with a complete <task>/<split>.jsonl.gz")
  return docs


def train_tasks(data_dir: str | os.PathLike) -> tuple[str, ...]:
  """Tasks with a train split on disk (offline: all but SciQ), in TASK_NAMES order."""
  return tuple(t for t in TASK_NAMES if split_path(t, "train", data_dir) is not None)


def hellaswag_clean(text: str) -> str:
  """OLMo's HellaSwag `preprocess`: strips WikiHow bracket artifacts."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def _spaced(choices: list[str]) -> tuple[str, ...]:
  return tuple(" " + c for c in choices)


_Rendered = tuple[tuple[str, ...], tuple[str, ...], int]


def _piqa(doc: dict) -> _Rendered:
  context = "Question: " + doc["goal"] + "\nAnswer:"
  return (context, context), _spaced([doc["sol1"], doc["sol2"]]), doc["label"]


def _hellaswag(doc: dict) -> _Rendered:
  """Raw HF docs (ctx_a/ctx_b) are cleaned as OLMo did; offline docs are already clean.

  clean() is not idempotent (it strips before dropping brackets, so "[header] Foo"
  becomes " Foo"), so re-cleaning the offline `ctx`/`endings` would change the
  strings OLMo scored (the leading space of ~48% of validation docs' endings).
  """
  if "ctx_a" in doc and "ctx_b" in doc:
    context = hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    endings = [hellaswag_clean(e) for e in doc["endings"]]
  else:
    context = doc["activity_label"] + ": " + doc["ctx"]
    endings = list(doc["endings"])
  continuations = _spaced(endings)
  return (context,) * len(continuations), continuations, int(doc["label"])


def _winogrande(doc: dict) -> _Rendered:
  sentence = doc["sentence"]
  i = sentence.index("_")
  contexts = (sentence[:i] + doc["option1"], sentence[:i] + doc["option2"])
  continuation = " " + sentence[i + 1 :].strip()
  return contexts, (continuation, continuation), int(doc["answer"]) - 1


def _openbookqa(doc: dict) -> _Rendered:
  continuations = _spaced(doc["choices"]["text"])
  gold = ["A", "B", "C", "D"].index(doc["answerKey"].strip())
  return (doc["question_stem"],) * len(continuations), continuations, gold


def _boolq(doc: dict) -> _Rendered:
  answer = doc["answer"]
  if not isinstance(answer, bool):
    raise ValueError(f"answer must be a bool, got {answer!r}")
  context = doc["passage"] + "\nQuestion: " + doc["question"] + "?\nAnswer:"
  return (context, context), (" yes", " no"), 0 if answer else 1


def _sciq(doc: dict) -> _Rendered:
  context = doc["support"].strip() + "\nQuestion: " + doc["question"] + "\nAnswer:"
  choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
  return (context,) * 4, _spaced(choices), 3


def _arc(doc: dict) -> _Rendered:
  context = "Question: " + doc["question"] + "\nAnswer:"
  continuations = _spaced(doc["choices"]["text"])
  key = _ARC_NUM_TO_LETTER.get(doc["answerKey"], doc["answerKey"])
  gold = ["A", "B", "C", "D", "E"].index(key)
  return (context,) * len(continuations), continuations, gold


_RENDERERS: dict[str, Callable[[dict], _Rendered]] = {
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "openbookqa": _openbookqa,
    "boolq": _boolq,
    "sciq": _sciq,
    "arc_easy": _arc,
    "arc_challenge": _arc,
}


def render(task: str, doc: dict[str, Any], doc_id: int = 0) -> MCExample:
  """The zero-shot contexts/continuations/gold of one doc, exactly as OLMo scored them."""
  check_task(task)
  try:
    contexts, continuations, gold = _RENDERERS[task](doc)
  except KeyError as e:
    raise errors.DataError(f"{task} doc {doc_id}: missing field {e}") from e
  except (ValueError, TypeError, AttributeError, IndexError) as e:
    raise errors.DataError(f"{task} doc {doc_id}: cannot render ({e})") from e
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(continuations):
    n = len(continuations)
    raise errors.DataError(f"{task} doc {doc_id}: gold {gold!r} is not a valid index into {n} choices")
  return MCExample(task, doc_id, tuple(contexts), tuple(continuations), gold)


def render_sft(task: str, doc: dict[str, Any]) -> str:
  """Finetuning text: the gold choice's context immediately followed by its continuation."""
  example = render(task, doc)
  return example.contexts[example.gold] + example.continuations[example.gold]


def choice_score(metric: str, logprob_sum: float, continuation: str) -> float:
  """Per-choice score; len_norm divides by characters after the leading space, as OLMo did."""
  if metric == "acc":
    return logprob_sum
  if metric == "len_norm":
    n_chars = len(continuation[1:] if continuation.startswith(" ") else continuation)
    return logprob_sum / max(n_chars, 1)
  raise ValueError(f"unknown metric {metric!r}; expected 'acc' or 'len_norm'")


def predict(metric: str, example: MCExample, logprob_sums: list[float]) -> int:
  """Argmax choice; ties go to the lowest index, like torch.argmax."""
  if len(logprob_sums) != len(example.continuations):
    raise ValueError(
        f"{example.task} doc {example.doc_id}: {len(logprob_sums)} log-probs for "
        f"{len(example.continuations)} choices"
    )
  scores = [choice_score(metric, lp, c) for lp, c in zip(logprob_sums, example.continuations)]
  return max(range(len(scores)), key=lambda i: (scores[i], -i))


def accuracy(task: str, examples: list[MCExample], logprob_sums: list[list[float]]) -> float:
  """Fraction of examples whose argmax choice (under the task's metric) is gold."""
  check_task(task)
  if len(examples) != len(logprob_sums):
    raise ValueError(f"{task}: {len(examples)} examples but {len(logprob_sums)} rows of log-probs")
  if not examples:
    raise ValueError(f"{task}: accuracy of zero examples is undefined")
  metric = METRIC[task]
  correct = sum(predict(metric, ex, lps) == ex.gold for ex, lps in zip(examples, logprob_sums))
  return correct / len(examples)
