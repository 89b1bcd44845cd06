"""The device mesh, named shardings and host-to-device batch transfer.

One mesh per run, built from `config.mesh` (e.g. `[("data", -1)]`: all devices
on a data-parallel axis). Parameters are replicated; batches are sharded on
their leading axis over every mesh axis. Axes are `AxisType.Auto`: the default
Explicit axes break Linen's `nn.Dropout` on batch-sharded inputs.

Each process feeds its own rows (`global // process_count` of them) and
`jax.make_array_from_process_local_data` assembles the global batch, so the
same code runs on 1 device, N devices and many hosts.
"""

from __future__ import annotations

import collections
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


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes, the rest replicated."""
  return NamedSharding(mesh, P(mesh.axis_names))


def num_batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch axis is split into."""
  return mesh.size


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
