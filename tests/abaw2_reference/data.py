"""numpy transcription of the reference's data side (sucv/ABAW2).

Written from the reference's documented behaviour, for equivalence tests
only; nothing here is used by affjax. What it transcribes:

- preprocessing.py: frames where valence or arousal is -5 are deleted from
  every cached array of a training or validation trial; test trials are
  cached whole and have no `label.npy`.
- base/dataset.py `generate_partition_dict_for_cross_validation`: five
  chunks of the training trials plus the validation set, rolled by the
  fold; the rolled order's last chunk validates.
- base/dataset.py `resample_according_to_window_and_hop_length`: windows
  every `hop` frames while they end before the trial's end, then one ending
  at the end; a trial of at most `window` frames gets one short window.
- calculate_mean_and_std.py: per feature, fold and partition one mean and
  one std (N - 1) over every value of the partition's cached arrays.
- base/dataset.py `__getitem__`: a short window is zero-padded to `window`
  frames (frames, audio, labels 0); mfcc and vggish are normalised with
  their partition's mean/std *after* padding (so padding is (0 - m) / s).
- experiment_regular.py `init_dataloader`: the training list is shuffled
  once by Python's `random` seeded with 0, the DataLoader does not shuffle
  and keeps the last partial batch.
"""

from __future__ import annotations

import random

import numpy as np

PARTITIONS = ("Train_Set", "Validation_Set", "Target_Set")
CHUNK_BOUNDS = 5  # training chunks before the validation set


def compact(arrays: dict[str, np.ndarray], test: bool) -> dict[str, np.ndarray]:
  """The reference's cached arrays of one trial (names as in npy_data).

  Args:
    arrays: affjax cache arrays (`frames`, `labels`, `mfcc`, ...).
    test: a test trial (no labels, nothing deleted).
  """
  names = {"frames": "frame", "mfcc": "mfcc", "vggish": "vggish"}
  names["egemaps"] = "egemaps"
  keep = np.ones(len(arrays["labels"]), bool)
  if not test:
    lab = arrays["labels"]
    keep = (lab[:, 0] != -5) & (lab[:, 1] != -5)
  out = {names[k]: np.asarray(arrays[k])[keep] for k in names}
  if not test:
    out["label"] = np.asarray(arrays["labels"])[keep]
  return out


def partition_dict(
  dataset_partition: dict[str, dict[str, int]], fold: int
) -> dict[str, dict[str, int]]:
  """Trials (name -> length) of each partition of `fold`, in list order.

  Args:
    dataset_partition: `dataset_info['partition']` (Train_Set,
      Validation_Set, Target_Set dicts in their order).
    fold: 0..5.
  """
  train = list(dataset_partition["Train_Set"])
  n = len(train)
  size = n // CHUNK_BOUNDS
  bounds = [i * size for i in range(CHUNK_BOUNDS)] + [n]
  chunks = [train[bounds[i] : bounds[i + 1]] for i in range(CHUNK_BOUNDS)]
  chunks.append(list(dataset_partition["Validation_Set"]))
  pool = {
    **dataset_partition["Train_Set"],
    **dataset_partition["Validation_Set"],
  }
  rolled = [chunks[i] for i in np.roll(np.arange(len(chunks)), fold)]
  out = {"Train_Set": {}, "Validation_Set": {}}
  for position, names in enumerate(rolled):
    part = "Validation_Set" if position == len(rolled) - 1 else "Train_Set"
    for name in names:
      out[part][name] = pool[name]
  out["Target_Set"] = dict(dataset_partition["Target_Set"])
  return out


def windows(
  trials: dict[str, int], window: int, hop: int
) -> list[tuple[str, np.ndarray, int]]:
  """(trial, frame indices, trial length) of every window, in list order."""
  out = []
  for name, length in trials.items():
    start, end = 0, window
    if end < length:
      while end < length:
        out.append((name, np.arange(start, end), length))
        start += hop
        end = start + window
      out.append((name, np.arange(length - window, length), length))
    else:
      out.append((name, np.arange(0, length), length))
  return out


def mean_std(
  npy: dict[str, dict[str, np.ndarray]],
  dataset_partition: dict[str, dict[str, int]],
  features=("vggish", "mfcc", "egemaps"),
) -> dict:
  """`mean_std_dict`: {feature: {fold: {partition: {'mean', 'std'}}}}."""
  out = {}
  for feat in features:
    out[feat] = {}
    for fold in range(6):
      out[feat][fold] = {}
      for part, trials in partition_dict(dataset_partition, fold).items():
        if not trials:  # the reference would divide by zero here
          continue
        values = np.concatenate(
          [np.asarray(npy[t][feat], np.float64).ravel() for t in trials]
        )
        mean = values.sum() / (len(values) + 1e-10)
        std = np.sqrt(np.sum((values - mean) ** 2) / (len(values) - 1))
        out[feat][fold][part] = {"mean": mean, "std": std}
  return out


def get_item(
  npy: dict[str, dict[str, np.ndarray]],
  entry: tuple[str, np.ndarray, int],
  window: int,
  stats: dict[str, tuple[float, float]],
  features=("frame", "vggish", "mfcc"),
  labelled: bool = True,
) -> dict[str, np.ndarray]:
  """One window as the reference's Dataset builds it, before the image
  transforms: raw frames (uint8 values, zero-padded), normalised mfcc and
  vggish, labels `[window, 2]` (zero-padded)."""
  name, indices, length = entry
  out = {}
  for feat in features:
    data = np.asarray(npy[name][feat])[indices]
    if length < window:
      padded = np.zeros((window, *data.shape[1:]), data.dtype)
      padded[indices] = data
      data = padded
    if feat in stats:
      mean, std = stats[feat]
      data = (data.astype(np.float32) - np.float32(mean)) / np.float32(std)
    out[feat] = data
  if labelled:
    lab = np.asarray(npy[name]["label"], np.float32)[indices]
    if length < window:
      padded = np.zeros((window, 2), np.float32)
      padded[indices] = lab
      lab = padded
    out["label"] = lab
  return out


def shuffled_once(entries: list, seed: int = 0) -> list:
  """The training list after the reference's one shuffle."""
  entries = list(entries)
  random.Random(seed).shuffle(entries)
  return entries


def batches(entries: list, batch_size: int) -> list[list]:
  """DataLoader(shuffle=False, drop_last=False) batches of a list."""
  return [
    entries[i : i + batch_size] for i in range(0, len(entries), batch_size)
  ]


def write_layout(
  root: str,
  npy: dict[str, dict[str, np.ndarray]],
  dataset_partition: dict[str, dict[str, int]],
  stats: dict,
) -> None:
  """Writes the authors' shared layout: `npy_data/<trial>/*.npy`,
  `dataset_info.pkl` and `mean_std_dict.pkl` (see base/dataset.py)."""
  import os
  import pickle

  for name, arrays in npy.items():
    d = os.path.join(root, "npy_data", name)
    os.makedirs(d, exist_ok=True)
    for key, value in arrays.items():
      np.save(os.path.join(d, key + ".npy"), value)
  with open(os.path.join(root, "dataset_info.pkl"), "wb") as f:
    pickle.dump({"partition": dataset_partition}, f)
  with open(os.path.join(root, "mean_std_dict.pkl"), "wb") as f:
    pickle.dump(stats, f)
