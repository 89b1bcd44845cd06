"""The per-trial feature cache: settings, manifest, atomic trial directories.

```
<cache_dir>/manifest.json   {"version": 1, "settings": {...},
                             "trials": {name: entry}, "skipped": {name: ...}}
<cache_dir>/trials/<trial>/{frames,face_mask,labels,mfcc,egemaps,vggish}.npy
<cache_dir>/trials/<trial>/meta.json
```

A trial directory is written under a temporary name and renamed when every
file is in place, so an existing `trials/<trial>` is always complete. The
manifest is rewritten atomically (temp file + `os.replace`) after each trial;
if a run dies between the rename and the manifest update, the next run adds
the trial back from its `meta.json`. Temporaries (`.tmp-*`) left by a killed
run are deleted by the next one; `<cache_dir>/.lock` (see
`affjax.data.dirlock`) keeps a second run from writing at the same time.

`meta.json["feature_sums"]` holds, per audio feature, the frame count and
the per-dimension sum and sum of squares (float64) over the trial's
*labelled* frames (neither valence nor arousal is -5; all frames for test
trials), which are the frames the reference cached and normalised over.
Summing them over a fold's training trials gives that fold's mean/std
without re-reading the arrays.
"""

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from affjax import io
from affjax.data.preprocess import audio

VERSION = 1
MANIFEST = "manifest.json"
TRIALS_DIR = "trials"
META = "meta.json"
FEATURE_DIMS = {
  "mfcc": audio.MFCC_DIM,
  "egemaps": audio.EGEMAPS_DIM,
  "vggish": audio.VGGISH_DIM,
}
ARRAYS = ("frames", "face_mask", "labels", *FEATURE_DIMS)
_TMP_PREFIX = io.TMP_PREFIX
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FREE_AND_RERUN = (
  "free some space and rerun the same command (finished trials are kept)"
)


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
  """Everything that changes the cache's content (recorded in the manifest).

  Attributes:
    frame_size: side of the cached face frames, pixels.
    sample_rate: audio rate for the features, Hz (VGGish and the MFCC config
      need 16000).
    label_tolerance: largest accepted difference between annotation rows and
      video frames (see `labels.align_labels`).
    vggish_hop_seconds: VGGish example grid, seconds; None → one example per
      video frame (the reference; ~50x the cost of the 0.48 s default).
    vggish_model: 'full' (VGGish) or 'tiny' (a narrow random net for tests).
    vggish_checkpoint: converted weights (TF `vggish_model.ckpt` or a
      torchvggish `.pth`); '' → fixed-seed random weights.
    egemaps_feature_set: 'eGeMAPSv01a' (reference) or 'eGeMAPSv02'.
    max_audio_shortfall_seconds: how much shorter than the video the audio
      may be (the last feature row is repeated).
  """

  frame_size: int = 48
  sample_rate: int = 16000
  label_tolerance: int = 2
  vggish_hop_seconds: float | None = audio.DEFAULT_VGGISH_HOP_SECONDS
  vggish_model: str = "full"
  vggish_checkpoint: str = ""
  egemaps_feature_set: str = "eGeMAPSv01a"
  max_audio_shortfall_seconds: float = audio.MAX_SHORTFALL_SECONDS

  def __post_init__(self):
    if self.vggish_model not in ("full", "tiny"):
      raise ValueError(
        f"vggish_model must be 'full' or 'tiny', got {self.vggish_model!r}"
      )
    if self.frame_size <= 0 or self.label_tolerance < 0:
      raise ValueError(f"invalid settings {self}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (`affjax.io.atomic_write`).

  Raises:
    OSError: naming `path` when the disk is full.
  """
  try:
    io.atomic_write(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True))
  except OSError as e:
    if e.errno in _DISK_FULL:
      raise OSError(
        e.errno, f"disk full writing {path} ({e.strerror}); {_FREE_AND_RERUN}"
      ) from e
    raise


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def open_manifest(
  cache_dir: str, settings: PreprocessSettings
) -> dict[str, Any]:
  """Loads the manifest (or starts one) and checks the settings match.

  Raises:
    ValueError: the existing cache was built with other settings (the
      differing keys are named), has another version, or has trial
      directories but no manifest.
  """
  path = os.path.join(cache_dir, MANIFEST)
  wanted = settings.to_dict()
  if not os.path.isfile(path):
    trials_dir = os.path.join(cache_dir, TRIALS_DIR)
    done = finished_trials(cache_dir) if os.path.isdir(trials_dir) else []
    if done:
      raise ValueError(
        f"{cache_dir} has {len(done)} trial directories but no {MANIFEST}; "
        "cannot tell which settings built them. Use an empty cache directory."
      )
    return {"version": VERSION, "settings": wanted, "trials": {}, "skipped": {}}
  try:
    manifest = read_json(path)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}): it was damaged or edited. The trial "
      f"directories are intact; restore the file, or delete {cache_dir} to "
      "rebuild the cache"
    ) from None
  if not isinstance(manifest, dict):
    raise ValueError(  # noqa: TRY004  (a bad file, not a bad argument)
      f"{path}: expected a JSON object, found {type(manifest).__name__}"
    )
  if manifest.get("version") != VERSION:
    raise ValueError(
      f"{path}: cache format version {manifest.get('version')}, this code "
      f"writes version {VERSION}; use a new cache directory"
    )
  found = manifest.get("settings", {})
  diff = sorted(
    k
    for k in set(found) | set(wanted)
    if found.get(k, "<absent>") != wanted.get(k, "<absent>")
  )
  if diff:
    details = ", ".join(
      f"{k}: cache has {found.get(k, '<absent>')!r}, requested "
      f"{wanted.get(k, '<absent>')!r}"
      for k in diff
    )
    raise ValueError(
      f"{path} was built with other preprocessing settings ({details}). "
      "Use a new cache directory, or delete this one to rebuild it."
    )
  manifest.setdefault("trials", {})
  manifest.setdefault("skipped", {})
  return manifest


def trial_dir(cache_dir: str, trial: str) -> str:
  return os.path.join(cache_dir, TRIALS_DIR, trial)


def finished_trials(cache_dir: str) -> list[str]:
  """Names of complete trial directories (temporary ones excluded)."""
  root = os.path.join(cache_dir, TRIALS_DIR)
  if not os.path.isdir(root):
    return []
  return sorted(
    n
    for n in os.listdir(root)
    if not n.startswith(".") and os.path.isdir(os.path.join(root, n))
  )


def remove_stale_temporaries(cache_dir: str) -> None:
  """Deletes leftovers of interrupted runs: trial and manifest temporaries.

  Only safe while holding the cache's lock (no other run is writing).
  """
  root = os.path.join(cache_dir, TRIALS_DIR)
  for name in os.listdir(root) if os.path.isdir(root) else []:
    if name.startswith(_TMP_PREFIX):
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  for name in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
    path = os.path.join(cache_dir, name)
    if name.startswith(_TMP_PREFIX) and os.path.isfile(path):
      os.remove(path)


def feature_sums(
  features: dict[str, np.ndarray], frames: np.ndarray
) -> dict[str, dict[str, Any]]:
  """Per-feature count, sum and sum of squares over the selected frames.

  Args:
    features: name -> `[T, D]` array.
    frames: `[T]` bool, the frames to include.
  """
  out = {}
  for name, values in features.items():
    x = np.asarray(values, np.float64)[frames]
    out[name] = {
      "count": int(x.shape[0]),
      "sum": x.sum(axis=0).tolist(),
      "sumsq": np.square(x).sum(axis=0).tolist(),
    }
  return out


def write_trial(
  cache_dir: str, trial: str, arrays: dict[str, np.ndarray], meta: dict
) -> str:
  """Writes one trial's arrays and meta.json, atomically; returns its dir.

  Raises:
    ValueError: an expected array is missing.
    OSError: a write failed; a full disk is said so, naming the trial.
  """
  missing = [a for a in ARRAYS if a not in arrays]
  if missing:
    raise ValueError(f"trial {trial}: arrays {missing} missing")
  root = os.path.join(cache_dir, TRIALS_DIR)
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{trial}-", dir=root)
  path = tmp
  try:
    for name in ARRAYS:
      path = os.path.join(tmp, name + ".npy")
      np.save(path, arrays[name])
    path = os.path.join(tmp, META)
    with open(path, "w") as f:
      json.dump(meta, f, indent=1)
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    final = trial_dir(cache_dir, trial)
    os.rename(tmp, final)  # fails if `final` exists: never half-replaced
  except BaseException as e:
    # Measured before the cleanup, which frees the space again.
    free = _free_bytes(root)
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError) and _disk_full(e, free, arrays):
      raise OSError(
        errno.ENOSPC,
        f"trial {trial}: disk full writing {os.path.basename(path)} into "
        f"{root} ({free} bytes were free; {e}); {_FREE_AND_RERUN}",
      ) from e
    raise
  return final


def _free_bytes(directory: str) -> int | None:
  try:
    return shutil.disk_usage(directory).free
  except OSError:
    return None


def _disk_full(
  error: OSError, free: int | None, arrays: dict[str, np.ndarray]
) -> bool:
  """Whether `error`, a failed write of `arrays`, means the disk is full.

  numpy reports a short write as "N requested and M written", without an
  errno, so a failure with less space left (`free` bytes) than the trial's
  arrays take counts as a full disk too.
  """
  if error.errno in _DISK_FULL:
    return True
  needed = sum(np.asarray(a).nbytes for a in arrays.values())
  return free is not None and free < needed


def read_trial(cache_dir: str, trial: str) -> dict[str, Any]:
  """Loads one cached trial: its arrays plus `meta`."""
  path = trial_dir(cache_dir, trial)
  out: dict[str, Any] = {
    name: np.load(os.path.join(path, name + ".npy")) for name in ARRAYS
  }
  out["meta"] = read_json(os.path.join(path, META))
  return out


def manifest_entry(meta: dict[str, Any]) -> dict[str, Any]:
  """The manifest's summary of a finished trial, from its meta.json."""
  keys = ("partition", "video", "fps", "n_frames", "n_valid_labels", "n_faces")
  return {k: meta[k] for k in keys}
