"""Windows over trials, and window outputs stitched back into trials.

Window rule of the reference (sucv/ABAW2 `base/dataset.py`): windows of
`window` frames start every `hop` frames while they end strictly before the
trial's end; one last window then ends exactly at the trial's end (start
`length - window`), so no window of a long trial needs padding. A trial of at
most `window` frames gets a single window starting at 0, zero-padded to
`window` frames by the pipeline.

Stitching averages, per frame, the outputs of all windows covering it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def window_starts(length: int, window: int, hop: int) -> np.ndarray:
  """Start frames of the windows of one trial.

  Args:
    length: trial length, frames (> 0).
    window: window length, frames (> 0).
    hop: frames between consecutive regular starts (0 < hop <= window).

  Returns:
    int64 `[n_windows]`, increasing; the last start is `max(length - window,
    0)`.

  Raises:
    ValueError: non-positive sizes, or hop > window (frames would be
      skipped).
  """
  length, window, hop = int(length), int(window), int(hop)
  if length <= 0 or window <= 0 or hop <= 0:
    raise ValueError(
      f"window_starts: length, window and hop must be > 0, "
      f"got {length}, {window}, {hop}"
    )
  if hop > window:
    raise ValueError(
      f"hop_length {hop} > window_length {window} would skip "
      f"frames between windows"
    )
  if length <= window:
    return np.zeros(1, np.int64)
  regular = np.arange(0, length - window, hop, dtype=np.int64)
  return np.append(regular, length - window)


def num_windows(length: int, window: int, hop: int) -> int:
  """Number of windows of a trial of `length` frames (see `window_starts`)."""
  return len(window_starts(length, window, hop))


def stitch_windows(
  preds: np.ndarray,
  trial: np.ndarray,
  frame_index: np.ndarray,
  trial_lengths: Sequence[int] | np.ndarray,
) -> list[np.ndarray]:
  """Per-trial series from window outputs, averaging overlapping windows.

  Args:
    preds: `[N, T, C]` window outputs (N windows of T frames, C channels).
    trial: int `[N]`, index of each window's trial; -1 marks padding rows.
    frame_index: int `[N, T]`, frame of the trial at each window position;
      -1 marks padding positions.
    trial_lengths: `[n_trials]` trial lengths, frames.

  Returns:
    One float64 `[L_i, C]` array per trial: the mean over the windows
    covering each frame.

  Raises:
    ValueError: shapes disagree, an index points outside its trial, or a
      frame of some trial is covered by no window.
  """
  preds = np.asarray(preds)
  trial = np.asarray(trial).astype(np.int64)
  frame_index = np.asarray(frame_index).astype(np.int64)
  lengths = np.asarray(trial_lengths, np.int64).reshape(-1)
  if (
    preds.ndim != 3
    or trial.shape != preds.shape[:1]
    or frame_index.shape != preds.shape[:2]
  ):
    raise ValueError(
      f"stitch_windows: expected preds [N, T, C], trial [N], frame_index "
      f"[N, T]; got {preds.shape}, {trial.shape}, {frame_index.shape}"
    )
  rows = np.broadcast_to(trial[:, None], frame_index.shape)
  real = (rows >= 0) & (frame_index >= 0)
  rows, frames, values = rows[real], frame_index[real], preds[real]
  if rows.size and rows.max() >= len(lengths):
    raise ValueError(
      f"stitch_windows: trial index {rows.max()} but only "
      f"{len(lengths)} trial lengths"
    )
  if rows.size and np.any(frames >= lengths[rows]):
    bad = np.flatnonzero(frames >= lengths[rows])[0]
    raise ValueError(
      f"stitch_windows: frame {frames[bad]} of trial {rows[bad]} is beyond "
      f"its length {lengths[rows[bad]]}"
    )
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  flat = offsets[rows] + frames
  n_channels = preds.shape[2]
  sums = np.zeros((offsets[-1], n_channels), np.float64)
  counts = np.zeros(offsets[-1], np.int64)
  np.add.at(sums, flat, values.astype(np.float64))
  np.add.at(counts, flat, 1)
  out = []
  for i, length in enumerate(lengths):
    c = counts[offsets[i] : offsets[i + 1]]
    if length and not c.all():
      raise ValueError(
        f"stitch_windows: trial {i}: {int((c == 0).sum())} of {length} "
        f"frames are covered by no window (first: frame "
        f"{int(np.flatnonzero(c == 0)[0])})"
      )
    out.append(sums[offsets[i] : offsets[i + 1]] / np.maximum(c, 1)[:, None])
  return out
