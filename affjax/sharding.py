"""The device mesh, named shardings and host-to-device batch transfer.

One mesh per run, built from `config.mesh` (e.g. `[("data", -1)]`: all devices
on a data-parallel axis). Parameters are replicated; batches are sharded on
their leading axis over every mesh axis except `crops`. Inside the steps the
backbone's face crops (batch and time merged) are split over all axes
(`shard_crops`), so a `crops` axis lets a batch of 8 windows use 16 or more
devices: `[("data", 8), ("crops", 2)]` on 16 chips gives each device 150 of
the 2,400 crops of a step. Axes are `AxisType.Auto`: the default Explicit
axes break Linen's `nn.Dropout` on batch-sharded inputs.

Each process feeds its own rows (`global // process_count` of them) and
`jax.make_array_from_process_local_data` assembles the global batch, so the
same code runs on 1 device, N devices and many hosts.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Batch = dict[str, Any]

# The mesh axis that splits crops inside the backbone but not the batch.
CROPS_AXIS = "crops"


def make_mesh(
  axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Builds a mesh from `(name, size)` pairs; one size may be -1 (the rest).

  Args:
    axes: e.g. `[("data", -1)]` or `[("data", 4), ("replica", 2)]`.
    devices: devices to use (default: all of `jax.devices()`).

  Raises:
    ValueError: if the sizes do not multiply to the number of devices or more
      than one size is -1.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(str(name) for name, _ in axes)
  if names == (CROPS_AXIS,):
    raise ValueError(
      f"config.mesh={list(axes)}: the batch needs an axis besides "
      f"{CROPS_AXIS!r} (e.g. [('data', -1), ('crops', 2)])"
    )
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={list(axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known == 0 or len(devices) % known:
      raise ValueError(
        f"config.mesh={list(axes)}: {len(devices)} devices "
        f"are not divisible by {known}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"config.mesh={list(axes)}: axis sizes {sizes} multiply "
      f"to {math.prod(sizes)}, expected {len(devices)} devices"
    )
  return jax.make_mesh(
    tuple(sizes),
    names,
    axis_types=(jax.sharding.AxisType.Auto,) * len(names),
    devices=devices,
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimiser state)."""
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch of windows is split over (all but `crops`)."""
  return tuple(a for a in mesh.axis_names if a != CROPS_AXIS)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `batch_axes`, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def num_batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch axis is split into."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def shard_crops(x: jax.Array) -> jax.Array:
  """Splits the leading axis over every axis of the step's mesh.

  For use inside a step traced under `with_mesh`: the backbone's
  `[B * T, H, W, C]` crops are then spread over all devices, `crops` axis
  included, whatever the batch size. Without a mesh, or when the rows do not
  divide evenly, `x` is returned unchanged (XLA keeps the batch layout).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.shape[0] % mesh.size:
    return x
  return jax.lax.with_sharding_constraint(x, P(mesh.axis_names))


def with_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` as the abstract mesh (for `shard_crops`)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises ValueError unless the batch splits evenly over devices/hosts."""
  divisor = math.lcm(num_batch_shards(mesh), jax.process_count())
  if global_batch_size % divisor:
    raise ValueError(
      f"{what}={global_batch_size} must be divisible by {divisor} "
      f"({num_batch_shards(mesh)} devices on {jax.process_count()} "
      "processes)"
    )


def global_batch(batch: Batch, mesh: Mesh) -> Batch:
  """Turns this process's numpy rows into global batch-sharded jax.Arrays.

  Args:
    batch: dict of numpy arrays `[local_batch, ...]`; this process's rows.
    mesh: the run's mesh.

  Returns:
    Dict of `jax.Array`s `[local_batch * process_count, ...]`.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    batch,
  )


def local_rows(global_rows: int) -> slice:
  """This process's rows of a global batch that every process holds whole."""
  per_process = global_rows // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def process_rows(
  global_rows: int, mesh: Mesh, process: int | None = None
) -> np.ndarray:
  """Global rows of a batch-sharded array that `process` feeds, in order.

  `jax.make_array_from_process_local_data` places a process's local rows
  into its devices' shards in increasing global order, and those shards
  need not be one block: on TPU slices `jax.make_mesh` orders devices by
  their place in the torus, so the hosts interleave (v5p:2x2x2: the 8 shards
  belong to processes 0, 1, 0, 1, ...). Feeding `batch[process_rows(...)]`
  puts every global row at its own index, so the gathered predictions line
  up with the whole batch.

  Args:
    global_rows: the global batch size.
    mesh: the run's mesh.
    process: default `jax.process_index()`.

  Returns:
    int64 indices `[global_rows // process_count]`.
  """
  process = jax.process_index() if process is None else process
  index_map = data_sharding(mesh).devices_indices_map((global_rows,))
  blocks = {
    (index[0].start or 0, index[0].stop or global_rows)
    for device, index in index_map.items()
    if device.process_index == process
  }
  return np.concatenate(
    [np.arange(start, stop) for start, stop in sorted(blocks)]
  ).astype(np.int64)


def to_host(x: jax.Array) -> np.ndarray:
  """Whole value of a (possibly multi-host) global array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def prefetch_to_device(
  batches: Iterable[Batch], mesh: Mesh, size: int = 2
) -> Iterator[Batch]:
  """Yields global device batches, keeping `size` transfers in flight.

  The transfers are asynchronous, so the next batches move to the devices
  while the current step runs. The queue is bounded: at most `size` batches
  (the one handed out included) have been pulled from `batches`.
  """
  queue = collections.deque()
  iterator = iter(batches)

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(global_batch(batch, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
