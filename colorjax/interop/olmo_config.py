"""OLMo's config.yaml <-> colorjax's ModelSpec.

An OLMo architecture option colorjax cannot run exactly is refused by name, and an unknown option refused outright:
a silently ignored field would import a model that computes something else. config.yaml is read with
yaml.safe_load (no tags, no code).
"""
import pathlib

import yaml

from colorjax import errors
from colorjax.model import transformer


# The original's ModelConfig defaults (color-filter-olmo olmo/config.py), in its field order: a field config.yaml
# omits takes these values there, so it takes them here.
OLMO_MODEL_DEFAULTS = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "clip_qkv": None, "n_layers": 12, "mlp_ratio": 4,
    "mlp_hidden_size": None, "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1,
    "alibi": False, "alibi_bias_max": 8.0, "rope": False, "rope_full_precision": True, "flash_attention": False,
    "attention_dropout": 0.1, "multi_query_attention": None, "attention_layer_norm": False, "residual_dropout": 0.1,
    "embedding_dropout": 0.1, "layer_norm_type": "default", "layer_norm_with_affine": True,
    "attention_layer_norm_with_affine": True, "max_sequence_length": 1024, "include_bias": True,
    "bias_for_layer_norm": None, "scale_logits": False, "vocab_size": 50257, "embedding_size": 50304,
    "weight_tying": True, "eos_token_id": 50256, "pad_token_id": 50256, "init_device": None, "init_fn": "normal",
    "init_std": 0.02, "init_cutoff_factor": None, "precision": None,
}
# Fields of later OLMo versions that colorjax can honour (the original fork has none of them: export omits them).
LATER_OLMO_DEFAULTS = {"rope_theta": 10000, "layer_norm_eps": None, "norm_after": False, "emb_init_std": None,
                       "scale_emb_init": False}
# What an exported config.yaml's model section holds besides the architecture: configs/base.yaml's values.
EXPORT_MODEL_DEFAULTS = dict(OLMO_MODEL_DEFAULTS, activation_type="gelu", rope=True, attention_dropout=0.0,
                             attention_layer_norm=True, residual_dropout=0.0, embedding_dropout=0.0,
                             include_bias=False, bias_for_layer_norm=False, weight_tying=False, init_device="meta",
                             init_fn="mitchell", precision="amp_bf16")

# (field, test, why): options whose math colorjax's model (docs/definitions.md#model) does not have.
_RUNNABLE = (
    ("activation_type", lambda v, m: v == "gelu", "colorjax's MLP is exact GELU (no SwiGLU or ReLU)"),
    ("block_type", lambda v, m: v == "sequential", "colorjax runs OLMo's sequential pre-norm block only"),
    ("layer_norm_type", lambda v, m: v == "default", "colorjax's LayerNorm is OLMo's default (fp32, gain, no bias)"),
    ("layer_norm_with_affine", lambda v, m: v is True, "colorjax's LayerNorms have a gain"),
    ("attention_layer_norm", lambda v, m: v is True, "colorjax always applies QK-norm"),
    ("attention_layer_norm_with_affine", lambda v, m: v is True, "colorjax's QK-norms have a gain"),
    ("include_bias", lambda v, m: v is False, "colorjax's linear layers have no bias"),
    ("bias_for_layer_norm", lambda v, m: v is False or (v is None and m["include_bias"] is False),
     "colorjax's LayerNorms have no bias"),
    ("weight_tying", lambda v, m: v is False, "colorjax's output head is untied from the embedding"),
    ("scale_logits", lambda v, m: v is False, "colorjax does not scale logits"),
    ("rope", lambda v, m: v is True, "colorjax's positions are RoPE"),
    ("alibi", lambda v, m: v is False, "colorjax has no ALiBi"),
    ("rope_full_precision", lambda v, m: v is True, "colorjax applies RoPE in fp32"),
    ("n_kv_heads", lambda v, m: v is None or v == m["n_heads"], "colorjax has no grouped-query attention"),
    ("multi_query_attention", lambda v, m: not v, "colorjax has no multi-query attention"),
    ("clip_qkv", lambda v, m: v is None, "colorjax does not clip qkv"),
    ("attention_dropout", lambda v, m: v == 0, "colorjax trains without dropout"),
    ("residual_dropout", lambda v, m: v == 0, "colorjax trains without dropout"),
    ("embedding_dropout", lambda v, m: v == 0, "colorjax trains without dropout"),
    ("norm_after", lambda v, m: v is False, "colorjax's blocks are pre-norm"),
)
_POSITIVE_INTS = ("d_model", "n_heads", "n_layers", "max_sequence_length", "vocab_size", "block_group_size")


def read_config_yaml(path) -> dict:
  """A checkpoint's config.yaml (OmegaConf YAML) as plain data, via yaml.safe_load (no tags, no code)."""
  path = pathlib.Path(path)
  try:
    raw = yaml.safe_load(path.read_text())
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path} is not readable YAML ({e})") from e
  if not isinstance(raw, dict):
    raise errors.DataError(f"{path} is not an OLMo config (a YAML mapping with a model: section)")
  return raw


def model_section(raw: dict, where) -> dict:
  """The `model:` section (a bare ModelConfig is accepted too) over the original's defaults; a field colorjax does
  not know could change the math, so it is refused."""
  section = raw.get("model", raw if "d_model" in raw else None)
  if not isinstance(section, dict):
    raise errors.DataError(f"{where} has no model: section; pass the config.yaml of an OLMo checkpoint")
  known = {**OLMO_MODEL_DEFAULTS, **LATER_OLMO_DEFAULTS}
  unknown = [k for k in section if k not in known]
  if unknown:
    raise errors.DataError(f"{where}: model.{unknown[0]}={section[unknown[0]]!r} is an OLMo option colorjax does not "
                           "know; it may change the model's math, so the checkpoint is refused (remove it from the "
                           "config.yaml only if it is at its no-op default)")
  return {**known, **section}


def check_runnable(m: dict, where) -> None:
  """Refuse, naming the config.yaml field, every architecture colorjax cannot run exactly."""
  for field in _POSITIVE_INTS:
    if not isinstance(m[field], int) or isinstance(m[field], bool) or m[field] <= 0:
      raise errors.DataError(f"{where}: model.{field}={m[field]!r} must be a positive integer")
  for field in ("mlp_hidden_size", "embedding_size"):
    if m[field] is not None and (not isinstance(m[field], int) or isinstance(m[field], bool) or m[field] <= 0):
      raise errors.DataError(f"{where}: model.{field}={m[field]!r} must be a positive integer or null")
  for field in ("rope_theta", "layer_norm_eps"):
    value = m[field]
    if not (value is None and field == "layer_norm_eps") and (
        not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
      raise errors.DataError(f"{where}: model.{field}={value!r} must be a positive number")
  for field, ok, why in _RUNNABLE:
    if not ok(m[field], m):
      raise errors.DataError(f"{where}: model.{field}={m[field]!r} is not supported: {why}; colorjax runs only the "
                             "OLMo architecture (docs/definitions.md#model) and refuses one it would compute "
                             "differently")
  if m["d_model"] % m["n_heads"]:
    raise errors.DataError(f"{where}: model.d_model={m['d_model']} is not divisible by model.n_heads={m['n_heads']}")
  if m["n_layers"] % m["block_group_size"]:
    raise errors.DataError(f"{where}: model.block_group_size={m['block_group_size']} does not divide "
                           f"model.n_layers={m['n_layers']}")
  if m["embedding_size"] is not None and m["embedding_size"] < m["vocab_size"]:
    raise errors.DataError(f"{where}: model.embedding_size={m['embedding_size']} < model.vocab_size="
                           f"{m['vocab_size']}; the original refuses this too")


def spec_from_olmo(m: dict, model_cfg, where) -> transformer.ModelSpec:
  """colorjax's ModelSpec of an OLMo model section (defaults applied); compute settings come from `model_cfg`.
  vocab_size is OLMo's embedding_size: the padding rows are in the softmax."""
  check_runnable(m, where)
  eps = m["layer_norm_eps"] if m["layer_norm_eps"] is not None else 1e-5
  return transformer.ModelSpec(
      d_model=m["d_model"], n_layers=m["n_layers"], n_heads=m["n_heads"],
      mlp_hidden=m["mlp_hidden_size"] if m["mlp_hidden_size"] is not None else m["mlp_ratio"] * m["d_model"],
      vocab_size=m["embedding_size"] or m["vocab_size"], max_seq_len=m["max_sequence_length"],
      rope_theta=float(m["rope_theta"]), norm_eps=float(eps), compute_dtype=model_cfg.compute_dtype,
      attention=model_cfg.attention, remat=model_cfg.remat, precision=model_cfg.precision)


def olmo_model_config(spec: transformer.ModelSpec, vocab_size: int, eos_id: int, pad_id: int,
                      base: dict | None) -> dict:
  """The `model:` section the original loads for this architecture: `base` (the imported checkpoint's section, for
  its init and precision fields) or configs/base.yaml's values, with the architecture from `spec`."""
  if spec.rope_theta != 10000.0 or spec.norm_eps != 1e-5:
    raise errors.DataError(f"the original OLMo code fixes RoPE base 10000 and LayerNorm eps 1e-5; these params have "
                           f"rope_theta={spec.rope_theta}, norm_eps={spec.norm_eps} and cannot be exported")
  if vocab_size > spec.vocab_size:
    raise errors.DataError(f"the tokenizer's {vocab_size} tokens exceed the model's {spec.vocab_size} embedding rows")
  section = {k: (base or {}).get(k, v) for k, v in EXPORT_MODEL_DEFAULTS.items()}
  section.update(d_model=spec.d_model, n_heads=spec.n_heads, n_kv_heads=None, n_layers=spec.n_layers,
                 mlp_ratio=int(section["mlp_ratio"]), mlp_hidden_size=spec.mlp_hidden, block_group_size=1,
                 max_sequence_length=spec.max_seq_len, vocab_size=int(vocab_size), embedding_size=spec.vocab_size,
                 eos_token_id=int(eos_id), pad_token_id=int(pad_id))
  return section
