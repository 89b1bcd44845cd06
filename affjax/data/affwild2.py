"""TFDS dataset over the feature cache: one example per trial.

Built fully offline from a preprocessed cache (see
`affjax.data.preprocess.cache` for its layout). Splits are the six
cross-validation chunks of `affjax.data.folds` plus the test set:

```
chunk0 .. chunk4   the sorted official training trials in five chunks
chunk5             the official validation trials
test               the test trials
```

so fold f trains on a split expression such as `chunk0+chunk1+...` and
validates on one chunk, without storing any trial twice. Empty chunks (fewer
than five training trials) are not written; the metadata lists them empty.

Example (T = frames of the trial):
  frames      uint8   [T, S, S, 3]  face crops (zeros where no face)
  face_mask   bool    [T]
  labels      float32 [T, 2]        valence, arousal; -5 = not annotated
  mfcc        float32 [T, 39], egemaps [T, 23], vggish [T, 128] (raw)
  embeddings  float32 [T, 512]      only if every trial has them cached
  trial       text, n_frames int32

Examples are written in sorted name order and never shuffled
(`disable_shuffling`), so example i of a split is the split's i-th trial and
the pipeline can read any trial alone (`chunk3[i:i+1]`).

The builder's metadata (`metadata.json`) records the chunk assignment and,
per trial, its split, position, partition, length and the audio feature sums
the fold statistics come from, plus a fingerprint of the cache; `build`
rebuilds the dataset only when that fingerprint changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from affjax import logs
from affjax.data import dirlock, folds

NAME = "aff_wild2"
DATASET_VERSION = "1.0.0"
CHUNKS = tuple(f"chunk{i}" for i in range(folds.NUM_FOLDS))
TEST = "test"
AUDIO_FEATURES = ("mfcc", "egemaps", "vggish")
EMBEDDINGS = "embeddings"
_MANIFEST = "manifest.json"
_TRIALS = "trials"
_PARTITION_SPLIT = {"train": None, "validation": CHUNKS[-1], "test": TEST}


def dataset_dir(tfds_dir: str) -> str:
  """Where `build` writes the dataset inside `tfds_dir`."""
  return os.path.join(tfds_dir, NAME, DATASET_VERSION)


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def _trial_dir(cache_dir: str, trial: str) -> str:
  return os.path.join(cache_dir, _TRIALS, trial)


def _has_embeddings(cache_dir: str, trial: str) -> bool:
  d = _trial_dir(cache_dir, trial)
  return all(
    os.path.isfile(os.path.join(d, f))
    for f in ("embeddings.npy", "embeddings.json")
  )


def scan_cache(cache_dir: str) -> dict[str, Any]:
  """Reads the cache's manifest and trial metadata (no arrays).

  Returns:
    {"fingerprint": str, "settings": dict, "embeddings": bool,
     "trials": {name: meta.json dict}} with trials sorted by name.

  Raises:
    FileNotFoundError: the manifest, a trial directory or its meta.json is
      missing.
    ValueError: the manifest lists no trials, or a partition is unknown.
  """
  manifest = _read_json(os.path.join(cache_dir, _MANIFEST))
  names = sorted(manifest.get("trials", {}))
  if not names:
    raise ValueError(
      f"{os.path.join(cache_dir, _MANIFEST)} lists no "
      "finished trials; run preprocessing first"
    )
  trials = {}
  for name in names:
    meta = _read_json(os.path.join(_trial_dir(cache_dir, name), "meta.json"))
    if meta.get("partition") not in _PARTITION_SPLIT:
      raise ValueError(
        f"{_trial_dir(cache_dir, name)}/meta.json: partition "
        f"{meta.get('partition')!r}, expected one of "
        f"{sorted(_PARTITION_SPLIT)}"
      )
    trials[name] = meta
  with_emb = [n for n in names if _has_embeddings(cache_dir, n)]
  embeddings = len(with_emb) == len(names)
  if with_emb and not embeddings:
    logging.warning(
      "%s: only %d of %d trials have cached embeddings; the "
      "dataset is built without them",
      cache_dir,
      len(with_emb),
      len(names),
    )
  emb_info = (
    {
      n: _read_json(os.path.join(_trial_dir(cache_dir, n), "embeddings.json"))
      for n in with_emb
    }
    if embeddings
    else {}
  )
  digest = hashlib.sha256(
    json.dumps(
      {
        "version": DATASET_VERSION,
        "settings": manifest.get("settings"),
        "trials": {n: manifest["trials"][n] for n in names},
        "embeddings": emb_info,
      },
      sort_keys=True,
    ).encode()
  ).hexdigest()
  return {
    "fingerprint": digest,
    "settings": manifest.get("settings", {}),
    "embeddings": embeddings,
    "trials": trials,
  }


def assign_splits(trials: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
  """Split name -> sorted trial names (all of CHUNKS and TEST, maybe empty)."""
  by_part = {
    p: sorted(n for n, m in trials.items() if m["partition"] == p)
    for p in _PARTITION_SPLIT
  }
  parts = folds.chunks(by_part["train"], by_part["validation"])
  out = dict(zip(CHUNKS, parts))
  out[TEST] = by_part["test"]
  return out


def _metadata(scan: dict[str, Any]) -> dict[str, Any]:
  splits = assign_splits(scan["trials"])
  trials = {}
  for split, names in splits.items():
    for i, name in enumerate(names):
      meta = scan["trials"][name]
      trials[name] = {
        "split": split,
        "index": i,
        "partition": meta["partition"],
        "n_frames": int(meta["n_frames"]),
        "fps": meta.get("fps"),
        "feature_sums": meta.get("feature_sums", {}),
      }
  return {
    "fingerprint": scan["fingerprint"],
    "splits": splits,
    "trials": trials,
    "embeddings": scan["embeddings"],
    "settings": scan["settings"],
  }


class AffWild2(tfds.core.GeneratorBasedBuilder):
  """Aff-Wild2 (or the synthetic stand-in) from a feature cache."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    DATASET_VERSION: "One example per trial; CV chunks as splits."
  }

  def __init__(self, *, cache_dir: str, **kwargs):
    """`cache_dir`: the preprocessed cache; other args go to tfds."""
    self._cache_dir = os.path.abspath(cache_dir)
    self._scan = scan_cache(self._cache_dir)
    self._meta = _metadata(self._scan)
    super().__init__(**kwargs)

  def _array_shapes(self) -> dict[str, tuple[int, ...]]:
    first = min(self._scan["trials"])
    d = _trial_dir(self._cache_dir, first)
    names = ["frames", *AUDIO_FEATURES]
    if self._scan["embeddings"]:
      names.append(EMBEDDINGS)
    return {
      n: np.load(os.path.join(d, n + ".npy"), mmap_mode="r").shape[1:]
      for n in names
    }

  def _info(self) -> tfds.core.DatasetInfo:
    shapes = self._array_shapes()
    raw = tfds.features.Encoding.BYTES
    features = {
      "frames": tfds.features.Tensor(
        shape=(None, *shapes["frames"]), dtype=np.uint8, encoding=raw
      ),
      "face_mask": tfds.features.Tensor(
        shape=(None,), dtype=np.bool_, encoding=raw
      ),
      "labels": tfds.features.Tensor(
        shape=(None, 2), dtype=np.float32, encoding=raw
      ),
      "trial": tfds.features.Text(),
      "n_frames": np.int32,
    }
    for name in shapes:
      if name != "frames":
        features[name] = tfds.features.Tensor(
          shape=(None, *shapes[name]), dtype=np.float32, encoding=raw
        )
    return tfds.core.DatasetInfo(
      builder=self,
      description="Aff-Wild2 valence/arousal trials from a feature cache.",
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(self._meta),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    return {
      split: self._generate_examples(names)
      for split, names in self._meta["splits"].items()
      if names
    }

  def _generate_examples(self, names=()):
    keys = ["frames", "face_mask", "labels", *AUDIO_FEATURES]
    if self._scan["embeddings"]:
      keys.append(EMBEDDINGS)
    for name in names:
      d = _trial_dir(self._cache_dir, name)
      n = self._meta["trials"][name]["n_frames"]
      ex = {"trial": name, "n_frames": n}
      for key in keys:
        path = os.path.join(d, key + ".npy")
        try:
          ex[key] = np.load(path)
        except FileNotFoundError:
          raise FileNotFoundError(f"{path} not found") from None
        if ex[key].shape[0] != n:
          raise ValueError(
            f"{path}: {ex[key].shape[0]} rows, meta.json says n_frames={n}"
          )
      ex["face_mask"] = ex["face_mask"].astype(bool)
      for key in ("labels", *AUDIO_FEATURES, EMBEDDINGS):
        if key in ex:
          ex[key] = ex[key].astype(np.float32)
          check_finite(ex[key], os.path.join(d, key + ".npy"), name)
      yield name, ex


def check_finite(values: np.ndarray, path: str, trial: str) -> None:
  """Raises ValueError naming the file, trial and rows holding NaN/Inf.

  A non-finite cached feature otherwise surfaces only as a NaN training loss
  (naming a step range) or a NaN validation score, epochs later. One
  vectorised pass over an array that is read anyway.

  Args:
    values: `[T, ...]` float array of one trial.
    path: the `.npy` file it was read from, for the message.
    trial: the trial's name, for the message.
  """
  finite = np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
  if finite.all():
    return
  rows = np.flatnonzero(~finite)
  shown = ", ".join(str(r) for r in rows[:10]) + (
    ", ..." if len(rows) > 10 else ""
  )
  raise ValueError(
    f"{path}: {len(rows)} of {len(values)} rows of trial {trial!r} hold "
    f"NaN or Inf (rows {shown}); delete {os.path.dirname(path)} and "
    "prepare the data again to rebuild the trial from the raw data"
  )


def read_metadata(tfds_dir: str) -> dict[str, Any]:
  """The metadata of the dataset built in `tfds_dir`.

  Raises:
    FileNotFoundError: no dataset there (naming the path).
  """
  path = os.path.join(dataset_dir(tfds_dir), "metadata.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"no {NAME} dataset in {tfds_dir} ({path} missing); build it with "
      "affjax.data.prepare.prepare or affwild2.build"
    )
  return _read_json(path)


def build(cache_dir: str, tfds_dir: str) -> str:
  """Builds the TFDS dataset of `cache_dir` unless it is already current.

  An existing dataset is kept when its recorded fingerprint equals the
  cache's (same manifest, settings and embeddings); otherwise it is deleted
  and rebuilt. tfds writes into a temporary directory and renames it, so an
  interrupted build leaves no dataset that looks complete. A second build
  into the same `tfds_dir` waits for the first (`<tfds_dir>/.lock`), then
  finds the dataset current.

  Returns:
    The dataset directory (`dataset_dir(tfds_dir)`).
  """
  os.makedirs(tfds_dir, exist_ok=True)
  with dirlock.hold(dirlock.inside(tfds_dir), f"TFDS directory {tfds_dir}"):
    return _build_once(cache_dir, tfds_dir)


def _build_once(cache_dir: str, tfds_dir: str) -> str:
  """`build` holding the lock of `tfds_dir`."""
  out = dataset_dir(tfds_dir)
  scan = scan_cache(cache_dir)
  if os.path.isfile(os.path.join(out, "dataset_info.json")):
    try:
      current = read_metadata(tfds_dir).get("fingerprint")
    except (OSError, ValueError):
      current = None
    if current == scan["fingerprint"]:
      return out
    logging.info(
      "Cache %s changed since %s was built; rebuilding.", cache_dir, out
    )
    shutil.rmtree(out)
  tfds.disable_progress_bar()
  builder = AffWild2(cache_dir=cache_dir, data_dir=tfds_dir)
  # TFDS prints "Downloading and preparing dataset Unknown size ..." and
  # "... downloaded and prepared" to stdout whatever the log level; when
  # libraries' INFO lines are off, `affjax.data.prepare` logs one line
  # instead.
  quiet = logs.libraries_quiet()
  with (
    contextlib.redirect_stdout(io.StringIO())
    if quiet
    else (contextlib.nullcontext())
  ):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return out
