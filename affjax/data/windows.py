"""tf.data graph pieces: window rows, raw windows, batch finishing.

A raw window (or a batch of them, with a leading `[B]`) is a dict

  <feature>    [T, ...]  as stored (frames uint8 [T, S, S, 3], others float32)
  label        float32 [T, E]  config.data.emotions columns, time-delay
                               shifted; -5 where not annotated or padding
  frame_index  int32 [T]       frame of the trial, -1 on padding
  trial        int32           index into `Split.trial_names`, -1 for a
                               padding row
  crop         int32 [3]       (row offset, column offset, flip) of the
                               training crop

Both readers produce it with the same index rule (`window_rows`): the
in-memory path gathers a whole batch from a `trials.TrialStore`
(`store_batch_fn`), the streaming path cuts each trial read from disk
(`trial_windows_fn`). Padding positions read a sentinel row (zeros, labels
-5), so no masking pass over the data is needed. `finish_fn` then turns a
batch of raw windows into the contract's layout: the uint8 frames are
cropped and flipped per window and converted to float only there, audio
features are normalised, labels masked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from affjax.data import splits
from affjax.data.trials import LABELS

Stats = Mapping[str, tuple[np.ndarray, np.ndarray]]


def window_rows(
  offset: tf.Tensor,
  length: tf.Tensor,
  start: tf.Tensor,
  window: int,
  delay: int,
  sentinel: tf.Tensor | int,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Data rows of windows: int32 `[B]` -> three int32 `[B, window]`.

  Args:
    offset: first data row of each window's trial.
    length: frames of each window's trial (0 for a padding row).
    start: first frame of each window.
    window: frames per window.
    delay: labels are read `delay` frames later (clamped to the last frame).
    sentinel: the row read at padding positions.

  Returns:
    (frame_index (-1 on padding), feature rows, label rows).
  """
  t = start[:, None] + tf.range(window, dtype=tf.int32)[None]
  real = t < length[:, None]
  frame_index = tf.where(real, t, -1)
  rows = tf.where(real, offset[:, None] + t, sentinel)
  last = tf.maximum(length - 1, 0)[:, None]
  label_rows = tf.where(
    real, offset[:, None] + tf.minimum(t + delay, last), sentinel
  )
  return frame_index, rows, label_rows


def _gather(
  arrays: Mapping[str, Any],
  keys: Sequence[str],
  columns: Sequence[int],
  rows: tf.Tensor,
  label_rows: tf.Tensor,
) -> dict[str, tf.Tensor]:
  raw = {k: tf.gather(arrays[k], rows) for k in keys}
  raw["label"] = tf.gather(
    tf.gather(arrays[LABELS], label_rows), list(columns), axis=-1
  )
  return raw


def _columns(data_config: Any) -> list[int]:
  return [splits.EMOTION_COLUMNS[e] for e in data_config.emotions]


def store_batch_fn(
  store: Any,
  data_config: Any,
  stats: Stats,
  *,
  train: bool,
  batch_size: int,
  row_map: np.ndarray | None = None,
):
  """Plan of one batch -> finished batch, gathered from an in-memory store.

  The plan holds int32 `[B]` `trial`, `offset`, `length`, `start` and
  `[B, 3]` `crop`. The traced function is kept with the store, so later
  epochs reuse it instead of tracing again.

  `row_map` (unlabelled frames dropped): int `[M + 1]`, the store row of
  each kept frame, trials one after the other, then the store's sentinel;
  the plan's offsets and lengths then count kept frames (`kept_row_map`).
  """
  keys = list(data_config.features)
  window, delay = int(data_config.window_length), int(data_config.time_delay)
  columns = _columns(data_config)
  key = (
    tuple(keys),
    window,
    delay,
    tuple(columns),
    int(data_config.crop_size),
    train,
    int(batch_size),
    tuple((k, m.tobytes(), s.tobytes()) for k, (m, s) in sorted(stats.items())),
    bool(data_config.get("padding_in_loss", False)),
    None if row_map is None else hashlib.sha1(row_map.tobytes()).hexdigest(),
  )
  if key in store.functions:
    return store.functions[key]
  arrays, sentinel = store.arrays, store.sentinel
  finish = finish_fn(data_config, stats, train=train)
  mapping = None
  if row_map is not None:
    mapping = tf.constant(np.asarray(row_map, np.int32))
    sentinel = len(row_map) - 1

  def fn(plan):
    frame_index, rows, label_rows = window_rows(
      plan["offset"], plan["length"], plan["start"], window, delay, sentinel
    )
    if mapping is not None:
      rows = tf.gather(mapping, rows)
      label_rows = tf.gather(mapping, label_rows)
    raw = _gather(arrays, keys, columns, rows, label_rows)
    raw.update(frame_index=frame_index, trial=plan["trial"], crop=plan["crop"])
    return finish(raw)

  spec = {
    k: tf.TensorSpec([batch_size], tf.int32)
    for k in ("trial", "offset", "length", "start")
  }
  spec["crop"] = tf.TensorSpec([batch_size, 3], tf.int32)
  store.functions[key] = tf.function(
    fn, input_signature=[spec], autograph=False
  )
  return store.functions[key]


def kept_row_map(
  offsets: np.ndarray, kept_rows: Sequence[np.ndarray], sentinel: int
) -> tuple[np.ndarray, np.ndarray]:
  """Store rows of the kept frames of every trial (unlabelled dropped).

  Args:
    offsets: int `[n_trials]`, first store row of each trial.
    kept_rows: per trial, the kept frames' rows within the trial
      (`Split.kept_rows`).
    sentinel: the store's all-zero row.

  Returns:
    (row map int64 `[M + 1]`: kept frames trial after trial, then
    `sentinel`; offsets int64 `[n_trials]` of each trial in the map).
  """
  counts = [len(k) for k in kept_rows]
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  parts = [np.asarray(o + k, np.int64) for o, k in zip(offsets, kept_rows)]
  return np.concatenate([*parts, [sentinel]]).astype(np.int64), starts


def trial_windows_fn(
  data_config: Any,
  keys: Sequence[str],
  trial_index: Mapping[str, int],
  window_base: np.ndarray,
  crops: np.ndarray,
  *,
  drop_unlabelled: bool = False,
):
  """Trial example (read from disk) -> dataset of its raw windows.

  Args:
    data_config: `config.data`.
    keys: the features to emit.
    trial_index: trial name -> index into `Split.trial_names`.
    window_base: int `[n_trials]`, the split-wide id of each trial's first
      window (rows of `crops`).
    crops: int32 `[n_windows, 3]` training crops (`crop_table`).
    drop_unlabelled: delete the frames whose valence or arousal is -5
      before windowing (`config.data.unlabelled_frames = 'drop'`).
  """
  window, hop = int(data_config.window_length), int(data_config.hop_length)
  delay = int(data_config.time_delay)
  columns = _columns(data_config)
  table = tf.lookup.StaticHashTable(
    tf.lookup.KeyValueTensorInitializer(
      tf.constant(list(trial_index), tf.string),
      tf.constant(list(trial_index.values()), tf.int32),
    ),
    default_value=-1,
  )
  base = tf.constant(np.asarray(window_base, np.int32))
  crop_rows = tf.constant(np.asarray(crops, np.int32).reshape(-1, 3))

  def fn(ex):
    if drop_unlabelled:
      kept = tf.reduce_all(ex[LABELS] != splits.INVALID_LABEL, axis=1)
      ex = dict(ex)
      for k in (*keys, LABELS):
        ex[k] = tf.boolean_mask(ex[k], kept)
    length = tf.shape(ex[LABELS], out_type=tf.int32)[0]
    last = tf.maximum(length - window, 0)
    starts = tf.concat([tf.range(0, last, hop, dtype=tf.int32), [last]], 0)
    n = tf.shape(starts)[0]
    # One sentinel row after the trial, read by padding positions.
    arrays = {k: tf.concat([ex[k], tf.zeros_like(ex[k][:1])], 0) for k in keys}
    arrays[LABELS] = tf.concat(
      [ex[LABELS], tf.fill([1, 2], splits.INVALID_LABEL)], 0
    )
    frame_index, rows, label_rows = window_rows(
      tf.zeros([n], tf.int32),
      tf.fill([n], length),
      starts,
      window,
      delay,
      length,
    )
    raw = _gather(arrays, keys, columns, rows, label_rows)
    trial = table.lookup(ex["trial"])
    raw.update(
      frame_index=frame_index,
      trial=tf.fill([n], trial),
      crop=tf.gather(crop_rows, base[trial] + tf.range(n)),
    )
    return tf.data.Dataset.from_tensor_slices(raw)

  return fn


def padding_window(
  data_config: Any,
  shapes: Mapping[str, tuple[int, ...]],
  dtypes: Mapping[str, tf.DType],
) -> dict[str, tf.Tensor]:
  """A raw window of `trial = -1` (fills the last evaluation batch)."""
  t = int(data_config.window_length)
  raw = {k: tf.zeros((t, *shapes[k]), dtypes[k]) for k in shapes}
  raw.update(
    label=tf.fill([t, len(data_config.emotions)], splits.INVALID_LABEL),
    frame_index=tf.fill([t], -1),
    trial=tf.constant(-1, tf.int32),
    crop=tf.zeros([3], tf.int32),
  )
  return raw


def crop_table(seed: int, num_windows: int, max_offset: int) -> np.ndarray:
  """Training crop of every window of a split: int32 `[num_windows, 3]`.

  Row w is (row offset, column offset, flip) of window w (windows numbered
  over the split's sorted trials), uniform over `[0, max_offset]` and a fair
  coin: a function of the seed only, whatever the process count.
  """
  rng = np.random.default_rng(seed)
  offsets = rng.integers(0, max_offset + 1, (num_windows, 2))
  flips = rng.random(num_windows) < 0.5
  return np.concatenate([offsets, flips[:, None]], 1).astype(np.int32)


def _crops(
  frames: tf.Tensor, offsets: tf.Tensor | None, size: int
) -> tf.Tensor:
  """`[B, T, S, S, 3]` -> `[B, T, size, size, 3]`.

  Args:
    frames: uint8 frames; B and T static.
    offsets: int32 `[B, 3]` (row, column, flip) per window, or None for the
      centre crop of every window.
    size: crop side.
  """
  batch, length, side, _, channels = frames.shape
  if batch is None or length is None:
    raise ValueError(
      f"crops need static batch and window sizes, got "
      f"frames of shape {frames.shape}"
    )
  # Pixels and channels as one axis: a crop row is then one contiguous run
  # of bytes (slicing the 5-d uint8 tensor copies byte by byte, ~2x slower).
  rows = tf.reshape(frames, [batch, length, side, side * channels])
  if offsets is None:
    # torchvision CenterCrop: offset round((S - size) / 2).
    c = round((side - size) / 2)
    out = rows[:, :, c : c + size, c * channels : (c + size) * channels]
    return tf.reshape(out, [batch, length, size, size, channels])
  out = []
  for b in range(batch):
    w = tf.slice(
      rows[b],
      tf.stack([0, offsets[b, 0], offsets[b, 1] * channels]),
      [length, size, size * channels],
    )
    # Mirror the pixel order of each row (a 3-d reverse: ~3x faster than
    # reversing axis 2 of the 4-d window).
    w = tf.reshape(w, [length * size, size, channels])
    w = tf.cond(
      offsets[b, 2] > 0, lambda w=w: tf.reverse(w, [1]), lambda w=w: w
    )
    out.append(tf.reshape(w, [length, size, size, channels]))
  return tf.stack(out)


def finish_fn(data_config: Any, stats: Stats, *, train: bool):
  """Batch of raw windows -> batch in the contract's layout.

  Args:
    data_config: `config.data`.
    stats: audio feature -> (mean, std) of the fold.
    train: random crop + flip per window (its `crop`); else centre crop.

  Audio of padding positions is 0, or with `config.data.padding_in_loss`
  the raw zeros normalised like real frames, `(0 - mean) / std`, as the
  reference feeds them (its loss sees the model's output there).
  """
  size = int(data_config.crop_size)
  norm = {k: (tf.constant(m), tf.constant(s)) for k, (m, s) in stats.items()}
  features = list(data_config.features)
  pad_normalised = bool(data_config.get("padding_in_loss", False))

  def fn(raw):
    real = raw["frame_index"] >= 0
    mask = tf.reduce_all(raw["label"] != splits.INVALID_LABEL, -1) & real
    out = {
      "label": tf.where(mask[..., None], raw["label"], 0.0),
      "mask": mask,
      "frame_index": raw["frame_index"],
      "trial": raw["trial"],
    }
    for k in features:
      x = raw[k]
      if k == "frames":
        x = _crops(x, raw["crop"] if train else None, size)
        # Padding frames are zeros: -1 here, like missing faces.
        x = (tf.cast(x, tf.float32) / 255.0 - 0.5) / 0.5
      elif k in norm:
        x = (x - norm[k][0]) / norm[k][1]
        if not pad_normalised:
          x = tf.where(real[..., None], x, 0.0)
      out[k] = x
    return out

  return fn
