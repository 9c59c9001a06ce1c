"""An independent float64 numpy implementation of docs/definitions.md#model's forward pass, for checking the JAX model."""
import math

import jax
import numpy as np


def _np_layernorm(x, g, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * g


def _np_rope(x, theta=10000.0):  # x [T, H, hd]
  t, _, hd = x.shape
  inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = np.arange(t)[:, None] * inv[None]
  ang = np.concatenate([ang, ang], -1)[:, None, :]
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  return x * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def _np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def reference_logits(spec, params, tokens):
  """docs/definitions.md#model written out directly in float64 numpy, one sequence at a time."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  out = []
  for seq in np.asarray(tokens):
    x = p["embed"][seq]
    t = len(seq)
    for layer in range(spec.n_layers):
      b = p[f"block_{layer}"]
      h = _np_layernorm(x, b["attn_norm"]["scale"])
      q, k, v = np.split(h @ b["attn"]["qkv"]["kernel"], 3, -1)
      q = _np_layernorm(q, b["attn"]["q_norm"]["scale"])
      k = _np_layernorm(k, b["attn"]["k_norm"]["scale"])
      shape = (t, spec.n_heads, spec.head_dim)
      q, k, v = _np_rope(q.reshape(shape)), _np_rope(k.reshape(shape)), v.reshape(shape)
      scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(spec.head_dim)
      scores = np.where(np.tril(np.ones((t, t), bool))[None], scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      attn = np.einsum("hts,shd->thd", probs, v).reshape(t, spec.d_model)
      x = x + attn @ b["attn"]["out"]["kernel"]
      h = _np_layernorm(x, b["mlp_norm"]["scale"])
      x = x + _np_gelu(h @ b["mlp"]["up"]["kernel"]) @ b["mlp"]["down"]["kernel"]
    out.append(_np_layernorm(x, p["final_norm"]["scale"]) @ p["head"])
  return np.stack(out)
