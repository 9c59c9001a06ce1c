"""The OLMo-style decoder of docs/definitions.md#model, in Flax NNX.

Parameters are fp32; matmuls and attention run in `compute_dtype` (bf16 by default). `precision` says what else:
  original       what the paper's runs did (FSDP bf16 params under autocast; docs/definitions.md#recipe): bf16
                 residual stream and activations, norm gains applied as bf16, LayerNorm/QK-norm statistics and RoPE in
                 fp32 inside the op (the QK-norm output rounded to bf16 before RoPE, as OLMo), bf16 logits
                 (cross-entropy in fp32 on them). Faithful, and the fastest: half the bytes.
  fp32_residual  more precise than the original: fp32 residual stream, norm gains and logits.
Every parameter carries `logical_axes` metadata;
`sharding.py` maps those names to mesh axes, so nothing here knows about devices. Activations are annotated through
`sharding.constrain`, a no-op outside a mesh.

Outside this module parameters travel as a plain nested dict (`init_params`), which optax, orbax and `jax.vmap`
handle directly; `forward` merges them back into the module graph at trace time.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from colorjax import errors
from colorjax import sharding

PRECISIONS = ("original", "fp32_residual")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The architecture and how to compute it, hashable so it can key caches and be a static jit argument.

  Its fields are of two kinds, and this class is the one place that says which: ARCHITECTURE decides whether two
  parameter sets are interchangeable (a params export records it and every reader checks it); COMPUTE is how a run
  computes (dtype, precision policy, attention kernel, remat), taken from the config of the run that reads params.
  `max_seq_len` is neither: RoPE has no learned positions, and each reader checks its data against it."""
  ARCHITECTURE = ("d_model", "n_layers", "n_heads", "mlp_hidden", "vocab_size", "rope_theta", "norm_eps")
  COMPUTE = ("compute_dtype", "attention", "remat", "precision")
  SCORING = ("fp8",)  # set by the scoring stage alone (score.fp8), never read from a model config or an export
  DEFAULT_NUMERICS = {"precision": "original"}  # numerics() of the defaults: the original's policy, bf16 compute
  d_model: int
  n_layers: int
  n_heads: int
  mlp_hidden: int
  vocab_size: int
  max_seq_len: int = 512
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  compute_dtype: str = "bfloat16"
  attention: str = "auto"
  remat: bool = False
  precision: str = "original"
  fp8: bool = False

  def __post_init__(self):
    if self.precision not in PRECISIONS:
      raise errors.ConfigError(f"model.precision={self.precision!r}; choose one of {PRECISIONS}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def residual_dtype(self):
    """The residual stream's dtype: the compute dtype under "original", fp32 under "fp32_residual"."""
    return jnp.dtype(self.compute_dtype) if self.precision == "original" else jnp.dtype(jnp.float32)

  @property
  def logits_dtype(self):
    """What the head's output is rounded to before the fp32 log-softmax."""
    return self.residual_dtype

  @classmethod
  def from_config(cls, m) -> "ModelSpec":
    if m.d_model % m.n_heads:
      raise errors.ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls) if f.name not in cls.SCORING})

  def to_dict(self) -> dict:
    """What a params export records: scoring-only fields are not the model's."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.SCORING}

  def architecture(self) -> dict:
    """The fields that decide whether two parameter sets are interchangeable."""
    return {k: getattr(self, k) for k in self.ARCHITECTURE}

  def with_compute(self, model_cfg) -> "ModelSpec":
    """This architecture, computed as `model_cfg` says (a params export read by a run with its own settings)."""
    return dataclasses.replace(self, **{k: model_cfg[k] for k in self.COMPUTE})

  def numerics(self) -> dict:
    """The compute fields that change a result's numbers, as an artifact's request records them: the precision
    policy, and the compute dtype when it is not bf16 (the original's, implied so that artifacts made before the key
    existed keep their ids). The attention kernel and remat change speed and memory, not the numbers."""
    request = {"precision": self.precision}
    if self.compute_dtype != "bfloat16":
      request["compute_dtype"] = self.compute_dtype
    if self.fp8:
      request["fp8"] = True
    return request


def _trunc_normal(std: float):
  """OLMo's "mitchell" init: normal(0, std) truncated at ±3 std."""
  return jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)


def fp8_qdq(x):
  """Quantize to e4m3 with one power-of-two scale per tensor (max |x| maps into [224, 448]) and dequantize to bf16:
  the Q -> DQ -> dot pattern XLA's GPU GEMM rewriter turns into a cuBLASLt fp8 GEMM with the scales as its alpha.
  A power-of-two scale makes the dequantized values exact in bf16, so CPU (which runs this as written) computes the
  products an fp8 GEMM computes, and the selection's change is measurable without one."""
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32))
  scale = jnp.where(amax > 0, jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / E4M3_MAX))), 1.0)
  return (x32 / scale).astype(jnp.float8_e4m3fn).astype(jnp.bfloat16) * scale.astype(jnp.bfloat16)


class Linear(nnx.Module):
  """Bias-free projection; weight [in, out] in fp32, applied in the compute dtype, or with both operands in fp8
  (`fp8`: scoring only, there is no fp8 gradient recipe here)."""

  def __init__(self, d_in: int, d_out: int, std: float, axes: tuple, dtype, fp8: bool = False, *,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(_trunc_normal(std)(rngs.params(), (d_in, d_out), jnp.float32), logical_axes=axes)
    self.dtype = dtype
    self.fp8 = fp8

  def __call__(self, x):
    if self.fp8:
      return self.fp8_dot(x)
    return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))

  def fp8_dot(self, x):
    return jnp.dot(fp8_qdq(x), fp8_qdq(self.kernel[...]), preferred_element_type=self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def layer_norm(x, gain, eps: float):
  """fp32 LayerNorm with a gain and no bias, two-pass statistics (exact far from zero too; a one-pass E[x²] − E[x]²
  measured no faster on an H200, tests/benchmarks/variants.py). Checkpointed: the backward pass keeps only `x` (bf16
  under "original") and recomputes the fp32 statistics, instead of keeping fp32 copies of the activation per norm."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * gain.astype(jnp.float32)


class LayerNorm(nnx.Module):
  """LayerNorm with a gain and no bias, computed in fp32 (OLMo's non-parametric-bias variant); the gain is applied
  as `gain_dtype` (bf16 under precision "original": the original's params were bf16 copies). Output fp32: the
  consumer casts, and XLA fuses that cast into this op."""

  def __init__(self, dim: int, eps: float, gain_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
    self.eps = eps
    self.gain_dtype = gain_dtype

  def __call__(self, x):
    return layer_norm(x, self.scale[...].astype(self.gain_dtype), self.eps)


def rope(x_bthd, theta: float):
  """Rotary embedding over the full head dim, NeoX rotate-half convention, in fp32."""
  _, seq, _, head_dim = x_bthd.shape
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_td = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  angles_td = jnp.concatenate([angles_td, angles_td], axis=-1)
  cos, sin = jnp.cos(angles_td)[None, :, None, :], jnp.sin(angles_td)[None, :, None, :]
  x = x_bthd.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_impl(spec: ModelSpec):
  """The `implementation` for jax.nn.dot_product_attention: cuDNN on GPU in bf16 unless told otherwise."""
  if spec.attention == "auto":
    use_cudnn = jax.default_backend() == "gpu" and spec.compute_dtype in ("bfloat16", "float16")
    return "cudnn" if use_cudnn else "xla"
  if spec.attention not in ("xla", "cudnn"):
    raise errors.ConfigError(f"model.attention={spec.attention!r}; choose auto, xla or cudnn")
  return spec.attention


class Attention(nnx.Module):
  """Fused qkv, QK-norm over the full width, RoPE, causal softmax attention, output projection."""

  def __init__(self, spec: ModelSpec, layer: int, *, rngs: nnx.Rngs):
    d, dtype = spec.d_model, jnp.dtype(spec.compute_dtype)
    std = 1.0 / math.sqrt(d)
    self.qkv = Linear(d, 3 * d, std, ("embed", "qkv"), dtype, spec.fp8, rngs=rngs)
    self.q_norm = LayerNorm(d, spec.norm_eps, spec.residual_dtype)
    self.k_norm = LayerNorm(d, spec.norm_eps, spec.residual_dtype)
    self.out = Linear(d, d, std / math.sqrt(2 * (layer + 1)), ("heads", "embed"), dtype, spec.fp8, rngs=rngs)
    self.spec = spec

  def normed_qk(self, q_btd, k_btd):
    """QK-norm with its output back in the activation dtype, as OLMo (`q = self.q_norm(q).to(dtype=dtype)`): bf16
    under "original", so RoPE (fp32 inside) reads half the bytes."""
    return self.q_norm(q_btd).astype(self.spec.residual_dtype), self.k_norm(k_btd).astype(self.spec.residual_dtype)

  def __call__(self, x_btd):
    spec, dtype = self.spec, jnp.dtype(self.spec.compute_dtype)
    batch, seq, _ = x_btd.shape
    q_btd, k_btd, v_btd = jnp.split(self.qkv(x_btd), 3, axis=-1)
    q_btd, k_btd = self.normed_qk(q_btd, k_btd)
    shape_bthd = (batch, seq, spec.n_heads, spec.head_dim)
    q_bthd = rope(q_btd.reshape(shape_bthd), spec.rope_theta).astype(dtype)
    k_bthd = rope(k_btd.reshape(shape_bthd), spec.rope_theta).astype(dtype)
    v_bthd = v_btd.reshape(shape_bthd).astype(dtype)
    axes = ("batch", "seq", "act_heads", None)
    q_bthd, k_bthd, v_bthd = (sharding.constrain(t, axes) for t in (q_bthd, k_bthd, v_bthd))
    out_bthd = jax.nn.dot_product_attention(
        q_bthd, k_bthd, v_bthd, is_causal=True, scale=1.0 / math.sqrt(spec.head_dim),
        implementation=attention_impl(spec))
    return self.out(out_bthd.reshape(batch, seq, spec.d_model))


@jax.checkpoint
def gelu(h):
  """Exact (erf) GELU as torch computes it on bf16: fp32 math, x·½·(1 + erf(x·√½)), one rounding out
  (jax.nn.gelu on bf16 rounds after every op). Multiplying by √½ rather than dividing by √2 (jax.nn.gelu) halves
  the op's GPU time; the checkpoint keeps only the bf16 input for the backward pass, not fp32 intermediates."""
  x = h.astype(jnp.float32)
  return (0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))).astype(h.dtype)


class MLP(nnx.Module):
  """d -> hidden, exact (erf) GELU, hidden -> d; no biases, no gating."""

  def __init__(self, spec: ModelSpec, layer: int, *, rngs: nnx.Rngs):
    d, h, dtype = spec.d_model, spec.mlp_hidden, jnp.dtype(spec.compute_dtype)
    self.up = Linear(d, h, 1.0 / math.sqrt(d), ("embed", "mlp"), dtype, spec.fp8, rngs=rngs)
    self.down = Linear(h, d, 1.0 / math.sqrt(h) / math.sqrt(2 * (layer + 1)), ("mlp", "embed"), dtype, spec.fp8,
                       rngs=rngs)

  def __call__(self, x_btd):
    h_btf = sharding.constrain(self.up(x_btd), ("batch", "seq", "act_mlp"))
    return self.down(gelu(h_btf))


class Block(nnx.Module):
  """Pre-norm block: h = x + Attn(LN1(x)); y = h + MLP(LN2(h)); the residual stream is `spec.residual_dtype`."""

  def __init__(self, spec: ModelSpec, layer: int, *, rngs: nnx.Rngs):
    self.attn_norm = LayerNorm(spec.d_model, spec.norm_eps, spec.residual_dtype)
    self.attn = Attention(spec, layer, rngs=rngs)
    self.mlp_norm = LayerNorm(spec.d_model, spec.norm_eps, spec.residual_dtype)
    self.mlp = MLP(spec, layer, rngs=rngs)
    self.residual_dtype = spec.residual_dtype

  def __call__(self, x_btd):
    x_btd = x_btd + self.attn(self.attn_norm(x_btd)).astype(self.residual_dtype)
    x_btd = x_btd + self.mlp(self.mlp_norm(x_btd)).astype(self.residual_dtype)
    return sharding.constrain(x_btd, ("batch", "seq", "act_embed"))


class Transformer(nnx.Module):
  """Token embedding, blocks, final norm; the untied head is applied by `logits` so losses can chunk it."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    d, std = spec.d_model, 1.0 / math.sqrt(spec.d_model)
    self.embed = nnx.Param(
        _trunc_normal(std)(rngs.params(), (spec.vocab_size, d), jnp.float32), logical_axes=("vocab", "embed"))
    for layer in range(spec.n_layers):
      setattr(self, f"block_{layer}", Block(spec, layer, rngs=rngs))
    self.final_norm = LayerNorm(d, spec.norm_eps, spec.residual_dtype)
    self.head = nnx.Param(
        _trunc_normal(std)(rngs.params(), (d, spec.vocab_size), jnp.float32), logical_axes=("embed", "vocab"))
    self.spec = spec

  def hidden(self, tokens_bt):
    """Final-norm hidden states [batch, seq, d_model] in the compute dtype (the head's operand)."""
    # Gather fp32 rows, then cast: the same values as a bf16 table, but the embedding gradient accumulates in fp32.
    x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.spec.residual_dtype)
    x_btd = sharding.constrain(x_btd, ("batch", "seq", "act_embed"))
    for layer in range(self.spec.n_layers):
      block = getattr(self, f"block_{layer}")
      if self.spec.remat:
        x_btd = nnx.remat(lambda blk, x: blk(x))(block, x_btd)
      else:
        x_btd = block(x_btd)
    return self.final_norm(x_btd).astype(self.spec.compute_dtype)

  def logits(self, hidden_btd):
    """fp32 logits over the full padded vocabulary (bf16 operands, fp32 accumulation, rounded through the policy's
    logits dtype). Losses do not call this: `losses.py` applies the head in chunks."""
    dtype = jnp.dtype(self.spec.compute_dtype)
    logits_btv = jnp.dot(hidden_btd.astype(dtype), self.head[...].astype(dtype), preferred_element_type=jnp.float32)
    logits_btv = logits_btv.astype(self.spec.logits_dtype).astype(jnp.float32)
    return sharding.constrain(logits_btv, ("batch", "seq", "act_vocab"))

  def __call__(self, tokens_bt):
    return self.logits(self.hidden(tokens_bt))


@functools.lru_cache(maxsize=None)
def _graph(spec: ModelSpec):
  """The module graph and an abstract state, built once per architecture without allocating."""
  abstract = nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def init_params(spec: ModelSpec, key) -> dict:
  """Fresh parameters as a nested dict of fp32 arrays (jit this with out_shardings to init sharded)."""
  model = Transformer(spec, rngs=nnx.Rngs(params=key))
  return nnx.to_pure_dict(nnx.split(model)[1])


def abstract_params(spec: ModelSpec) -> dict:
  """ShapeDtypeStructs of the parameters, without allocating anything. Shape and dtype only: nnx.eval_shape
  attaches the mesh in context (sharding.use_mesh) to its results, which the cached graph would leak elsewhere."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(_graph(spec)[1]))


def param_axes(spec: ModelSpec) -> dict:
  """Logical axis names of every parameter, same tree as the params."""
  state = _graph(spec)[1]
  flat = {path: var.get_metadata()["logical_axes"] for path, var in nnx.to_flat_state(state)}
  return _unflatten(flat)


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def bind(spec: ModelSpec, params: dict) -> Transformer:
  """The module with these parameters (cheap; call inside jit)."""
  return nnx.merge(_graph(spec)[0], params)


def param_counts(spec: ModelSpec) -> dict:
  """Parameter counts as the paper reports them: total, non-embedding (weights + norm gains), embedding, head."""
  sizes = {path: math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(spec))[0]}
  total = sum(sizes.values())
  embed = spec.vocab_size * spec.d_model
  return {"total": total, "non_embedding": total - 2 * embed, "embedding": embed, "head": embed}


def flops_per_token(spec: ModelSpec, seq_len: int, training: bool = True) -> float:
  """6N + 12·L·d·T (train) or 2N + 4·L·d·T (forward), N = non-embedding + head params
  (docs/definitions.md#flop-counts-and-reference-figures)."""
  counts = param_counts(spec)
  n = counts["non_embedding"] + counts["head"]
  if training:
    return 6.0 * n + 12.0 * spec.n_layers * spec.d_model * seq_len
  return 2.0 * n + 4.0 * spec.n_layers * spec.d_model * seq_len
