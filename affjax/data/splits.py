"""Host-side metadata of a split: trials, labels, normalisation statistics.

A split of a fold is a list of trials (`affjax.data.folds` over the TFDS
dataset's chunks). `load_split` returns its `Split`: sorted trial names,
lengths, per-trial labels and masks (read from the feature cache's
`labels.npy`, small), the number of windows and the fold's audio feature
statistics.

Frames whose valence or arousal is -5 (`config.data.unlabelled_frames`):
'mask' keeps them in the trial (masked in the loss and the metrics); 'drop'
deletes them from training and validation trials before windowing, as the
reference deletes them before caching (sucv/ABAW2 `preprocessing.py`), so a
trial's length is its count of labelled frames and windows run across the
gaps. `Split.kept_rows` then maps each trial's frames to the cached rows.
Test trials have no labels and are never cut.

Audio normalisation (`config.data.audio_stats`): one mean and one standard
deviation per feature over all its dimensions and the labelled frames of
some trials (variance with N - 1, the reference's `calculate_mean_and_std.
py`), summed from the cache's per-trial `feature_sums`. Which trials:
'train' (affjax's choice) uses the fold's training trials for every split,
so nothing of the validation or test audio enters its own normalisation;
'per_partition' (the reference, `base/dataset.py`) normalises each split
with its own statistics, which is transductive for validation and test;
'imported' reads the statistics an imported sucv/ABAW2 dataset came with
(`affjax.data.import_reference`). `config.data.normalization = 'per_dim'`
(optional key) standardises each dimension instead of one scalar.

`config.data.time_delay = n` shifts each trial's labels n frames earlier and
repeats its last label (`label'[t] = label[min(t + n, L - 1)]`), over the
whole trial rather than per window as the reference does, so windows of one
trial agree where they overlap. `Split.labels` holds the shifted labels.

The training loop asks for the same splits every epoch, so the dataset's
metadata and each `Split` are memoised. The memo keys include the identity
(inode, size, mtime, ctime) of every file of the TFDS dataset and of every
`labels.npy` read, so a rebuilt dataset or an edited cache is read again.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from affjax.data import affwild2, folds, stitch

EMOTION_COLUMNS = {"valence": 0, "arousal": 1}
VISUAL = ("frames", "embeddings")
INVALID_LABEL = -5.0
SPLITS = ("train", "validation", "test")
UNLABELLED_FRAMES = ("mask", "drop")
AUDIO_STATS = ("train", "per_partition", "imported")
WINDOW_ORDERS = ("every_epoch", "once")
# Statistics of an imported sucv/ABAW2 dataset, in the feature cache:
# {feature: {fold: {split: {"mean": float, "std": float}}}}.
IMPORTED_STATS = "reference_stats.json"
_MEMO_SPLITS = 16
_MANIFEST = "manifest.json"  # of the feature cache


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
    feature_stats: audio feature -> (mean `[D]`, std `[D]`) float32
      (`config.data.audio_stats`).
    kept_rows: None, or (unlabelled frames dropped) per trial int64 `[L]`,
      the cached rows of its frames; `trial_lengths`, `labels` and
      `label_masks` then count kept frames only.
  """

  name: str
  trial_names: list[str]
  trial_lengths: np.ndarray
  labels: list[np.ndarray]
  label_masks: list[np.ndarray]
  num_windows: int
  feature_stats: dict[str, tuple[np.ndarray, np.ndarray]]
  kept_rows: list[np.ndarray] | None = None


# ---------------------------------------------------------------- dataset


def _file_id(path: str) -> tuple[int, ...]:
  # ctime cannot be set back (a copy keeping the mtime still changes it).
  st = os.stat(path)
  return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def dataset_token(tfds_dir: str) -> tuple[Any, ...]:
  """Identity of the dataset files in `tfds_dir` (changes on a rebuild).

  Raises:
    FileNotFoundError: no dataset there (naming the path).
  """
  path = affwild2.dataset_dir(tfds_dir)
  try:
    names = sorted(os.listdir(path))
  except FileNotFoundError:
    names = []
  if "metadata.json" not in names:
    affwild2.read_metadata(tfds_dir)  # raises the descriptive error
  return tuple((n, *_file_id(os.path.join(path, n))) for n in names)


@functools.lru_cache(maxsize=4)
def _opened(tfds_dir: str, token: tuple[Any, ...]):
  del token  # part of the cache key: a rebuilt dataset is reopened
  return (
    tfds.builder_from_directory(affwild2.dataset_dir(tfds_dir)),
    affwild2.read_metadata(tfds_dir),
  )


def open_dataset(paths: Any) -> tuple[Any, dict[str, Any], tuple[Any, ...]]:
  """(TFDS builder, metadata, dataset token) of `paths.tfds_dir`."""
  token = dataset_token(paths.tfds_dir)
  builder, meta = _opened(os.path.abspath(paths.tfds_dir), token)
  return builder, meta, token


def check_data_config(data_config: Any, meta: dict[str, Any]) -> None:
  """Checks `config.data` against the TFDS dataset's metadata `meta`.

  The features asked for exist in the dataset, emotions are known columns,
  the time delay is >= 0 and the crop fits the cached frames.

  Raises:
    ValueError: naming the bad `config.data` key.
  """
  features = tuple(data_config.features)
  available = {"frames", *affwild2.AUDIO_FEATURES}
  if meta.get("embeddings"):
    available.add("embeddings")
  missing = [f for f in features if f not in available]
  if missing:
    hint = (
      " (run `python -m affjax.embed` on the cache, then prepare again)"
      if "embeddings" in missing
      else ""
    )
    raise ValueError(
      f"config.data.features={features} asks for {missing}; "
      f"the dataset has {sorted(available)}{hint}"
    )
  if sum(f in VISUAL for f in features) > 1:
    raise ValueError(
      f"config.data.features={features}: use 'frames' or 'embeddings', not both"
    )
  bad = [e for e in data_config.emotions if e not in EMOTION_COLUMNS]
  if bad or not data_config.emotions:
    raise ValueError(
      f"config.data.emotions={tuple(data_config.emotions)}: "
      f"expected a non-empty subset of {tuple(EMOTION_COLUMNS)}"
    )
  if data_config.time_delay < 0:
    raise ValueError(
      f"config.data.time_delay must be >= 0, got {data_config.time_delay}"
    )
  size = frame_size(meta)
  if "frames" in features and not 0 < data_config.crop_size <= size:
    raise ValueError(
      f"config.data.crop_size={data_config.crop_size} must be "
      f"in (0, {size}] (cached frame size)"
    )
  stitch.window_starts(1, data_config.window_length, data_config.hop_length)
  for key, allowed in (
    ("unlabelled_frames", UNLABELLED_FRAMES),
    ("audio_stats", AUDIO_STATS),
    ("window_order", WINDOW_ORDERS),
  ):
    value = data_config.get(key, allowed[0])
    if value not in allowed:
      raise ValueError(
        f"config.data.{key}={value!r}: expected one of {allowed}"
      )


def frame_size(meta: dict[str, Any]) -> int:
  """Side of the cached square face crops, pixels."""
  return int(meta["settings"].get("frame_size", 48))


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


def _skipped_trials(cache_dir: str) -> dict[str, dict[str, Any]]:
  """`manifest.json["skipped"]` of the feature cache; {} if unreadable."""
  try:
    with open(os.path.join(cache_dir, _MANIFEST)) as f:
      return dict(json.load(f).get("skipped", {}))
  except (OSError, ValueError, AttributeError):
    return {}


def _partitions(fold: int, split: str) -> set[str]:
  """Raw partitions ('train', 'validation', 'test') feeding `split`."""
  if split == "test":
    return {"test"}
  train_ids, val_id = folds.fold_chunks(fold)
  ids = train_ids if split == "train" else [val_id]
  # The last chunk is the official validation set (`affwild2.CHUNKS`).
  last = len(affwild2.CHUNKS) - 1
  return {"validation" if i == last else "train" for i in ids}


def require_trials(split: Split, paths: Any, fold: int) -> None:
  """Raises ValueError if `split` has no trial, naming the skipped trials.

  Preprocessing skips trials without a single valid label and records them
  under the cache's `manifest.json["skipped"]`. A split emptied that way
  must stop a run before training: otherwise a whole epoch trains before
  evaluation finds nothing to score.

  Args:
    split: from `load_split`.
    paths: `affjax.data.prepare.DataPaths` (cache_dir).
    fold: `config.data.fold`.
  """
  if split.trial_names:
    return
  partitions = _partitions(fold, split.name)
  skipped = {
    name: entry
    for name, entry in sorted(_skipped_trials(paths.cache_dir).items())
    if entry.get("partition") in partitions
  }
  where = f"the {split.name} split of fold {fold} (config.data.fold)"
  if not skipped:
    raise ValueError(
      f"{where} has no trials: the dataset in {paths.tfds_dir} has none of "
      f"partition {sorted(partitions)} for it; add trials to the raw data "
      "or choose another config.data.fold"
    )
  listed = "; ".join(
    f"{name} ({entry.get('reason', 'no reason recorded')})"
    for name, entry in skipped.items()
  )
  raise ValueError(
    f"{where} has no trials: preprocessing skipped {len(skipped)} trial(s) "
    f"of partition {sorted(partitions)}, as recorded in "
    f'{os.path.join(paths.cache_dir, _MANIFEST)}["skipped"]: {listed}. '
    "Fix their annotations and preprocess again, or choose another "
    "config.data.fold"
  )


def feature_stats(
  meta: dict[str, Any],
  train_names: Sequence[str],
  features: Sequence[str],
  per_dim: bool = False,
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
      raise ValueError(
        f"feature {feat!r}: {int(count)} labelled frames in "
        "the fold's training trials; cannot normalise"
      )
    total = np.sum([s["sum"] for s in sums], axis=0, dtype=np.float64)
    total_sq = np.sum([s["sumsq"] for s in sums], axis=0, dtype=np.float64)
    dim = total.shape[0]
    if not per_dim:
      count, total, total_sq = count * dim, total.sum(), total_sq.sum()
    mean = total / count
    var = np.maximum(total_sq - count * mean**2, 0.0) / (count - 1)
    std = np.sqrt(var)
    std = np.where(std > 1e-8, std, 1.0)
    out[feat] = (
      np.broadcast_to(mean, (dim,)).astype(np.float32),
      np.broadcast_to(std, (dim,)).astype(np.float32),
    )
  return out


def shift_labels(labels: np.ndarray, delay: int) -> np.ndarray:
  """`out[t] = labels[min(t + delay, L - 1)]` (labels delay frames earlier)."""
  if delay == 0:
    return labels
  idx = np.minimum(np.arange(labels.shape[0]) + delay, labels.shape[0] - 1)
  return labels[idx]


def num_windows(data_config: Any, length: int) -> int:
  """Windows of a trial of `length` frames under `data_config`."""
  return stitch.num_windows(
    length, data_config.window_length, data_config.hop_length
  )


def _labels_path(cache_dir: str, name: str) -> str:
  return os.path.join(cache_dir, "trials", name, "labels.npy")


def _missing_labels(path: str) -> FileNotFoundError:
  return FileNotFoundError(
    f"{path} not found: the cache no longer matches the TFDS dataset; "
    "run affjax.data.prepare.prepare again"
  )


def _trial_labels(
  path: str, columns: Sequence[int], delay: int, drop: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
  """(labels `[L, E]`, mask `[L]`, kept rows or None, cached rows).

  With `drop`, frames where valence or arousal is -5 are deleted first
  (whatever the trained emotions, as the reference's preprocessing does);
  the time delay then shifts over the kept frames.
  """
  try:
    full = np.load(path)
  except FileNotFoundError:
    raise _missing_labels(path) from None
  kept, rows = None, full.shape[0]
  if drop:
    kept = np.flatnonzero(np.all(full != INVALID_LABEL, axis=1))
    full = full[kept]
  labels = shift_labels(np.asarray(full[:, list(columns)], np.float32), delay)
  return labels, np.all(labels != INVALID_LABEL, axis=1), kept, rows


def imported_stats(
  cache_dir: str,
  fold: int,
  split: str,
  features: Sequence[str],
  dims: dict[str, int],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Audio statistics recorded by `affjax.data.import_reference`.

  Raises:
    FileNotFoundError: the cache has no `reference_stats.json` (it was not
      imported from a sucv/ABAW2 dataset).
    ValueError: the file lacks the feature, fold or split.
  """
  path = os.path.join(cache_dir, IMPORTED_STATS)
  try:
    with open(path) as f:
      table = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(
      f"config.data.audio_stats='imported' but {path} does not exist: the "
      "cache was not imported with affjax.data.import_reference; use "
      "'per_partition' or 'train'"
    ) from None
  out = {}
  for feat in (f for f in features if f in affwild2.AUDIO_FEATURES):
    try:
      entry = table[feat][str(fold)][split]
      mean, std = float(entry["mean"]), float(entry["std"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(
        f"{path} has no mean/std of feature {feat!r}, fold {fold}, split "
        f"{split!r}"
      ) from None
    out[feat] = (
      np.full(dims[feat], mean, np.float32),
      np.full(dims[feat], std if std > 1e-8 else 1.0, np.float32),
    )
  return out


def _copy(split: Split) -> Split:
  """A Split whose containers (not arrays) are its own."""
  return dataclasses.replace(
    split,
    trial_names=list(split.trial_names),
    labels=list(split.labels),
    label_masks=list(split.label_masks),
    feature_stats=dict(split.feature_stats),
    kept_rows=None if split.kept_rows is None else list(split.kept_rows),
  )


_split_memo: collections.OrderedDict = collections.OrderedDict()
_split_lock = threading.Lock()


def _stats(
  mode: str,
  meta: dict[str, Any],
  paths: Any,
  data_config: Any,
  split: str,
  names: Sequence[str],
  per_dim: bool,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Audio statistics of `split` under `config.data.audio_stats = mode`."""
  features = data_config.features
  if mode == "imported":
    dims = {}
    for feat in (f for f in features if f in affwild2.AUDIO_FEATURES):
      sums = next(iter(meta["trials"].values()))["feature_sums"][feat]
      dims[feat] = len(sums["sum"])
    return imported_stats(
      paths.cache_dir, data_config.fold, split, features, dims
    )
  if mode == "per_partition":
    return feature_stats(meta, names, features, per_dim)
  train_names = split_trials(meta, data_config.fold, "train")
  return feature_stats(meta, train_names, features, per_dim)


def load_split(data_config: Any, paths: Any, split: str) -> Split:
  """Host-side metadata of `split` of fold `data_config.fold`.

  Args:
    data_config: `config.data`.
    paths: `affjax.data.prepare.DataPaths` (tfds_dir, cache_dir).
    split: 'train' | 'validation' | 'test'.

  Returns:
    A new `Split` (its arrays are shared with the memo: do not modify them
    in place).
  """
  _, meta, token = open_dataset(paths)
  check_data_config(data_config, meta)
  names = split_trials(meta, data_config.fold, split)
  label_paths = [_labels_path(paths.cache_dir, n) for n in names]
  try:
    label_ids = tuple(_file_id(p) for p in label_paths)
  except FileNotFoundError as e:
    raise _missing_labels(e.filename) from None
  per_dim = data_config.get("normalization", "scalar") == "per_dim"
  drop = (
    data_config.get("unlabelled_frames", "mask") == "drop" and split != "test"
  )
  stats_mode = data_config.get("audio_stats", "train")
  key = (
    token,
    paths.cache_dir,
    label_ids,
    split,
    data_config.fold,
    tuple(data_config.features),
    tuple(data_config.emotions),
    int(data_config.time_delay),
    int(data_config.window_length),
    int(data_config.hop_length),
    per_dim,
    drop,
    stats_mode,
  )
  with _split_lock:
    cached = _split_memo.get(key)
    if cached is not None:
      _split_memo.move_to_end(key)
      return _copy(cached)
  columns = [EMOTION_COLUMNS[e] for e in data_config.emotions]
  kept_names, lengths, labels, masks, kept_rows = [], [], [], [], []
  for name, path in zip(names, label_paths):
    lab, mask, kept, rows = _trial_labels(
      path, columns, data_config.time_delay, drop
    )
    n_frames = meta["trials"][name]["n_frames"]
    if rows != n_frames:
      raise ValueError(
        f"{path} has {rows} rows, the dataset "
        f"{n_frames}: run affjax.data.prepare.prepare again"
      )
    if lab.shape[0] == 0:
      # Only with `drop`: preprocessing keeps trials with a valid label in
      # one emotion, which may have none where both are valid.
      logging.warning(
        "%s: no frame with both labels valid; trial %s left out of the "
        "%s split (config.data.unlabelled_frames='drop')",
        path,
        name,
        split,
      )
      continue
    kept_names.append(name)
    lengths.append(lab.shape[0])
    labels.append(lab)
    masks.append(mask)
    kept_rows.append(kept)
  out = Split(
    name=split,
    trial_names=kept_names,
    trial_lengths=np.array(lengths, np.int64),
    labels=labels,
    label_masks=masks,
    num_windows=sum(num_windows(data_config, n) for n in lengths),
    feature_stats=_stats(
      stats_mode, meta, paths, data_config, split, names, per_dim
    ),
    kept_rows=kept_rows if drop else None,
  )
  with _split_lock:
    _split_memo[key] = out
    while len(_split_memo) > _MEMO_SPLITS:
      _split_memo.popitem(last=False)
  return _copy(out)
