"""tf.data windows over the TFDS trials: the Data API of the team contract.

A split of a fold is a list of trials (`affjax.data.folds` over the dataset's
chunks). Each trial is cut into windows of `window_length` frames
(`affjax.data.stitch.window_starts`; a short trial gives one zero-padded
window) and every window becomes one batch row:

  frames       float32 [B, T, C, C, 3]  (x / 255 - 0.5) / 0.5; train: random
                                         CxC crop + horizontal flip per window,
                                         eval: centre crop; padding = -1
  embeddings   float32 [B, T, 512]      (cached-embedding mode)
  vggish/mfcc/egemaps float32 [B, T, D]  normalised with the fold's training
                                         statistics; 0 on padding
  label        float32 [B, T, E]        config.data.emotions order; 0 where
                                         invalid or padding
  mask         bool    [B, T]           label valid (no -5) and frame real
  frame_index  int32   [B, T]           frame of the trial, -1 on padding
  trial        int32   [B]              index into `Split.trial_names`; -1
                                         for rows padding the last eval batch

Only the features in `config.data.features` are emitted.

Normalisation follows the reference (`calculate_mean_and_std.py`): one mean
and one standard deviation per feature over all its dimensions and all
labelled frames of the fold's training trials (variance with N - 1), here
summed from the cache's per-trial `feature_sums`, and used for every split.
`config.data.normalization = 'per_dim'` (optional key) standardises each
dimension instead.

`config.data.time_delay = n` shifts each trial's labels n frames earlier and
repeats its last label (`label'[t] = label[min(t + n, L - 1)]`), over the
whole trial rather than per window as the reference does, so windows of one
trial agree where they overlap. `Split.labels` holds the shifted labels.

Multi-process: each process reads only its own trials. Training assigns the
epoch's shuffled trials greedily to the process with the fewest windows, and
every process yields `min_p(windows_p) // batch_size` batches, so all run the
same number of steps. Evaluation gives each process a contiguous run of the
sorted trials, and pads with whole `trial = -1` batches so every process
yields the same number of batches; concatenated in process order, the
windows come in the fixed single-process order.

Randomness is a function of (seed, epoch) only: trial order, the window
shuffle, and each window's crop/flip (seeded by its trial and start frame,
so it does not depend on the process count).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from affjax.data import affwild2, folds, stitch

EMOTION_COLUMNS = {"valence": 0, "arousal": 1}
VISUAL = ("frames", "embeddings")
INVALID_LABEL = -5.0
SPLITS = ("train", "validation", "test")
# Trials whose windows are mixed at once, and windows in the shuffle buffer
# (frames of a 300-frame 40x40 window are 1.4 MB as uint8).
_TRAIN_CYCLE = 4
_SHUFFLE_WINDOWS = 128
_PREFETCH = 2


@dataclasses.dataclass
class Split:
  """Host-side metadata of one split of one fold.

  Attributes:
    name: 'train' | 'validation' | 'test'.
    trial_names: sorted; `trial` ints in batches index this list.
    trial_lengths: int64 `[n_trials]`, frames.
    labels: per trial float32 `[L, n_emotions]` (time-delay shifted; -5
      where not annotated).
    label_masks: per trial bool `[L]`: every selected emotion is annotated.
    num_windows: windows of the split over all processes.
    feature_stats: audio feature -> (mean `[D]`, std `[D]`) float32, from
      the fold's training trials.
  """
  name: str
  trial_names: list[str]
  trial_lengths: np.ndarray
  labels: list[np.ndarray]
  label_masks: list[np.ndarray]
  num_windows: int
  feature_stats: dict[str, tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- metadata


@functools.lru_cache(maxsize=4)
def _builder(dataset_dir: str, fingerprint: str):
  del fingerprint  # part of the cache key: a rebuilt dataset is reopened
  return tfds.builder_from_directory(dataset_dir)


def _open(paths: Any) -> tuple[Any, dict[str, Any]]:
  meta = affwild2.read_metadata(paths.tfds_dir)
  return (_builder(affwild2.dataset_dir(paths.tfds_dir), meta["fingerprint"]),
          meta)


def _check_config(data_config: Any, meta: dict[str, Any]) -> None:
  features = tuple(data_config.features)
  available = {"frames", *affwild2.AUDIO_FEATURES}
  if meta.get("embeddings"):
    available.add("embeddings")
  missing = [f for f in features if f not in available]
  if missing:
    hint = (" (run `python -m affjax.embed` on the cache, then prepare "
            "again)" if "embeddings" in missing else "")
    raise ValueError(f"config.data.features={features} asks for {missing}; "
                     f"the dataset has {sorted(available)}{hint}")
  if sum(f in VISUAL for f in features) > 1:
    raise ValueError(f"config.data.features={features}: use 'frames' or "
                     "'embeddings', not both")
  bad = [e for e in data_config.emotions if e not in EMOTION_COLUMNS]
  if bad or not data_config.emotions:
    raise ValueError(f"config.data.emotions={tuple(data_config.emotions)}: "
                     f"expected a non-empty subset of {tuple(EMOTION_COLUMNS)}")
  if data_config.time_delay < 0:
    raise ValueError(f"config.data.time_delay must be >= 0, got "
                     f"{data_config.time_delay}")
  size = int(meta["settings"].get("frame_size", 48))
  if "frames" in features and not 0 < data_config.crop_size <= size:
    raise ValueError(f"config.data.crop_size={data_config.crop_size} must be "
                     f"in (0, {size}] (cached frame size)")
  stitch.window_starts(1, data_config.window_length, data_config.hop_length)


def split_trials(meta: dict[str, Any], fold: int, split: str) -> list[str]:
  """Sorted trial names of `split` ('train'|'validation'|'test') of `fold`."""
  train_ids, val_id = folds.fold_chunks(fold)
  if split == "train":
    names = [n for i in train_ids for n in meta["splits"][affwild2.CHUNKS[i]]]
  elif split == "validation":
    names = meta["splits"][affwild2.CHUNKS[val_id]]
  elif split == "test":
    names = meta["splits"][affwild2.TEST]
  else:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return sorted(names)


def feature_stats(meta: dict[str, Any], train_names: Sequence[str],
                  features: Sequence[str], per_dim: bool = False
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Mean/std `[D]` per audio feature over the trials' labelled frames.

  Args:
    meta: dataset metadata (per-trial `feature_sums`).
    train_names: the fold's training trials.
    features: feature names; non-audio ones are ignored.
    per_dim: per-dimension statistics instead of the reference's one scalar
      per feature (broadcast to `[D]`).

  Raises:
    ValueError: no labelled training frame carries the feature.
  """
  out = {}
  for feat in (f for f in features if f in affwild2.AUDIO_FEATURES):
    sums = [meta["trials"][n]["feature_sums"][feat] for n in train_names]
    count = float(sum(s["count"] for s in sums))
    if count < 2:
      raise ValueError(f"feature {feat!r}: {int(count)} labelled frames in "
                       "the fold's training trials; cannot normalise")
    total = np.sum([s["sum"] for s in sums], axis=0, dtype=np.float64)
    total_sq = np.sum([s["sumsq"] for s in sums], axis=0, dtype=np.float64)
    dim = total.shape[0]
    if not per_dim:
      count, total, total_sq = count * dim, total.sum(), total_sq.sum()
    mean = total / count
    var = np.maximum(total_sq - count * mean**2, 0.0) / (count - 1)
    std = np.sqrt(var)
    std = np.where(std > 1e-8, std, 1.0)
    out[feat] = (np.broadcast_to(mean, (dim,)).astype(np.float32),
                 np.broadcast_to(std, (dim,)).astype(np.float32))
  return out


def shift_labels(labels: np.ndarray, delay: int) -> np.ndarray:
  """`out[t] = labels[min(t + delay, L - 1)]` (labels delay frames earlier)."""
  if delay == 0:
    return labels
  idx = np.minimum(np.arange(labels.shape[0]) + delay, labels.shape[0] - 1)
  return labels[idx]


def _trial_labels(cache_dir: str, name: str, columns: Sequence[int],
                  delay: int) -> tuple[np.ndarray, np.ndarray]:
  path = os.path.join(cache_dir, "trials", name, "labels.npy")
  try:
    labels = np.load(path)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{path} not found: the cache no longer matches the TFDS dataset; "
        "run affjax.data.prepare.prepare again") from None
  labels = shift_labels(np.asarray(labels[:, list(columns)], np.float32),
                        delay)
  return labels, np.all(labels != INVALID_LABEL, axis=1)


def load_split(data_config: Any, paths: Any, split: str) -> Split:
  """Host-side metadata of `split` of fold `data_config.fold`.

  Args:
    data_config: `config.data`.
    paths: `affjax.data.prepare.DataPaths` (tfds_dir, cache_dir).
    split: 'train' | 'validation' | 'test'.
  """
  _, meta = _open(paths)
  _check_config(data_config, meta)
  names = split_trials(meta, data_config.fold, split)
  train_names = split_trials(meta, data_config.fold, "train")
  columns = [EMOTION_COLUMNS[e] for e in data_config.emotions]
  lengths = np.array([meta["trials"][n]["n_frames"] for n in names], np.int64)
  labels, masks = [], []
  for n, length in zip(names, lengths):
    lab, mask = _trial_labels(paths.cache_dir, n, columns,
                              data_config.time_delay)
    if lab.shape[0] != length:
      raise ValueError(f"{paths.cache_dir}/trials/{n}/labels.npy has "
                       f"{lab.shape[0]} rows, the dataset {length}: run "
                       "affjax.data.prepare.prepare again")
    labels.append(lab)
    masks.append(mask)
  per_dim = data_config.get("normalization", "scalar") == "per_dim"
  return Split(
      name=split, trial_names=names, trial_lengths=lengths, labels=labels,
      label_masks=masks,
      num_windows=sum(_num_windows(data_config, n) for n in lengths),
      feature_stats=feature_stats(meta, train_names, data_config.features,
                                  per_dim))


def _num_windows(data_config: Any, length: int) -> int:
  return stitch.num_windows(length, data_config.window_length,
                            data_config.hop_length)


# ------------------------------------------------------- process sharding


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, "
                     f"{process_count})")


def balanced_assignment(windows: Sequence[int], order: Sequence[int],
                        process_count: int) -> list[list[int]]:
  """Trials (taken in `order`) each to the process with fewest windows."""
  load = [0] * process_count
  out: list[list[int]] = [[] for _ in range(process_count)]
  for i in order:
    p = min(range(process_count), key=lambda q: (load[q], q))
    out[p].append(int(i))
    load[p] += windows[i]
  return out


def contiguous_assignment(windows: Sequence[int],
                          process_count: int) -> list[list[int]]:
  """Contiguous runs of trials with about equal windows per process."""
  cum = np.cumsum(windows)
  total = cum[-1] if len(cum) else 0
  cuts = [int(np.searchsorted(cum, total * p / process_count, side="left"))
          for p in range(1, process_count)]
  bounds = [0, *cuts, len(windows)]
  return [list(range(bounds[p], bounds[p + 1])) for p in range(process_count)]


# ----------------------------------------------------------------- tf.data


def _read_trials(builder, meta: dict[str, Any], names: Sequence[str],
                 keep: Sequence[str]) -> tf.data.Dataset:
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
  wanted = {k: True for k in (*keep, "labels", "trial")}
  return builder.as_dataset(
      split="+".join(f"{s}[{a}:{b}]" for s, a, b in runs),
      shuffle_files=False, decoders=tfds.decode.PartialDecoding(wanted),
      read_config=tfds.ReadConfig(try_autocache=False,
                                  interleave_cycle_length=1))


def _window_fn(data_config: Any, split: Split, trial_index: dict[str, int]):
  """Trial example -> dataset of its windows (uint8 frames, raw crops)."""
  window, hop = data_config.window_length, data_config.hop_length
  columns = [EMOTION_COLUMNS[e] for e in data_config.emotions]
  delay = int(data_config.time_delay)
  features = list(data_config.features)
  stats = {k: (tf.constant(m), tf.constant(s))
           for k, (m, s) in split.feature_stats.items()}
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(list(trial_index)), tf.constant(
              list(trial_index.values()), tf.int32)), default_value=-1)

  def fn(ex):
    labels = tf.gather(ex["labels"], columns, axis=1)
    length = tf.shape(labels)[0]
    if delay:
      labels = tf.gather(labels, tf.minimum(tf.range(length) + delay,
                                            length - 1))
    valid = tf.reduce_all(labels != INVALID_LABEL, axis=1)
    series = {"label": tf.where(valid[:, None], labels, 0.0), "mask": valid}
    for f in features:
      series[f] = ex[f]
      if f in stats:
        series[f] = (ex[f] - stats[f][0]) / stats[f][1]
    pad = tf.maximum(window - length, 0)
    series = {k: tf.pad(v, [[0, pad]] + [[0, 0]] * (len(v.shape) - 1))
              for k, v in series.items()}
    last = tf.maximum(length - window, 0)
    starts = tf.concat([tf.range(0, last, hop, dtype=tf.int32), [last]], 0)
    trial = table.lookup(ex["trial"])

    def cut(start):
      out = {k: v[start:start + window] for k, v in series.items()}
      index = start + tf.range(window, dtype=tf.int32)
      out["frame_index"] = tf.where(index < length, index, -1)
      out["trial"] = trial
      out["start"] = start
      return out

    return tf.data.Dataset.from_tensor_slices(starts).map(cut)

  return fn


def _crop_fn(data_config: Any, train: bool, aug_seed: int):
  """Window -> window with frames cropped (random + flip when training)."""
  crop = int(data_config.crop_size)

  def fn(w):
    if "frames" not in w:
      return w
    frames = w["frames"]
    size = tf.shape(frames)[1]
    if train:
      seed = tf.stack([tf.constant(aug_seed, tf.int64),
                       tf.cast(w["trial"], tf.int64) * 1_000_003
                       + tf.cast(w["start"], tf.int64)])
      crop_seed, flip_seed = tf.unstack(
          tf.random.experimental.stateless_split(seed, 2))
      offset = tf.random.stateless_uniform([2], crop_seed, 0, size - crop + 1,
                                           dtype=tf.int32)
      frames = frames[:, offset[0]:offset[0] + crop,
                      offset[1]:offset[1] + crop]
      flip = tf.random.stateless_uniform([], flip_seed) < 0.5
      frames = tf.cond(flip, lambda: tf.reverse(frames, [2]), lambda: frames)
    else:
      # torchvision CenterCrop: offset round((size - crop) / 2).
      off = tf.cast(tf.round(tf.cast(size - crop, tf.float32) / 2), tf.int32)
      frames = frames[:, off:off + crop, off:off + crop]
    return dict(w, frames=frames)

  return fn


def _finish(batch):
  """Batched windows -> the contract's batch layout."""
  out = {k: v for k, v in batch.items() if k != "start"}
  if "frames" in out:
    out["frames"] = (tf.cast(out["frames"], tf.float32) / 255.0 - 0.5) / 0.5
  return out


def _options() -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.autotune.ram_budget = 2 << 30
  return opts


def _seeds(seed: int, epoch: int) -> tuple[int, int, int]:
  """Trial order, window shuffle and augmentation seeds of one epoch."""
  state = np.random.SeedSequence(
      [int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0xAFF]
  ).generate_state(3, np.uint32)
  return int(state[0]), int(state[1]), int(state[2]) & 0x7FFFFFFF


def _split_and_names(data_config, paths, split):
  builder, meta = _open(paths)
  meta_split = load_split(data_config, paths, split)
  index = {n: i for i, n in enumerate(meta_split.trial_names)}
  windows = [_num_windows(data_config, n) for n in meta_split.trial_lengths]
  return builder, meta, meta_split, index, windows


def train_batches(data_config: Any, paths: Any, split: str, *,
                  batch_size: int, epoch: int, seed: int,
                  process_index: int = 0, process_count: int = 1
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
  _check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be > 0, got {batch_size}")
  builder, meta, info, index, windows = _split_and_names(
      data_config, paths, split)
  order_seed, shuffle_seed, aug_seed = _seeds(seed, epoch)
  order = np.random.default_rng(order_seed).permutation(len(windows))
  shards = balanced_assignment(windows, order, process_count)
  steps = min(sum(windows[i] for i in s) for s in shards) // batch_size
  mine = [info.trial_names[i] for i in shards[process_index]]
  if steps == 0:
    return
  keep = list(data_config.features)
  ds = _read_trials(builder, meta, mine, keep)
  ds = ds.interleave(_window_fn(data_config, info, index),
                     cycle_length=_TRAIN_CYCLE, block_length=1,
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(_crop_fn(data_config, True, aug_seed),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.shuffle(data_config.get("shuffle_buffer", _SHUFFLE_WINDOWS),
                  seed=shuffle_seed, reshuffle_each_iteration=False)
  ds = ds.batch(batch_size, drop_remainder=True).take(steps)
  ds = ds.map(_finish).prefetch(_PREFETCH).with_options(_options())
  yield from tfds.as_numpy(ds)


def eval_batches(data_config: Any, paths: Any, split: str, *,
                 batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every window of this process's trials once, in a fixed order.

  The last batch is padded with rows of `trial = -1`, `frame_index = -1`,
  `mask = False` and zero data; processes with fewer batches than the
  busiest one add whole padding batches, so all yield the same number.
  """
  _check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be > 0, got {batch_size}")
  builder, meta, info, index, windows = _split_and_names(
      data_config, paths, split)
  shards = contiguous_assignment(windows, process_count)
  n_batches = max((-(-sum(windows[i] for i in s) // batch_size)
                   for s in shards), default=0)
  mine = [info.trial_names[i] for i in shards[process_index]]
  template = None
  count = 0
  if mine:
    ds = _read_trials(builder, meta, mine, list(data_config.features))
    ds = ds.flat_map(_window_fn(data_config, info, index))
    ds = ds.map(_crop_fn(data_config, False, 0),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).map(_finish).prefetch(_PREFETCH)
    for batch in tfds.as_numpy(ds.with_options(_options())):
      template = batch
      count += 1
      yield _pad_batch(batch, batch_size)
  while count < n_batches:
    if template is None:
      template = _empty_batch(data_config, info, builder)
    count += 1
    yield _pad_batch({k: v[:0] for k, v in template.items()}, batch_size)


def _pad_batch(batch: dict[str, np.ndarray],
               batch_size: int) -> dict[str, np.ndarray]:
  n = batch["trial"].shape[0]
  if n == batch_size:
    return batch
  fill = {"trial": -1, "frame_index": -1, "mask": False, "frames": -1.0}
  return {k: np.concatenate([v, np.full((batch_size - n, *v.shape[1:]),
                                        fill.get(k, 0), v.dtype)])
          for k, v in batch.items()}


def _empty_batch(data_config: Any, info: Split,
                 builder) -> dict[str, np.ndarray]:
  """A zero-row batch with the right shapes (a process without trials)."""
  t = data_config.window_length
  out = {"label": np.zeros((0, t, len(data_config.emotions)), np.float32),
         "mask": np.zeros((0, t), bool),
         "frame_index": np.zeros((0, t), np.int32),
         "trial": np.zeros((0,), np.int32)}
  for f in data_config.features:
    if f == "frames":
      c = data_config.crop_size
      out[f] = np.zeros((0, t, c, c, 3), np.float32)
    else:
      dim = builder.info.features[f].shape[-1]
      out[f] = np.zeros((0, t, dim), np.float32)
  del info
  return out
