"""Hashed token n-gram features: every n-gram of orders 1..order of a row of token ids, hashed into one of `buckets`
buckets. DSIR's importance weights and the distilled CoLoR scorer both read text through them; n-grams holding a
token in `skip` (EOS, PAD: how a store packs documents, not what the text says) count nowhere.
"""
import numpy as np

FEATURES = "token-ngrams-splitmix-v1"  # names the hashing below: change it whenever the features change
_ORDER_KEY = 0x9E3779B97F4A7C15  # times the order: the start key of each order's hash


def mix(x: np.ndarray, key) -> np.ndarray:
  """splitmix64 finalizer of (x xor key). Pinned here because it defines the features (and DSIR's Gumbel noise)."""
  with np.errstate(over="ignore"):
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def feature_buckets(tokens_bt: np.ndarray, buckets: int, order: int = 2, skip=()) -> np.ndarray:
  """[B, F] bucket of every n-gram (orders 1..order, in that order) of each row; `buckets` (one past the last
  bucket) marks an n-gram holding a token in `skip`, so it counts nowhere."""
  tokens = np.asarray(tokens_bt).astype(np.uint64)
  special = np.isin(tokens, np.asarray(list(skip), np.uint64)) if len(skip) else np.zeros(tokens.shape, bool)
  length, out = tokens.shape[1], []
  for m in range(1, order + 1):
    width = length - m + 1
    if width <= 0:
      break
    h = np.uint64((_ORDER_KEY * m) % (1 << 64))
    dropped = np.zeros((tokens.shape[0], width), bool)
    for j in range(m):
      h = mix(tokens[:, j:j + width], h)
      dropped |= special[:, j:j + width]
    out.append(np.where(dropped, buckets, (h % np.uint64(buckets)).astype(np.int64)))
  return np.concatenate(out, axis=1) if out else np.zeros((tokens.shape[0], 0), np.int64)
