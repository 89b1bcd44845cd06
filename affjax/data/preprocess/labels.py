"""Aff-Wild2 valence/arousal annotation files: parsing, checking, alignment.

An annotation file has the header `valence,arousal` and one row per video
frame; `-5` marks a frame that was not annotated. Aligning the rows to the
video tolerates a small count mismatch: Aff-Wild2 annotation files are
sometimes a frame or two longer (or shorter) than the video as decoded
(container frame counts are rounded), which the reference silently absorbed
by trusting the annotation length. Here at most `tolerance` frames of
difference are accepted: surplus rows at the end are dropped, missing rows at
the end become -5 (invalid). A larger difference means the file belongs to
another video or is truncated, and raises.
"""

import numpy as np

INVALID = -5.0
HEADER = ("valence", "arousal")


def read_annotation(path: str) -> np.ndarray:
  """Reads and checks one annotation file.

  Args:
    path: a `valence,arousal` text file.

  Returns:
    `[n_rows, 2]` float32 (valence, arousal); -5 where not annotated.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: missing/wrong header, a row without exactly two numeric
      values, or a value outside [-1, 1] other than -5; the message names
      the file and the line.
  """
  with open(path) as f:
    lines = f.read().splitlines()
  header = (
    tuple(c.strip().lower() for c in lines[0].split(",")) if lines else ()
  )
  if header != HEADER:
    found = repr(lines[0]) if lines else "an empty file"
    raise ValueError(
      f"{path}: expected the header 'valence,arousal' on line 1, found {found}"
    )
  rows = []
  for number, line in enumerate(lines[1:], start=2):
    if not line.strip():
      if any(rest.strip() for rest in lines[number - 1 :]):
        raise ValueError(f"{path}: line {number} is empty")
      break  # trailing blank lines
    cells = line.split(",")
    if len(cells) != 2:
      raise ValueError(
        f"{path}: line {number} has {len(cells)} columns, expected 2 "
        f"(valence,arousal): {line!r}"
      )
    try:
      values = [float(c) for c in cells]
    except ValueError:
      raise ValueError(
        f"{path}: line {number} is not numeric: {line!r}"
      ) from None
    for v in values:
      if not (v == INVALID or -1.0 <= v <= 1.0):
        raise ValueError(
          f"{path}: line {number} has {v}, expected a value in [-1, 1] or "
          f"{INVALID:g} (not annotated)"
        )
    rows.append(values)
  return np.asarray(rows, np.float32).reshape(-1, 2)


def align_labels(
  labels: np.ndarray, n_frames: int, tolerance: int, path: str
) -> np.ndarray:
  """Aligns annotation rows to the video's frames.

  Args:
    labels: `[n_rows, 2]` from `read_annotation`.
    n_frames: number of frames of the video.
    tolerance: largest accepted |n_rows - n_frames|.
    path: annotation file, named in the error.

  Returns:
    `[n_frames, 2]` float32; rows beyond the annotation are -5.

  Raises:
    ValueError: the row count differs from the frame count by more than
      `tolerance`.
  """
  n_rows = labels.shape[0]
  if abs(n_rows - n_frames) > tolerance:
    raise ValueError(
      f"{path}: {n_rows} annotation rows cannot be aligned to the video's "
      f"{n_frames} frames (difference {n_rows - n_frames}, tolerance "
      f"{tolerance} frames)"
    )
  out = np.full((n_frames, 2), INVALID, np.float32)
  keep = min(n_rows, n_frames)
  out[:keep] = labels[:keep]
  return out


def valid_mask(labels: np.ndarray) -> np.ndarray:
  """`[T]` bool: True where neither valence nor arousal is -5."""
  return np.all(labels != INVALID, axis=-1)
