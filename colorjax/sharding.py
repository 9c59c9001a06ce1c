"""Everything that knows about devices: the mesh, logical-axis rules, shardings, multi-host start-up.

The model names axes logically ("embed", "mlp", "batch", ...); `RULES` is the single place that maps those names
to mesh axes. Parameters and optimizer state are FSDP-sharded over "fsdp" (and "tensor" where a tensor axis is
configured); batches are split over ("data", "fsdp").
"""
import contextlib
import os

import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from colorjax import errors

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes, or None = replicated). Params first, then activations.
RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "qkv": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "models": None,
}

def maybe_initialize_distributed(mode: str = "auto") -> None:
  """Join a multi-host job when the environment describes one (TPU pod, SLURM, or explicit coordinator)."""
  if mode not in ("auto", "on", "off"):
    raise errors.ConfigError(f"mesh.distributed={mode!r}; choose auto, on or off")
  if mode == "off" or jax.distributed.is_initialized():
    return
  cluster_env = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                 "OMPI_MCA_orte_hnp_uri")
  in_cluster = any(os.environ.get(name) for name in cluster_env)
  in_cluster = in_cluster or int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if mode == "auto" and "TPU_WORKER_HOSTNAMES" in os.environ:
    in_cluster = "," in os.environ["TPU_WORKER_HOSTNAMES"]
  if mode == "on" or in_cluster:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts (tests); no effect on GPU/TPU
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
      jax.distributed.initialize(
          coordinator_address=address,
          num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
          process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
      jax.distributed.initialize()
    logging.info("distributed: process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count())


def add_xla_flags(flags: str) -> None:
  """Append XLA flags to $XLA_FLAGS (read once, when the first backend starts); a flag the user already set there
  wins. GPU flags are parsed but unused on CPU and TPU."""
  current = os.environ.get("XLA_FLAGS", "")
  set_names = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in flags.split() if f.split("=", 1)[0] not in set_names]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join(current.split() + extra)


def mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """Resolve the configured (data, fsdp, tensor) sizes, one of which may be -1, against the device count."""
  sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise errors.ConfigError(f"at most one mesh axis may be -1, got {sizes}")
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if num_devices % fixed:
      raise errors.ConfigError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes ({fixed})")
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise errors.ConfigError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, but {num_devices} are "
                     "available; set --config.mesh.fsdp=-1 to use all of them")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over all devices (all hosts), laid out for fast collectives."""
  devices = jax.devices() if devices is None else list(devices)
  shape = tuple(mesh_shape(mesh_cfg, len(devices))[axis] for axis in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def abstract_mesh(mesh_cfg, num_devices: int):
  """A device-less mesh of the configured shape, for planning (dry runs) on any machine."""
  sizes = mesh_shape(mesh_cfg, num_devices)
  return jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def logical_to_spec(axes, rules: dict = RULES) -> P:
  """PartitionSpec for a tuple of logical axis names (None entries stay replicated)."""
  used: set = set()
  spec = []
  for name in axes:
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to colorjax.sharding.RULES")
    target = rules[name]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)  # a mesh axis may shard only one dim
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return P(*spec)


def _fit(spec: P, shape, mesh) -> tuple[P, list]:
  """fit_spec, plus what it dropped: (dim index, dim size, mesh axes, their size) per replicated dim."""
  fitted, dropped = [], []
  for i, (dim, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    if entry is None:
      fitted.append(None)
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    size = int(np.prod([mesh.shape[n] for n in names]))
    keep = size == 1 or dim % size == 0
    fitted.append(entry if keep else None)
    if not keep:
      dropped.append((i, dim, names, size))
  return P(*fitted), dropped


def fit_spec(spec: P, shape, mesh: Mesh) -> P:
  """Drop mesh axes from dims they do not divide evenly (small norms, odd vocab sizes); `describe_replicated`
  lists where that happened, since a silently replicated matrix costs memory on every device."""
  return _fit(spec, shape, mesh)[0]


def is_axes(x) -> bool:
  """Whether a tree node is a logical-axes tuple (a leaf), as opposed to a container such as a NamedTuple state."""
  return x is None or (type(x) is tuple and all(a is None or isinstance(a, str) for a in x))


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh):
  """NamedShardings for a tree of arrays, given a matching tree of logical-axes tuples."""
  return jax.tree.map(
      lambda leaf, axes: NamedSharding(mesh, fit_spec(logical_to_spec(axes), leaf.shape, mesh)),
      abstract_tree, axes_tree, is_leaf=is_axes)


def describe_replicated(abstract_tree, axes_tree, mesh) -> list[str]:
  """One line per leaf dim that its rule would shard but `fit_spec` left replicated (the mesh axes do not divide
  it), e.g. "embed (50257, 512): dim 0 of 50257 not split over tensor=2 (50257 % 2 != 0)"; empty if all fit."""
  lines = []
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  for (path, leaf), axes in zip(leaves, jax.tree.leaves(axes_tree, is_leaf=is_axes)):
    for i, dim, names, size in _fit(logical_to_spec(axes or ()), leaf.shape, mesh)[1]:
      over = "x".join(f"{n}={mesh.shape[n]}" for n in names)
      lines.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} {tuple(leaf.shape)}: dim {i} of {dim} "
                   f"not split over {over} ({dim} % {size} != 0)")
  return lines


def warn_replicated(abstract_tree, axes_tree, mesh) -> list[str]:
  """Log (WARNING, process 0) the parameters `describe_replicated` finds; call once per job, at start-up."""
  lines = describe_replicated(abstract_tree, axes_tree, mesh)
  if lines and jax.process_index() == 0:
    logging.warning("%d parameter dim(s) left replicated because the mesh does not divide them (%s):\n  %s",
                    len(lines), describe(mesh), "\n  ".join(lines))
  return lines


def mirror_opt_state(tx, opt_state, param_tree, non_param):
  """An optimizer-state-shaped tree: `param_tree` in place of every params-shaped part (Adam's mu and nu), and
  `non_param` for everything else (step counts). optax.tree_map_params finds those parts from `tx` itself."""
  return optax.tree_map_params(tx, lambda _, value: value, opt_state, param_tree,
                               transform_non_params=lambda _: non_param)


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh):
  """Optimizer-state shardings: laid out like the params they mirror, counts replicated."""
  return mirror_opt_state(tx, abstract_opt_state, param_shardings, replicated(mesh))


def opt_state_axes(tx, abstract_opt_state, param_axes):
  """Logical axes of every optimizer-state leaf (None = replicated), for the dry run's byte counts."""
  return mirror_opt_state(tx, abstract_opt_state, param_axes, None)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
  """Split dimension `batch_dim` of an ndim-array over the data-parallel axes; the rest replicated. [batch, seq]
  rows and [batch, models] outputs take the defaults, [batch] weights ndim=1, [n_micro, micro, seq] batch_dim=1."""
  spec = [None] * ndim
  spec[batch_dim] = RULES["batch"]
  return NamedSharding(mesh, P(*spec))


def data_parallel_size(mesh: Mesh) -> int:
  names = RULES["batch"]
  return int(np.prod([mesh.shape[n] for n in names]))


@contextlib.contextmanager
def use_mesh(mesh):
  """Make `constrain` annotate activations for this mesh while tracing inside the block (call outside jit).

  JAX's own context: jax.set_mesh for a device mesh, use_abstract_mesh for a dry run's AbstractMesh, so jit caches
  key on the mesh. Note that under jax.set_mesh eager ops also run on the whole mesh (arrays committed to a single
  other device cannot mix with them there).
  """
  setter = jax.sharding.use_abstract_mesh if isinstance(mesh, jax.sharding.AbstractMesh) else jax.set_mesh
  with setter(mesh):
    yield mesh


def constrain(x, axes):
  """Annotate an activation with logical axes; identity when no mesh is active (e.g. plain CPU use)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, fit_spec(logical_to_spec(axes), x.shape, mesh))


def host_rows(sharding: NamedSharding, global_shape, dim: int = 0) -> tuple[int, int]:
  """The contiguous [start, stop) range of `dim` that this host's devices hold (what this host must load)."""
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    piece = index[dim]
    starts.append(piece.start or 0)
    stops.append(global_shape[dim] if piece.stop is None else piece.stop)
  start, stop = min(starts), max(stops)
  covered = sum(b - a for a, b in sorted(set(zip(starts, stops))))
  if covered != stop - start:
    raise ValueError(f"this host's rows of dim {dim} are not contiguous: {sorted(set(zip(starts, stops)))}")
  return start, stop


def put_host_rows(local_rows: np.ndarray, sharding: NamedSharding, global_shape, row_start: int, dim: int = 0):
  """A global jax.Array from the rows this host holds (rows [row_start, row_start + len) of dim)."""

  def callback(index):
    index = list(index)
    piece = index[dim]
    start = (piece.start or 0) - row_start
    stop = (global_shape[dim] if piece.stop is None else piece.stop) - row_start
    index[dim] = slice(start, stop)
    return local_rows[tuple(index)]

  return jax.make_array_from_callback(tuple(global_shape), sharding, callback)


def describe(mesh: Mesh) -> str:
  return " ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.size} devices)"
