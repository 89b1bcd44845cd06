"""Merge fold predictions into ABAW2 valence-arousal submission files.

Input: several prediction directories, each holding `<trial>.txt` files as
written by `affjax.evaluate` (header = emotion names, one row per frame).
A directory may hold all emotions (one two-head run per fold) or only some
(the paper trains one emotion per run, so e.g. 6 valence and 6 arousal
directories); header names are matched case-insensitively, so the
reference's own per-emotion outputs (header `Valence`) are accepted too.
For each trial and emotion, the series of every directory that has that
emotion are merged with `affjax.ensemble.ccc_centering` (float64, on the
host CPU whatever the default device) and then
clipped to [-1, 1], as the reference's script/generate_test_result.py does.

Output: one `<trial>.txt` per trial in `out_dir`, header
`valence,arousal` (the requested emotions, in order), one row per frame:
the ABAW2 VA-track submission format. The file name is the trial name,
which keeps the `_left`/`_right` suffix of two-subject videos, as the
challenge's test list does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from affjax import ensemble, evaluate, io

PathLike = str | os.PathLike


def _list_trials(pred_dir: str) -> set[str]:
  if not io.isdir(pred_dir):
    raise FileNotFoundError(f"prediction directory {pred_dir} does not exist")
  trials = {
    f[:-4]
    for f in io.listdir(pred_dir)
    if f.endswith(".txt") and not f.startswith(".")
  }
  if not trials:
    raise ValueError(
      f"prediction directory {pred_dir} has no <trial>.txt files"
    )
  return trials


def _check_trial_sets(
  dirs: Sequence[str], trials: Sequence[str] | None
) -> list[str]:
  """Returns the sorted trials to merge; raises naming the odd directory."""
  sets = [_list_trials(d) for d in dirs]
  if trials is not None:
    wanted = set(trials)
    for d, s in zip(dirs, sets):
      missing = sorted(wanted - s)
      if missing:
        raise ValueError(
          f"{d}: missing predictions for {len(missing)} "
          f"trial(s): {missing[:10]}"
        )
    return sorted(wanted)
  for d, s in zip(dirs[1:], sets[1:]):
    if s != sets[0]:
      raise ValueError(
        f"trial sets differ between {dirs[0]} and {d}: only in the first "
        f"{sorted(sets[0] - s)[:10]}, only in the second "
        f"{sorted(s - sets[0])[:10]}"
      )
  return sorted(sets[0])


def _gather(
  dirs: Sequence[str], trial: str, emotions: Sequence[str]
) -> np.ndarray:
  """Stacks the folds' series of one trial: float64 `[n_folds, L, E]`."""
  per_emotion: dict[str, list[np.ndarray]] = {e: [] for e in emotions}
  length, first = None, None
  for d in dirs:
    path = io.join(d, f"{trial}.txt")
    names, data = evaluate.read_prediction_file(path)
    if length is None:
      length, first = data.shape[0], path
    elif data.shape[0] != length:
      raise ValueError(
        f"length mismatch for trial {trial!r}: {first} has "
        f"{length} frames, {path} has {data.shape[0]}"
      )
    for e in emotions:
      if e in names:
        per_emotion[e].append(data[:, names.index(e)])
  counts = {e: len(v) for e, v in per_emotion.items()}
  if min(counts.values()) == 0 or len(set(counts.values())) != 1:
    raise ValueError(
      f"trial {trial!r}: every emotion needs the same number (>0) of fold "
      f"predictions, found {counts} across {len(dirs)} directories"
    )
  if length < 2 and counts[emotions[0]] > 1:
    raise ValueError(
      f"trial {trial!r}: {first} has {length} frame(s); CCC "
      f"centering needs at least 2"
    )
  return np.stack([np.stack(per_emotion[e]) for e in emotions], axis=-1)


def merge_folds(
  pred_dirs: Sequence[PathLike],
  out_dir: PathLike,
  emotions: Sequence[str] = ("valence", "arousal"),
  *,
  trials: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
  """Merges fold predictions per trial and writes submission files.

  Args:
    pred_dirs: directories of `<trial>.txt` prediction files (the
      `predictions/` folders of each fold's evaluation).
    out_dir: where to write `<trial>.txt` submission files (created).
    emotions: emotions to merge and write, in column order; the ABAW2 VA
      submission needs `("valence", "arousal")`.
    trials: optional list of trials to merge (e.g. the challenge test list);
      each directory must contain them and other files are ignored. Without
      it, every directory must contain exactly the same trials.

  Returns:
    `{trial: float64 [L, len(emotions)]}` merged, clipped predictions.

  Raises:
    FileNotFoundError: a directory or file is missing.
    ValueError: trial sets or lengths differ, an emotion is missing or
      unevenly covered, or a file holds NaN/unparsable values; the message
      names the file or directory.
  """
  dirs = [os.fspath(d) for d in pred_dirs]
  if not dirs:
    raise ValueError("merge_folds: no prediction directories given")
  emotions = [e.lower() for e in emotions]
  out_dir = os.fspath(out_dir)
  merged = {}
  for trial in _check_trial_sets(dirs, trials):
    stacked = _gather(dirs, trial, emotions)
    # Float64 as in the reference (its 1e-100 stabiliser needs it), on the
    # host's CPU: the default device may be a TPU, which has no float64.
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
      merged[trial] = np.asarray(ensemble.merge_folds(stacked), np.float64)
  # Write only after every trial merged, so a bad input leaves no partial
  # submission behind.
  for trial, series in merged.items():
    evaluate.write_prediction_file(
      io.join(out_dir, f"{trial}.txt"), series, emotions
    )
  return merged
