"""The `distill` stage: CoLoR-Filter at a fraction of the scoring cost, by a fast scorer distilled from a sample.

CoLoR scores every pool sequence with two LMs. Most of the pool is plainly far from the target, which cheap features
of the text show, so (as FineWeb-Edu's and DCLM's classifiers are distilled from expensive labels):
  1. sample    a uniform random `distill.sample_size` sequences, at most `distill.sample_fraction` of those it is
               drawn from (a selection folder: `<parts>/sample`);
  2. label it  with the prior and the conditional: the score stage restricted to that index (`<parts>/sample_scores`);
  3. fit       a linear model on hashed token n-gram features (data.ngrams) to the CoLoR score with optax, cross-
               fitted over 1/`distill.holdout_fraction` folds with early stopping, so every sampled sequence has an
               out-of-fold prediction that measures it: Spearman ρ and the recall estimate the cascade sizes itself by
               (`<parts>/scorer`; training.ngram_scorer);
  4. predict   every pool sequence, `distill.block_rows` rows at a time (memory independent of the pool), written
               chunk by chunk with done flags and CRC-32s so a killed run resumes to the same bytes and a damaged
               chunk is never used (`<parts>/predictions`; artifacts.chunked);
  5. select    the top 1/τ of the predictions into --config.workdir (the select stage's format: `train` takes it
               as --config.data.index).
Steps 1-4 do not depend on τ: `distill.parts` (default `<workdir>-parts`) is shared by the selections of several τ,
which then cost one prediction pass. The sample is drawn with `distill.seed` from a permutation stream of its own
(never a prefix of a random baseline's or a nested pool's draw), from `distill.sample_within` when set (the largest
fixed-n pool: one sample serves every τ), else from the selection's candidates. Process 0 holds a lock on the parts
folder while it writes them, so a second job waits for nothing half-made.

`distill.method=color_cascade` spends more scoring for more fidelity: the prior and the conditional rescore the top
sequences by prediction among the candidates that were not sampled (`<parts>/candidates-f<factor>`,
`<parts>/rescored-f<factor>`): cascade_factor x the top 1/τ of them, or, with `distill.target_recall`, the fewest
whose estimated recall of CoLoR's top 1/τ reaches it (sampled share + unsampled share x the out-of-fold recall at
that factor). The sampled sequences keep their true scores and compete with the rescored ones: the top 1/τ of the
candidates is taken from both by the true CoLoR score. With cascade_factor = τ every candidate has its true score
and the selection is exactly CoLoR's.
A fitted scorer is an artifact of its own (weights with their sha256, features, the sample scores it was fitted on,
the tokenizer): `distill.scorer` reuses one on another pool, which skips steps 1-3; a scorer whose tokenizer or
features differ from the pool's is refused by name.
"""
