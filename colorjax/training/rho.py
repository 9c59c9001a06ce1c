"""RHO-down (Mindermann et al., 2022) as a training mode: online selection by reducible loss, inside the train step.

Each step draws τ·b candidate sequences; the model being trained and a fixed reference model score them (forward
only, per-sequence mean NLL, fp32), and the step trains on the b candidates with the largest reducible loss
NLL_θ − NLL_ref. Reference = a model trained on target data only (RHO-down) or the conditional (RHO-down + prior,
the paper's strongest baseline, docs/definitions.md#baselines). Everything happens in the one jitted step: no host
round trip.
"""
import dataclasses

import jax
import jax.numpy as jnp

from colorjax.model import losses
from colorjax.model import transformer


@dataclasses.dataclass(frozen=True)
class Rho:
  spec: transformer.ModelSpec  # the model being trained
  reference_spec: transformer.ModelSpec  # the fixed reference model (may differ in size)
  keep: int  # sequences trained on per step (the global batch)
  pad_id: int | None
  chunk: int  # head positions per chunk when scoring


def reducible_loss(rho: Rho, params, reference_params, tokens_bt, unroll: bool = False):
  """[batch] NLL_θ − NLL_ref of each sequence (no gradient flows through the selection)."""
  current = losses.sequence_nll(rho.spec, params, tokens_bt, rho.pad_id, rho.chunk, unroll=unroll)
  reference = losses.sequence_nll(rho.reference_spec, reference_params, tokens_bt, rho.pad_id, rho.chunk,
                                  unroll=unroll)
  return jax.lax.stop_gradient(current - reference)


def select(rho: Rho, params, reference_params, candidates_cmt, unroll: bool = False):
  """The `keep` candidates with the largest reducible loss (ties: lower candidate index), in candidate order, laid
  out [keep / micro, micro, seq] for the accumulation loop; plus the mean score of the chosen and of all candidates.
  Candidates are scored one micro-batch at a time, so scoring memory is that of one forward micro-batch
  (`unroll`: that loop as straight-line code, losses.scan_map)."""
  c, micro, seq = candidates_cmt.shape
  scores = losses.scan_map(lambda t: reducible_loss(rho, params, reference_params, t, unroll), candidates_cmt,
                           unroll).reshape(-1)
  chosen_scores, ids = jax.lax.top_k(scores, rho.keep)
  ids = jnp.sort(ids)
  chosen = candidates_cmt.reshape(c * micro, seq)[ids].reshape(rho.keep // micro, micro, seq)
  return chosen, {"rho_chosen_score": jnp.mean(chosen_scores), "rho_candidate_score": jnp.mean(scores)}


def forward_flops_per_step(rho: Rho, candidates: int, seq_len: int) -> float:
  """The selection's extra cost: a forward of both models over every candidate (2N + 4LdT per token each)."""
  per_token = (transformer.flops_per_token(rho.spec, seq_len, training=False)
               + transformer.flops_per_token(rho.reference_spec, seq_len, training=False))
  return float(per_token) * candidates * seq_len
