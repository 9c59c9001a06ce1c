"""Evaluation: held-out LM loss on token stores (and, with tasks.py, zero-shot multiple choice).

Held-out loss is the mean over sequences of each sequence's mean next-token CE (fp32, no z-loss) at the store's
sequence length, i.e. the training context length. Batches have a fixed shape; the last partial batch is padded
with weight-0 rows, so one compiled function serves every batch.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from colorjax import data
from colorjax import model
from colorjax import sharding


def sequence_nll(spec, params, tokens_bt, pad_id, chunk: int = 0):
  """Mean next-token NLL of each sequence [batch] (fp32), PAD targets excluded when pad_id is given."""
  nll_bt, _ = model.next_token_nll(spec, params, tokens_bt.astype(jnp.int32), chunk)
  targets = tokens_bt[:, 1:]
  mask_bt = jnp.ones(nll_bt.shape, jnp.float32) if pad_id is None else (targets != pad_id).astype(jnp.float32)
  return jnp.sum(nll_bt * mask_bt, axis=1) / jnp.maximum(jnp.sum(mask_bt, axis=1), 1.0)


def eval_batch_size(cfg, mesh) -> int:
  """Eval batch: the configured size (or the train micro-batch), rounded up to the data-parallel size."""
  size = int(cfg.eval.batch_size or cfg.train.micro_batch_size or cfg.train.global_batch_size)
  dp = sharding.data_parallel_size(mesh)
  return -(-size // dp) * dp


class HeldoutEvaluator:
  """Mean per-sequence CE of params on each named token store (the first `max_batches` batches, in id order)."""

  def __init__(self, spec, mesh, param_sh, stores: dict, cfg, max_batches: int | None = None):
    self.spec, self.mesh, self.stores = spec, mesh, stores
    self.batch = eval_batch_size(cfg, mesh)
    self.max_batches = cfg.train.eval_batches if max_batches is None else max_batches
    self.loss_on_padding = bool(cfg.sft.loss_on_padding)
    self.row_sh = NamedSharding(mesh, P(sharding.RULES["batch"], None))
    self.weight_sh = NamedSharding(mesh, P(sharding.RULES["batch"]))
    self._fns = {}
    self.chunk = cfg.train.loss_chunk
    self.param_sh = param_sh

  def _fn(self, pad_id):
    if pad_id not in self._fns:
      def weighted_sum(params, tokens_bt, weight_b):
        per_seq = sequence_nll(self.spec, params, tokens_bt, pad_id, self.chunk)
        return jnp.sum(per_seq * weight_b), jnp.sum(weight_b)
      self._fns[pad_id] = jax.jit(weighted_sum, in_shardings=(self.param_sh, self.row_sh, self.weight_sh))
    return self._fns[pad_id]

  def store_loss(self, params, store: data.TokenStore) -> float:
    n = store.num_sequences
    if self.max_batches:
      n = min(n, self.max_batches * self.batch)
    pad_id = store.pad_id if (store.padded and not self.loss_on_padding) else None
    fn = self._fn(pad_id)
    shape = (self.batch, store.seq_len)
    start, stop = sharding.host_rows(self.row_sh, shape, dim=0)
    total, weight = 0.0, 0.0
    with sharding.use_mesh(self.mesh):
      for first in range(0, n, self.batch):
        ids = np.arange(first, first + self.batch)
        valid = ids < n
        local_ids = np.where(valid, ids, 0)[start:stop]
        rows = store.read(local_ids)
        tokens = sharding.put_host_rows(rows, self.row_sh, shape, start)
        weights = sharding.put_host_rows(valid[start:stop].astype(np.float32), self.weight_sh, (self.batch,), start)
        s, w = fn(params, tokens, weights)
        total, weight = total + s, weight + w  # stays on device: no sync per batch
    return float(total) / max(float(weight), 1.0)

  def __call__(self, params) -> dict:
    return {f"{name}_loss": self.store_loss(params, store) for name, store in self.stores.items()}
