"""Dry-run arithmetic: parameter counts, FLOPs, steps, tokens and per-device memory, computed without allocating.

The memory figure is an estimate for planning (which mesh, micro-batch, remat): exact for params, gradients and
optimizer state under the configured sharding; activations use a per-token-per-layer byte count of this model's
saved tensors (fp32 residual stream and norms, bf16 matmul outputs, materialized attention probabilities for the
XLA kernel) and ignore XLA's temporary buffers, so treat it as ±30%.
"""
import math

import jax
import numpy as np

from colorjax import sharding
from colorjax.model import transformer

GIB = 1024 ** 3


def shard_factor(axes, shape, mesh) -> int:
  """How many ways a leaf with these logical axes is split on this mesh."""
  spec = sharding.fit_spec(sharding.logical_to_spec(axes), shape, mesh)
  factor = 1
  for entry in spec:
    if entry is None:
      continue
    for name in ((entry,) if isinstance(entry, str) else entry):
      factor *= mesh.shape[name]
  return factor


def sharded_bytes(abstract_tree, axes_tree, mesh) -> float:
  """Bytes per device of a tree laid out by its logical axes (a None axes entry = replicated)."""
  leaves = jax.tree.leaves(abstract_tree)
  axes = jax.tree.leaves(axes_tree, is_leaf=sharding.is_axes)
  total = 0.0
  for leaf, leaf_axes in zip(leaves, axes):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += nbytes / (shard_factor(leaf_axes, leaf.shape, mesh) if leaf_axes else 1)
  return total


def activation_bytes(spec: transformer.ModelSpec, batch_per_device: int, seq_len: int, remat: bool, loss_chunk: int,
                     training: bool, tensor: int = 1) -> float:
  """Activation memory of one forward(+backward) pass on one device."""
  d, heads = spec.d_model, spec.n_heads
  xla_attention = transformer.attention_impl(spec) == "xla"
  per_token_layer = 36 * d + 2 * 2 * spec.mlp_hidden / tensor  # fp32 residual/norms + bf16 qkv/attn/mlp outputs
  per_token_layer += (6 * heads * seq_len / tensor) if xla_attention else 0  # fp32 scores + bf16 probs
  tokens = batch_per_device * seq_len
  if not training:
    layers = per_token_layer * tokens  # one layer alive at a time
  elif remat:
    layers = 4 * d * tokens * spec.n_layers + per_token_layer * tokens
  else:
    layers = per_token_layer * tokens * spec.n_layers
  positions = min(loss_chunk, seq_len) if loss_chunk else seq_len
  logits = batch_per_device * positions * spec.vocab_size / tensor * 4 * (2 if training else 1)
  return layers + logits


def print_model_and_training(stage, spec, mesh, steps, abstract_params, abstract_opt, tx, data_note=None,
                             remat=None, loss_chunk: int = 0):
  """The dry-run report of a training stage; `tx` (the optimizer) tells which optimizer-state leaves mirror the
  params (and are sharded like them)."""
  counts = transformer.param_counts(spec)
  axes = transformer.param_axes(spec)
  flops_token = transformer.flops_per_token(spec, steps.seq_len, training=True)
  params_b = sharded_bytes(abstract_params, axes, mesh)
  opt_axes = sharding.opt_state_axes(tx, abstract_opt, axes)
  opt_b = sharded_bytes(abstract_opt, opt_axes, mesh)
  grads_b = params_b * (2 if steps.n_micro > 1 else 1)
  dp = int(np.prod([mesh.shape[a] for a in sharding.RULES["batch"]]))
  act_b = activation_bytes(spec, steps.micro_batch // dp, steps.seq_len, spec.remat if remat is None else remat,
                           loss_chunk, training=True, tensor=mesh.shape["tensor"])
  total_flops = flops_token * steps.tokens
  print(f"{stage} (dry run)")
  print(f"params: total={counts['total']:,} non_embedding={counts['non_embedding']:,}")
  print(f"flops/token: {flops_token:,.0f} (training, 6N+12LdT); total {total_flops:.3e} FLOPs")
  print(f"steps: {steps.total_steps:,} x {steps.global_batch} x {steps.seq_len} = {steps.tokens:,} tokens; "
        f"schedule over {steps.schedule_steps:,} steps ({steps.schedule}); {steps.n_micro} micro-batch(es) of "
        f"{steps.micro_batch}")
  print(f"mesh: {' '.join(f'{k}={v}' for k, v in mesh.shape.items())} ({math.prod(mesh.shape.values())} devices); "
        f"per device: {steps.micro_batch // dp} sequences x {steps.n_micro} micro-batch(es) per step")
  print(f"memory/device (estimate): params {params_b / GIB:.2f} GiB + grads {grads_b / GIB:.2f} GiB + optimizer "
        f"{opt_b / GIB:.2f} GiB + activations {act_b / GIB:.2f} GiB = "
        f"{(params_b + grads_b + opt_b + act_b) / GIB:.2f} GiB")
  if data_note:
    print(f"note: {data_note}")
  return {"flops_per_token": flops_token, "total_flops": total_flops, "tokens": steps.tokens,
          "steps": steps.total_steps, "global_batch": steps.global_batch, "schedule_steps": steps.schedule_steps,
          "memory_bytes": params_b + grads_b + opt_b + act_b}
