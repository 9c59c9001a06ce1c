"""Tests for colorjax.tasks: prompts pinned against real docs, scoring, and error messages."""
import functools
import gzip
import json
import pathlib
import sys

import pytest

from colorjax.data import tasks

SPLIT_SIZES = {
    ("piqa", "train"): 16113,
    ("piqa", "validation"): 1838,
    ("hellaswag", "train"): 39905,
    ("hellaswag", "validation"): 10042,
    ("winogrande", "train"): 40398,
    ("winogrande", "validation"): 1267,
    ("openbookqa", "train"): 4957,
    ("openbookqa", "validation"): 500,
    ("openbookqa", "test"): 500,
    ("boolq", "train"): 9427,
    ("boolq", "validation"): 3270,
    ("sciq", "validation"): 1000,
    ("arc_easy", "train"): 2251,
    ("arc_easy", "validation"): 570,
    ("arc_easy", "test"): 2376,
    ("arc_challenge", "train"): 1119,
    ("arc_challenge", "validation"): 299,
    ("arc_challenge", "test"): 1172,
}

# (contexts, continuations, gold) of docs 0 and 1 of each eval split, checked by hand
# against OLMo's downstream.py. Non-WinoGrande tasks repeat their single context per choice.
EXPECTED_FIRST_TWO = {
    "piqa": [
        (
            ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",),
            (
                " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper"
                " strips, you will also need to supply it with a water bottle and a food dish.",
                " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans"
                " material, you will also need to supply it with a water bottle and a food dish.",
            ),
            0,
        ),
        (
            ("Question: dresser\nAnswer:",),
            (" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "),
            1,
        ),
    ],
    "hellaswag": [
        (
            ("Roof shingle removal: A man is sitting on a roof. He",),
            (
                " is using wrap to wrap a pair of skis.",
                " is ripping level tiles off.",
                " is holding a rubik's cube.",
                " starts pulling up roofing on a roof.",
            ),
            3,
        ),
        (
            ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",),
            (
                " swings and lands in her arms.",
                " pulls the barbell forward.",
                " pulls a rope attached to the barbell.",
                " stands and lifts the weight over her head.",
            ),
            3,
        ),
    ],
    "winogrande": [
        (
            (
                "Sarah was a much better surgeon than Maria so Sarah",
                "Sarah was a much better surgeon than Maria so Maria",
            ),
            (" always got the easier cases.", " always got the easier cases."),
            1,
        ),
        (
            (
                "Sarah was a much better surgeon than Maria so Sarah",
                "Sarah was a much better surgeon than Maria so Maria",
            ),
            (" always got the harder cases.", " always got the harder cases."),
            0,
        ),
    ],
    "openbookqa": [
        (
            (
                "A person wants to start saving money so that they can afford a nice vacation at the end of"
                " the year. After looking over their budget and expenses, they decide the best way to save"
                " money is to",
            ),
            (
                " make more phone calls",
                " quit eating lunch out",
                " buy less with monopoly money",
                " have lunch with friends",
            ),
            1,
        ),
        (
            ("There is most likely going to be fog around:",),
            (" a marsh", " a tundra", " the plains", " a desert"),
            0,
        ),
    ],
    "boolq": [
        (
            (
                "All biomass goes through at least some of these steps: it needs to be grown, collected,"
                " dried, fermented, distilled, and burned. All of these steps require resources and an"
                " infrastructure. The total amount of energy input into the process compared to the energy"
                " released by burning the resulting ethanol fuel is known as the energy balance (or"
                " ``energy returned on energy invested''). Figures compiled in a 2007 report by National"
                " Geographic Magazine point to modest results for corn ethanol produced in the US: one unit"
                " of fossil-fuel energy is required to create 1.3 energy units from the resulting ethanol."
                " The energy balance for sugarcane ethanol produced in Brazil is more favorable, with one"
                " unit of fossil-fuel energy required to create 8 from the ethanol. Energy balance"
                " estimates are not easily produced, thus numerous such reports have been generated that"
                " are contradictory. For instance, a separate survey reports that production of ethanol"
                " from sugarcane, which requires a tropical climate to grow productively, returns from 8 to"
                " 9 units of energy for each unit expended, as compared to corn, which only returns about"
                " 1.34 units of fuel energy for each unit of energy expended. A 2006 University of"
                " California Berkeley study, after analyzing six separate studies, concluded that producing"
                " ethanol from corn uses much less petroleum than producing gasoline.\nQuestion: does"
                " ethanol take more energy make that produces?\nAnswer:",
            ),
            (" yes", " no"),
            1,
        ),
        (
            (
                "Property tax or 'house tax' is a local tax on buildings, along with appurtenant land. It"
                " is and imposed on the Possessor (not the custodian of property as per 1978, 44th"
                " amendment of constitution). It resembles the US-type wealth tax and differs from the"
                " excise-type UK rate. The tax power is vested in the states and is delegated to local"
                " bodies, specifying the valuation method, rate band, and collection procedures. The tax"
                " base is the annual rental value (ARV) or area-based rating. Owner-occupied and other"
                " properties not producing rent are assessed on cost and then converted into ARV by"
                " applying a percentage of cost, usually four percent. Vacant land is generally exempt."
                " Central government properties are exempt. Instead a 'service charge' is permissible under"
                " executive order. Properties of foreign missions also enjoy tax exemption without"
                " requiring reciprocity. The tax is usually accompanied by service taxes, e.g., water tax,"
                " drainage tax, conservancy (sanitation) tax, lighting tax, all using the same tax base."
                " The rate structure is flat on rural (panchayat) properties, but in the urban (municipal)"
                " areas it is mildly progressive with about 80% of assessments falling in the first two"
                " brackets.\nQuestion: is house tax and property tax are same?\nAnswer:",
            ),
            (" yes", " no"),
            0,
        ),
    ],
    "sciq": [
        (
            ("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:",),
            (" Linnaeus", " shaw", " Scopes", " darwin"),
            3,
        ),
        (
            ("\nQuestion: Each specific polypeptide has a unique linear sequence of which acids?\nAnswer:",),
            (" fatty", " lactic", " hydrochloric", " amino"),
            3,
        ),
    ],
    "arc_easy": [
        (
            (
                "Question: Which statement best explains why photosynthesis is the foundation of most food"
                " webs?\nAnswer:",
            ),
            (
                " Sunlight is the source of energy for nearly all ecosystems.",
                " Most ecosystems are found on land instead of in water.",
                " Carbon dioxide is more available than other gases.",
                " The producers in all ecosystems are plants.",
            ),
            0,
        ),
        (
            (
                "Question: Which piece of safety equipment is used to keep mold spores from entering the"
                " respiratory system?\nAnswer:",
            ),
            (" safety goggles", " breathing mask", " rubber gloves", " lead apron"),
            1,
        ),
    ],
    "arc_challenge": [
        (
            (
                "Question: An astronomer observes that a planet rotates faster after a meteorite impact."
                " Which is the most likely effect of this increase in rotation?\nAnswer:",
            ),
            (
                " Planetary density will decrease.",
                " Planetary years will become longer.",
                " Planetary days will become shorter.",
                " Planetary gravity will become stronger.",
            ),
            2,
        ),
        (
            (
                "Question: A group of engineers wanted to know how different building designs would respond"
                " during an earthquake. They made several models of buildings and tested each for its"
                " ability to withstand earthquake conditions. Which will most likely result from testing"
                " different building designs?\nAnswer:",
            ),
            (
                " buildings will be built faster",
                " buildings will be made safer",
                " building designs will look nicer",
                " building materials will be cheaper",
            ),
            1,
        ),
    ],
}

# render_sft of train doc 0 (BoolQ: doc 124, a short passage whose answer is False).
EXPECTED_SFT = {
    ("piqa", 0): "Question: When boiling butter, when it's ready, you can\nAnswer: Pour it into a jar",
    ("hellaswag", 0): (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a"
        " woman wearing winter clothes smiles. Then , the man continues removing the snow on his car."
    ),
    ("winogrande", 0): (
        "Ian volunteered to eat Dennis's menudo after already having a bowl because Dennis despised eating"
        " intestine."
    ),
    ("openbookqa", 0): "The sun is responsible for plants sprouting, blooming and wilting",
    ("boolq", 124): (
        "The cancellation of The Border was announced by the CBC after three seasons were aired.\n"
        "Question: is there going to be a season 4 of the border?\nAnswer: no"
    ),
    ("arc_easy", 0): "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:"
    " a bacterial population in the bloodstream",
    ("arc_challenge", 0): (
        "Question: George wants to warm his hands quickly by rubbing them. Which skin surface will produce"
        " the most heat?\nAnswer: dry palms"
    ),
}


@pytest.fixture(scope="session")
def task_dir(data_dir):
  return data_dir / "tasks"


@functools.lru_cache(maxsize=None)
def _docs(task_dir: pathlib.Path, task: str, split: str) -> tuple[dict, ...]:
  return tuple(tasks.load_docs(task, split, task_dir))


def _eval_docs(task_dir, task):
  return _docs(task_dir, task, tasks.EVAL_SPLIT[task])


def _example(task, contexts, continuations, gold=0):
  return tasks.MCExample(task, 0, tuple(contexts), tuple(continuations), gold)


# Constants.


def test_task_constants():
  assert tasks.TASK_NAMES == (
      "piqa", "hellaswag", "winogrande", "openbookqa", "boolq", "sciq", "arc_easy", "arc_challenge"
  )
  assert tasks.EVAL_SPLIT == {
      "piqa": "validation",
      "hellaswag": "validation",
      "winogrande": "validation",
      "openbookqa": "test",
      "boolq": "validation",
      "sciq": "validation",
      "arc_easy": "test",
      "arc_challenge": "test",
  }
  len_norm = {t for t, m in tasks.METRIC.items() if m == "len_norm"}
  assert len_norm == {"piqa", "hellaswag", "openbookqa", "arc_challenge"}
  assert set(tasks.METRIC.values()) == {"acc", "len_norm"} and set(tasks.METRIC) == set(tasks.TASK_NAMES)


def test_train_tasks_offline_has_no_sciq(task_dir):
  assert tasks.train_tasks(task_dir) == (
      "piqa", "hellaswag", "winogrande", "openbookqa", "boolq", "arc_easy", "arc_challenge"
  )
  assert tasks.train_tasks(str(task_dir)) == tasks.train_tasks(task_dir)


# Real data: sizes and pinned prompts.


@pytest.mark.parametrize("task,split", sorted(SPLIT_SIZES))
def test_split_sizes(task_dir, task, split):
  assert len(_docs(task_dir, task, split)) == SPLIT_SIZES[(task, split)]


def test_available_splits_match_readme(task_dir):
  for task in tasks.TASK_NAMES:
    expected = tuple(sorted(s for t, s in SPLIT_SIZES if t == task))
    assert tasks.available_splits(task, task_dir) == expected


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_first_two_eval_docs_render_exactly(task_dir, task):
  docs = tasks.load_docs(task, tasks.EVAL_SPLIT[task], task_dir, limit=2)
  assert len(docs) == 2
  for doc_id, (doc, (contexts, continuations, gold)) in enumerate(zip(docs, EXPECTED_FIRST_TWO[task])):
    example = tasks.render(task, doc, doc_id)
    if task != "winogrande":
      contexts = contexts * len(continuations)
    assert example == tasks.MCExample(task, doc_id, contexts, continuations, gold)


def test_limit_reads_a_prefix_in_file_order(task_dir):
  head = tasks.load_docs("piqa", "validation", task_dir, limit=3)
  assert head == list(_eval_docs(task_dir, "piqa")[:3])
  assert tasks.load_docs("piqa", "validation", task_dir, limit=0) == []


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_every_eval_continuation_starts_with_space(task_dir, task):
  for doc_id, doc in enumerate(_eval_docs(task_dir, task)):
    example = tasks.render(task, doc, doc_id)
    assert len(example.contexts) == len(example.continuations) >= 2
    assert 0 <= example.gold < len(example.continuations)
    for continuation in example.continuations:
      assert continuation.startswith(" "), (task, doc_id, continuation)


@pytest.mark.parametrize("task", [t for t in tasks.TASK_NAMES if t != "winogrande"])
def test_gold_and_choices_agree_with_olmes_crosscheck(task_dir, task):
  """The stored OLMES fields use other prompts, but the same answers, gold and (for HellaSwag) query."""
  for doc_id, doc in enumerate(_eval_docs(task_dir, task)):
    example = tasks.render(task, doc, doc_id)
    assert example.gold == doc["olmes"]["gold"], doc_id
    assert example.continuations == tuple(" " + c for c in doc["olmes"]["choices"]), doc_id
    if task == "hellaswag":
      assert example.contexts[0] == doc["olmes"]["query"], doc_id


# Edge cases.


def test_winogrande_real_doc_contexts_differ_and_continuation_is_shared(task_dir):
  doc = _eval_docs(task_dir, "winogrande")[0]
  assert doc["sentence"] == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
  example = tasks.render("winogrande", doc, 0)
  assert example.contexts[0] != example.contexts[1]
  assert example.contexts[0].endswith(" so Sarah") and example.contexts[1].endswith(" so Maria")
  assert example.continuations[0] == example.continuations[1] == " always got the easier cases."
  assert example.gold == 1
  sft = "Sarah was a much better surgeon than Maria so Maria always got the easier cases."
  assert tasks.render_sft("winogrande", doc) == sft


def test_winogrande_continuation_is_stripped_then_spaced():
  doc = {"sentence": "A _   rest  ", "option1": "x", "option2": "y", "answer": "1"}
  example = tasks.render("winogrande", doc)
  assert example.contexts == ("A x", "A y")
  assert example.continuations == (" rest", " rest")
  assert example.gold == 0


def test_hellaswag_clean_constructed_strings():
  assert tasks.hellaswag_clean("  a man [title] opens a door.  ") == "a man. opens a door."
  assert tasks.hellaswag_clean("[header] How to cook [title] Rinse it.") == " How to cook. Rinse it."
  assert tasks.hellaswag_clean("one  two") == "one two"
  assert tasks.hellaswag_clean("drop [step] this [substeps] and that") == "drop this and that"
  # One pass only, exactly as OLMo: three spaces collapse to two, not one.
  assert tasks.hellaswag_clean("a   b") == "a  b"


def test_hellaswag_raw_hf_doc_uses_ctx_a_ctx_b_and_cleans():
  doc = {
      "activity_label": "Roof shingle removal",
      "ctx_a": "A man is sitting on a roof.",
      "ctx_b": "he",
      "ctx": "ignored when ctx_a/ctx_b exist",
      "endings": ["is using wrap  to wrap.", "[header] rips tiles [title] off.", "x", "y"],
      "label": "1",
  }
  example = tasks.render("hellaswag", doc, 7)
  assert example.contexts == ("Roof shingle removal: A man is sitting on a roof. He",) * 4
  # "[header] rips" -> " rips" after strip-then-drop: OLMo scored a double space here.
  assert example.continuations == (" is using wrap to wrap.", "  rips tiles. off.", " x", " y")
  assert example.gold == 1


def test_hellaswag_offline_doc_is_not_cleaned_twice(task_dir):
  """Offline ctx/endings are OLMo's clean() output already; cleaning again would drop a space."""
  doc = _eval_docs(task_dir, "hellaswag")[3868]
  assert doc["endings"][1] == " This is called a ductwork screw. Pop it out of the way and pull the top back."
  example = tasks.render("hellaswag", doc, 3868)
  assert example.continuations[1] == (
      "  This is called a ductwork screw. Pop it out of the way and pull the top back."
  )
  assert example.contexts[0] == (
      "Computers and Electronics: How to unjam a vcr. Check to make sure it's plugged in. If its still"
      " jammed, go to step 2. Unplug the vcr. Unscrew any screw that is holding the top on the unit."
  )
  # A raw HF doc whose ending starts with "[header]" renders to the same strings.
  raw = dict(doc, ctx_a=doc["ctx"], ctx_b="", endings=["[header]" + e for e in doc["endings"]])
  assert tasks.render("hellaswag", raw, 3868) == example


def test_arc_numeric_answer_keys_map_to_letters():
  doc = {
      "question": "Pick three.",
      "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]},
      "answerKey": "3",
  }
  for task in ("arc_easy", "arc_challenge"):
    example = tasks.render(task, doc, 5)
    assert example.gold == 2
    assert example.contexts == ("Question: Pick three.\nAnswer:",) * 4
    assert example.continuations == (" one", " two", " three", " four")
  assert tasks.render_sft("arc_easy", doc) == "Question: Pick three.\nAnswer: three"
  assert doc["answerKey"] == "3"  # OLMo rewrote the doc in place; rendering here must not.
  with pytest.raises(ValueError, match="arc_easy doc 9"):
    tasks.render("arc_easy", dict(doc, answerKey="5"), 9)  # E is out of range for 4 choices.


def test_arc_five_choices_gold_e():
  doc = {"question": "q", "choices": {"text": list("abcde"), "label": list("ABCDE")}, "answerKey": "E"}
  assert tasks.render("arc_challenge", doc).gold == 4


def test_sciq_empty_support_keeps_leading_newline_like_olmo(task_dir):
  doc = _eval_docs(task_dir, "sciq")[0]
  assert doc["support"] == ""
  context = tasks.render("sciq", doc).contexts[0]
  assert context == "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"


def test_sciq_support_is_stripped_and_joined(task_dir):
  doc = _eval_docs(task_dir, "sciq")[246]
  example = tasks.render("sciq", doc, 246)
  assert example.contexts[0] == (
      "if the salt produced is an acidic salt.\n"
      "Question: Most living things build proteins from the same 20 different what?\nAnswer:"
  )
  assert example.continuations == (" uncommon acids", " atomic isolates", " acid peptides", " amino acids")
  assert example.gold == 3
  padded = dict(doc, support="  if the salt produced is an acidic salt. \n")
  assert tasks.render("sciq", padded).contexts == example.contexts


def test_boolq_false_answer_is_gold_no(task_dir):
  doc = _eval_docs(task_dir, "boolq")[0]
  assert doc["answer"] is False
  assert tasks.render("boolq", doc).gold == 1
  constructed = {"passage": "P.", "question": "is it", "answer": True}
  example = tasks.render("boolq", constructed)
  assert example.contexts == ("P.\nQuestion: is it?\nAnswer:",) * 2
  assert example.continuations == (" yes", " no") and example.gold == 0
  assert tasks.render("boolq", dict(constructed, answer=False)).gold == 1


def test_openbookqa_and_piqa_constructed():
  choices = {"text": list("abcd"), "label": list("ABCD")}
  obqa = {"question_stem": "Stem", "choices": choices, "answerKey": " C "}  # OLMo strips the key.
  assert tasks.render("openbookqa", obqa) == _example("openbookqa", ["Stem"] * 4, [" a", " b", " c", " d"], 2)
  piqa = {"goal": "g", "sol1": "s1", "sol2": "s2", "label": 1}
  assert tasks.render_sft("piqa", piqa) == "Question: g\nAnswer: s2"


@pytest.mark.parametrize("task,doc_id", sorted(EXPECTED_SFT))
def test_render_sft_on_train_docs(task_dir, task, doc_id):
  doc = tasks.load_docs(task, "train", task_dir, limit=doc_id + 1)[doc_id]
  assert tasks.render_sft(task, doc) == EXPECTED_SFT[(task, doc_id)]


# Scoring.


def test_choice_score():
  assert tasks.choice_score("acc", -6.0, " abc") == -6.0
  assert tasks.choice_score("len_norm", -6.0, " abc") == -2.0
  assert tasks.choice_score("len_norm", -6.0, "abc") == -2.0
  assert tasks.choice_score("len_norm", -6.0, "  abc") == -1.5  # Only the one leading space is excluded.
  assert tasks.choice_score("len_norm", -6.0, " ") == -6.0  # Zero characters: no division by zero.
  with pytest.raises(ValueError, match="unknown metric 'bpb'"):
    tasks.choice_score("bpb", -1.0, " a")


def test_len_norm_flips_an_acc_decision():
  # Choice 1 has the larger total log-prob but the smaller per-character log-prob.
  arc_easy = _example("arc_easy", ["Q"] * 2, [" a long answer", " no"], gold=0)  # acc
  arc_challenge = _example("arc_challenge", ["Q"] * 2, [" a long answer", " no"], gold=0)  # len_norm
  logprobs = [[-13.0, -6.0]]
  assert tasks.accuracy("arc_easy", [arc_easy], logprobs) == 0.0
  assert tasks.accuracy("arc_challenge", [arc_challenge], logprobs) == 1.0


def test_accuracy_mean_and_ties_go_to_lowest_index():
  examples = [
      _example("boolq", ["c"] * 2, [" yes", " no"], gold=0),
      _example("boolq", ["c"] * 2, [" yes", " no"], gold=1),
      _example("boolq", ["c"] * 2, [" yes", " no"], gold=1),
      _example("boolq", ["c"] * 2, [" yes", " no"], gold=0),
  ]
  logprobs = [[-1.0, -2.0], [-3.0, -1.0], [-1.0, -1.0], [-2.0, -2.0]]
  assert tasks.accuracy("boolq", examples, logprobs) == pytest.approx(0.75)


def test_accuracy_rejects_mismatched_inputs():
  example = _example("boolq", ["c"] * 2, [" yes", " no"])
  with pytest.raises(ValueError, match="1 examples but 2 rows"):
    tasks.accuracy("boolq", [example], [[0.0, 0.0], [0.0, 0.0]])
  with pytest.raises(ValueError, match="3 log-probs for 2 choices"):
    tasks.accuracy("boolq", [example], [[0.0, 0.0, 0.0]])
  with pytest.raises(ValueError, match="zero examples"):
    tasks.accuracy("boolq", [], [])


# Errors.


def test_unknown_task_lists_valid_names(task_dir):
  for call in (
      lambda: tasks.load_docs("hellaswagg", "validation", task_dir),
      lambda: tasks.render("hellaswagg", {}),
      lambda: tasks.accuracy("hellaswagg", [], []),
  ):
    with pytest.raises(ValueError, match="unknown task 'hellaswagg'") as info:
      call()
    assert all(name in str(info.value) for name in tasks.TASK_NAMES)


def test_missing_split_names_path_and_existing_splits(task_dir):
  with pytest.raises(FileNotFoundError) as info:
    tasks.load_docs("sciq", "train", task_dir)
  message = str(info.value)
  assert str(task_dir / "sciq" / "train.jsonl.gz") in message
  assert "validation" in message and "data_dir" in message


def test_missing_task_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no"):
    tasks.load_docs("piqa", "train", tmp_path)
  assert tasks.train_tasks(tmp_path) == ()


def _write(path: pathlib.Path, lines: list[str]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  text = "".join(line + "\n" for line in lines)
  if path.name.endswith(".gz"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("name", ["validation.jsonl.gz", "validation.jsonl"])
def test_corrupt_json_names_file_and_line(tmp_path, name):
  path = tmp_path / "piqa" / name
  good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})
  _write(path, [good, good, '{"goal": "g", "sol1": '])
  with pytest.raises(ValueError, match="line 3: invalid JSON") as info:
    tasks.load_docs("piqa", "validation", tmp_path)
  assert str(path) in str(info.value)
  assert len(tasks.load_docs("piqa", "validation", tmp_path, limit=2)) == 2


def test_plain_jsonl_is_accepted_and_non_objects_rejected(tmp_path):
  doc = {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}
  _write(tmp_path / "piqa" / "train.jsonl", [json.dumps(doc)])
  assert tasks.load_docs("piqa", "train", tmp_path) == [doc]
  assert tasks.train_tasks(tmp_path) == ("piqa",)
  _write(tmp_path / "piqa" / "validation.jsonl", ["[1, 2]"])
  with pytest.raises(ValueError, match="line 1: expected a JSON object"):
    tasks.load_docs("piqa", "validation", tmp_path)


def test_not_gzip_names_file(tmp_path):
  path = tmp_path / "boolq" / "validation.jsonl.gz"
  path.parent.mkdir()
  path.write_bytes(b"this is not gzip")
  with pytest.raises(ValueError, match="unreadable") as info:
    tasks.load_docs("boolq", "validation", tmp_path)
  assert str(path) in str(info.value)


def test_hf_loading_without_datasets_says_how_to_fix(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match="pip install datasets") as info:
    tasks.load_docs("piqa", "validation")
  assert "data_dir" in str(info.value)


def test_hf_sources_cover_every_task():
  assert set(tasks.HF_SOURCES) == set(tasks.TASK_NAMES)
  assert tasks.HF_SOURCES["winogrande"] == ("allenai/winogrande", "winogrande_xl")
  assert tasks.HF_SOURCES["arc_challenge"] == ("allenai/ai2_arc", "ARC-Challenge")


@pytest.mark.parametrize(
    "task,doc,match",
    [
        ("piqa", {"goal": "g", "sol1": "a", "label": 0}, "piqa doc 4: missing field 'sol2'"),
        ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, "doc 4"),
        ("winogrande", {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}, "gold 2 is not"),
        ("openbookqa", {"question_stem": "s", "choices": {"text": ["a"] * 4}, "answerKey": "F"}, "doc 4"),
        ("boolq", {"passage": "p", "question": "q", "answer": "yes"}, "answer must be a bool"),
        ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": -1}, "gold -1 is not a valid"),
        ("hellaswag", {"activity_label": "a", "ctx": "c", "endings": ["x"] * 4, "label": "z"}, "doc 4"),
    ],
)
def test_render_rejects_bad_docs_naming_task_and_doc(task, doc, match):
  with pytest.raises(ValueError, match=match) as info:
    tasks.render(task, doc, 4)
  assert str(info.value).startswith(f"{task} doc 4: ")


def test_empty_split_file_is_named_not_evaluated_as_zero_examples(tmp_path):
  _write(tmp_path / "piqa" / "validation.jsonl.gz", [])
  with pytest.raises(tasks.MissingTaskData, match="holds no documents") as info:
    tasks.load_docs("piqa", "validation", tmp_path, setting="--config.eval.tasks_dir")
  assert str(tmp_path / "piqa" / "validation.jsonl.gz") in str(info.value)
  assert "--config.eval.tasks_dir" in str(info.value)
