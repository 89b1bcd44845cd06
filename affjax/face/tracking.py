"""One face track per video from per-frame detections.

Steps (`track_faces`):

1. Selection: in each frame keep the detection that overlaps the track's
   last box most (IoU >= `iou_threshold`); if none does (first face, face
   lost, or a cut), the best-scoring detection. So a video with several
   people follows one face, the most confident one when the track starts.
2. Gap bridging: a run of at most `max_gap` frames without a selected box,
   between two boxes that overlap, is filled by linear interpolation of the
   box (Haar cascades miss single frames; the face did not vanish).
3. Isolated detections: runs of found frames shorter than `min_run` (after
   bridging) are dropped as false positives.
4. Smoothing: the box centre and size are averaged over `smooth` frames
   (centred, within each run), removing the detector's few-pixel jitter,
   which the training crops (from an offline aligner) do not have.

`track` also carries the selected detection's five landmarks through the
same steps (interpolated over bridged gaps, smoothed over the same window),
for the aligned crop; `track_faces` returns the boxes only.

Boxes are float `[T, 4]` (x0, y0, x1, y1); frames without a face have
`found = False` and a zero box.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from affjax.face.detector import Detections


@dataclasses.dataclass(frozen=True)
class TrackSettings:
  """Tracking settings (frames, not seconds: detection runs per frame).

  Attributes:
    iou_threshold: overlap with the previous box that continues the track.
    max_gap: longest run of missed frames bridged by interpolation.
    min_run: shortest run of found frames kept.
    smooth: centred moving-average length for box centre and size (1 = off).
  """

  iou_threshold: float = 0.3
  max_gap: int = 5
  min_run: int = 3
  smooth: int = 5

  def __post_init__(self):
    if self.max_gap < 0 or self.min_run < 1 or self.smooth < 1:
      raise ValueError(f"invalid track settings {self}")


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union of boxes `a [..., 4]` and `b [..., 4]`."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  w = np.clip(
    np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None
  )
  h = np.clip(
    np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None
  )
  inter = w * h
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def select_detections(
  detections: Sequence[Detections], iou_threshold: float
) -> np.ndarray:
  """Step 1: index of the selected detection per frame, int `[T]` (-1 none)."""
  picks = np.full(len(detections), -1, np.int64)
  last = None
  for t, det in enumerate(detections):
    if not len(det):
      continue
    pick = 0  # detections come best first
    if last is not None:
      overlaps = iou(np.asarray(det.boxes), last[None])
      if overlaps.max() >= iou_threshold:
        pick = int(np.argmax(overlaps))
    picks[t] = pick
    last = np.asarray(det.boxes[pick], np.float64)
  return picks


def select_boxes(
  detections: Sequence[Detections], iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
  """Step 1: one box per frame. Returns boxes `[T, 4]`, found `[T]`."""
  return _selected_boxes(
    detections, select_detections(detections, iou_threshold)
  )


def _selected_boxes(
  detections: Sequence[Detections], picks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  boxes = np.zeros((len(detections), 4), np.float64)
  for t in np.flatnonzero(picks >= 0):
    boxes[t] = detections[t].boxes[picks[t]]
  return boxes, picks >= 0


def select_landmarks(
  detections: Sequence[Detections], picks: np.ndarray
) -> np.ndarray:
  """The selected detections' landmarks, float `[T, 5, 2]`, NaN where none."""
  out = np.full((len(detections), 5, 2), np.nan)
  for t in np.flatnonzero(picks >= 0):
    marks = detections[t].landmarks
    if marks is not None and len(marks) > picks[t]:
      out[t] = marks[picks[t]]
  return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """[start, end) of each run of True in a bool `[T]` array."""
  padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
  edges = np.flatnonzero(np.diff(padded))
  return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def bridge_gaps(
  boxes: np.ndarray, found: np.ndarray, max_gap: int
) -> tuple[np.ndarray, np.ndarray]:
  """Step 2: interpolates gaps of <= max_gap frames between overlapping boxes."""
  boxes, found = boxes.copy(), found.copy()
  for start, end in _runs(~found):
    if start == 0 or end == len(found) or end - start > max_gap:
      continue
    a, b = boxes[start - 1], boxes[end]
    if iou(a, b) <= 0:
      continue  # the face jumped: not the same position, do not invent one
    w = (np.arange(start, end) - (start - 1))[:, None] / (end - start + 1)
    boxes[start:end] = (1 - w) * a + w * b
    found[start:end] = True
  return boxes, found


def drop_short_runs(
  boxes: np.ndarray, found: np.ndarray, min_run: int
) -> tuple[np.ndarray, np.ndarray]:
  """Step 3: removes runs of found frames shorter than `min_run`."""
  boxes, found = boxes.copy(), found.copy()
  for start, end in _runs(found):
    if end - start < min_run:
      found[start:end] = False
      boxes[start:end] = 0
  return boxes, found


def smooth_boxes(
  boxes: np.ndarray, found: np.ndarray, window: int
) -> np.ndarray:
  """Step 4: centred moving average of centre and size within each run.

  Near a run's ends the window shrinks symmetrically, so the first and last
  box of a run are kept as they are.
  """
  out = boxes.copy()
  if window <= 1:
    return out
  half = window // 2
  cx = (boxes[:, 0] + boxes[:, 2]) / 2
  cy = (boxes[:, 1] + boxes[:, 3]) / 2
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  params = np.stack([cx, cy, w, h], 1)
  for start, end in _runs(found):
    for t in range(start, end):
      k = min(half, t - start, end - 1 - t)
      m = params[t - k : t + k + 1].mean(0)
      out[t] = [
        m[0] - m[2] / 2,
        m[1] - m[3] / 2,
        m[0] + m[2] / 2,
        m[1] + m[3] / 2,
      ]
  return out


def bridge_landmarks(
  landmarks: np.ndarray, found: np.ndarray, bridged: np.ndarray
) -> np.ndarray:
  """Step 2 for landmarks: linear interpolation over the bridged frames.

  Args:
    landmarks: float `[T, 5, 2]`, NaN where the frame has none.
    found: bool `[T]`, frames with a detection before bridging.
    bridged: bool `[T]`, frames with a box after bridging.

  Returns:
    `[T, 5, 2]`; a bridged frame stays NaN if either end of its gap is.
  """
  out = landmarks.copy()
  for start, end in _runs(bridged & ~found):
    a, b = landmarks[start - 1], landmarks[end]
    w = (np.arange(start, end) - (start - 1)) / (end - start + 1)
    out[start:end] = (1 - w)[:, None, None] * a + w[:, None, None] * b
  return out


def smooth_landmarks(
  landmarks: np.ndarray, found: np.ndarray, window: int
) -> np.ndarray:
  """Step 4 for landmarks: centred moving average within each run.

  As `smooth_boxes` (the window shrinks symmetrically at a run's ends);
  frames without landmarks inside the window are left out of the mean.
  """
  out = landmarks.copy()
  if window <= 1:
    return out
  half = window // 2
  have = np.isfinite(landmarks).all(axis=(1, 2))
  for start, end in _runs(found):
    for t in range(start, end):
      if not have[t]:
        continue
      k = min(half, t - start, end - 1 - t)
      near = slice(t - k, t + k + 1)
      out[t] = landmarks[near][have[near]].mean(0)
  return out


@dataclasses.dataclass(frozen=True)
class Track:
  """One face per frame.

  Attributes:
    boxes: float32 `[T, 4]` (x0, y0, x1, y1), zeros where no face.
    found: bool `[T]`.
    landmarks: float32 `[T, 5, 2]` (x, y) in `Detections.landmarks`' order,
      NaN where no face or the detector gives none.
  """

  boxes: np.ndarray
  found: np.ndarray
  landmarks: np.ndarray


def track(
  detections: Sequence[Detections], settings: TrackSettings | None = None
) -> Track:
  """Per-frame detections -> one smoothed face box and landmarks per frame.

  Steps 1-4 of the module docstring; landmarks follow the selected box, are
  interpolated over bridged gaps and smoothed like the boxes.
  """
  s = settings or TrackSettings()
  picks = select_detections(detections, s.iou_threshold)
  boxes, found = _selected_boxes(detections, picks)
  landmarks = select_landmarks(detections, picks)
  boxes, bridged = bridge_gaps(boxes, found, s.max_gap)
  landmarks = bridge_landmarks(landmarks, found, bridged)
  boxes, kept = drop_short_runs(boxes, bridged, s.min_run)
  boxes = smooth_boxes(boxes, kept, s.smooth)
  landmarks = smooth_landmarks(landmarks, kept, s.smooth)
  boxes[~kept] = 0
  landmarks[~kept] = np.nan
  return Track(boxes.astype(np.float32), kept, landmarks.astype(np.float32))


def track_faces(
  detections: Sequence[Detections], settings: TrackSettings | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Per-frame detections -> one smoothed face box per frame.

  Args:
    detections: one `Detections` per video frame.
    settings: see `TrackSettings`.

  Returns:
    boxes float32 `[T, 4]` (x0, y0, x1, y1; zeros where no face) and found
    bool `[T]`.
  """
  result = track(detections, settings)
  return result.boxes, result.found
