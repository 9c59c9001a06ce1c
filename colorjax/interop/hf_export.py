"""A params export as a model that loads in transformers (the `hub transformers` action, and what `hub push_model`
pushes): `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

No transformers architecture computes colorjax's model exactly (LayerNorm with a weight and no bias, QK-norm over
the full width, ungated exact GELU, untied head), so the folder carries it as custom code: modeling_colorjax.py
(this package's copy, the PyTorch module) and config.json whose auto_map names its classes. model.safetensors holds
OLMo's state dict (olmo_weights.params_to_state: OLMo's names and nn.Linear layouts, fp32), written by torch_files
without torch; the tokenizer is the params' tokenizer.json with tokenizer_config.json for PreTrainedTokenizerFast.
`tests/test_hf_export.py` loads it with transformers and compares its logits with colorjax's.
"""
import json
import pathlib
import shutil

from colorjax import errors
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.data import tokenizer as tokenizer_lib
from colorjax.interop import olmo_weights
from colorjax.interop import torch_files
from colorjax.model import transformer
from colorjax.training import checkpoint

MODELING = "modeling_colorjax.py"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "colorjax.transformers_export"


def hf_config(spec: transformer.ModelSpec, tok: dict, manifest: dict) -> dict:
  """config.json: the architecture under ColorjaxConfig's names, auto_map to the custom code, special ids."""
  return {
      "architectures": ["ColorjaxForCausalLM"], "model_type": "colorjax",
      "auto_map": {"AutoConfig": "modeling_colorjax.ColorjaxConfig",
                   "AutoModelForCausalLM": "modeling_colorjax.ColorjaxForCausalLM"},
      "vocab_size": spec.vocab_size, "d_model": spec.d_model, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
      "mlp_hidden": spec.mlp_hidden, "max_position_embeddings": spec.max_seq_len, "rope_theta": spec.rope_theta,
      "norm_eps": spec.norm_eps, "eos_token_id": tok["eos_id"], "pad_token_id": tok["pad_id"],
      "tie_word_embeddings": False, "dtype": "float32",
      "colorjax": {"params_id": manifest.get("id"), "architecture": spec.architecture(),
                   "tokenizer": {k: tok[k] for k in ("name", "sha256", "vocab_size")},
                   "steps": manifest.get("steps"), "tokens": manifest.get("tokens")},
  }


def tokenizer_config(tokenizer, tok: dict, max_len: int) -> dict:
  """tokenizer_config.json for transformers' PreTrainedTokenizerFast over tokenizer.json (no BOS, as trained)."""
  return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.id_to_token(tok["eos_id"]),
          "pad_token": tokenizer.id_to_token(tok["pad_id"]), "model_max_length": max_len,
          "clean_up_tokenization_spaces": False}


def model_card(manifest: dict, spec: transformer.ModelSpec) -> str:
  counts = transformer.param_counts(spec)
  tokens = "" if manifest.get("tokens") is None else f" on {manifest['tokens']:,} tokens"
  return "\n".join([
      "---", "library_name: transformers", "tags: [colorjax, color-filter, custom_code]", "---", "",
      f"# colorjax model {manifest.get('id')}", "",
      f"A {counts['total']:,}-parameter OLMo-style decoder ({spec.n_layers} layers, d_model {spec.d_model}, "
      f"{spec.n_heads} heads, context {spec.max_seq_len}) trained with colorjax (CoLoR-Filter in JAX){tokens}.", "",
      "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
      "model = AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True)",
      "tokenizer = AutoTokenizer.from_pretrained(REPO)", "```", "",
      "`modeling_colorjax.py` computes colorjax's architecture (LayerNorm without bias, full-width QK-norm, NeoX RoPE, "
      "exact GELU, untied head over the padded vocabulary); `params/` (when present) is the colorjax params export, "
      "readable by every colorjax stage as `hf://REPO/params`.", ""])


def export(params_dir, out, model_cfg, card: bool = False) -> pathlib.Path:
  """Write the transformers folder `out` from a params export (built in `<out>.partial`, then moved into place;
  an existing `out` is refused, never overwritten)."""
  params_dir, out = pathlib.Path(params_dir), pathlib.Path(out).resolve()
  if out.exists():
    raise errors.DataError(f"{out} already exists; choose another --config.workdir (nothing was overwritten)")
  manifest = checkpoint.read_params_manifest(params_dir)
  spec = checkpoint.spec_from_manifest(manifest, model_cfg)
  tok = manifest["tokenizer"]
  tok_path = tokenizer_lib.checked_tokenizer_path(params_dir, tok)
  tokenizer = tokenizer_lib.load_tokenizer(str(tok_path))
  params, _ = checkpoint.load_params(params_dir, spec)
  state = olmo_weights.params_to_state(params, spec)
  with lineage.building(out, "a transformers folder", "choose another --config.workdir", marker=CONFIG) as partial:
    torch_files.write_safetensors(partial / WEIGHTS, state, metadata={"format": "pt"})
    shutil.copyfile(pathlib.Path(__file__).with_name(MODELING), partial / MODELING)
    shutil.copyfile(tok_path, partial / tokenizer_lib.TOKENIZER)
    (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer, tok, spec.max_seq_len),
                                                              indent=1))
    (partial / "colorjax_manifest.json").write_text(formats.json_text(manifest))
    if card:
      (partial / "README.md").write_text(model_card(manifest, spec))
    (partial / CONFIG).write_text(json.dumps(hf_config(spec, tok, manifest), indent=1))  # last: marks it complete
  print(f"hub transformers: {params_dir} (id {manifest.get('id')}) -> {out}: {len(state)} tensors, load with "
        f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
  return out
