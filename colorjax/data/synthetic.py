"""The embedded default data: a seeded synthetic corpus of distinguishable text domains and a locally trained BPE.

It lets the first README command run the whole method with no downloads. Each domain has its own vocabulary and
sentence templates (recipes, sports reports, code, legal clauses, weather bulletins, fairy tales); they share
English function words, numbers and punctuation, so the models must learn which domain a sequence is in.
"""
import gzip
import json
import pathlib

import numpy as np

from colorjax import errors

NAMES = ["Anna", "Boris", "Chen", "Dara", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena"]
ANIMALS = ["fox", "owl", "bear", "wolf", "hare", "crow", "otter", "badger", "deer", "mouse"]
PLACES = ["the dark forest", "a quiet village", "the old mill", "the frozen lake", "a castle on the hill",
          "the deep cave", "the king's garden", "a little cottage"]
OBJECTS = ["a golden key", "a silver bell", "a magic stone", "an old map", "a red cloak", "a wooden flute"]
FEELINGS = ["afraid", "curious", "brave", "tired", "happy", "lonely", "angry", "wise"]
INGREDIENTS = ["flour", "sugar", "butter", "eggs", "milk", "salt", "garlic", "onions", "tomatoes", "rice", "basil"]
UNITS = ["cups", "grams", "tablespoons", "teaspoons", "pinches"]
COOK_VERBS = ["Mix", "Stir", "Whisk", "Fold", "Chop", "Season", "Simmer", "Bake", "Fry", "Roast"]
TEAMS = ["Tigers", "Eagles", "Sharks", "Wolves", "Falcons", "Bears", "Rangers", "Comets"]
SPORT_VERBS = ["beat", "edged", "crushed", "defeated", "tied with", "lost to"]
FUNCS = ["compute", "parse", "load", "merge", "update", "render", "filter", "encode"]
NOUNS = ["items", "rows", "config", "buffer", "tokens", "records", "state", "index"]
PARTIES = ["the Tenant", "the Landlord", "the Buyer", "the Seller", "the Contractor", "the Company"]
LEGAL_VERBS = ["shall indemnify", "shall notify", "may terminate", "shall pay", "shall not assign", "warrants to"]
REGIONS = ["the north coast", "the valley", "the capital", "the mountains", "the southern plains", "the islands"]
SKIES = ["sunny", "cloudy", "rainy", "foggy", "stormy", "windy", "snowy"]


def _story(rng):
  name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
  sentences = [f"Once upon a time, a {rng.choice(FEELINGS)} {animal} named {name} lived in {place}."]
  for _ in range(rng.integers(4, 10)):
    sentences.append(rng.choice([
        f"One morning {name} found {rng.choice(OBJECTS)} near {rng.choice(PLACES)}.",
        f"The {rng.choice(ANIMALS)} told {name} a secret about {rng.choice(PLACES)}.",
        f"{name} felt {rng.choice(FEELINGS)} and walked until the sun went down.",
        f"\"Who are you?\" asked the {rng.choice(ANIMALS)}, and {name} smiled.",
        f"At night the {animal} dreamed of {rng.choice(OBJECTS)} and {rng.choice(PLACES)}.",
    ]))
  sentences.append(f"And so {name} the {animal} lived happily ever after.")
  return " ".join(sentences)


def _recipe(rng):
  first, second = rng.choice(INGREDIENTS).title(), rng.choice(INGREDIENTS)
  lines = [f"Recipe: {first} and {second} {rng.choice(['pie', 'soup', 'bake'])}"]
  for _ in range(rng.integers(3, 7)):
    lines.append(f"- {rng.integers(1, 9)} {rng.choice(UNITS)} of {rng.choice(INGREDIENTS)}")
  for step in range(1, rng.integers(3, 7)):
    lines.append(f"{step}. {rng.choice(COOK_VERBS)} the {rng.choice(INGREDIENTS)} for {rng.integers(2, 40)} minutes "
                 f"at {rng.choice([160, 180, 200, 220])} degrees.")
  return "\n".join(lines)


def _sports(rng):
  a, b = rng.choice(TEAMS, 2, replace=False)
  out = [f"The {a} {rng.choice(SPORT_VERBS)} the {b} {rng.integers(0, 6)}-{rng.integers(0, 6)} on "
         f"{rng.choice(['Friday', 'Saturday', 'Sunday'])}."]
  for _ in range(rng.integers(3, 7)):
    out.append(rng.choice([
        f"{rng.choice(NAMES)} scored in the {rng.integers(1, 90)}th minute.",
        f"The coach of the {rng.choice(TEAMS)} said the defense was {rng.choice(['solid', 'weak', 'tired'])}.",
        f"Attendance was {rng.integers(1000, 60000):,} fans.",
        f"The {rng.choice(TEAMS)} now sit {rng.integers(1, 12)}th in the league table.",
    ]))
  return " ".join(out)


def _code(rng):
  fn, noun = rng.choice(FUNCS), rng.choice(NOUNS)
  lines = [f"def {fn}_{noun}({noun}, limit={rng.integers(1, 100)}):", f'  """{fn.title()} the {noun}."""',
           "  result = []"]
  for _ in range(rng.integers(2, 6)):
    lines.append(rng.choice([
        f"  for item in {noun}[:limit]:", f"    result.append({rng.choice(FUNCS)}(item))",
        f"  if len(result) > {rng.integers(1, 50)}:", f"    return result[{rng.integers(0, 5)}:]",
        f"  {rng.choice(NOUNS)} = {rng.choice(FUNCS)}_{rng.choice(NOUNS)}(result)",
    ]))
  lines.append("  return result")
  return "\n".join(lines)


def _legal(rng):
  out = [f"Section {rng.integers(1, 30)}.{rng.integers(1, 9)}."]
  for _ in range(rng.integers(3, 7)):
    out.append(f"{rng.choice(PARTIES)} {rng.choice(LEGAL_VERBS)} {rng.choice(PARTIES)} within "
               f"{rng.integers(5, 90)} days of the {rng.choice(['Effective Date', 'notice', 'termination'])}.")
  return " ".join(out)


def _weather(rng):
  out = [f"Weather bulletin for {rng.choice(REGIONS)}."]
  for _ in range(rng.integers(3, 7)):
    out.append(f"{rng.choice(['Monday', 'Tuesday', 'Wednesday', 'Thursday'])}: {rng.choice(SKIES)}, high of "
               f"{rng.integers(-5, 35)} degrees, wind {rng.integers(0, 60)} km/h from the "
               f"{rng.choice(['north', 'south', 'east', 'west'])}.")
  return " ".join(out)


DOMAINS = {"stories": _story, "recipes": _recipe, "sports": _sports, "code": _code, "legal": _legal,
           "weather": _weather}


def write_domain(path, domain: str, num_docs: int, seed: int) -> pathlib.Path:
  """Write num_docs documents of one domain as jsonl.gz ({"id", "source", "text"})."""
  if domain not in DOMAINS:
    raise errors.ConfigError(f"unknown synthetic domain {domain!r}; choose from {sorted(DOMAINS)}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with gzip.open(tmp, "wt", encoding="utf-8") as f:
    for i, text in enumerate(documents(domain, num_docs, seed)):
      f.write(json.dumps({"id": f"{domain}/{i}", "source": domain, "text": text}) + "\n")
  tmp.rename(path)
  return path


def documents(domain: str, num_docs: int, seed: int):
  """The texts of one domain, deterministic in (domain, seed) (dry runs count their characters)."""
  rng = np.random.default_rng([seed, sorted(DOMAINS).index(domain)])
  for _ in range(num_docs):
    yield DOMAINS[domain](rng)


def train_tokenizer(files, path, vocab_size: int = 1024) -> pathlib.Path:
  """A byte-level BPE trained on the given jsonl.gz files, with <|endoftext|> = 0 and <|padding|> = 1."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  def texts():
    for file in files:
      with gzip.open(file, "rt", encoding="utf-8") as f:
        for line in f:
          yield json.loads(line)["text"]

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(texts(), trainer=trainer)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(path))
  return path
