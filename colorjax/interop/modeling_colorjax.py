"""colorjax's decoder in PyTorch for transformers: `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` on a folder written by colorjax's `hub transformers` action (interop/hf_export.py), which
copies this file there beside config.json (whose auto_map names the two classes below). colorjax never imports it.

No architecture of transformers computes this model exactly, so it is written out here as colorjax computes it
(colorjax/model/transformer.py, the original CoLoR-Filter's OLMo configs/base.yaml): pre-norm blocks; LayerNorm
with a weight and no bias, its statistics in fp32; QK LayerNorm over the full width, before the heads are split;
NeoX rotate-half RoPE over the whole head dim, base rope_theta, in fp32; exact (erf) GELU, no gating; no biases;
an output head untied from the embedding, over the padded vocabulary, whose padding rows are in the softmax.
Parameters carry OLMo's state-dict names, so the weights are the original's checkpoint layout (nn.Linear: out, in).
No KV cache: `generate` recomputes the whole prefix at each step (fine for evaluation-length outputs).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import PretrainedConfig
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class ColorjaxConfig(PretrainedConfig):
  model_type = "colorjax"
  attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                   "intermediate_size": "mlp_hidden"}

  def __init__(self, vocab_size=50304, d_model=1024, n_layers=12, n_heads=16, mlp_hidden=4096,
               max_position_embeddings=512, rope_theta=10000.0, norm_eps=1e-5, tie_word_embeddings=False, **kwargs):
    self.vocab_size = vocab_size
    self.d_model = d_model
    self.n_layers = n_layers
    self.n_heads = n_heads
    self.mlp_hidden = mlp_hidden
    self.max_position_embeddings = max_position_embeddings
    self.rope_theta = rope_theta
    self.norm_eps = norm_eps
    super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class LayerNorm(nn.Module):
  """A gain, no bias; mean and variance in fp32, the result in the input's dtype."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), None, self.eps).to(x.dtype)


def rope(x, positions, theta: float):
  """NeoX rotate-half rotary embedding over the whole head dim, in fp32. x: [batch, heads, seq, head_dim]."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=x.device) / head_dim))
  angles = positions.float()[:, None, :, None] * inv_freq
  angles = torch.cat([angles, angles], dim=-1)
  x32 = x.float()
  x1, x2 = x32.chunk(2, dim=-1)
  return (x32 * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()).to(x.dtype)


class Block(nn.Module):
  """h = x + Attn(LN(x)); y = h + MLP(LN(h)); OLMo's parameter names."""

  def __init__(self, config: ColorjaxConfig):
    super().__init__()
    d = config.d_model
    self.n_heads, self.theta = config.n_heads, config.rope_theta
    self.attn_norm = LayerNorm(d, config.norm_eps)
    self.att_proj = nn.Linear(d, 3 * d, bias=False)
    self.q_norm = LayerNorm(d, config.norm_eps)
    self.k_norm = LayerNorm(d, config.norm_eps)
    self.attn_out = nn.Linear(d, d, bias=False)
    self.ff_norm = LayerNorm(d, config.norm_eps)
    self.ff_proj = nn.Linear(d, config.mlp_hidden, bias=False)
    self.ff_out = nn.Linear(config.mlp_hidden, d, bias=False)

  def attention(self, x, positions, mask):
    batch, seq, d = x.shape
    q, k, v = self.att_proj(x).split(d, dim=-1)
    q, k = self.q_norm(q), self.k_norm(k)
    heads = lambda t: t.view(batch, seq, self.n_heads, d // self.n_heads).transpose(1, 2)
    q, k, v = rope(heads(q), positions, self.theta), rope(heads(k), positions, self.theta), heads(v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(d // self.n_heads))
    return self.attn_out(out.transpose(1, 2).reshape(batch, seq, d))

  def forward(self, x, positions, mask):
    x = x + self.attention(self.attn_norm(x), positions, mask)
    h = self.ff_proj(self.ff_norm(x))
    return x + self.ff_out(F.gelu(h.float(), approximate="none").to(h.dtype))


class ColorjaxForCausalLM(PreTrainedModel, GenerationMixin):
  config_class = ColorjaxConfig
  base_model_prefix = "transformer"
  _no_split_modules = ["Block"]

  def __init__(self, config: ColorjaxConfig):
    super().__init__(config)
    self.transformer = nn.ModuleDict({
        "wte": nn.Embedding(config.vocab_size, config.d_model),
        "blocks": nn.ModuleList(Block(config) for _ in range(config.n_layers)),
        "ln_f": LayerNorm(config.d_model, config.norm_eps),
        "ff_out_last": nn.Linear(config.d_model, config.vocab_size, bias=False),
    })
    self.post_init()

  def _init_weights(self, module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.trunc_normal_(module.weight, std=1.0 / math.sqrt(self.config.d_model), a=-3.0 / math.sqrt(
          self.config.d_model), b=3.0 / math.sqrt(self.config.d_model))
    elif isinstance(module, LayerNorm):
      nn.init.ones_(module.weight)

  def get_input_embeddings(self):
    return self.transformer["wte"]

  def get_output_embeddings(self):
    return self.transformer["ff_out_last"]

  def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
    del kwargs  # no cache: the whole prefix each step
    return {"input_ids": input_ids, "attention_mask": attention_mask}

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
    """Logits [batch, seq, vocab] (padding rows of the vocabulary included); with `labels`, the mean next-token
    cross-entropy over labels != -100. `attention_mask` (1 = token) hides padded keys; positions count from 0 unless
    `position_ids` are given."""
    del kwargs  # past_key_values, use_cache, return_dict, ...: not used
    batch, seq = input_ids.shape
    if position_ids is None:
      position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()[None, None]
    if attention_mask is not None:  # padded keys hidden; a query always sees itself, so no row is empty
      mask = (mask & attention_mask.bool()[:, None, None, :]) | torch.eye(seq, dtype=torch.bool, device=mask.device)
    x = self.transformer["wte"](input_ids)
    for block in self.transformer["blocks"]:
      x = block(x, position_ids, mask)
    logits = self.transformer["ff_out_last"](self.transformer["ln_f"](x)).float()
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits)
