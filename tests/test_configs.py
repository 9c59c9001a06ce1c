"""The paper's recipe (docs/definitions.md) pinned in every config that claims to be it: the standalone 150M/1.2B pretrain and
target configs and the paper pipeline presets, as the stages they run would see them."""
import pytest

from colorjax import config

from conftest import make_config

# docs/definitions.md#recipe: AdamW, clip, z-loss and the schedule's floor, shared by every stage of the paper.
OPTIMIZER = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0, grad_clip=1.0, z_loss=1e-4,
                 min_lr_ratio=0.1)
# docs/definitions.md#pipeline/§3: 24,000 steps x 256 x 512 (about 3.1B tokens), warmup 1000 for the 150M prior and targets.
RECIPE_150M = dict(OPTIMIZER, global_batch_size=256, max_steps=24_000, warmup_steps=1000)
# docs/definitions.md#pipeline/§3: 1.2B targets on a 192k-step schedule, warmup 8000.
RECIPE_1_2B = dict(OPTIMIZER, global_batch_size=256, max_steps=192_000, warmup_steps=8000)


def _check_train(train, recipe):
  assert {k: train[k] for k in recipe} == pytest.approx(recipe)


def _check_heldout_eval(cfg):
  """docs/definitions.md#recipe: the original's held-out loss is 100 batches x 64 shuffled sequences per eval."""
  assert (cfg.train.eval_batches, cfg.eval.batch_size, cfg.eval.shuffle) == (100, 64, True)


def _pipeline_stages(preset):
  """The configs the pipeline's prior, conditional and target runs are built from (pipeline.stage_config)."""
  cfg = make_config("pipeline", preset)
  return cfg, {
      "prior": config.stage_config(cfg, "pretrain", model=cfg.prior.model, train=cfg.prior.train),
      "conditional": config.stage_config(cfg, "finetune", model=cfg.prior.model, train=cfg.conditional.train),
      "target": config.stage_config(cfg, "pretrain", model=cfg.target.model, train=cfg.target.train),
  }


def test_the_recipe_is_the_papers():
  assert RECIPE_150M["max_steps"] * RECIPE_150M["global_batch_size"] * 512 == 3_145_728_000  # "3.1B tokens"
  assert make_config("pretrain", "150m").model.max_seq_len == 512


@pytest.mark.parametrize("name,arg,recipe", [("pretrain", "150m", RECIPE_150M), ("target", "150m", RECIPE_150M),
                                             ("pretrain", "1.2b", RECIPE_1_2B), ("target", "1.2b", RECIPE_1_2B)])
def test_standalone_configs_follow_the_paper(name, arg, recipe):
  cfg = make_config(name, arg)
  _check_train(cfg.train, recipe)
  _check_heldout_eval(cfg)
  assert cfg.model.max_seq_len == 512 and cfg.model.vocab_size == 50304
  if name == "target":
    assert cfg.train.single_pass and not cfg.train.anneal_to_data  # the original: nominal schedule


@pytest.mark.parametrize("preset,size,target_recipe", [("paper-150m", "150m", RECIPE_150M),
                                                       ("paper-1.2b", "1.2b", RECIPE_1_2B)])
def test_paper_presets_follow_the_paper(preset, size, target_recipe):
  cfg, stages = _pipeline_stages(preset)
  assert cfg.pipeline.seq_len == 512 and tuple(cfg.pipeline.taus) == (7.0, 16.0, 32.0, 64.0)
  assert stages["prior"].model.size == "150m" and stages["target"].model.size == size
  _check_train(stages["prior"].train, RECIPE_150M)
  _check_train(stages["target"].train, target_recipe)
  assert stages["target"].train.single_pass and not stages["target"].train.anneal_to_data
  cond = stages["conditional"].train
  _check_train(cond, dict(OPTIMIZER, warmup_steps=100))  # the tasks conditional (docs/definitions.md#pipeline)
  assert cond.max_steps <= 0 and cond.single_pass and cond.anneal_to_data  # one epoch, its own schedule
  for stage in stages.values():
    _check_heldout_eval(stage)
  assert stages["target"].train.eval_every == 2000  # docs/definitions.md#pipeline: the original evaluated every 2000 steps


@pytest.mark.parametrize("preset", ["paper-150m", "paper-1.2b"])
def test_paper_presets_keep_the_originals_precision_and_sft_loss(preset):
  """docs/definitions.md#recipe: bf16 activations (precision "original", not fp32_residual) and an SFT loss that counts PAD."""
  cfg, stages = _pipeline_stages(preset)
  for stage in stages.values():
    assert stage.model.precision == "original" and stage.model.compute_dtype == "bfloat16"
    assert stage.sft.loss_on_padding
  fixed = make_config("pipeline", preset, sft__loss_on_padding=False)  # the fix stays one flag away
  assert not config.stage_config(fixed, "finetune", train=fixed.conditional.train).sft.loss_on_padding


def test_defaults_outside_the_paper_presets():
  cfg = make_config("pretrain", "tiny")
  assert not cfg.sft.loss_on_padding and not cfg.eval.shuffle  # masked SFT loss; held-out in id order
  assert cfg.model.precision == "original"
  for preset in ("demo", "books", "tasks"):
    assert not make_config("pipeline", preset).sft.loss_on_padding


def test_finetune_configs_of_the_paper_sizes_accumulate_like_pretraining():
  for size in ("150m", "1.2b"):
    want = make_config("pretrain", size).train.micro_batch_size
    assert make_config("finetune", f"books,{size}").train.micro_batch_size == want > 0
  with pytest.raises(ValueError, match="after the size come ',anneal' and a TPU slice \\(v5p-64, v5e:4x4\\); 'aneal' "
                                      "is neither"):
    make_config("target", "150m,aneal")
  assert make_config("target", "150m,anneal").train.anneal_to_data


def test_pipeline_refuses_top_level_sections_it_does_not_read_and_passes_the_ones_it_does():
  from colorjax import errors
  from colorjax.pipeline import plan
  for override, message in ((dict(train__lr=3e-4), "train.lr: a pipeline does not read the top-level 'train'"),
                            (dict(model__d_model=256), "set them in prior.model"),
                            (dict(prepare__seq_len=256), "set it in pipeline.seq_len"),
                            (dict(pipeline__seeds=(0, -1)), "seeds are integers >= 0")):
    with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(")):
      plan.check_settings(make_config("pipeline", "books", **override))
  cfg = make_config("pipeline", "books", dsir__ngram=3, prepare__workers=3, profile_steps="2:4")
  dsir_cfg = config.stage_config(cfg, "dsir")
  assert (dsir_cfg.dsir.ngram, dsir_cfg.prepare.workers, dsir_cfg.profile_steps) == (3, 3, "2:4")
