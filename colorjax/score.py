"""The `score` stage: per-sequence mean NLL of every pool sequence under the prior and K conditional models.

One jitted step evaluates all K+1 models on the same batch with `jax.vmap` over their stacked parameters, so the
pool is read once (the original read it once per model). The head and log-softmax run in sequence chunks
(`score.loss_chunk`) so the fp32 [models, batch, seq, vocab] logits never exist at once, and optionally a vocabulary
tile at a time with an online logsumexp (`score.vocab_tile`), so not even one chunk's logits do.

Output: a tensorstore zarr array `nll.zarr` [num_sequences, models] float32 keyed by global sequence id (with
`score.index`, by position among the index's ids, ascending, which `ids.npy` lists), plus
`done.zarr` (one flag per row chunk) and `manifest.json`. The pool is cut into row chunks of `chunk_rows`; each
host scores whole chunks (its own rows, no gather to one host) and writes a chunk, then its done flag, when it is
complete. A restarted job skips done chunks and, because a chunk's batches are always cut the same way, ends with
exactly the bytes an uninterrupted job writes. `score.shard=i/n` restricts a job to the i-th of n chunk ranges,
for many independent machines writing to one shared folder.
"""
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from colorjax import console
from colorjax import errors
from colorjax import sharding
from colorjax.aot import compiler
from colorjax.aot import targets
from colorjax.artifacts import formats
from colorjax.artifacts import lineage
from colorjax.artifacts import scores as scores_lib
from colorjax.data import stores
from colorjax.model import estimate
from colorjax.model import losses
from colorjax.model import transformer
from colorjax.training import checkpoint
from colorjax.training import loops
from colorjax.training import metrics



def parse_shard(text: str) -> tuple[int, int]:
  if not text:
    return 0, 1
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError as e:
    raise errors.ConfigError(f"score.shard={text!r}: write it as i/n, e.g. 0/4") from e
  if not 0 <= i < n:
    raise errors.ConfigError(f"score.shard={text!r}: need 0 <= i < n")
  return i, n


def model_entries(cfg):
  """(name, path, manifest) of the prior and each conditional, checked to share architecture and tokenizer."""
  scfg = cfg.score
  if not scfg.prior or not scfg.conditionals:
    raise errors.ConfigError("set --config.score.prior and --config.score.conditionals (one or more params exports)")
  paths = [("prior", scfg.prior)] + [(f"conditional_{i}", p) for i, p in enumerate(scfg.conditionals)]
  entries = [(name, path, checkpoint.read_params_manifest(path)) for name, path in paths]
  spec = scoring_spec(checkpoint.spec_from_manifest(entries[0][2], cfg.model), scfg)
  for _, path, manifest in entries:
    checkpoint.check_architecture(manifest, spec, path)
    if manifest["tokenizer"]["sha256"] != entries[0][2]["tokenizer"]["sha256"]:
      raise errors.DataError(f"{path} was trained with another tokenizer than the prior {scfg.prior}")
  return entries, spec


def scoring_spec(spec: transformer.ModelSpec, scfg) -> transformer.ModelSpec:
  """The models' spec as scoring computes it: with `score.fp8`, every trunk projection in fp8 (its numerics, hence
  the scores' request, say so)."""
  return dataclasses.replace(spec, fp8=bool(scfg.fp8))


def numerics_of(cfg) -> dict:
  """The numerics a score job with this config computes in, as its request records them: the model section's
  compute settings and score.fp8. The score stage and everything that predicts its request (the pipeline's
  preflight, the distill stage) call this one function."""
  return scoring_spec(transformer.ModelSpec.from_config(cfg.model), cfg.score).numerics()


FP8_NOTE = ("score: fp8 (score.fp8, opt-in): both operands of every trunk projection (qkv, attention out, MLP up and "
            "down) in e4m3 with one power-of-two scale per tensor; embeddings, norms, attention, the head and the "
            "log-softmax unchanged. The scores differ from bf16's (another artifact: its request records fp8); on the "
            "books-fixed-n pool the top-1/tau selections kept 99.9/99.5/99.0% of bf16's at tau 4/8/16 "
            "(docs/performance.md, fp8)")


def describe_models(entries) -> list[dict]:
  """The models of a score job by column name and content id (paths are not part of what was scored)."""
  return [{"name": name, "id": m.get("id")} for name, _, m in entries]


def scores_request(store_id: str, models: list[dict], numerics: dict | None = None,
                   index_id: str | None = None) -> dict:
  """What decides a score array's content: the pool and the models, by content id, and the numerics they ran in
  (ModelSpec.numerics) when not the default, so that scores made before numerics were recorded keep their ids while
  scores in another precision are another artifact (never reused, never mixed on a resume)."""
  request = {"store": store_id, "models": [[m["name"], m.get("id")] for m in models]}
  if numerics and numerics != transformer.ModelSpec.DEFAULT_NUMERICS:
    request["numerics"] = numerics
  if index_id:  # a subset of the pool (score.index), by the index's content id
    request["index"] = index_id
  return request


def stacked_layout(spec, n_models: int, mesh):
  """(abstract [models, ...] stacked params, their shardings, one model's params' shardings) on `mesh`."""
  axes = transformer.param_axes(spec)
  param_sh = sharding.tree_shardings(transformer.abstract_params(spec), axes, mesh)
  stacked_axes = jax.tree.map(lambda a: ("models",) + a, axes, is_leaf=sharding.is_axes)
  stacked_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n_models,) + a.shape, a.dtype),
                                  transformer.abstract_params(spec))
  return stacked_abstract, sharding.tree_shardings(stacked_abstract, stacked_axes, mesh), param_sh


def load_models(cfg, mesh):
  """Prior + conditionals: checked to share an architecture, stacked along a leading "models" axis."""
  entries, spec = model_entries(cfg)
  paths = [(name, path) for name, path, _ in entries]
  manifests = [m for _, _, m in entries]
  sharding.warn_replicated(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  _, stacked_sh, param_sh = stacked_layout(spec, len(paths), mesh)
  loaded = [checkpoint.load_params(p, spec, param_sh)[0] for _, p in paths]
  stacked = jax.jit(lambda *ps: jax.tree.map(lambda *xs: jnp.stack(xs), *ps), out_shardings=stacked_sh)(*loaded)
  del loaded
  return spec, stacked, stacked_sh, describe_models(entries), manifests[0]["tokenizer"]


def over_models(fn, stacked, fp8: bool):
  """fn(one model's params) for every model of `stacked` (a leading models axis), stacked along a new leading axis:
  one vmapped pass, or with fp8 one pass per model in the same step (XLA rewrites quantize -> dequantize -> dot
  into an fp8 GEMM only for an unbatched dot, so vmapped fp8 runs bf16 GEMMs plus the quantization: measured 0.86x
  of bf16 on an H200; per model, 1.04x per model-step)."""
  if not fp8:
    return jax.vmap(fn)(stacked)
  models = jax.tree.leaves(stacked)[0].shape[0]
  outs = [fn(jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(models)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def build_score_step(spec, stacked_sh, batch_sh, out_sh, pad_id, chunk: int, vocab_tile: int = 0,
                     prefixes: tuple = (), unroll: bool = False):
  """[batch, seq] tokens -> [batch, models] mean NLL, all models in one pass over the batch (over_models); with
  `prefixes` (token counts) also [batch, models, P] mean NLL of each sequence's first k tokens
  (losses.sequence_nll_and_prefixes). `unroll`: the head's loops as straight-line code, for the compile-ahead cost
  estimate."""

  def score(stacked, tokens_bt):
    per_model = over_models(lambda p: losses.sequence_nll(spec, p, tokens_bt, pad_id, chunk, vocab_tile, unroll),
                            stacked, spec.fp8)
    return per_model.T

  def score_with_prefixes(stacked, tokens_bt):
    full_mb, prefix_mbp = over_models(lambda p: losses.sequence_nll_and_prefixes(
        spec, p, tokens_bt, pad_id, prefixes, chunk, vocab_tile, unroll), stacked, spec.fp8)
    return full_mb.T, jnp.transpose(prefix_mbp, (1, 0, 2))

  if prefixes:
    prefix_sh = sharding.batch_sharding(batch_sh.mesh, ndim=3)
    return jax.jit(score_with_prefixes, in_shardings=(stacked_sh, batch_sh), out_shardings=(out_sh, prefix_sh))
  return jax.jit(score, in_shardings=(stacked_sh, batch_sh), out_shardings=out_sh)


def prefix_lengths(scfg, seq_len: int) -> tuple:
  """Token counts of the prefixes whose NLL a score job records beside the scores (score.prefix_fractions of the
  sequence; each >= 2 and < seq_len, once)."""
  lengths = sorted({int(round(f * seq_len)) for f in scfg.prefix_fractions})
  return tuple(k for k in lengths if 2 <= k < seq_len)


def step_key(spec, n_models: int, batch: int, seq_len: int, pad_id, token_dtype, mesh, scfg,
             prefixes: tuple = ()) -> dict:
  """Everything a compiled score step depends on besides the code (`aot.compiler.load`)."""
  return {"step": "score", "model": spec.to_dict() | {"fp8": spec.fp8}, "models": n_models, "batch": batch,
          "seq_len": seq_len, "loss_chunk": int(scfg.loss_chunk), "vocab_tile": int(scfg.vocab_tile),
          "pad_id": pad_id, "tokens": np.dtype(token_dtype).name, "mesh": dict(mesh.shape),
          "prefixes": list(prefixes)}


def abstract_step(cfg, spec, n_models: int, seq_len: int, pad_id, token_dtype, mesh, unroll: bool = False):
  """(the jitted score step, ShapeDtypeStructs of its arguments on `mesh`, its key): the step `_score` runs, for
  compiling ahead of time on any devices."""
  dp = sharding.data_parallel_size(mesh)
  batch = -(-int(cfg.score.batch_size) // dp) * dp
  stacked_abstract, stacked_sh, _ = stacked_layout(spec, n_models, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  prefixes = prefix_lengths(cfg.score, seq_len)
  jitted = build_score_step(spec, stacked_sh, batch_sh, batch_sh, pad_id, int(cfg.score.loss_chunk),
                            int(cfg.score.vocab_tile), prefixes, unroll)
  stacked = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), stacked_abstract, stacked_sh)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), token_dtype, sharding=batch_sh)
  return jitted, (stacked, tokens), step_key(spec, n_models, batch, seq_len, pad_id, token_dtype, mesh, cfg.score,
                                             prefixes)


def run(cfg) -> pathlib.Path:
  scfg = cfg.score
  if not cfg.workdir:
    raise errors.ConfigError("set --config.workdir to the folder the scores go to")
  workdir = pathlib.Path(cfg.workdir).resolve()
  if not scfg.store:
    raise errors.ConfigError("set --config.score.store to the pool's token store (a prepare or dolma output)")
  profiler = metrics.StepProfiler(cfg.profile_steps, workdir / "profile")
  store = stores.TokenStore(scfg.store)
  entries, spec = model_entries(cfg)
  index_id = stores.index_id(scfg.index, "score.index") if scfg.index else None
  request = scores_request(store.id, describe_models(entries), numerics_of(cfg), index_id)
  if scfg.verify:
    console.on_main_then_sync(lambda: scores_lib.reopen_damaged(workdir, request), "score verify")
  if scores_lib.is_complete(workdir, request):
    if console.is_main():
      print(f"score: {workdir} is complete for this pool and these models; nothing to do")
    return workdir
  shard_i, shard_n = parse_shard(scfg.shard)
  with lineage.Lock(workdir, f"shard-{shard_i}-of-{shard_n}"):
    # MFU's per-device peak is one setting for every stage that reports MFU: train.peak_flops
    return _score(cfg, workdir, store, request, profiler, shard_i, shard_n, cfg.train.peak_flops)


def layout(scfg, mesh, seq_len: int) -> loops.Layout:
  """The batch (a multiple of the data-parallel size), this host's part of it and the chunk rows; checked."""
  dp = sharding.data_parallel_size(mesh)
  batch = -(-int(scfg.batch_size) // dp) * dp
  row_start, row_stop = sharding.host_rows(sharding.batch_sharding(mesh), (batch, seq_len))
  host_batch, hosts = row_stop - row_start, jax.process_count()
  if batch % hosts:
    raise errors.ConfigError(f"score.batch_size={batch} must split evenly over {hosts} hosts")
  if int(scfg.vocab_tile) < 0:
    raise errors.ConfigError(f"score.vocab_tile={scfg.vocab_tile}: a number of vocabulary columns, or 0 for all")
  chunk_rows = int(scfg.chunk_rows) or host_batch * max(1, 65536 // host_batch)
  if chunk_rows % host_batch:
    raise errors.ConfigError(f"score.chunk_rows={chunk_rows} must be a multiple of the per-host batch {host_batch}")
  return loops.Layout(batch, row_start, host_batch, chunk_rows, hosts)


def _check_pool(store, spec, tok_info) -> None:
  if tok_info["sha256"] != store.manifest["tokenizer"]["sha256"]:
    raise errors.DataError(f"pool {store.path} was tokenized with {store.manifest['tokenizer']['name']}, the models "
                           f"with {tok_info['name']}; prepare the pool with the models' tokenizer")
  if store.seq_len > spec.max_seq_len:
    raise errors.DataError(f"pool seq_len {store.seq_len} exceeds the models' context {spec.max_seq_len}")


def _manifest(cfg, request, store, workdir, spec, models, tok_info, n, lay, index, prefixes) -> dict:
  """The score folder's manifest (written before any chunk, so another machine can resume it)."""
  manifest = {
      "format": formats.SCORES.format, "num_sequences": n, "columns": [m["name"] for m in models], "models": models,
      "store": {"path": lineage.relative(store.path, workdir), "id": store.id, "seq_len": store.seq_len},
      "id": lineage.content_id(request), "request": request, "dtype": "float32",
      "value": "per-sequence mean next-token NLL (fp32, no z-loss)", "chunk_rows": lay.chunk_rows,
      "batch_size": lay.batch, "model": spec.architecture(), "tokenizer": tok_info,
      "config": json.loads(cfg.to_json()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  if index is not None:
    manifest["index"] = {"path": lineage.relative(cfg.score.index, workdir), "id": request["index"],
                         "pool": store.num_sequences}
  if prefixes:
    manifest["prefixes"] = list(prefixes)
  return manifest


def _score(cfg, workdir, store, request, profiler, shard_i, shard_n, peak_flops: float) -> pathlib.Path:
  """Set up (models, layout, step, output folder), then score this shard's chunks that are not done."""
  scfg = cfg.score
  mesh = sharding.make_mesh(cfg.mesh)
  spec, stacked, stacked_sh, models, tok_info = load_models(cfg, mesh)
  _check_pool(store, spec, tok_info)
  lay = layout(scfg, mesh, store.seq_len)
  pad_id = losses.pad_to_mask(store)  # scores are means over real tokens, whatever the training policy
  if spec.fp8 and console.is_main():
    print(FP8_NOTE, flush=True)
  # prefix NLLs: diagnostics beside the scores (not in the request: the scores are the same with or without them);
  # a folder started without them is resumed without them
  saved = formats.read_json(workdir / formats.MANIFEST) if (workdir / formats.MANIFEST).exists() else None
  prefixes = tuple((saved or {}).get("prefixes") or ()) if saved else prefix_lengths(scfg, store.seq_len)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = build_score_step(spec, stacked_sh, batch_sh, batch_sh, pad_id, int(scfg.loss_chunk),
                             int(scfg.vocab_tile), prefixes)
  if cfg.compile_load:  # the same step, compiled ahead of time (compile_for + compile_save); before any output
    step_fn = compiler.load(cfg.compile_load, "score_step", mesh.devices.flat,
                            step_key(spec, len(models), lay.batch, store.seq_len, pad_id, store.dtype, mesh, scfg,
                                     prefixes))
    if console.is_main():
      print(f"score: step loaded from {cfg.compile_load} (compiled ahead of time)", flush=True)
  # score.index: rows are the index's ids, ascending, each once
  index = np.unique(stores.load_index(scfg.index, store, "score.index")) if scfg.index else None
  n = store.num_sequences if index is None else index.size
  if n == 0:
    raise errors.DataError(f"score.index {scfg.index} selects no sequence; nothing to score")
  num_chunks = -(-n // lay.chunk_rows)
  manifest = _manifest(cfg, request, store, workdir, spec, models, tok_info, n, lay, index, prefixes)
  console.on_main_then_sync(lambda: scores_lib.open_output(workdir, manifest, num_chunks, index), "score output")
  if not console.is_main():
    scores_lib.open_output(workdir, manifest, num_chunks)  # every host checks the folder it will write into
  out = scores_lib.Scores(workdir)
  mine = np.arange(num_chunks)[shard_i * num_chunks // shard_n:(shard_i + 1) * num_chunks // shard_n]
  todo = mine[~out.done()[mine]]
  if console.is_main():
    print(f"score: {n:,} sequences x {len(models)} models ({', '.join(m['name'] for m in models)}); "
          f"{len(mine) - len(todo)} of {len(mine)} chunks already done; batch {lay.batch}, chunk {lay.chunk_rows} "
          f"rows; {spec.compute_dtype} compute, precision {spec.precision}; mesh {sharding.describe(mesh)}",
          flush=True)
  flops = transformer.flops_per_token(spec, store.seq_len, training=False) * len(models)
  per_host = [todo[h::lay.hosts] for h in range(lay.hosts)]
  seconds, scored, stopped, steps = loops.score_chunks(cfg, mesh, step_fn, stacked, store, index, lay, out, per_host,
                                                  len(models), prefixes, flops * store.seq_len, peak_flops, profiler)
  console.on_main_then_sync(lambda: None, "score finished")  # every host's chunks are written
  done = out.done()
  if console.is_main():
    record = {"event": "score", "shard": f"{shard_i}/{shard_n}", "chunks": int(done[todo].sum()), "seconds": seconds,
              "sequences": scored, "models": len(models),
              "sequences_per_s": scored / max(seconds, 1e-9),
              "tokens_per_s_per_model": scored * store.seq_len / max(seconds, 1e-9),
              "complete": bool(done.all()), "preempted": stopped is not None}
    metrics.MetricsWriter(workdir).write(record)
    state = "complete" if done.all() else f"{int(done.sum())} of {done.size} chunks done"
    print(f"score: {state}; {record['tokens_per_s_per_model']:,.0f} tokens/s per model; {workdir}")
  if stopped is not None:
    raise errors.Preempted(f"{stopped[1]} after step {stopped[0]} of {steps}: {int(done.sum())} of "
                           f"{done.size} row chunks are written (done flags set); re-run the same command to score the "
                           "rest", stopped[0], stopped[2])
  return workdir


def describe_nominal(cfg, num_sequences: int, seq_len: int, models: int) -> float:
  """Dry-run report of scoring `num_sequences` with `models` models of cfg.model's architecture; returns FLOPs."""
  spec = transformer.ModelSpec.from_config(cfg.model)
  flops = transformer.flops_per_token(spec, seq_len, training=False)
  total = flops * models * num_sequences * seq_len
  devices = cfg.dry_run_devices or jax.device_count()
  mesh = sharding.abstract_mesh(cfg.mesh, devices)
  dp = int(np.prod([mesh.shape[a] for a in sharding.RULES["batch"]]))
  batch = -(-int(cfg.score.batch_size) // dp) * dp
  params_b = models * estimate.sharded_bytes(transformer.abstract_params(spec), transformer.param_axes(spec), mesh)
  act_b = models * estimate.activation_bytes(spec, batch // dp, seq_len, False, cfg.score.loss_chunk, training=False,
                                             tensor=mesh.shape["tensor"])
  print(f"score (dry run): {models} models x {num_sequences:,} sequences x {seq_len} tokens, one vmapped pass; "
        f"{-(-num_sequences // batch):,} steps of {batch}" + ("; trunk matmuls in fp8 (score.fp8)" if cfg.score.fp8
                                                             else ""))
  print(f"flops/token/model: {flops:,.0f} (2N+4LdT); total {total:.3e} FLOPs")
  print(f"mesh: {' '.join(f'{k}={v}' for k, v in mesh.shape.items())} ({devices} devices); per device: "
        f"{batch // dp} sequences per step")
  print(f"memory/device (estimate): params {params_b / estimate.GIB:.2f} GiB + activations "
        f"{act_b / estimate.GIB:.2f} GiB")
  rate = float(cfg.score.tokens_per_s_per_device)
  if rate > 0:
    seconds = num_sequences * seq_len / (rate * devices)
    print(f"expected time: {seconds / 3600:,.1f} h for {num_sequences * seq_len:,} pool tokens at {rate:,.0f} pool "
          f"tokens/s per device (score.tokens_per_s_per_device) x {devices} devices, if scoring scales linearly "
          "(it has no cross-device traffic but the per-sequence results)")
  if targets.local_compiler(cfg):  # on this machine's accelerators: XLA's own memory figures too
    real = sharding.make_mesh(cfg.mesh)
    jitted, args, _ = abstract_step(cfg, scoring_spec(spec, cfg.score), models, seq_len, None,
                                    stores.token_dtype(spec.vocab_size), real)
    print(compiler.memory_line(compiler.compile_step(jitted, args, real), targets.target(targets.LOCAL)))
  return total


def describe(cfg) -> None:
  entries, spec = model_entries(cfg)
  store = stores.TokenStore(cfg.score.store)
  cfg_model = cfg.model
  for key, value in spec.architecture().items():
    cfg_model[key] = value
  n = (np.unique(stores.load_index(cfg.score.index, store, "score.index")).size if cfg.score.index
       else store.num_sequences)
  describe_nominal(cfg, n, store.seq_len, len(entries))
