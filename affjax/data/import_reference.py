r"""Imports the sucv/ABAW2 authors' preprocessed Aff-Wild2 into an affjax cache.

  python -m affjax.data.import_reference --src=DIR --out=CACHE [--trials=a,b]

The authors share their preprocessed dataset (linked from the sucv/ABAW2
ReadMe). Its layout, as their code reads it (`base/dataset.py`,
`calculate_mean_and_std.py`):

```
<src>/dataset_info.pkl   {'partition': {'Train_Set': {trial: length},
                           'Validation_Set': {...}, 'Target_Set' (or
                           'Test_Set'): {...}}, ...}
<src>/mean_std_dict.pkl  {feature: {fold: {partition: {'mean', 'std'}}}}
<src>/npy_data/<trial>/frame.npy    [T, 48, 48, 3] face crops, 0..255
                       mfcc.npy     [T, 39]
                       egemaps.npy  [T, 23]
                       vggish.npy   [T, 128]
                       label.npy    [T, 2] valence, arousal (not for test)
```

Frames labelled -5 were already deleted, so T counts labelled frames. Each
trial becomes a cache trial (`affjax.data.preprocess.cache`): frames as
uint8, `face_mask` = the frame is not all black (the reference's stand-in
for a missing face), labels (all -5 for test trials), the audio features as
they are, and the feature sums of all its frames. `mean_std_dict.pkl` is
kept as `reference_stats.json`, which `config.data.audio_stats =
'imported'` reads. The manifest's settings name the source
(`imported_from`), so a paper config needs no VGGish checkpoint for it.

Every trial is checked before anything is written (array shapes, frame
counts against `dataset_info.pkl`, all five files present), and its values
when converted (labels in [-1, 1], finite features, pixel range); each
problem names its file. Trials are written atomically and the manifest after
each one, so an interrupted import resumes where it stopped.

The `.pkl` files are Python pickles, which can run code when loaded: import
only a copy of the authors' dataset you trust.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from affjax import io
from affjax.data import dirlock, folds, splits
from affjax.data.preprocess import cache
from affjax.required_weights import IMPORTED_KEY

SOURCE = "sucv/ABAW2 preprocessed Aff-Wild2"
PARTITIONS = {
  "Train_Set": "train",
  "Validation_Set": "validation",
  "Target_Set": "test",
  "Test_Set": "test",
}
FILES = {
  "frame": "frames",
  "mfcc": "mfcc",
  "egemaps": "egemaps",
  "vggish": "vggish",
  "label": "labels",
}
DIMS = dict(cache.FEATURE_DIMS)


def _load_pickle(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      return pickle.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found") from None
  except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
    raise ValueError(f"{path} is not a readable pickle: {e}") from None


def read_partitions(src: str) -> dict[str, dict[str, int]]:
  """`dataset_info.pkl` -> affjax partition -> {trial: length}, in order.

  Raises:
    ValueError: naming the file when a partition is missing or a length is
      not a positive integer.
  """
  path = os.path.join(src, "dataset_info.pkl")
  info = _load_pickle(path)
  part = info.get("partition") if isinstance(info, dict) else None
  if not isinstance(part, dict):
    raise ValueError(  # noqa: TRY004  (a bad file, not a bad argument)
      f"{path}: expected a dict with a 'partition' dict"
    )
  out: dict[str, dict[str, int]] = {"train": {}, "validation": {}, "test": {}}
  for key, value in part.items():
    if key not in PARTITIONS:
      raise ValueError(
        f"{path}: unknown partition {key!r}, expected {sorted(PARTITIONS)}"
      )
    for trial, length in dict(value).items():
      if int(length) != length or length <= 0:
        raise ValueError(f"{path}: trial {trial!r} has length {length!r}")
      out[PARTITIONS[key]][str(trial)] = int(length)
  for name in ("train", "validation"):
    if not out[name]:
      raise ValueError(f"{path}: no {name} trials")
  return out


def read_stats(src: str) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
  """`mean_std_dict.pkl` -> {feature: {fold: {split: {mean, std}}}} (JSON).

  Raises:
    ValueError: naming the file and the missing entry.
  """
  path = os.path.join(src, "mean_std_dict.pkl")
  table = _load_pickle(path)
  out: dict[str, Any] = {}
  for feat in DIMS:
    out[feat] = {}
    for fold in range(folds.NUM_FOLDS):
      out[feat][str(fold)] = {}
      for part, split in (
        ("Train_Set", "train"),
        ("Validation_Set", "validation"),
        ("Target_Set", "test"),
      ):
        try:
          entry = table[feat][fold][part]
          mean, std = float(entry["mean"]), float(entry["std"])
        except (KeyError, TypeError, ValueError):
          raise ValueError(
            f"{path}: no mean/std for [{feat!r}][{fold}][{part!r}]"
          ) from None
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
          raise ValueError(
            f"{path}: [{feat!r}][{fold}][{part!r}] has mean {mean}, std {std}"
          )
        out[feat][str(fold)][split] = {"mean": mean, "std": std}
  return out


def _expected_shape(key: str, length: int) -> tuple[int, ...] | None:
  if key == "frame":
    return None  # [T, S, S, 3], S checked separately
  if key == "label":
    return (length, 2)
  return (length, DIMS[key])


def check_trial(src: str, trial: str, partition: str, length: int) -> int:
  """Checks one trial's files without reading their data; returns S.

  Raises:
    FileNotFoundError, ValueError: naming the file.
  """
  d = os.path.join(src, "npy_data", trial)
  size = 0
  for key in FILES:
    if key == "label" and partition == "test":
      continue
    path = os.path.join(d, key + ".npy")
    try:
      shape = np.load(path, mmap_mode="r").shape
    except FileNotFoundError:
      raise FileNotFoundError(f"{path} not found (trial {trial})") from None
    except ValueError as e:
      raise ValueError(f"{path} is not a readable .npy file: {e}") from None
    want = _expected_shape(key, length)
    if key == "frame":
      ok = len(shape) == 4 and shape[0] == length and shape[1] == shape[2]
      ok = ok and shape[3] == 3
      size = shape[1] if ok else 0
      want_text = f"({length}, S, S, 3)"
    else:
      ok = shape == want
      want_text = str(want)
    if not ok:
      raise ValueError(
        f"{path}: shape {shape}, expected {want_text} (dataset_info.pkl "
        f"gives trial {trial} {length} frames)"
      )
  return size


def _frames(path: str) -> np.ndarray:
  x = np.load(path)
  if not np.issubdtype(x.dtype, np.integer) and not np.all(x == np.round(x)):
    raise ValueError(f"{path}: pixel values are not integers ({x.dtype})")
  if x.size and (x.min() < 0 or x.max() > 255):
    raise ValueError(
      f"{path}: pixel values in [{x.min()}, {x.max()}], expected 0..255"
    )
  return x.astype(np.uint8)


def _labels(path: str) -> np.ndarray:
  y = np.load(path).astype(np.float32)
  bad = ~(((y >= -1.0) & (y <= 1.0)) | (y == splits.INVALID_LABEL))
  if bad.any():
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    raise ValueError(
      f"{path}: {int(bad.sum())} label values outside [-1, 1] (first at "
      f"row {row}: {y[row].tolist()})"
    )
  return y


def _features(path: str, trial: str) -> np.ndarray:
  x = np.load(path).astype(np.float32)
  from affjax.data import affwild2  # pylint: disable=g-import-not-at-top

  affwild2.check_finite(x, path, trial)
  return x


def convert_trial(
  src: str, out: str, trial: str, partition: str, length: int
) -> dict[str, Any]:
  """Reads, checks and writes one trial into the cache; returns its meta."""
  d = os.path.join(src, "npy_data", trial)
  frames = _frames(os.path.join(d, "frame.npy"))
  if partition == "test":
    labels = np.full((length, 2), splits.INVALID_LABEL, np.float32)
  else:
    labels = _labels(os.path.join(d, "label.npy"))
  features = {k: _features(os.path.join(d, k + ".npy"), trial) for k in DIMS}
  face_mask = frames.reshape(length, -1).any(axis=1)
  valid = np.all(labels != splits.INVALID_LABEL, axis=1)
  stats_frames = valid if partition != "test" else np.ones(length, bool)
  video = trial
  for suffix in ("_left", "_right"):
    video = video.removesuffix(suffix)
  meta = {
    "trial": trial,
    "video": video,
    "partition": partition,
    "fps": None,
    "n_frames": length,
    "n_valid_labels": int(valid.sum()),
    "n_faces": int(face_mask.sum()),
    "feature_sums": cache.feature_sums(features, stats_frames),
    "stats_frames": "labelled" if partition != "test" else "all",
    "sources": {"npy_data": d},
  }
  arrays = {"frames": frames, "face_mask": face_mask, "labels": labels}
  arrays.update(features)
  cache.write_trial(out, trial, arrays, meta)
  return meta


def _chunk_order_warning(partitions: dict[str, dict[str, int]]) -> str | None:
  """Says when the listed training order is not sorted: the reference cuts
  its folds from the listed order, affjax from the sorted names, so folds
  other than 0 (and their imported statistics) would then differ."""
  listed = list(partitions["train"])
  if listed == sorted(listed):
    return None
  return (
    "the training trials in dataset_info.pkl are not in sorted order; "
    "affjax cuts the cross-validation chunks from the sorted names, so "
    "folds 1-5 differ from the reference's (fold 0 is the same)"
  )


def import_reference(
  src: str, out: str, trials: Sequence[str] | None = None
) -> dict[str, Any]:
  """Converts `src` (the authors' layout) into the cache `out`; resumable.

  Args:
    src: the directory holding `dataset_info.pkl`, `mean_std_dict.pkl` and
      `npy_data/`.
    out: the affjax cache directory (created).
    trials: only these trials (default: all).

  Returns:
    The manifest written to `out`.

  Raises:
    FileNotFoundError, ValueError: a bad input, naming its file; `out`
      holding a cache of another source.
  """
  src = os.path.abspath(src)
  partitions = read_partitions(src)
  stats = read_stats(src)
  wanted = [
    (name, part, length)
    for part, members in partitions.items()
    for name, length in members.items()
    if trials is None or name in trials
  ]
  if trials is not None:
    unknown = sorted(set(trials) - {n for n, _, _ in wanted})
    if unknown:
      raise ValueError(f"trials {unknown} are not in {src}/dataset_info.pkl")
  sizes = {check_trial(src, n, p, k) for n, p, k in wanted}
  if len(sizes) > 1:
    raise ValueError(f"{src}/npy_data: frames of several sizes {sorted(sizes)}")
  settings = {IMPORTED_KEY: SOURCE, "frame_size": sizes.pop() if sizes else 48}
  warning = _chunk_order_warning(partitions)
  if warning:
    logging.warning("%s: %s", src, warning)
  os.makedirs(out, exist_ok=True)
  with dirlock.hold(dirlock.inside(out), f"feature cache {out}"):
    manifest_path = os.path.join(out, cache.MANIFEST)
    if os.path.isfile(manifest_path):
      manifest = cache.read_json(manifest_path)
      found = manifest.get("settings", {})
      if found != settings:
        raise ValueError(
          f"{manifest_path} has settings {found}, this import {settings}: "
          "use an empty cache directory"
        )
    else:
      manifest = {"version": cache.VERSION, "settings": settings}
      manifest.update(trials={}, skipped={})
    manifest["source"] = src
    if warning:
      manifest["warning"] = warning
    cache.remove_stale_temporaries(out)
    done = set(cache.finished_trials(out))
    for name in sorted(done - set(manifest["trials"])):
      meta = cache.read_json(
        os.path.join(cache.trial_dir(out, name), cache.META)
      )
      manifest["trials"][name] = cache.manifest_entry(meta)
    io.write_json(os.path.join(out, splits.IMPORTED_STATS), stats)
    cache.atomic_write_json(manifest_path, manifest)
    for name, part, length in wanted:
      if name in done:
        continue
      start = time.time()
      meta = convert_trial(src, out, name, part, length)
      manifest["trials"][name] = cache.manifest_entry(meta)
      manifest["trials"] = dict(sorted(manifest["trials"].items()))
      cache.atomic_write_json(manifest_path, manifest)
      logging.info(
        "imported %s: %d frames in %.1fs", name, length, time.time() - start
      )
  return manifest


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m affjax.data.import_reference",
    description=__doc__.split("\n")[0],
  )
  parser.add_argument("--src", required=True, help="the authors' dataset")
  parser.add_argument("--out", required=True, help="affjax cache directory")
  parser.add_argument("--trials", default=None, help="comma-separated names")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    manifest = import_reference(
      args.src, args.out, args.trials.split(",") if args.trials else None
    )
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  frames = sum(t["n_frames"] for t in manifest["trials"].values())
  print(f"{len(manifest['trials'])} trials ({frames} frames) in {args.out}")
  if "warning" in manifest:
    print(f"warning: {manifest['warning']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
