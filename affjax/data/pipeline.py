"""tf.data windows over the TFDS trials: the batches training and scoring read.

A split of a fold is a list of trials (`affjax.data.splits`). Each trial is
cut into windows of `window_length` frames (`affjax.data.stitch.
window_starts`; a short trial gives one padded window) and every window
becomes one batch row:

  frames       float32 [B, T, C, C, 3]  (x / 255 - 0.5) / 0.5; train: random
                                         CxC crop + horizontal flip per window,
                                         eval: centre crop; padding = -1
  embeddings   float32 [B, T, 512]      (cached-embedding mode)
  vggish/mfcc/egemaps float32 [B, T, D]  normalised (`splits`,
                                         config.data.audio_stats); 0 on
                                         padding, or (0 - mean) / std with
                                         config.data.padding_in_loss
  label        float32 [B, T, E]        config.data.emotions order; 0 where
                                         invalid or padding
  mask         bool    [B, T]           label valid (no -5) and frame real
  frame_index  int32   [B, T]           frame of the trial, -1 on padding
  trial        int32   [B]              index into `Split.trial_names`; -1
                                         for rows padding the last eval batch

Only the features in `config.data.features` are emitted.

Reading. When the split's decoded trials fit the memory budget
(`config.data.memory_cache_gb`, default 40% of RAM; `affjax.data.trials`),
they are decoded once and kept in memory; each epoch is then a plan (which
window, which crop, in which order: small numpy arrays) and every batch is
one gather from memory (`windows.store_batch_fn`). Otherwise the epoch's
trials are streamed from disk, windowed per trial and mixed in a shuffle
buffer (`windows.trial_windows_fn`). Both paths cut the same windows with
the same crops; evaluation batches are identical, training differs in the
order only (a full shuffle of the epoch's windows in memory, a
`shuffle_buffer`-window buffer over `_TRAIN_CYCLE` interleaved trials when
streaming). Frames stay uint8 until the batch's crop; all per-batch work is
vectorised TF ops in a parallel, deterministic `map`.

Multi-process: training assigns the epoch's shuffled trials greedily to the
process with the fewest windows, and every process yields
`min_p(windows_p) // batch_size` batches of windows of its own trials, so
all run the same number of steps. Evaluation gives each process a
contiguous run of the sorted trials, and pads with whole `trial = -1`
batches so every process yields the same number of batches; concatenated
in process order, the windows come in the fixed single-process order. A
process keeps the whole split in memory (assignments change per epoch) or
streams only its own trials.

Window order (`config.data.window_order`): 'every_epoch' as above, or
'once' (the reference's): every training window in one order drawn once
from the seed (`replayed_window_order`), the same in every epoch, the last
partial batch kept and padded with `trial = -1` rows; it needs the training
split in memory. Frames labelled -5 are deleted before windowing when
`config.data.unlabelled_frames = 'drop'` (`splits`).

Randomness is a function of (seed, epoch) only: trial order, the window
shuffle, and each window's crop/flip (`windows.crop_table`, drawn per window
of the split, so it does not depend on the process count).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from affjax.data import affwild2, folds, splits, stitch, trials, windows
from affjax.data.splits import (  # noqa: F401  (the Data API's names)
  EMOTION_COLUMNS,
  INVALID_LABEL,
  SPLITS,
  VISUAL,
  Split,
  feature_stats,
  load_split,
  require_trials,
  shift_labels,
  split_trials,
)

# Streaming: trials whose windows are mixed at once, and windows in the
# shuffle buffer (a raw 300-frame 48x48 window is 2 MB as uint8).
_TRAIN_CYCLE = 4
_SHUFFLE_WINDOWS = 128
_PREFETCH = 2


# ------------------------------------------------------- process sharding


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} not in [0, {process_count})"
    )


def balanced_assignment(
  windows_per_trial: Sequence[int], order: Sequence[int], process_count: int
) -> list[list[int]]:
  """Trials (taken in `order`) each to the process with fewest windows."""
  load = [0] * process_count
  out: list[list[int]] = [[] for _ in range(process_count)]
  for i in order:
    p = min(range(process_count), key=lambda q: (load[q], q))
    out[p].append(int(i))
    load[p] += windows_per_trial[i]
  return out


def contiguous_assignment(
  windows_per_trial: Sequence[int], process_count: int
) -> list[list[int]]:
  """Contiguous runs of trials with about equal windows per process."""
  cum = np.cumsum(windows_per_trial)
  total = cum[-1] if len(cum) else 0
  cuts = [
    int(np.searchsorted(cum, total * p / process_count, side="left"))
    for p in range(1, process_count)
  ]
  bounds = [0, *cuts, len(windows_per_trial)]
  return [list(range(bounds[p], bounds[p + 1])) for p in range(process_count)]


# ------------------------------------------------------------------ setup


def _options(optimize: bool = True) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.autotune.ram_budget = 2 << 30
  # The in-memory graph (slices -> parallel map) has nothing to rewrite;
  # skipping the rewrites saves ~0.1 s per epoch.
  opts.experimental_optimization.apply_default_optimizations = optimize
  return opts


def _seeds(seed: int, epoch: int) -> tuple[int, int, int]:
  """Trial order, window shuffle and augmentation seeds of one epoch."""
  state = np.random.SeedSequence(
    [int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0xAFF]
  ).generate_state(3, np.uint32)
  return int(state[0]), int(state[1]), int(state[2]) & 0x7FFFFFFF


class _Reader:
  """One split's windows, read from memory or streamed from disk."""

  def __init__(
    self,
    data_config: Any,
    paths: Any,
    split: str,
    batch_size: int,
    process_index: int,
    process_count: int,
  ):
    _check_process(process_index, process_count)
    if batch_size <= 0:
      raise ValueError(f"batch_size must be > 0, got {batch_size}")
    self.config, self.batch_size = data_config, batch_size
    self.builder, self.meta, token = splits.open_dataset(paths)
    self.split = load_split(data_config, paths, split)
    self.keys = list(data_config.features)
    self.starts = [
      stitch.window_starts(n, data_config.window_length, data_config.hop_length)
      for n in self.split.trial_lengths
    ]
    self.windows = [len(s) for s in self.starts]
    self.first_window = np.cumsum([0, *self.windows[:-1]]).astype(np.int64)
    self.store = None
    if self.split.trial_names:
      self.store = trials.get_store(
        self.builder,
        self.meta,
        token,
        self.split.trial_names,
        self.keys,
        data_config,
      )
    # Where each trial's frames are in the store: its rows, or (unlabelled
    # frames dropped) its run in `row_map`, which points at the kept rows.
    self.row_map = None
    if self.store is not None:
      self.offsets, self.lengths = self.store.offsets, self.store.lengths
      if self.split.kept_rows is not None:
        self.row_map, self.offsets = windows.kept_row_map(
          self.store.offsets, self.split.kept_rows, self.store.sentinel
        )
        self.lengths = np.asarray(self.split.trial_lengths, np.int64)

  def crops(self, seed: int | None) -> np.ndarray:
    """`[n_windows, 3]` training crops of the split; zeros for None/eval."""
    total = sum(self.windows)
    if seed is None or "frames" not in self.keys:
      return np.zeros((total, 3), np.int32)
    return windows.crop_table(
      seed, total, splits.frame_size(self.meta) - self.config.crop_size
    )

  def _finish(self, train: bool):
    return windows.finish_fn(self.config, self.split.feature_stats, train=train)

  def _windows_of(self, order: Sequence[int]) -> tuple[np.ndarray, ...]:
    """(trial, start, split-wide window id) of the windows of `order`."""
    empty = [np.zeros(0, np.int64)]
    trial = np.concatenate(
      [np.full(self.windows[i], i, np.int64) for i in order] + empty
    )
    start = np.concatenate([self.starts[i] for i in order] + empty)
    wid = np.concatenate(
      [self.first_window[i] + np.arange(self.windows[i]) for i in order] + empty
    )
    return trial, start, wid

  def from_memory(
    self,
    order: Sequence[int],
    crops: np.ndarray,
    *,
    train: bool,
    num_batches: int,
    shuffle_seed: int | None = None,
  ) -> tf.data.Dataset:
    """Batches of the windows of trials `order` (all shuffled if a seed is
    given), cut to `num_batches` or padded with `trial = -1` rows."""
    trial, start, wid = self._windows_of(order)
    if shuffle_seed is not None:
      perm = np.random.default_rng(shuffle_seed).permutation(len(trial))
      trial, start, wid = trial[perm], start[perm], wid[perm]
    return self.from_windows(
      trial, start, wid, crops, train=train, num_batches=num_batches
    )

  def from_windows(
    self,
    trial: np.ndarray,
    start: np.ndarray,
    wid: np.ndarray,
    crops: np.ndarray,
    *,
    train: bool,
    num_batches: int,
  ) -> tf.data.Dataset:
    """Batches of the given windows in this order (trial index, start frame,
    split-wide window id each), cut to `num_batches` or padded with
    `trial = -1` rows."""
    rows = num_batches * self.batch_size
    n = min(len(trial), rows)
    pad = rows - n
    trial = trial[:n]
    plan = {
      "trial": np.pad(trial, (0, pad), constant_values=-1),
      "offset": np.pad(self.offsets[trial], (0, pad)),
      "length": np.pad(self.lengths[trial], (0, pad)),
      "start": np.pad(start[:n], (0, pad)),
      "crop": np.pad(crops[wid[:n]], ((0, pad), (0, 0))),
    }
    plan = {
      k: v.astype(np.int32).reshape(num_batches, self.batch_size, *v.shape[1:])
      for k, v in plan.items()
    }
    fn = windows.store_batch_fn(
      self.store,
      self.config,
      self.split.feature_stats,
      train=train,
      batch_size=self.batch_size,
      row_map=self.row_map,
    )
    ds = tf.data.Dataset.from_tensor_slices(plan).map(
      fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return ds.with_options(_options(optimize=False))

  def streamed(
    self,
    order: Sequence[int],
    crops: np.ndarray,
    *,
    train: bool,
    num_batches: int,
    shuffle_seed: int | None = None,
  ) -> tf.data.Dataset:
    """Like `from_memory`, reading the trials from disk: windows are mixed
    over `_TRAIN_CYCLE` trials and a shuffle buffer if a seed is given."""
    names = [self.split.trial_names[i] for i in order]
    index = {n: i for i, n in enumerate(self.split.trial_names)}
    cut = windows.trial_windows_fn(
      self.config,
      self.keys,
      index,
      self.first_window,
      crops,
      drop_unlabelled=self.split.kept_rows is not None,
    )
    read = (
      trials.read_trials(self.builder, self.meta, names, self.keys)
      if names
      else None
    )
    if shuffle_seed is not None:
      ds = read.interleave(
        cut,
        cycle_length=_TRAIN_CYCLE,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
      )
      ds = ds.shuffle(
        self.config.get("shuffle_buffer", _SHUFFLE_WINDOWS),
        seed=shuffle_seed,
        reshuffle_each_iteration=False,
      )
    else:
      ds = read.flat_map(cut) if read is not None else None
      pad = num_batches * self.batch_size - sum(self.windows[i] for i in order)
      shapes = {k: trials.frame_shape(self.builder, k) for k in self.keys}
      dtypes = {
        k: tf.as_dtype(self.builder.info.features[k].np_dtype)
        for k in self.keys
      }
      padding = tf.data.Dataset.from_tensors(
        windows.padding_window(self.config, shapes, dtypes)
      ).repeat(pad)
      ds = padding if ds is None else ds.concatenate(padding)
    ds = ds.batch(self.batch_size, drop_remainder=True).take(num_batches)
    ds = ds.map(
      self._finish(train),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    return ds.with_options(_options())

  def batches(
    self,
    order: Sequence[int],
    crops: np.ndarray,
    *,
    train: bool,
    num_batches: int,
    shuffle_seed: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    make = self.from_memory if self.store is not None else self.streamed
    ds = make(
      order,
      crops,
      train=train,
      num_batches=num_batches,
      shuffle_seed=shuffle_seed,
    )
    yield from tfds.as_numpy(ds.prefetch(_PREFETCH))


# --------------------------------------------------------------- iterators


def train_batches(
  data_config: Any,
  paths: Any,
  split: str,
  *,
  batch_size: int,
  epoch: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of shuffled, augmented training batches of this process.

  Args:
    data_config: `config.data`.
    paths: DataPaths.
    split: usually 'train'.
    batch_size: rows per batch of this process (global // process_count).
    epoch: folded into every seed, so each epoch differs reproducibly.
    seed: the run's data seed.
    process_index, process_count: this process and how many read the split.

  Yields:
    Batches in the layout of the module docstring, `min_p(windows_p) //
    batch_size` of them (drop remainder).
  """
  reader = _Reader(
    data_config, paths, split, batch_size, process_index, process_count
  )
  order_seed, shuffle_seed, aug_seed = _seeds(seed, epoch)
  if data_config.get("window_order", "every_epoch") == "once":
    yield from _replayed_epoch(
      reader, seed, aug_seed, process_index, process_count
    )
    return
  order = np.random.default_rng(order_seed).permutation(len(reader.windows))
  shards = balanced_assignment(reader.windows, order, process_count)
  steps = min(sum(reader.windows[i] for i in s) for s in shards) // batch_size
  if steps:
    yield from reader.batches(
      shards[process_index],
      reader.crops(aug_seed),
      train=True,
      num_batches=steps,
      shuffle_seed=shuffle_seed,
    )


def reference_trial_order(
  meta: dict[str, Any], fold: int, names: Sequence[str]
) -> list[int]:
  """Indices into `names` (a training split's sorted trials) in the order
  the reference lists them: chunk after chunk in the fold's rolled chunk
  order (`folds.fold_chunks`), each chunk's trials sorted."""
  index = {n: i for i, n in enumerate(names)}
  train_ids, _ = folds.fold_chunks(fold)
  return [
    index[n]
    for c in train_ids
    for n in sorted(meta["splits"][affwild2.CHUNKS[c]])
    if n in index
  ]


def replayed_window_order(
  reader: _Reader, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(trial, start, window id) of every training window, in the order of
  every epoch under `config.data.window_order = 'once'`.

  The reference (`experiment_regular.py`) lists the windows trial after
  trial in its fold order (`reference_trial_order`), shuffles that list
  once with Python's `random` seeded with 0 and a `DataLoader` without
  shuffling replays it every epoch. `random.Random(seed).shuffle` is the
  same draw, so with `seed = 0` the order is the reference's.
  """
  order = reference_trial_order(
    reader.meta, reader.config.fold, reader.split.trial_names
  )
  trial, start, wid = reader._windows_of(order)
  perm = list(range(len(trial)))
  random.Random(seed).shuffle(perm)
  return trial[perm], start[perm], wid[perm]


def _replayed_epoch(
  reader: _Reader,
  seed: int,
  aug_seed: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of `replayed_window_order`, every window once.

  Global batch g holds windows `[g G, (g + 1) G)` (G = batch_size x
  process_count; process p its rows `[p B, (p + 1) B)`). The last global
  batch keeps its partial windows, as the reference's `DataLoader` does;
  rows past them are `trial = -1` padding, which no loss counts (they still
  pass through the model, so in train mode they enter the BatchNorm batch
  statistics of that one step).
  """
  if reader.store is None:
    raise ValueError(
      "config.data.window_order='once' replays one order of all training "
      "windows and needs the training split in memory, but it exceeds "
      "the memory budget (config.data.memory_cache_gb): raise "
      "config.data.memory_cache_gb or use window_order='every_epoch'"
    )
  trial, start, wid = replayed_window_order(reader, seed)
  per, total = reader.batch_size, reader.batch_size * process_count
  num_batches = -(-len(trial) // total)
  rows = np.arange(len(trial))
  mine = (rows % total) // per == process_index
  if num_batches:
    yield from tfds.as_numpy(
      reader.from_windows(
        trial[mine],
        start[mine],
        wid[mine],
        reader.crops(aug_seed),
        train=True,
        num_batches=num_batches,
      ).prefetch(_PREFETCH)
    )


def eval_batches(
  data_config: Any,
  paths: Any,
  split: str,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every window of this process's trials once, in a fixed order.

  The last batch is padded with rows of `trial = -1`, `frame_index = -1`,
  `mask = False`, zero features and frames of -1; processes with fewer
  batches than the busiest one add whole padding batches, so all yield the
  same number.
  """
  reader = _Reader(
    data_config, paths, split, batch_size, process_index, process_count
  )
  shards = contiguous_assignment(reader.windows, process_count)
  n_batches = max(
    (-(-sum(reader.windows[i] for i in s) // batch_size) for s in shards),
    default=0,
  )
  if n_batches:
    yield from reader.batches(
      shards[process_index],
      reader.crops(None),
      train=False,
      num_batches=n_batches,
    )
