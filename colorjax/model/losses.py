"""Every loss in one place: the PAD policy, the CoLoR score, the loss mask, the output head's next-token NLL, the
training loss, per-sequence NLL.

The head is the costliest memory traffic of a small LM: [tokens, 50304] logits. It is computed here in chunks of
`chunk` sequence positions (every row of the batch at once, so a batch-sharded mesh keeps its sharding), and the
training loss never keeps logits for the backward pass: `head_loss` computes the gradient of the weighted
CE + z-loss with respect to the hidden states and the head during the forward chunk loop (one custom VJP, the
"fused linear cross-entropy" of Liger-Kernel), so the backward neither stores nor recomputes logits.
Softmax, logsumexp and NLL are fp32; the logits entering them are bf16 under precision "original" (as the paper's
autocast runs) and fp32 under "fp32_residual".
"""
import functools

import jax
import jax.numpy as jnp

from colorjax.model import transformer


def pad_to_mask(store, loss_on_padding: bool = False) -> int | None:
  """The PAD id whose targets the loss skips, for a token store: padded (SFT) rows skip PAD unless
  `loss_on_padding` reproduces the original (whose SFT loss counted PAD); packed text has no PAD to skip."""
  return store.pad_id if (store.padded and not loss_on_padding) else None


def color_score(nll_prior, nll_conditional):
  """CoLoR-Filter's score (higher = keep): how much the conditional lowers a sequence's mean NLL, in fp32. Works on
  numpy or jax arrays; `nll_prior=None` gives the conditional-only score, −NLL_conditional."""
  if nll_prior is None:
    return -nll_conditional.astype("float32")
  return nll_prior.astype("float32") - nll_conditional.astype("float32")


def loss_mask(tokens_bt, pad_id: int | None):
  """1.0 where the next token counts: everywhere, or (SFT rows) where the target is not PAD."""
  targets = tokens_bt[:, 1:]
  if pad_id is None:
    return jnp.ones(targets.shape, jnp.float32)
  return (targets != pad_id).astype(jnp.float32)


def _logits(h_xd, head_dv, logits_dtype):
  """Logits from bf16 operands (fp32 accumulation) written as `logits_dtype`, read as fp32: the matmul itself
  rounds, so no separate pass over [tokens, vocab] converts them, and bf16 logits cost half the bytes."""
  logits = jnp.einsum("...d,dv->...v", h_xd, head_dv, preferred_element_type=logits_dtype)
  return logits.astype(jnp.float32)


def logsumexp(logits_xv):
  """fp32 logsumexp over the last axis: the one place the head's normalizer is computed."""
  return jax.nn.logsumexp(logits_xv, axis=-1)


def _chunked(x_bt, chunk: int):
  """[batch, seq, ...] -> [n_chunks, batch, chunk, ...], zero-padding seq to a multiple of chunk."""
  batch, seq = x_bt.shape[:2]
  n_chunks = -(-seq // chunk)
  pad = [(0, 0), (0, n_chunks * chunk - seq)] + [(0, 0)] * (x_bt.ndim - 2)
  x = jnp.pad(x_bt, pad).reshape((batch, n_chunks, chunk) + x_bt.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunked(x_cbt, seq: int):
  """Inverse of `_chunked`: [n_chunks, batch, chunk, ...] -> [batch, seq, ...]."""
  x = jnp.moveaxis(x_cbt, 0, 1)
  return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :seq]


def _chunk_size(chunk: int, seq: int) -> int:
  return seq if not chunk or chunk >= seq else int(chunk)


def scan_map(fn, xs, unroll: bool = False):
  """`jax.lax.map(fn, xs)` (a scan over the leading axis), written out as straight-line code when `unroll`: XLA's
  cost analysis counts a loop body once, so the compile-ahead report's estimate compiles loops unrolled."""
  return jax.lax.scan(lambda carry, x: (carry, fn(x)), None, xs, unroll=unroll)[1]


def vocab_tile_size(tile: int, vocab: int) -> int:
  """The largest divisor of `vocab` that is at most `tile` (0 or >= vocab: the whole vocabulary, no tiling)."""
  if not tile or tile >= vocab:
    return vocab
  return next(size for size in range(int(tile), 0, -1) if vocab % size == 0)


def _vocab_tiled_nll(h_xd, head_dv, t_x, logits_dtype, tile: int, unroll: bool = False):
  """(NLL, logsumexp) [x] with the head's logits made one vocabulary tile at a time and folded into a running
  (max, rescaled sum, target logit), so the [x, vocab] logits never exist and each tile is reduced while it is hot:
  the forward head's memory traffic drops from the whole logits to one tile (CPU: 1.8x the chunked head at
  d=128, vocab 50,304). Each tile's logits are rounded as `_logits` rounds them, so the NLL equals the plain path's
  up to the order of the fp32 sum."""
  d, vocab = head_dv.shape
  tiles_ndv = jnp.moveaxis(head_dv.reshape(d, vocab // tile, tile), 1, 0)

  def fold(carry, tile_and_first):
    max_x, sum_x, target_x = carry
    head_tile_dv, first = tile_and_first
    logits_xv = _logits(h_xd, head_tile_dv, logits_dtype)
    new_max_x = jnp.maximum(max_x, jnp.max(logits_xv, axis=-1))
    sum_x = sum_x * jnp.exp(max_x - new_max_x) + jnp.sum(jnp.exp(logits_xv - new_max_x[:, None]), axis=-1)
    local_x = t_x - first
    inside_x = (local_x >= 0) & (local_x < tile)
    picked_x = jnp.take_along_axis(logits_xv, jnp.clip(local_x, 0, tile - 1)[:, None], axis=-1)[:, 0]
    return (new_max_x, sum_x, target_x + jnp.where(inside_x, picked_x, 0.0)), None

  zeros_x = jnp.zeros(t_x.shape, jnp.float32)
  firsts = jnp.arange(vocab // tile, dtype=t_x.dtype) * tile
  (max_x, sum_x, target_x), _ = jax.lax.scan(fold, (zeros_x - jnp.inf, zeros_x, zeros_x), (tiles_ndv, firsts),
                                              unroll=unroll)
  lse_x = max_x + jnp.log(sum_x)
  return lse_x - target_x, lse_x


def head_nll(hidden_btd, head_dv, targets_bt, logits_dtype, chunk: int = 0, vocab_tile: int = 0,
             unroll: bool = False):
  """Next-token NLL and logsumexp [batch, seq] (fp32) of `targets_bt` from final hidden states, `chunk` positions
  at a time so the [batch, seq, vocab] logits never exist at once, and with `vocab_tile` each chunk's logits made
  and reduced a vocabulary tile at a time (forward only: scoring and evaluation). Differentiable by plain autodiff
  (tests). `unroll`: the chunk and tile loops as straight-line code (scan_map)."""
  head_dv = head_dv.astype(hidden_btd.dtype)
  tile = vocab_tile_size(vocab_tile, head_dv.shape[-1])

  def nll(h_btd, t_bt):
    if tile < head_dv.shape[-1]:
      nll_x, lse_x = _vocab_tiled_nll(h_btd.reshape(-1, h_btd.shape[-1]), head_dv, t_bt.reshape(-1), logits_dtype,
                                      tile, unroll)
      return nll_x.reshape(t_bt.shape), lse_x.reshape(t_bt.shape)
    logits_btv = _logits(h_btd, head_dv, logits_dtype)
    lse_bt = logsumexp(logits_btv)
    return lse_bt - jnp.take_along_axis(logits_btv, t_bt[..., None], axis=-1)[..., 0], lse_bt

  seq = hidden_btd.shape[1]
  chunk = _chunk_size(chunk, seq)
  if chunk == seq:
    return nll(hidden_btd, targets_bt)
  nll_cbt, lse_cbt = scan_map(lambda xs: nll(*xs), (_chunked(hidden_btd, chunk), _chunked(targets_bt, chunk)),
                              unroll)
  return _unchunked(nll_cbt, seq), _unchunked(lse_cbt, seq)


def _head_loss_and_grads(hidden_btd, head_dv, targets_bt, weight_bt, z_weight: float, logits_dtype, chunk: int,
                         unroll: bool = False):
  """sum(w·(nll + z·lse²)), sum(w·nll), sum(w·lse²) and the gradient of the first w.r.t. hidden and head."""
  seq, vocab = hidden_btd.shape[1], head_dv.shape[1]
  chunk = _chunk_size(chunk, seq)
  head_c = head_dv.astype(hidden_btd.dtype)

  def body(carry, xs):
    grad_head_dv, loss, ce, z = carry
    h_btd, t_bt, w_bt = xs
    logits_btv = _logits(h_btd, head_c, logits_dtype)
    lse_bt = logsumexp(logits_btv)
    nll_bt = lse_bt - jnp.take_along_axis(logits_btv, t_bt[..., None], axis=-1)[..., 0]
    # d/dlogits of w·(lse - logit_t + z·lse²) = w·(softmax·(1 + 2z·lse) - onehot(t))
    coef_bt = w_bt * (1.0 + 2.0 * z_weight * lse_bt)
    probs_btv = jnp.exp(logits_btv - lse_bt[..., None])
    onehot_btv = jax.nn.one_hot(t_bt, vocab, dtype=jnp.float32)
    grad_logits_btv = (probs_btv * coef_bt[..., None] - onehot_btv * w_bt[..., None]).astype(head_c.dtype)
    grad_h_btd = jnp.einsum("btv,dv->btd", grad_logits_btv, head_c, preferred_element_type=jnp.float32)
    grad_head_dv = grad_head_dv + jnp.einsum("btd,btv->dv", h_btd, grad_logits_btv,
                                             preferred_element_type=jnp.float32)
    ce_sum, z_sum = jnp.sum(w_bt * nll_bt), jnp.sum(w_bt * jnp.square(lse_bt))
    carry = (grad_head_dv, loss + ce_sum + z_weight * z_sum, ce + ce_sum, z + z_sum)
    return carry, grad_h_btd.astype(hidden_btd.dtype)

  zeros = (jnp.zeros(head_dv.shape, jnp.float32),) + (jnp.zeros((), jnp.float32),) * 3
  xs = tuple(_chunked(x, chunk) for x in (hidden_btd, targets_bt, weight_bt))
  (grad_head_dv, loss, ce, z), grad_h_cbtd = jax.lax.scan(body, zeros, xs, unroll=unroll)
  return (loss, ce, z), (_unchunked(grad_h_cbtd, seq), grad_head_dv.astype(head_dv.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def head_loss(hidden_btd, head_dv, targets_bt, weight_bt, z_weight: float, logits_dtype, chunk: int,
              unroll: bool = False):
  """(loss, ce_sum, z_sum): loss = sum(w·nll) + z_weight·sum(w·lse²), differentiable in `hidden_btd` and `head_dv`
  only through `loss` (ce_sum and z_sum are for logging; their cotangents are ignored)."""
  return _head_loss_and_grads(hidden_btd, head_dv, targets_bt, weight_bt, z_weight, logits_dtype, chunk, unroll)[0]


def _head_loss_bwd(z_weight, logits_dtype, chunk, unroll, grads, cotangents):
  del z_weight, logits_dtype, chunk, unroll
  grad_h, grad_head = grads
  g = cotangents[0]
  return (grad_h * g.astype(grad_h.dtype), grad_head * g.astype(grad_head.dtype), None, None)


head_loss.defvjp(_head_loss_and_grads, _head_loss_bwd)


def next_token_nll(spec: transformer.ModelSpec, params: dict, tokens_bt, chunk: int = 0, vocab_tile: int = 0,
                   unroll: bool = False):
  """Per-position next-token NLL and logsumexp, both fp32 [batch, seq-1] (position t predicts token t+1).

  The model runs on all `seq` tokens (as OLMo does) and the last position's prediction is dropped.
  """
  module = transformer.bind(spec, params)
  hidden_btd = module.hidden(tokens_bt)[:, :-1]
  return head_nll(hidden_btd, module.head[...], tokens_bt[:, 1:].astype(jnp.int32), spec.logits_dtype, chunk,
                  vocab_tile, unroll)


def gathered_nll(spec: transformer.ModelSpec, params: dict, inputs_bt, positions_bk, targets_bk, chunk: int = 0,
                 unroll: bool = False):
  """NLL [batch, k] of `targets_bk[:, j]` given `inputs_bt[:, :positions_bk[:, j] + 1]`: the head runs only on the
  k gathered positions (a multiple-choice continuation), not on every context position."""
  module = transformer.bind(spec, params)
  hidden_btd = module.hidden(inputs_bt)
  hidden_bkd = jnp.take_along_axis(hidden_btd, positions_bk[..., None].astype(jnp.int32), axis=1)
  return head_nll(hidden_bkd, module.head[...], targets_bk.astype(jnp.int32), spec.logits_dtype, chunk,
                  unroll=unroll)[0]


def sequence_nll(spec: transformer.ModelSpec, params: dict, tokens_bt, pad_id: int | None, chunk: int = 0,
                 vocab_tile: int = 0, unroll: bool = False):
  """Mean next-token NLL of each sequence [batch] (fp32), PAD targets excluded when pad_id is given: the
  quantity CoLoR scores and held-out losses are made of."""
  nll_bt, _ = next_token_nll(spec, params, tokens_bt.astype(jnp.int32), chunk, vocab_tile, unroll)
  mask_bt = loss_mask(tokens_bt, pad_id)
  return jnp.sum(nll_bt * mask_bt, axis=1) / jnp.maximum(jnp.sum(mask_bt, axis=1), 1.0)


def sequence_nll_and_prefixes(spec: transformer.ModelSpec, params: dict, tokens_bt, pad_id: int | None,
                              prefixes: tuple, chunk: int = 0, vocab_tile: int = 0, unroll: bool = False):
  """(sequence_nll [batch], the mean NLL of each sequence's first k tokens for every k in `prefixes` [batch, P]).
  Attention is causal, so a prefix's NLL from the whole sequence's pass is what scoring the prefix alone gives: a
  cheaper score measured at no extra cost."""
  nll_bt, _ = next_token_nll(spec, params, tokens_bt.astype(jnp.int32), chunk, vocab_tile, unroll)
  mask_bt = loss_mask(tokens_bt, pad_id)
  full_b = jnp.sum(nll_bt * mask_bt, axis=1) / jnp.maximum(jnp.sum(mask_bt, axis=1), 1.0)
  parts = [jnp.sum((nll_bt * mask_bt)[:, :k - 1], axis=1) / jnp.maximum(jnp.sum(mask_bt[:, :k - 1], axis=1), 1.0)
           for k in prefixes]
  return full_b, jnp.stack(parts, axis=1)


def batch_loss(spec: transformer.ModelSpec, params: dict, tokens_bt, pad_id: int | None, z_weight: float,
               chunk: int = 0, unroll: bool = False):
  """Summed training loss of a batch (CE + z_weight·logsumexp²) and its parts (CE sum, z sum, counted targets);
  the step divides by the count over the whole global batch, so micro-batching does not change the mean."""
  tokens_bt = tokens_bt.astype(jnp.int32)
  module = transformer.bind(spec, params)
  hidden_btd = module.hidden(tokens_bt)[:, :-1]
  mask_bt = loss_mask(tokens_bt, pad_id)
  loss, ce_sum, z_sum = head_loss(hidden_btd, module.head[...], tokens_bt[:, 1:], mask_bt, z_weight,
                                  spec.logits_dtype, chunk, unroll)
  return loss, (ce_sum, z_sum, jnp.sum(mask_bt))
