"""Selection methods: one table of what each method is, needs and costs; every stage and the report read it.

A method's name appears here and in its own ranking code only (select's score stream and random draw, the dsir stage,
RHO-down in training). Adding a method is one `Method` entry plus that ranking code: the pipeline plans its
selections and target runs from the entry, the preflight checks them, the report counts its compute and draws it.
"""
import dataclasses

from colorjax import errors


@dataclasses.dataclass(frozen=True)
class Method:
  """How one selection method ranks the pool and what it needs before it can."""
  name: str  # as given in pipeline.methods and select.method, and recorded in a selection's manifest
  stage: str  # what selects: "select" (ranks score columns, or draws), "dsir", "distill" (their stages), "train"
  # (online, inside target training)
  score_columns: tuple = ()  # select: ("prior", "conditional") ranks by NLL_prior − NLL_cond, ("conditional",) by
  # −NLL_cond; () draws a seeded uniform sample
  seeded: bool = False  # the selection depends on the seed: one selection per seed (else one per τ for all seeds)
  text_target: bool = False  # models the target's text (a token store of it), so a tasks target cannot serve it
  shared_work: tuple = ()  # the pipeline's shared steps it needs, counted in its compute: prior, conditional,
  # reference (a model trained on target text only), scoring (both models over the pool), scoring_one (one model),
  # scoring_sample (both models over the distill stage's sample)
  reference: str = ""  # stage "train": the pipeline run whose params are the fixed reference model
  plot_color: str = "gray"  # its lines in the report's plots
  role: str = ""  # "headline": the method the report's data efficiency and examples are about; "baseline": the
  # yardstick (its budget curve, and the tokens it needs to match the headline)

  @property
  def ranks_scores(self) -> bool:
    return bool(self.score_columns)


REGISTRY = {m.name: m for m in (
    Method("color", "select", ("prior", "conditional"), shared_work=("prior", "conditional", "scoring"),
           plot_color="tab:red", role="headline"),
    Method("conditional_only", "select", ("conditional",), shared_work=("prior", "conditional", "scoring_one"),
           plot_color="tab:green"),
    Method("random", "select", seeded=True, plot_color="tab:blue", role="baseline"),
    Method("dsir", "dsir", seeded=True, text_target=True, plot_color="tab:purple"),
    Method("color_distilled", "distill", shared_work=("prior", "conditional", "scoring_sample"),
           plot_color="tab:pink"),
    Method("color_cascade", "distill", shared_work=("prior", "conditional", "scoring_sample"),
           plot_color="tab:cyan"),
    Method("rho_down", "train", text_target=True, shared_work=("reference",), reference="reference",
           plot_color="tab:orange"),
    Method("rho_down_prior", "train", shared_work=("prior", "conditional"), reference="conditional",
           plot_color="tab:brown"),
)}
HEADLINE = next(m for m in REGISTRY.values() if m.role == "headline")
BASELINE = next(m for m in REGISTRY.values() if m.role == "baseline")


def get(name: str, field: str = "pipeline.methods", stage: str | None = None) -> Method:
  """The method called `name` (run by `stage`, when given); a ConfigError naming `field` and the choices otherwise."""
  choices = [m.name for m in REGISTRY.values() if stage is None or m.stage == stage]
  if name not in choices:
    raise errors.ConfigError(f"{field}={name!r}; choose one of {', '.join(choices)}")
  return REGISTRY[name]


def names(stage: str | None = None) -> tuple[str, ...]:
  return tuple(m.name for m in REGISTRY.values() if stage is None or m.stage == stage)


def needs_pool_scores(method_names) -> bool:
  """Whether some of these methods rank the whole pool's scores (else the pipeline never scores the pool: the cheap
  methods score only their sample and candidates)."""
  return bool({"scoring", "scoring_one"} & shared_work(method_names))


def shared_work(method_names) -> set[str]:
  """The shared steps some of these methods need."""
  return {work for name in method_names for work in REGISTRY[name].shared_work}


def score_columns_of(name: str) -> tuple:
  """The score a selection's rows are shown with (export): its own ranking score, or the headline's for a method
  that ranks no scores (a random draw, DSIR, a selection imported from the original code)."""
  method = REGISTRY.get(name)
  return method.score_columns if method is not None and method.ranks_scores else HEADLINE.score_columns
