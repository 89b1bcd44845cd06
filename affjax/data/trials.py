"""Decoded trials: read from the TFDS dataset, or held in memory across epochs.

`read_trials` reads chosen trials of the TFDS dataset (one example per
trial) in a chosen order, decoding only the needed features.

`get_store` returns a `TrialStore`: every trial of a split decoded once and
concatenated along time into one tensor per key, plus a sentinel row

```
store.arrays[key]  [N + 1, ...]  trial i: rows offsets[i] + [0, lengths[i])
                                 row N: zeros (labels -5), read by padding
```

so a batch of windows is a single gather of row indices. Stores are kept
(LRU) while their total size stays within the memory budget
(`config.data.memory_cache_gb` per process, default 40% of the host's RAM
shared by the job's processes on that host), so every
epoch after the first reads memory only. Each store is filled trial by
trial into preallocated variables, so loading never holds two copies.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from affjax.data import splits

LABELS = "labels"
DEFAULT_MEMORY_FRACTION = 0.4
_MAX_STORES = 8


def read_trials(
  builder: Any, meta: dict[str, Any], names: Sequence[str], keep: Sequence[str]
) -> tf.data.Dataset:
  """The trials `names`, in this order, reading only their own records.

  Runs of consecutive examples of one split become one read instruction
  (`chunk3[4:9]`); only the features in `keep` (plus labels and the trial
  name) are decoded.
  """
  runs: list[list[Any]] = []
  for n in names:
    t = meta["trials"][n]
    if runs and runs[-1][0] == t["split"] and runs[-1][2] == t["index"]:
      runs[-1][2] += 1
    else:
      runs.append([t["split"], t["index"], t["index"] + 1])
  wanted = {k: True for k in (*keep, LABELS, "trial")}
  return builder.as_dataset(
    split="+".join(f"{s}[{a}:{b}]" for s, a, b in runs),
    shuffle_files=False,
    decoders=tfds.decode.PartialDecoding(wanted),
    read_config=tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1),
  )


def frame_shape(builder: Any, key: str) -> tuple[int, ...]:
  """Per-frame shape of dataset feature `key` (e.g. (48, 48, 3), (128,))."""
  return tuple(builder.info.features[key].shape[1:])


def _dtype(builder: Any, key: str) -> tf.DType:
  return tf.as_dtype(builder.info.features[key].np_dtype)


def row_bytes(builder: Any, keys: Sequence[str]) -> int:
  """Bytes of one frame of `keys` (plus labels) in a store."""
  total = 0
  for k in (*keys, LABELS):
    total += int(np.prod(frame_shape(builder, k))) * _dtype(builder, k).size
  return total


ENV_LOCAL_PROCESS_COUNT = "AFFJAX_LOCAL_PROCESS_COUNT"


def local_process_count(env: Mapping[str, str] | None = None) -> int:
  """How many processes of this job share this host's RAM.

  In order: `AFFJAX_LOCAL_PROCESS_COUNT`; SLURM's tasks per node
  (`SLURM_NTASKS_PER_NODE`, or the largest count in `SLURM_TASKS_PER_NODE`,
  e.g. "4(x2),3" -> 4); `LOCAL_WORLD_SIZE` (torchrun-style launchers); else
  1, the Cloud TPU VM layout of one process per host.

  Raises:
    ValueError: a variable that is set is not a positive count.
  """
  env = os.environ if env is None else env
  for name in (ENV_LOCAL_PROCESS_COUNT, "SLURM_NTASKS_PER_NODE"):
    if env.get(name):
      return _positive(env[name], name)
  if env.get("SLURM_TASKS_PER_NODE"):
    counts = re.findall(r"(\d+)(?:\(x\d+\))?", env["SLURM_TASKS_PER_NODE"])
    if counts:
      return max(_positive(c, "SLURM_TASKS_PER_NODE") for c in counts)
  if env.get("LOCAL_WORLD_SIZE"):
    return _positive(env["LOCAL_WORLD_SIZE"], "LOCAL_WORLD_SIZE")
  return 1


def _positive(value: str, name: str) -> int:
  try:
    count = int(value)
  except ValueError:
    count = 0
  if count < 1:
    raise ValueError(f"{name}={value!r}: expected a positive process count")
  return count


def budget_bytes(data_config: Any, env: Mapping[str, str] | None = None) -> int:
  """Memory this process's stores may hold.

  `config.data.memory_cache_gb` (per process) when set; otherwise 40% of
  the host's RAM split evenly between the processes on the host
  (`local_process_count`), so four processes on one node hold 40% together,
  not 160%.
  """
  gb = data_config.get("memory_cache_gb", None)
  if gb is not None:
    if gb < 0:
      raise ValueError(f"config.data.memory_cache_gb must be >= 0, got {gb}")
    return int(gb * 2**30)
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(ram * DEFAULT_MEMORY_FRACTION) // local_process_count(env)


@dataclasses.dataclass(frozen=True)
class TrialStore:
  """Trials of a split, concatenated in memory.

  Attributes:
    arrays: key -> variable `[N + 1, ...]` (features in the dataset's dtype,
      raw; 'labels' float32 `[N + 1, 2]`); row N is the sentinel.
    offsets: int64 `[n_trials]`, first row of each trial.
    lengths: int64 `[n_trials]`, frames.
    sentinel: N, the all-zero row (labels -5).
    nbytes: memory held.
    functions: traced batch functions over this store (`windows`).
  """

  arrays: dict[str, tf.Variable]
  offsets: np.ndarray
  lengths: np.ndarray
  sentinel: int
  nbytes: int
  functions: dict[Any, Any] = dataclasses.field(
    default_factory=dict, compare=False
  )


def load_store(
  builder: Any, meta: dict[str, Any], names: Sequence[str], keys: Sequence[str]
) -> TrialStore:
  """Decodes the trials `names` (in order) into a new `TrialStore`.

  Raises:
    ValueError: the dataset's trials disagree with its metadata.
  """
  lengths = np.array([meta["trials"][n]["n_frames"] for n in names], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  total = int(lengths.sum())
  arrays = {}
  for k in (*keys, LABELS):
    shape = (total + 1, *frame_shape(builder, k))
    init = (
      tf.fill(shape, tf.constant(splits.INVALID_LABEL, tf.float32))
      if k == LABELS
      else tf.zeros(shape, _dtype(builder, k))
    )
    arrays[k] = tf.Variable(init, trainable=False)
    del init
  ds = read_trials(builder, meta, names, keys) if names else []
  count = 0
  for i, ex in enumerate(ds):
    name = ex["trial"].numpy().decode()
    n = int(tf.shape(ex[LABELS])[0])
    if i >= len(names) or name != names[i] or n != lengths[i]:
      raise ValueError(
        f"{builder.data_dir}: example {i} is trial {name!r} of {n} "
        f"frames, the metadata expects "
        f"{names[i] if i < len(names) else None!r} of "
        f"{lengths[i] if i < len(names) else None} frames; rebuild it "
        "with affjax.data.prepare.prepare"
      )
    # A scatter is a row copy; a strided-slice assign is ~100x slower.
    rows = tf.range(int(offsets[i]), int(offsets[i]) + n)
    for k in (*keys, LABELS):
      arrays[k].scatter_update(tf.IndexedSlices(ex[k], rows))
    count += 1
  if count != len(names):
    raise ValueError(
      f"{builder.data_dir}: read {count} of {len(names)} "
      "trials; rebuild it with affjax.data.prepare.prepare"
    )
  return TrialStore(
    arrays=arrays,
    offsets=offsets,
    lengths=lengths,
    sentinel=total,
    nbytes=(total + 1) * row_bytes(builder, keys),
  )


_stores: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def get_store(
  builder: Any,
  meta: dict[str, Any],
  token: Any,
  names: Sequence[str],
  keys: Sequence[str],
  data_config: Any,
) -> TrialStore | None:
  """The memoised store of `names`/`keys`, or None if over the budget.

  Older stores are dropped (least recently used first) to make room; a
  store larger than the whole budget is not built (the caller streams the
  trials from disk instead).
  """
  budget = budget_bytes(data_config)
  need = (sum(meta["trials"][n]["n_frames"] for n in names) + 1) * row_bytes(
    builder, keys
  )
  if need > budget:
    logging.log_first_n(
      logging.INFO,
      "Trials need %.2f GB > memory budget %.2f GB "
      "(config.data.memory_cache_gb): streaming them from %s.",
      4,
      need / 2**30,
      budget / 2**30,
      builder.data_dir,
    )
    return None
  key = (token, tuple(names), tuple(keys))
  with _lock:
    if key in _stores:
      _stores.move_to_end(key)
      return _stores[key]
    while _stores and (
      len(_stores) >= _MAX_STORES
      or sum(s.nbytes for s in _stores.values()) + need > budget
    ):
      _stores.popitem(last=False)
    store = load_store(builder, meta, names, keys)
    _stores[key] = store
    return store


def clear_stores() -> None:
  """Drops every memoised store (tests, or to free memory)."""
  with _lock:
    _stores.clear()
